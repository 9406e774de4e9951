"""Ray start-up and worker groups: data-parallel actors of one role, fed shards of a batch."""

from posttrain.cluster.ray_cluster import (
    SharedBundles,
    WorkerDiedError,
    WorkerGroup,
    alive_nodes,
    cluster_name,
    free_tcp_address,
    init_ray,
    shard,
)

__all__ = ["SharedBundles", "WorkerDiedError", "WorkerGroup", "alive_nodes", "cluster_name", "free_tcp_address", "init_ray", "shard"]
