"""ThreadChoice runs a loop's steps with the faster of the current thread count and one thread."""
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from diffusion_ao.calibration import threads as threads_module
from diffusion_ao.calibration.threads import ThreadChoice


def _run(choice, steps, cost_of):
    """Runs `steps` steps whose duration under n threads is cost_of[n] (a fake clock); returns the counts seen."""
    clock = [0.0]
    seen = []
    original = threads_module.time.perf_counter
    threads_module.time.perf_counter = lambda: clock[0]
    try:
        for i in range(steps):
            with choice.step(i):
                n = torch.get_num_threads()
                seen.append(n)
                clock[0] += cost_of[n]
    finally:
        threads_module.time.perf_counter = original
    return seen


@settings(max_examples=25, deadline=None)
@given(one=st.floats(0.001, 1.0), two=st.floats(0.001, 1.0), trials=st.integers(1, 3), warmup=st.integers(0, 2))
def test_the_faster_count_runs_after_the_trials_and_the_setting_is_restored(one, two, trials, warmup):
    assume(abs(one - two) > 1e-6 * max(one, two))  # a tie within the fake clock's rounding may go either way
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        choice = ThreadChoice(trials=trials, warmup=warmup)
        seen = _run(choice, warmup + 2 * trials + 5, {1: one, 2: two})
        assert torch.get_num_threads() == 2  # every step restores the loop's setting
    finally:
        torch.set_num_threads(before)
    assert seen[:warmup] == [2] * warmup
    assert sorted(seen[warmup:warmup + 2 * trials]) == [1] * trials + [2] * trials  # each candidate timed
    fastest = 1 if one < two else 2
    assert choice.chosen == fastest and seen[warmup + 2 * trials:] == [fastest] * 5


def test_one_thread_has_nothing_to_choose():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        choice = ThreadChoice()
        assert choice.chosen == 1 and _run(choice, 4, {1: 0.1}) == [1] * 4
    finally:
        torch.set_num_threads(before)


def test_bad_arguments():
    with pytest.raises(ValueError, match="trials >= 1"):
        ThreadChoice(trials=0)


@pytest.mark.parametrize("one_is_faster", [True, False])
def test_calibration_threads_takes_the_faster_count_and_restores_it(monkeypatch, one_is_faster):
    clock = [0.0]
    monkeypatch.setattr(threads_module.time, "perf_counter", lambda: clock[0])

    def probe():  # a busy core makes two threads slower than one
        n = torch.get_num_threads()
        clock[0] += (0.1 if n == 1 else 0.3) if one_is_faster else (0.1 if n == 1 else 0.05)

    monkeypatch.setattr(threads_module, "_probe_workload", probe)
    monkeypatch.setattr(threads_module, "_last_probe", {})
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threads_module.calibration_threads() as n:
            assert n == torch.get_num_threads() == (1 if one_is_faster else 2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_real_probe_answers_a_valid_count():
    assert threads_module.faster_thread_count() in (1, torch.get_num_threads())


def test_the_probe_is_reused_for_a_while(monkeypatch):
    now = [1000.0]
    calls = []
    monkeypatch.setattr(threads_module.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(threads_module, "_probe_workload", lambda: calls.append(torch.get_num_threads()))
    monkeypatch.setattr(threads_module, "_last_probe", {})
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first = threads_module.faster_thread_count()
        probed = len(calls)
        assert probed > 0 and threads_module.faster_thread_count() == first and len(calls) == probed  # reused
        now[0] += threads_module.PROBE_VALID_S + 1
        threads_module.faster_thread_count()
        assert len(calls) == 2 * probed  # probed again once it is stale
    finally:
        torch.set_num_threads(before)
