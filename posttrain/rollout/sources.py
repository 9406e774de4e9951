"""Where each GRPO step's rollout comes from: collected when the step asks for it (synchronous
GRPO), or collected one step ahead while the policy trains (`grpo.async_grpo.enabled`)."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

from posttrain.rollout.collect import Rollout, RolloutCollector


class RolloutSource:
    """Synchronous: each step's rollout is sampled with the weights of the step's start."""

    def __init__(self, collector: RolloutCollector):
        self.collector = collector

    def next(self, step: int, another_follows: bool) -> Rollout:
        """Step `step`'s rollout; `another_follows` says whether step `step + 1` will ask too."""
        return self.collector.collect(step)

    def settle(self, timings: dict[str, float]) -> None:
        """Called before the generators' weights change (and before validation uses them)."""

    def close(self) -> None:
        """Stop collecting."""


class AheadRolloutSource(RolloutSource):
    """Asynchronous: while step s trains, step s + 1's rollout is collected in a driver thread (the
    actors do the work) with the weights the generators hold, those of step s - 1's update; each
    step thus trains on responses one step stale. The first step (also after a resume) collects
    its own."""

    def __init__(self, collector: RolloutCollector):
        super().__init__(collector)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout")
        self._ahead: Future[Rollout] | None = None

    def next(self, step: int, another_follows: bool) -> Rollout:
        current = self._ahead.result() if self._ahead is not None else self.collector.collect(step)
        self._ahead = self._pool.submit(self.collector.collect, step + 1) if another_follows else None
        return current

    def settle(self, timings: dict[str, float]) -> None:
        """Waits for the rollout in flight: it must end with the weights it began with."""
        if self._ahead is not None:
            start = time.perf_counter()
            self._ahead.exception()
            timings["time/rollout_wait_s"] = time.perf_counter() - start

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


def make_rollout_source(collector: RolloutCollector, asynchronous: bool) -> RolloutSource:
    return AheadRolloutSource(collector) if asynchronous else RolloutSource(collector)
