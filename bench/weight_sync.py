"""One weight sync, policy actor -> generation actor(s), through Ray's object store, the collective
path and the colocated (ipc) path, side by side in one run, on a locally built model.

    python -m bench.weight_sync [--size 0.5b] [--precision bfloat16] [--generators 1] [--repeats 3]

All transports serve the same actors (one policy worker, `--generators` Hugging Face generation
workers, all on this machine as colocated ones would be) and take turns, so the machine's load
falls on all alike. For each sync it prints the seconds, the bytes each generator received, and
how far the driver's and each actor's resident memory rose above where it stood before the sync
(its peak, from /proc, so Linux only): the object-store path copies the whole model on the
policy's side and again on each generator's; the collective path holds one bucket at a time, as
does ipc, whose buckets are shared-memory files both sides map (counted in each one's RSS once
touched).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import ray

from bench.common import machine_info, print_machine_info
from posttrain.cluster import WorkerGroup, init_ray
from posttrain.config import ClusterConfig, GenerationConfig, PolicyConfig
from posttrain.demo.tiny_model import save_tiny_model
from posttrain.rollout.hf import HFGenerationBackend
from posttrain.rollout.weight_sync import WeightSync
from posttrain.train.policy_group import PolicyGroup

TRANSPORTS = ("object_store", "collective", "ipc")


def _pid(actor) -> int:
    return os.getpid()


def _reset_peak(pid: int) -> int:
    """Resets the process's peak resident memory to its current value (Linux), which it returns in bytes."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _status_kb(pid, "VmRSS") * 1024


def _peak(pid: int) -> int:
    return _status_kb(pid, "VmHWM") * 1024


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Prints the comparison and returns each transport's medians."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="0.5b", help="tiny model size: test, demo, small or 0.5b")
    parser.add_argument("--precision", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--generators", type=int, default=1)
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)

    print_machine_info(machine_info())
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="posttrain-bench-sync-"))
    model_dir = save_tiny_model(workdir / f"model-{args.size}", size=args.size)
    cfg = PolicyConfig(model_name=str(model_dir), device="cpu", precision=args.precision,
                       generation=GenerationConfig(num_workers=args.generators))
    started_ray = not ray.is_initialized()
    init_ray(ClusterConfig())
    policy = PolicyGroup(cfg, ClusterConfig(), total_steps=1, seed=0)
    generators = WorkerGroup(HFGenerationBackend, args.generators, name="generation", args=(cfg,))
    try:
        syncs = {transport: WeightSync(policy, generators, transport, args.bucket_mb,
                                       colocated_ranks=[0] * args.generators) for transport in TRANSPORTS}
        processes = {"driver": os.getpid(), "policy": policy.workers.call_all("__ray_call__", _pid)[0],
                     **{f"generator {i}": pid for i, pid in enumerate(generators.call_all("__ray_call__", _pid))}}
        results: dict[str, list[dict[str, float]]] = {transport: [] for transport in TRANSPORTS}
        for repeat in range(args.repeats):
            for transport in TRANSPORTS[repeat % 3:] + TRANSPORTS[:repeat % 3]:  # each one first in turn
                before = {name: _reset_peak(pid) for name, pid in processes.items()}
                out = syncs[transport].sync()
                rises = {f"{name} +RSS GB": (_peak(pid) - before[name]) / 1e9 for name, pid in processes.items()}
                results[transport].append({"seconds": out["time/weight_sync_s"],
                                           "GB per generator": out["weight_sync/bytes"] / 1e9, **rises})
        print(f"\nOne weight sync, {args.size} model ({policy.num_parameters / 1e9:.2f}B parameters, {args.precision}), "
              f"{args.generators} generator(s), median of {args.repeats}")
        columns = list(results[TRANSPORTS[0]][0])
        print(f"{'transport':<14}" + "".join(f"{c:>20}" for c in columns))
        medians = {t: {c: statistics.median(r[c] for r in results[t]) for c in columns} for t in TRANSPORTS}
        for transport in TRANSPORTS:
            print(f"{transport:<14}" + "".join(f"{medians[transport][c]:>20.3f}" for c in columns))
        print()
        for transport in TRANSPORTS[1:]:
            speedup = medians["object_store"]["seconds"] / medians[transport]["seconds"]
            print(f"{transport} is {speedup:.1f}x faster than the object store")
        return medians
    finally:
        generators.shutdown()
        policy.close()
        if started_ray:
            ray.shutdown()


if __name__ == "__main__":
    main()
