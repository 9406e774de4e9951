"""EpochSampler: each row once per epoch, and an exact resume from a checkpointed position."""

import pytest

from posttrain.data.sampler import EpochSampler, plan_steps
from posttrain.data.sources import DataError


def take(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def test_each_row_once_per_epoch():
    sampler = EpochSampler(num_rows=12, batch_size=4, seed=0)
    assert sampler.batches_per_epoch == 3
    for epoch in range(3):
        batches = take(sampler, 3)
        assert all(len(b) == 4 for b in batches)
        assert sorted(i for b in batches for i in b) == list(range(12))
        assert sampler.epoch == epoch


def test_epochs_reshuffle_differently():
    sampler = EpochSampler(num_rows=32, batch_size=8, seed=1)
    epoch0 = [i for b in take(sampler, 4) for i in b]
    epoch1 = [i for b in take(sampler, 4) for i in b]
    assert epoch0 != list(range(32))
    assert epoch0 != epoch1
    assert sorted(epoch0) == sorted(epoch1) == list(range(32))


def test_order_depends_on_seed_only():
    a = take(EpochSampler(32, 8, seed=5), 8)
    b = take(EpochSampler(32, 8, seed=5), 8)
    c = take(EpochSampler(32, 8, seed=6), 8)
    assert a == b
    assert a != c


def test_incomplete_last_batch_is_dropped():
    sampler = EpochSampler(num_rows=10, batch_size=4, seed=0)
    assert sampler.batches_per_epoch == 2
    first = take(sampler, 2)
    third = sampler.next_batch()  # starts epoch 1 rather than returning a batch of 2
    assert len(third) == 4 and sampler.epoch == 1
    assert len(set(first[0] + first[1])) == 8


@pytest.mark.parametrize("consumed", [0, 1, 3, 4, 7])  # includes the epoch boundaries
def test_resume_gives_identical_batches(consumed):
    reference = EpochSampler(num_rows=16, batch_size=4, seed=3)
    take(reference, consumed)
    state = reference.state_dict()
    expected = take(reference, 6)

    resumed = EpochSampler(num_rows=16, batch_size=4, seed=3)
    resumed.load_state_dict(dict(state))
    assert take(resumed, 6) == expected


@pytest.mark.parametrize(("key", "kwargs"), [
    ("num_rows", dict(num_rows=20, batch_size=4, seed=3)),
    ("batch_size", dict(num_rows=16, batch_size=8, seed=3)),
    ("seed", dict(num_rows=16, batch_size=4, seed=4)),
])
def test_load_mismatch_raises(key, kwargs):
    state = EpochSampler(num_rows=16, batch_size=4, seed=3).state_dict()
    with pytest.raises(ValueError, match=rf"checkpoint has {key}="):
        EpochSampler(**kwargs).load_state_dict(state)


def test_too_few_rows_raises():
    with pytest.raises(DataError, match=r"has 3 rows, fewer than one global batch of 4 \(policy.train_global_batch_size\)"):
        EpochSampler(num_rows=3, batch_size=4, seed=0)


def test_no_shuffle_is_in_order():
    sampler = EpochSampler(num_rows=6, batch_size=2, seed=0, shuffle=False)
    assert take(sampler, 4) == [[0, 1], [2, 3], [4, 5], [0, 1]]


def test_plan_steps_says_when_the_epochs_cut_the_steps_asked_for():
    sampler = EpochSampler(num_rows=70, batch_size=1, seed=0)  # 70 steps an epoch
    assert plan_steps(sampler, 50, 1, "sft") == (50, "")
    total, note = plan_steps(sampler, 350, 1, "sft")
    assert total == 70
    assert note == " (350 steps requested; 1 epoch of this data is 70 steps: raise sft.max_num_epochs to train longer)"
    assert plan_steps(sampler, 350, 2, "grpo")[1] == (" (350 steps requested; 2 epochs of this data are 140 steps: "
                                                      "raise grpo.max_num_epochs to train longer)")
