"""Retry backoff, result fencing and the dedupe window, in-process."""

import math
import os
import random

import pytest

import lbd

T = lbd.TaskState


# -- backoff_delay ------------------------------------------------------------


def ceiling(attempt, base, cap):
    """min(cap, base * 2 ** (attempt - 1)), without overflowing."""
    if attempt - 1 > 1000:
        return cap
    return min(cap, base * 2.0 ** (attempt - 1))


BACKOFFS = [(0.5, 30.0), (0.1, 30.0), (1.0, 5.0), (0.001, 1e9), (2.0, 2.0),
            (3.0, 1.0)]


@pytest.mark.parametrize("base,cap", BACKOFFS)
def test_backoff_stays_in_its_window(base, cap):
    seed = int(os.environ.get("LBD_TEST_SEED") or random.randrange(2 ** 32))
    print(f"seed={seed} (replay with LBD_TEST_SEED={seed})")
    rng = random.Random(seed)
    for attempt in range(1, 1001):
        top = ceiling(attempt, base, cap)
        for rand in (lambda: 0.0, lambda: 0.999999, rng.random):
            delay = lbd.backoff_delay(attempt, base, cap, rand)
            assert isinstance(delay, float) and math.isfinite(delay)
            assert 0.0 <= delay < top, (attempt, delay, top, seed)
            assert delay <= cap


@pytest.mark.parametrize("base,cap", BACKOFFS)
def test_backoff_is_full_jitter_over_the_exponential_ceiling(base, cap):
    for attempt in range(1, 80):
        assert lbd.backoff_delay(attempt, base, cap, lambda: 0.5) == \
            pytest.approx(ceiling(attempt, base, cap) * 0.5), attempt
        assert lbd.backoff_delay(attempt, base, cap, lambda: 0.0) == 0.0


def test_backoff_doubles_then_caps():
    tops = [lbd.backoff_delay(a, 0.5, 30.0, lambda: 1.0) for a in range(1, 10)]
    assert tops == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


@pytest.mark.parametrize("attempt", [1000, 1025, 10 ** 6, 10 ** 30])
def test_backoff_handles_huge_attempt_numbers(attempt):
    delay = lbd.backoff_delay(attempt, 0.5, 30.0, lambda: 0.999999)
    assert delay == pytest.approx(30.0 * 0.999999)
    assert lbd.backoff_delay(attempt, 1e300, 30.0, lambda: 0.5) == 15.0


def test_backoff_with_zero_base_or_cap_is_zero():
    assert lbd.backoff_delay(5, 0.0, 30.0, lambda: 0.9) == 0.0
    assert lbd.backoff_delay(5, 0.5, 0.0, lambda: 0.9) == 0.0


def test_backoff_uses_real_randomness_by_default():
    delays = {lbd.backoff_delay(10, 0.5, 30.0) for _ in range(50)}
    assert all(0.0 <= d < 30.0 for d in delays)
    assert len(delays) > 1      # jittered, not a fixed delay


# -- result_is_current ---------------------------------------------------------


def running_task(attempts=1):
    spec = lbd.validate_task({"handler": "lbd:echo"},
                             {"timeout": 1.0, "max_attempts": 3})
    task = lbd.Task(101, spec, 1000.0)
    lbd.transition(lbd.TASK_TRANSITIONS, task, T.QUEUED)
    lbd.transition(lbd.TASK_TRANSITIONS, task, T.RUNNING)
    task.attempts = attempts
    return task


def worker():
    return lbd.Worker(1, 4321, None, 0.0)


def test_the_current_attempt_is_current():
    task = running_task(attempts=2)
    assert lbd.result_is_current(task, worker(), "101", 2) is True


def test_no_task_is_not_current():
    assert not lbd.result_is_current(None, worker(), "101", 1)


@pytest.mark.parametrize("reason", ["timeout", "hung", "drain", ""])
def test_a_killed_worker_is_not_current(reason):
    w = worker()
    w.kill_reason = reason
    assert not lbd.result_is_current(running_task(), w, "101", 1)


@pytest.mark.parametrize("task_id", ["100", "1010", "", 101, None])
def test_another_task_id_is_not_current(task_id):
    assert not lbd.result_is_current(running_task(), worker(), task_id, 1)


@pytest.mark.parametrize("attempt", [0, 2, 3, -1, "1", None])
def test_another_attempt_is_not_current(attempt):
    assert not lbd.result_is_current(running_task(attempts=1), worker(),
                                     "101", attempt)


@pytest.mark.parametrize("state", [s for s in T if s is not T.RUNNING])
def test_a_task_that_is_not_running_is_not_current(state):
    task = running_task()
    task.state = state          # direct: reach every state in one step
    assert not lbd.result_is_current(task, worker(), "101", 1)


def test_a_retried_task_fences_off_the_old_attempt():
    task = running_task(attempts=1)
    lbd.transition(lbd.TASK_TRANSITIONS, task, T.QUEUED)    # retry
    assert not lbd.result_is_current(task, worker(), "101", 1)
    lbd.transition(lbd.TASK_TRANSITIONS, task, T.RUNNING)
    task.attempts = 2
    assert not lbd.result_is_current(task, worker(), "101", 1)
    assert lbd.result_is_current(task, worker(), "101", 2)


# -- dedupe window through lbd.Master ----------------------------------------


class FakeClock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture
def make_master():
    masters = []

    def make(config=None):
        clock, wall = FakeClock(5000.0), FakeClock(1_700_000_000.0)
        # No journal: these tests are about memory, not the disk.
        config = dict(config or {}, journal={"path": "none"})
        m = lbd.Master(lbd.build_config(config), clock=clock, wall=wall)
        assert m.journal is None
        masters.append(m)
        return m, clock

    yield make
    for m in masters:
        m.selector.close()


def submit(m, key="k", **fields):
    return m.new_task(lbd.validate_task(
        {"handler": "lbd:echo", "key": key, **fields},
        {"timeout": 1.0, "max_attempts": 1}))


def run(m, task):
    """Take ``task`` off the ready queue and mark it RUNNING, as dispatch
    does, without a worker."""
    assert m.ready.pop() is task
    task.entry = None
    m._task_to(task, T.RUNNING)
    task.attempts += 1


def test_a_live_task_is_a_duplicate(make_master):
    m, clock = make_master()
    task = submit(m)
    assert task.state is T.QUEUED
    assert m.find_duplicate("k") is task
    assert m.find_duplicate("other") is None
    run(m, task)
    assert m.find_duplicate("k") is task
    # However long it stays live: the window only counts after the end.
    clock.now += 10 * 3600.0
    assert m.find_duplicate("k") is task


def test_a_delayed_task_is_a_duplicate(make_master):
    m, _ = make_master()
    task = submit(m, delay=60.0)
    assert task.state is T.DELAYED
    assert m.find_duplicate("k") is task


def test_a_task_without_a_key_deduplicates_nothing(make_master):
    m, _ = make_master()
    submit(m, key=None)
    assert m.keys == {}
    assert m.find_duplicate("k") is None


def test_a_finished_task_deduplicates_for_the_window_only(make_master):
    m, clock = make_master()
    assert m.cfg["tasks"].dedupe_window == 3600.0
    task = submit(m)
    run(m, task)
    m._finish(task, T.DONE, result=1)
    assert task.state is T.DONE and task.result == 1
    finished = clock.now
    assert m.find_duplicate("k") is task
    clock.now = finished + 3599.0
    assert m.find_duplicate("k") is task
    clock.now = finished + 3600.0 - 1e-6
    assert m.find_duplicate("k") is task
    clock.now = finished + 3600.0 + 1e-6
    assert m.find_duplicate("k") is None
    clock.now = finished + 3700.0
    assert m.find_duplicate("k") is None


@pytest.mark.parametrize("state", [T.DEAD, T.EXPIRED, T.CANCELLED])
def test_every_terminal_state_ends_after_the_window(make_master, state):
    m, clock = make_master({"tasks": {"dedupe_window": 10}})
    task = submit(m)
    if state is T.DEAD:
        run(m, task)
    m._finish(task, state, error={"reason": "x"})
    clock.now += 9.0
    assert m.find_duplicate("k") is task
    clock.now += 2.0
    assert m.find_duplicate("k") is None


def test_a_zero_window_never_deduplicates_finished_tasks(make_master):
    m, _ = make_master({"tasks": {"dedupe_window": 0}})
    task = submit(m)
    m._finish(task, T.CANCELLED)
    assert m.find_duplicate("k") is None


def test_the_window_uses_the_monotonic_clock_not_the_wall(make_master):
    m, clock = make_master({"tasks": {"dedupe_window": 10}})
    task = submit(m)
    m._finish(task, T.CANCELLED)
    m.wall.now += 1e6           # the wall clock jumps: no effect
    assert m.find_duplicate("k") is task
    clock.now += 11
    assert m.find_duplicate("k") is None


def test_a_resubmit_after_the_window_owns_the_key_through_purge(make_master):
    m, clock = make_master({"tasks": {"dedupe_window": 10,
                                      "result_ttl": 100}})
    old = submit(m)
    run(m, old)
    m._finish(old, T.DONE, result="old")
    clock.now += 20
    assert m.find_duplicate("k") is None
    new = submit(m)
    assert new.id != old.id
    assert m.find_duplicate("k") is new
    # The old task's retention runs out: it goes, the new key stays.
    clock.now += 90
    m._run_due(clock())
    assert old.id not in m.tasks
    assert m.find_duplicate("k") is new
    run(m, new)
    m._finish(new, T.DONE, result="new")
    clock.now += 101
    m._run_due(clock())
    assert new.id not in m.tasks
    assert m.keys == {}
    assert m.find_duplicate("k") is None


def test_finishing_a_queued_task_removes_it_from_the_ready_queue(
        make_master):
    m, _ = make_master()
    a, b = submit(m, key="a"), submit(m, key="b")
    assert len(m.ready) == 2
    m._finish(a, T.CANCELLED)
    assert len(m.ready) == 1
    assert m.ready.pop() is b
    assert m.counters["cancelled"] == 1 and m.counters["submitted"] == 2


def test_dedupe_window_longer_than_result_ttl_is_honoured_or_refused(
        make_master):
    try:
        lbd.build_config({"tasks": {"dedupe_window": 200,
                                    "result_ttl": 100}})
    except lbd.ConfigError:
        return          # refusing the combination is a fine answer too
    m, clock = make_master({"tasks": {"dedupe_window": 200,
                                      "result_ttl": 100}})
    task = submit(m)
    run(m, task)
    m._finish(task, T.DONE, result=1)
    clock.now += 150    # inside the window, past the result's retention
    m._run_due(clock())
    assert m.find_duplicate("k") is not None
    clock.now += 100    # past the window: the task and its key are gone
    m._run_due(clock())
    assert m.find_duplicate("k") is None
    assert task.id not in m.tasks
