"""The worker and task state machines: lbd.transition and its two tables.

The expected graphs below are written out from the state diagram in lbd.py
("States" section), not read from lbd's own tables, so that an accidental
edit of a table is caught here rather than copied into the expectation.
"""

import collections

import pytest

import lbd

W, T = lbd.WorkerState, lbd.TaskState

EXPECTED_WORKER = {
    None: {W.STARTING},
    W.STARTING: {W.IDLE, W.STOPPING, W.FAILED},
    W.IDLE: {W.BUSY, W.STOPPING, W.FAILED},
    W.BUSY: {W.IDLE, W.DRAINING, W.STOPPING, W.FAILED},
    W.DRAINING: {W.STOPPING, W.FAILED},
    W.STOPPING: set(),
    W.FAILED: set(),
}

EXPECTED_TASK = {
    None: {T.QUEUED, T.DELAYED},
    T.DELAYED: {T.QUEUED, T.EXPIRED, T.CANCELLED},
    T.QUEUED: {T.RUNNING, T.EXPIRED, T.CANCELLED},
    T.RUNNING: {T.DONE, T.QUEUED, T.DELAYED, T.DEAD, T.EXPIRED,
                T.CANCELLED},
    T.DONE: set(),
    T.DEAD: set(),
    T.EXPIRED: set(),
    T.CANCELLED: set(),
}


class Thing:
    """A minimal stand-in for a Worker or a Task: an id and a state."""

    def __init__(self, state, ident="x1"):
        self.id = ident
        self.state = state


def _pairs(name, table, members, expected):
    params = []
    for old in [None, *members]:
        for new in members:
            allowed = new in expected[old]
            params.append(pytest.param(
                table, old, new, allowed,
                id=f"{name}-{old or 'new'}-{new}-"
                   f"{'ok' if allowed else 'illegal'}"))
    return params


ALL_PAIRS = (_pairs("worker", lbd.WORKER_TRANSITIONS, list(W),
                    EXPECTED_WORKER)
             + _pairs("task", lbd.TASK_TRANSITIONS, list(T), EXPECTED_TASK))


def test_pair_count_covers_every_from_and_to_state():
    # (1 + 6) * 6 worker pairs and (1 + 7) * 7 task pairs.
    assert len(ALL_PAIRS) == 7 * 6 + 8 * 7


@pytest.mark.parametrize("table,old,new,allowed", ALL_PAIRS)
def test_transition(table, old, new, allowed):
    thing = Thing(old, ident="w42")
    if allowed:
        assert lbd.transition(table, thing, new) is old
        assert thing.state is new
    else:
        with pytest.raises(lbd.TransitionError) as info:
            lbd.transition(table, thing, new)
        message = str(info.value)
        assert (old if old is not None else "(new)") in message
        assert str(new) in message
        assert "w42" in message and "Thing" in message
        assert thing.state is old


@pytest.mark.parametrize("table,members", [
    (lbd.WORKER_TRANSITIONS, list(W)), (lbd.TASK_TRANSITIONS, list(T))],
    ids=["worker", "task"])
def test_moving_to_none_is_always_illegal(table, members):
    for old in members:
        thing = Thing(old)
        with pytest.raises(lbd.TransitionError):
            lbd.transition(table, thing, None)
        assert thing.state is old


def test_tables_match_the_documented_graphs():
    assert {k: set(v) for k, v in lbd.WORKER_TRANSITIONS.items()} == \
        EXPECTED_WORKER
    assert {k: set(v) for k, v in lbd.TASK_TRANSITIONS.items()} == \
        EXPECTED_TASK


def test_terminal_task_states_have_no_way_out():
    terminal = {T.DONE, T.DEAD, T.EXPIRED, T.CANCELLED}
    assert lbd.TERMINAL == terminal
    for state in terminal:
        assert lbd.TASK_TRANSITIONS[state] == frozenset()
    # ...and they are the only task states without a way out.
    dead_ends = {s for s, out in lbd.TASK_TRANSITIONS.items()
                 if s is not None and not out}
    assert dead_ends == terminal


def test_a_task_cannot_leave_a_terminal_state_even_to_be_retried():
    for state in lbd.TERMINAL:
        for new in T:
            thing = Thing(state)
            with pytest.raises(lbd.TransitionError):
                lbd.transition(lbd.TASK_TRANSITIONS, thing, new)
            assert thing.state is state


def _reachable(table):
    seen, todo = set(), collections.deque([None])
    while todo:
        for new in table[todo.popleft()]:
            if new not in seen:
                seen.add(new)
                todo.append(new)
    return seen


@pytest.mark.parametrize("table,members", [
    (lbd.WORKER_TRANSITIONS, set(W)), (lbd.TASK_TRANSITIONS, set(T))],
    ids=["worker", "task"])
def test_every_state_is_reachable_from_none(table, members):
    assert _reachable(table) == members
    # Every state has a row, and no row names a foreign state.
    assert set(table) == members | {None}
    for out in table.values():
        assert out <= members


def test_every_non_terminal_task_state_can_reach_a_terminal_one():
    for state in T:
        if state in lbd.TERMINAL:
            continue
        seen, todo = set(), [state]
        while todo:
            for new in lbd.TASK_TRANSITIONS[todo.pop()]:
                if new not in seen:
                    seen.add(new)
                    todo.append(new)
        assert seen & lbd.TERMINAL, state


def test_live_worker_states_are_the_pool_counting_ones():
    assert lbd.LIVE_WORKER_STATES == {W.STARTING, W.IDLE, W.BUSY}


def test_a_full_task_life_through_transition():
    task = Thing(None, ident="7")
    path = [T.QUEUED, T.RUNNING, T.DELAYED, T.QUEUED, T.RUNNING, T.DONE]
    olds = [lbd.transition(lbd.TASK_TRANSITIONS, task, s) for s in path]
    assert olds == [None, *path[:-1]]
    assert task.state is T.DONE


def test_transition_error_is_an_lbd_error():
    assert issubclass(lbd.TransitionError, lbd.LbdError)
