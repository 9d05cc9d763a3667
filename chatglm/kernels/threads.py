"""How many threads a one-token step runs on: all of torch's, or half, whichever recent steps ran faster.

Each product of a step is split evenly over the threads and ends when its slowest thread does. When another
process holds a core, the thread sharing that core sets the pace of every product, and two threads run slower than
one (measured here, 6B q4_0 on 2 cores: 105 ms a step with two threads on a quiet machine; with a CPU-bound process
pinned to one core, 300 ms with two against 195 ms with one; with a busier machine 0.9-2.8 s against 0.42 s).
The count is not guessed from the load: each batch size keeps a moving average of its step times at each count and
runs the faster one. The count in use is timed at every step, so a machine getting busy shows at once; the other
count's average is refreshed by a try every PROBE_EVERY steps while on fewer threads (to notice the machine
getting quiet), and only every QUIET_PROBE_EVERY steps while on all of them (a try at fewer threads costs most of a
step on a quiet machine). The first try waits for a sign that a core was taken: steps on all threads that kept
them busy less than HELD_OFF of the time (process CPU time over wall time; 1.93-2.03 cores of 2 at every quiet
6B step here, 1.18-1.51 beside a CPU-bound process), so a quiet machine never pays for it in a short reply.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Iterator

import torch

FIRST_TRY = 8            # the step that first tries fewer threads (the first steps warm the model up)
PROBE_EVERY = 32         # steps between tries of all threads while running on fewer
QUIET_PROBE_EVERY = 256  # steps between tries of fewer threads while running on all
WEIGHT = 0.3             # weight of the newest step time in the average of the count in use
HELD_OFF = 0.8           # below this share of their cores in use, the steps on all threads had a core taken


class StepThreads:
    """Picks the thread count of each one-token step (see the module's docstring)."""

    def __init__(self) -> None:
        self.most = torch.get_num_threads()  # the count asked for (torch.set_num_threads, --threads)
        self.seconds: dict[tuple[int, int], float] = {}  # (batch, threads) -> moving average seconds per step
        self.steps: dict[int, int] = {}
        self.use: dict[int, float] = {}  # batch -> moving average of the cores busy during its steps on all threads

    def counts(self) -> tuple[int, ...]:
        return (self.most, self.most // 2) if self.most > 1 else (1,)

    def pick(self, batch: int) -> tuple[int, bool]:
        """This step's count: the one with the lower average (all threads until fewer have been tried: first from
        step FIRST_TRY on, when the model is warm, once the steps show a core taken), or now and then the other one (a
        try)."""
        counts = self.counts()
        step = self.steps[batch] = self.steps.get(batch, 0) + 1
        if len(counts) == 1:
            return counts[0], False
        average = {n: self.seconds.get((batch, n), math.inf) for n in counts}
        best = min(counts, key=average.__getitem__)  # all threads first on a tie
        other = next(n for n in counts if n != best)
        period = QUIET_PROBE_EVERY if best == self.most else PROBE_EVERY
        first = average[other] == math.inf and step >= FIRST_TRY and self.use.get(batch, 0.0) < HELD_OFF * self.most
        if first or step % period == 0:
            return other, True
        return best, False

    @contextmanager
    def chosen(self, batch: int) -> Iterator[None]:
        """Run the step inside at the picked count, time it, and give torch back the count asked for."""
        current = torch.get_num_threads()
        if current != self.most:  # after each step torch is given `most` back: the caller has set another count
            self.most = current
            self.seconds.clear()
            self.steps.clear()
            self.use.clear()
        n, trying = self.pick(batch)
        torch.set_num_threads(n)
        start, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            spent, busy = time.perf_counter() - start, time.process_time() - cpu
            torch.set_num_threads(self.most)
            # a batch size's first step warms up (allocations) and says nothing of the machine; a try replaces what
            # the count's average knew (old news of another machine state); a lucky try costs little: the count it
            # puts in use is timed at every step after it
            if self.steps[batch] > 1:
                old = spent if trying else self.seconds.get((batch, n), spent)
                self.seconds[batch, n] = (1 - WEIGHT) * old + WEIGHT * spent
                if n == self.most and spent > 0:
                    cores = busy / spent
                    self.use[batch] = (1 - WEIGHT) * self.use.get(batch, cores) + WEIGHT * cores
