"""The thread count of one-token steps follows which count ran them faster (simulated clocks: no timing here)."""
from __future__ import annotations

import pytest
import torch

from chatglm.kernels import threads
from chatglm.kernels.threads import FIRST_TRY, PROBE_EVERY, QUIET_PROBE_EVERY, StepThreads


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def clocks(monkeypatch) -> list[float]:
    """Simulated [wall, process CPU] clocks for the chooser's timing."""
    clock = [0.0, 0.0]
    monkeypatch.setattr(threads.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(threads.time, "process_time", lambda: clock[1])
    return clock


def tick(clock: list[float], seconds: float, n: int, taken: bool) -> None:
    """A step of `seconds` at n threads: they are busy all the time, or 60% of it where another process took a core."""
    clock[0] += seconds
    clock[1] += seconds * n * (0.6 if taken else 1.0)


def run_steps(chooser: StepThreads, monkeypatch, seconds_at: dict[int, float], steps: int, batch: int = 1,
              taken: bool | None = None) -> list[int]:
    """Steps through the chooser where a step at n threads takes seconds_at[n]; the counts used. A core is taken
    (unless told) where fewer threads run faster: that is what makes them faster."""
    clock = clocks(monkeypatch)
    if taken is None:
        taken = seconds_at[max(seconds_at)] > seconds_at[min(seconds_at)]
    used = []
    for _ in range(steps):
        with chooser.chosen(batch):
            n = torch.get_num_threads()
            used.append(n)
            tick(clock, seconds_at[n], n, taken)
        assert torch.get_num_threads() == chooser.most  # torch gets back the count asked for after every step
    return used


def test_a_busy_core_moves_steps_to_one_thread_and_a_quiet_one_back(monkeypatch, two_threads):
    chooser = StepThreads()
    assert chooser.counts() == (2, 1)
    busy = run_steps(chooser, monkeypatch, {2: 1.5, 1: 0.42}, 100)
    assert busy[:FIRST_TRY] == [2] * (FIRST_TRY - 1) + [1]  # one thread is first tried once the model is warm
    assert busy[FIRST_TRY:].count(2) == 100 // PROBE_EVERY  # then two threads only as a try now and then
    quiet = run_steps(chooser, monkeypatch, {2: 0.10, 1: 0.19}, 2 * PROBE_EVERY)
    assert quiet[-PROBE_EVERY:] == [2] * PROBE_EVERY  # back on two at the first try, and one thread is tried rarely
    assert 1 in run_steps(chooser, monkeypatch, {2: 0.10, 1: 0.19}, QUIET_PROBE_EVERY)


def test_a_quiet_machine_never_pays_for_a_try_in_a_short_reply(monkeypatch, two_threads):
    """Steps that keep both threads busy show no core taken: fewer threads are tried only every QUIET_PROBE_EVERY."""
    used = run_steps(StepThreads(), monkeypatch, {2: 0.10, 1: 0.19}, QUIET_PROBE_EVERY)
    assert used == [2] * (QUIET_PROBE_EVERY - 1) + [1]


def test_a_machine_getting_busy_moves_to_one_thread_without_waiting_for_a_try(monkeypatch, two_threads):
    """The count in use is timed at every step, its time and the cores it kept busy: a machine getting busy shows
    within a few steps, and the steps move."""
    chooser = StepThreads()
    run_steps(chooser, monkeypatch, {2: 0.10, 1: 0.19}, PROBE_EVERY + 8)
    busy = run_steps(chooser, monkeypatch, {2: 0.30, 1: 0.195}, 10)
    assert busy[:2] == [2, 2] and busy[4:] == [1] * 6
    chooser = StepThreads()  # and once one thread has been tried, by its time alone
    run_steps(chooser, monkeypatch, {2: 0.10, 1: 0.19}, PROBE_EVERY + 8, taken=True)
    busy = run_steps(chooser, monkeypatch, {2: 0.30, 1: 0.195}, 10)
    assert busy[:2] == [2, 2] and busy[4:] == [1] * 6


def test_a_warm_up_step_does_not_count(monkeypatch, two_threads):
    """The first step (allocations) is slow and not counted; one thread is first tried FIRST_TRY steps later (a core
    taken, but two threads still faster)."""
    chooser = StepThreads()
    clock = clocks(monkeypatch)
    used = []
    for i in range(3 * PROBE_EVERY):
        with chooser.chosen(1):
            used.append(torch.get_num_threads())
            tick(clock, (5.0 if i == 0 else 0.10) if used[-1] == 2 else 0.12, used[-1], True)
    assert used.count(1) == 1 and chooser.seconds[1, 2] == pytest.approx(0.10, rel=1e-3)


def test_each_batch_size_keeps_its_own_times_and_a_new_count_resets_them(monkeypatch, two_threads):
    chooser = StepThreads()
    run_steps(chooser, monkeypatch, {2: 1.0, 1: 0.5}, PROBE_EVERY + 1, batch=1)
    run_steps(chooser, monkeypatch, {2: 0.5, 1: 1.0}, PROBE_EVERY + 1, batch=8)
    assert chooser.pick(1)[0] == 1 and chooser.pick(8)[0] == 2
    torch.set_num_threads(4)  # the caller asks for another count: earlier times say nothing about it
    used = run_steps(chooser, monkeypatch, {4: 0.2, 2: 0.3}, FIRST_TRY + 1, taken=True)
    assert used == [4] * (FIRST_TRY - 1) + [2, 4]
    assert chooser.most == 4 and chooser.counts() == (4, 2)


def test_one_thread_asked_for_stays_one(monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert set(run_steps(StepThreads(), monkeypatch, {1: 0.1}, 40)) == {1}
    finally:
        torch.set_num_threads(before)


def test_a_models_decode_steps_go_through_it_and_prompts_do_not(tmp_path, two_threads):
    from chatglm import load_model
    from chatglm.synthetic import synthetic_gguf

    model = load_model(synthetic_gguf("chatglm-tiny", "q4_0", tmp_path))
    cache, slot = model.new_cache(1, 16), torch.zeros(1, dtype=torch.long)
    model(torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 2]]), cache, slot)
    assert model.step_threads.steps == {}
    for i in range(3):
        model(torch.tensor([[4]]), torch.tensor([[3 + i]]), cache, slot)
    assert model.step_threads.steps == {1: 3} and torch.get_num_threads() == 2


def test_a_lucky_try_costs_a_few_steps_not_a_probe_period(monkeypatch, two_threads):
    """On a quiet machine one try at one thread happens to run fast: the steps after it, timed at one thread,
    bring two threads back within a few steps."""
    chooser = StepThreads()
    clock = clocks(monkeypatch)
    used = []
    for step in range(1, 2 * QUIET_PROBE_EVERY + 1):
        with chooser.chosen(1):
            n = torch.get_num_threads()
            used.append(n)
            tick(clock, 0.10 if n == 2 else (0.05 if step == QUIET_PROBE_EVERY else 0.19), n, False)
    assert used[QUIET_PROBE_EVERY - 1] == 1 and used[QUIET_PROBE_EVERY + 4:].count(1) == 1  # the next try only
