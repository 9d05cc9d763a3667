"""How many threads a one-token step runs on: all of torch's, or half, whichever recent steps ran faster.

A one-token step reads every weight once, and one core alone reads nearly as fast as two, so a second thread adds
little on a quiet machine. When another process holds a core, every product of the step waits at its end for the
thread that shares that core: two threads then run several times slower than one (measured here: 420 ms a step
with one thread against 1.8-2.8 s with two, on a 2-core machine with other work). The count is not guessed from the
load: each batch size keeps a moving average of its step times at each count, runs the faster one, and tries the
other every PROBE_EVERY steps, so the choice follows the machine as it gets busy or quiet.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch

PROBE_EVERY = 32  # steps between tries of the count not in use (a try costs at most one slower step in 32)
WEIGHT = 0.3      # weight of the newest step time in the average of the count in use


class StepThreads:
    """Picks the thread count of each one-token step (see the module's docstring)."""

    def __init__(self) -> None:
        self.most = torch.get_num_threads()  # the count asked for (torch.set_num_threads, --threads)
        self.set = self.most                 # what this object last set, to notice the caller changing it
        self.seconds: dict[tuple[int, int], float] = {}  # (batch, threads) -> moving average seconds per step
        self.steps: dict[int, int] = {}
        self.samples: dict[tuple[int, int], int] = {}

    def counts(self) -> tuple[int, ...]:
        return (self.most, self.most // 2) if self.most > 1 else (1,)

    def pick(self, batch: int) -> tuple[int, bool]:
        """This step's count: the one with the lower average, or, every PROBE_EVERY steps, the other one (a try)."""
        counts = self.counts()
        step = self.steps[batch] = self.steps.get(batch, 0) + 1
        untimed = [n for n in counts if self.samples.get((batch, n), 0) < 2]  # the first step was a warm-up
        if untimed:
            return untimed[0], False
        best = min(counts, key=lambda n: self.seconds[batch, n])
        if len(counts) > 1 and step % PROBE_EVERY == 0:
            return next(n for n in counts if n != best), True
        return best, False

    @contextmanager
    def chosen(self, batch: int) -> Iterator[None]:
        """Run the step inside at the picked count, time it, and give torch back the count asked for."""
        current = torch.get_num_threads()
        if current != self.set:  # the caller set another count since: that is the one asked for now
            self.most = self.set = current
            self.seconds.clear()
            self.samples.clear()
        n, trying = self.pick(batch)
        torch.set_num_threads(n)
        start = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            torch.set_num_threads(self.most)
            seen = self.samples[batch, n] = self.samples.get((batch, n), 0) + 1
            # a try replaces what the count's average knew (it is old news of another machine state); so does the
            # second step at a count, the first having paid its warm-up (allocations). A lucky try costs little:
            # the count it puts in use is timed at every step after it.
            old = spent if trying or seen <= 2 else self.seconds[batch, n]
            self.seconds[batch, n] = (1 - WEIGHT) * old + WEIGHT * spent
