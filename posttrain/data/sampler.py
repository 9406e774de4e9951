"""Deterministic, resumable order of training rows.

The permutation of epoch e is drawn from `seed + e`, so the position (epoch, index) is all a
checkpoint must store to continue with exactly the rows an uninterrupted run would see.
"""

from __future__ import annotations

import random

from posttrain.data.sources import DataError


class EpochSampler:
    def __init__(self, num_rows: int, batch_size: int, seed: int, shuffle: bool = True):
        if num_rows < batch_size:
            raise DataError(f"the training set has {num_rows} rows, fewer than one global batch of {batch_size} "
                            "(policy.train_global_batch_size)")
        self.num_rows, self.batch_size, self.seed, self.shuffle = num_rows, batch_size, seed, shuffle
        self.epoch, self.position = 0, 0
        self._cached: tuple[int, list[int]] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self.num_rows // self.batch_size  # the incomplete last batch is left for the next epoch's order

    def _order(self, epoch: int) -> list[int]:
        if self._cached is None or self._cached[0] != epoch:
            order = list(range(self.num_rows))
            if self.shuffle:
                random.Random(self.seed + epoch).shuffle(order)
            self._cached = (epoch, order)
        return self._cached[1]

    def next_batch(self) -> list[int]:
        if self.position + self.batch_size > self.num_rows:
            self.epoch, self.position = self.epoch + 1, 0
        batch = self._order(self.epoch)[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "num_rows": self.num_rows,
                "batch_size": self.batch_size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("num_rows", "batch_size", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume the data order: checkpoint has {key}={state[key]}, "
                                 f"this run has {getattr(self, key)}")
        self.epoch, self.position = state["epoch"], state["position"]


def plan_steps(sampler: EpochSampler, max_num_steps: int, max_num_epochs: int, section: str) -> tuple[int, str]:
    """The run's step count, the lesser of `max_num_steps` and `max_num_epochs` epochs, and, when
    the epochs cut the steps asked for, a note for the start-up line that says so (else "")."""
    per_epoch = sampler.batches_per_epoch
    total = min(max_num_steps, max_num_epochs * per_epoch)
    if total == max_num_steps:
        return total, ""
    epochs = f"{max_num_epochs} epoch{'s' if max_num_epochs > 1 else ''}"
    return total, (f" ({max_num_steps} steps requested; {epochs} of this data "
                   f"{'is' if max_num_epochs == 1 else 'are'} {total} steps: raise {section}.max_num_epochs "
                   "to train longer)")
