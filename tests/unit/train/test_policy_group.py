"""How a PolicyGroup deals a step's micro-batches to its FSDP2 ranks (the Ray round trip is covered
by the SFT and RM end-to-end tests)."""

from types import SimpleNamespace

from posttrain.train.policy_group import PolicyGroup, _add_ranks


def _group(num_workers: int) -> PolicyGroup:
    group = PolicyGroup.__new__(PolicyGroup)
    group.workers = SimpleNamespace(num_workers=num_workers)
    return group


def test_micro_batches_are_dealt_round_robin_and_short_ranks_get_fillers():
    batches = [{"id": i} for i in range(5)]
    dealt = _group(2)._deal(batches)
    assert dealt == [([{"id": 0}, {"id": 2}, {"id": 4}], 3), ([{"id": 1}, {"id": 3}, {"id": 0}], 2)]


def test_a_rank_without_micro_batches_runs_only_a_filler():
    assert _group(3)._deal([{"id": 0}, {"id": 1}]) == [([{"id": 0}], 1), ([{"id": 1}], 1), ([{"id": 0}], 0)]


def test_rank_metrics_add_up_and_maxima_stay_maxima():
    assert _add_ranks([{"a": 1.0, "b": 2.0}, {"a": 0.5}, {}]) == {"a": 1.5, "b": 2.0}
    assert _add_ranks([{"a": 1.0, "gap_max": 0.25}, {"a": 2.0, "gap_max": 0.5}, {"gap_max": 0.125}]) == {
        "a": 3.0, "gap_max": 0.5}
