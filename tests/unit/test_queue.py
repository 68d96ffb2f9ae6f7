"""lbd.LazyHeap and lbd.ReadyQueue: order, lazy removal, compaction, aging."""

import bisect
import os
import random

import pytest

import lbd


class FakeTask:
    """What a ReadyQueue reads from a task (and the ``entry`` it keeps on
    it while the task is queued), and a name."""

    def __init__(self, name, priority, seq, submitted_at=0.0):
        self.name = name
        self.priority = priority
        self.seq = seq
        self.submitted_at = submitted_at
        self.entry = None

    def __repr__(self):
        return (f"FakeTask({self.name!r}, p={self.priority}, "
                f"seq={self.seq}, t={self.submitted_at})")


def drain(queue):
    out = []
    while True:
        item = queue.pop()
        if item is None:
            return out
        out.append(item)


def names(tasks):
    return [t.name for t in tasks]


# -- priority and FIFO ----------------------------------------------------------


def test_higher_priority_pops_first():
    q = lbd.ReadyQueue()
    for seq, prio in enumerate([0, 5, -3, 10, 1]):
        q.push_task(FakeTask(f"p{prio}", prio, seq))
    assert names(drain(q)) == ["p10", "p5", "p1", "p0", "p-3"]


def test_fifo_among_equal_priorities_by_seq():
    q = lbd.ReadyQueue()
    # Pushed out of seq order: seq, not push order, decides.
    for seq in [5, 1, 4, 2, 3]:
        q.push_task(FakeTask(f"s{seq}", 7, seq))
    q.push_task(FakeTask("high", 8, 99))
    assert names(drain(q)) == ["high", "s1", "s2", "s3", "s4", "s5"]


def test_requeued_task_keeps_its_place_among_equals():
    # A retried task is re-pushed with its original seq, so it goes ahead
    # of equal-priority tasks submitted after it.
    q = lbd.ReadyQueue()
    first = FakeTask("first", 0, 1)
    q.push_task(first)
    q.push_task(FakeTask("second", 0, 2))
    assert q.pop() is first
    q.push_task(FakeTask("third", 0, 3))
    q.push_task(first)
    assert names(drain(q)) == ["first", "second", "third"]


def test_extreme_priorities_order():
    q = lbd.ReadyQueue()
    q.push_task(FakeTask("low", -lbd.MAX_PRIORITY, 1))
    q.push_task(FakeTask("high", lbd.MAX_PRIORITY, 2))
    q.push_task(FakeTask("mid", 0, 3))
    assert names(drain(q)) == ["high", "mid", "low"]


def test_empty_queue():
    q = lbd.ReadyQueue()
    assert len(q) == 0 and not q
    assert q.pop() is None
    assert q.peek_key() is None
    assert q.pop_due(float("inf")) == []


def test_lazy_heap_default_seq_is_fifo_among_equal_keys():
    h = lbd.LazyHeap()
    for i in range(20):
        h.push(1.0, f"a{i}")
    h.push(0.5, "first")
    assert [h.pop() for _ in range(21)] == ["first"] + [
        f"a{i}" for i in range(20)]


# -- lazy removal -------------------------------------------------------------


def test_removed_entry_never_pops_and_len_counts_only_live():
    q = lbd.ReadyQueue()
    tasks = [FakeTask(f"t{i}", i % 3, i) for i in range(10)]
    for t in tasks:
        q.push_task(t)
    assert len(q) == 10
    for i in (0, 4, 9):
        q.remove_task(tasks[i])
    assert len(q) == 7
    popped = drain(q)
    assert len(popped) == 7
    assert not {tasks[0], tasks[4], tasks[9]} & set(popped)
    assert len(q) == 0


def test_removing_the_top_entry_changes_peek():
    h = lbd.LazyHeap()
    top = h.push(1, "a")
    h.push(2, "b")
    assert h.peek_key() == 1
    h.remove(top)
    assert h.peek_key() == 2
    assert len(h) == 1
    assert h.pop() == "b"


def test_removing_twice_is_a_no_op():
    h = lbd.LazyHeap()
    a = h.push(1, "a")
    h.push(2, "b")
    h.remove(a)
    h.remove(a)
    assert len(h) == 1
    assert h.pop() == "b"
    assert len(h) == 0
    assert h.pop() is None


def test_removing_an_already_popped_entry_is_a_no_op():
    h = lbd.LazyHeap()
    a = h.push(1, "a")
    h.push(2, "b")
    h.push(3, "c")
    assert h.pop() == "a"
    h.remove(a)             # already gone: must not count as dead
    assert len(h) == 2
    assert [h.pop(), h.pop(), h.pop()] == ["b", "c", None]
    assert len(h) == 0


def test_remove_none_is_a_no_op():
    h = lbd.LazyHeap()
    h.push(1, "a")
    h.remove(None)
    assert len(h) == 1


def test_len_counts_live_after_mixed_operations():
    h = lbd.LazyHeap()
    entries = [h.push(i, i) for i in range(100)]
    for e in entries[::2]:
        h.remove(e)
    assert len(h) == 50
    assert h.pop() == 1
    assert len(h) == 49
    assert h.pop_due(10) == [3, 5, 7, 9]
    assert len(h) == 45


# -- compaction ---------------------------------------------------------------


def _bound(live):
    return 2 * live + lbd.COMPACT_MIN + 1


@pytest.mark.parametrize("keep_every", [2, 10, 1000, 0])
def test_compaction_keeps_the_heap_bounded(keep_every):
    h = lbd.LazyHeap()
    n = 20 * lbd.COMPACT_MIN
    entries = [h.push(i, i) for i in range(n)]
    kept = []
    for i, e in enumerate(entries):
        if keep_every and i % keep_every == 0:
            kept.append(i)
            continue
        h.remove(e)
        assert h.heap_size() <= _bound(len(h)), i
    assert len(h) == len(kept)
    assert h.heap_size() <= _bound(len(kept))
    # Compaction must not lose or reorder the survivors.
    assert drain(h) == kept
    assert h.heap_size() == 0


def test_compaction_in_a_ready_queue_keeps_order():
    q = lbd.ReadyQueue()
    tasks = [FakeTask(f"t{i}", i % 7, i) for i in range(5000)]
    for t in tasks:
        q.push_task(t)
    survivors = []
    for t in tasks:
        if t.seq % 13 == 0:
            survivors.append(t)
        else:
            q.remove_task(t)
    assert q.heap_size() <= _bound(len(survivors))
    expected = sorted(survivors, key=lambda t: (-t.priority, t.seq))
    assert drain(q) == expected


def test_steady_churn_does_not_grow_the_heap():
    # Push and cancel forever with a few live: memory must stay bounded.
    h = lbd.LazyHeap()
    live = [h.push(-1, "keep") for _ in range(5)]
    for i in range(50_000):
        h.remove(h.push(i, i))
        assert h.heap_size() <= _bound(len(h))
    assert len(h) == len(live)


# -- pop_due ------------------------------------------------------------------


def test_pop_due_returns_due_items_in_order():
    h = lbd.LazyHeap()
    for key in [5.0, 1.0, 3.0, 2.0, 4.0, 3.0]:
        h.push(key, f"k{key}")
    assert h.pop_due(0.5) == []
    assert h.pop_due(3.0) == ["k1.0", "k2.0", "k3.0", "k3.0"]
    assert len(h) == 2
    assert h.peek_key() == 4.0
    assert h.pop_due(100) == ["k4.0", "k5.0"]
    assert len(h) == 0


def test_pop_due_skips_removed_entries():
    h = lbd.LazyHeap()
    a = h.push(1, "a")
    h.push(2, "b")
    c = h.push(3, "c")
    h.push(9, "late")
    h.remove(a)
    h.remove(c)
    assert h.pop_due(5) == ["b"]
    assert len(h) == 1


def test_pop_due_with_equal_keys_is_fifo():
    h = lbd.LazyHeap()
    for i in range(10):
        h.push(1.0, i)
    assert h.pop_due(1.0) == list(range(10))


# -- aging --------------------------------------------------------------------


@pytest.mark.parametrize("wait,old_first", [
    (0.0, False), (8.0, False), (9.5, False),
    (10.0, True),     # a tie: the older task wins on seq
    (10.5, True), (100.0, True),
])
def test_aging_lets_an_old_task_overtake_exactly_when_the_key_says(
        wait, old_first):
    # rate 0.5: "new" (priority 5) arrives `wait` s after "old"
    # (priority 0). Effective priorities at any later time t are
    # 0 + 0.5 (t - t0) and 5 + 0.5 (t - t0 - wait): old wins iff
    # 0.5 * wait >= 5.
    for base in (0.0, 1_700_000_000.0):    # also with real wall times
        q = lbd.ReadyQueue(aging_rate=0.5)
        q.push_task(FakeTask("new", 5, 2, submitted_at=base + wait))
        q.push_task(FakeTask("old", 0, 1, submitted_at=base))
        expected = ["old", "new"] if old_first else ["new", "old"]
        assert names(drain(q)) == expected, base


def test_without_aging_submission_time_is_ignored():
    q = lbd.ReadyQueue()
    q.push_task(FakeTask("ancient", 0, 1, submitted_at=-1e9))
    q.push_task(FakeTask("fresh", 1, 2, submitted_at=1e9))
    assert names(drain(q)) == ["fresh", "ancient"]


def test_aging_orders_many_tasks_by_effective_priority():
    rate = 0.25
    rng = random.Random(7)
    tasks = [FakeTask(f"t{i}", rng.randint(-20, 20), i,
                      submitted_at=1_700_000_000.0 + i * rng.choice(
                          [0.0, 0.5, 4.0]))
             for i in range(300)]
    q = lbd.ReadyQueue(aging_rate=rate)
    for t in tasks:
        q.push_task(t)
    now = 1_700_000_000.0 + 5000.0
    expected = sorted(tasks, key=lambda t: (
        -(t.priority + rate * (now - t.submitted_at)), t.seq))
    got = drain(q)
    # Compare effective priorities, which ties cannot perturb.
    eff = [t.priority + rate * (now - t.submitted_at) for t in got]
    assert eff == sorted(eff, reverse=True)
    assert sorted(names(got)) == sorted(names(expected))


def test_an_old_low_priority_task_is_not_starved_with_aging():
    # A stream of newer priority-10 tasks, one old priority-0 task: with
    # aging it gets its turn after (10 / rate) seconds' worth of newer ones.
    q = lbd.ReadyQueue(aging_rate=1.0)
    q.push_task(FakeTask("old", 0, 0, submitted_at=0.0))
    for i in range(1, 30):
        q.push_task(FakeTask(f"n{i}", 10, i, submitted_at=float(i)))
    order = names(drain(q))
    # n1..n9 have keys -9..-1, old has key 0 and n10 ties it but is newer.
    assert order.index("old") == 9


# -- randomized against a model ------------------------------------------------


def _seed():
    env = os.environ.get("LBD_TEST_SEED")
    return int(env) if env else random.randrange(2 ** 32)


@pytest.mark.parametrize("aging_rate", [0.0, 0.5])
def test_randomized_against_sorted_list_model(aging_rate):
    seed = _seed()
    print(f"seed={seed} (replay with LBD_TEST_SEED={seed})")
    rng = random.Random(seed)
    q = lbd.ReadyQueue(aging_rate=aging_rate)
    model = []          # sorted [(key, seq, task)] of live tasks
    live = {}           # seq -> (task, model key)
    gone = []           # tasks already popped or removed
    seq = 0
    # Phases bias the op mix so the queue grows big, then shrinks through
    # removals (driving compaction), then drains through pops.
    phases = [(0.8, 0.1), (0.2, 0.7), (0.45, 0.1), (0.05, 0.05), (0.4, 0.4)]
    for p_push, p_remove in phases:
        for _ in range(rng.randint(2000, 4000)):
            r = rng.random()
            if r < p_push or not model:
                seq += 1
                task = FakeTask(f"t{seq}", rng.randint(-3, 3), seq,
                                submitted_at=rng.choice([0.0, 1.0, 2.5]))
                q.push_task(task)
                key = -task.priority + aging_rate * task.submitted_at
                bisect.insort(model, (key, seq, task),
                              key=lambda x: (x[0], x[1]))
                live[seq] = (task, key)
            elif r < p_push + p_remove:
                if gone and rng.random() < 0.2:
                    q.remove_task(rng.choice(gone))     # must be a no-op
                else:
                    victim_seq = rng.choice(list(live))
                    victim, key = live.pop(victim_seq)
                    i = bisect.bisect_left(model, (key, victim_seq),
                                           key=lambda x: (x[0], x[1]))
                    assert model[i][1] == victim_seq
                    del model[i]
                    q.remove_task(victim)
                    gone.append(victim)
                    assert q.heap_size() <= 2 * len(q) + lbd.COMPACT_MIN \
                        + 1, f"seed={seed}"
            else:
                key, s, task = model.pop(0)
                got = q.pop()
                assert got is task, f"seed={seed}: popped {got}, want {task}"
                gone.append(live.pop(s)[0])
            assert len(q) == len(model), f"seed={seed}"
            if model:
                assert q.peek_key() == model[0][0], f"seed={seed}"
    assert drain(q) == [t for _, _, t in model], f"seed={seed}"


def test_randomized_pop_due_against_model():
    seed = _seed()
    print(f"seed={seed} (replay with LBD_TEST_SEED={seed})")
    rng = random.Random(seed)
    h = lbd.LazyHeap()
    model = []          # sorted [(key, seq, item)]
    entries = {}
    seq = 0
    for _ in range(3000):
        op = rng.random()
        if op < 0.6:
            seq += 1
            key = rng.randint(0, 50) / 2
            entries[seq] = (h.push(key, seq), key)
            bisect.insort(model, (key, seq))
        elif op < 0.8 and entries:
            s = rng.choice(list(entries))
            entry, key = entries.pop(s)
            model.remove((key, s))
            h.remove(entry)
        else:
            limit = rng.randint(0, 50) / 2
            want = [s for k, s in model if k <= limit]
            model = [(k, s) for k, s in model if k > limit]
            for s in want:
                entries.pop(s)
            assert h.pop_due(limit) == want, f"seed={seed}"
        assert len(h) == len(model), f"seed={seed}"


# -- the strict-priority LevelQueue against a sorted model -------------------


def test_strict_ready_queue_is_a_level_queue_and_aging_a_heap():
    assert isinstance(lbd.ReadyQueue(), lbd.LevelQueue)
    assert isinstance(lbd.ReadyQueue(0.5), lbd.AgingQueue)


def test_a_retry_with_an_older_sequence_goes_before_newer_equals():
    q = lbd.ReadyQueue()
    for seq in (10, 11, 12):
        q.push_task(FakeTask(f"t{seq}", 3, seq))
    assert q.pop().name == "t10"
    q.push_task(FakeTask("retry7", 3, 7))      # came back, keeps its place
    q.push_task(FakeTask("new13", 3, 13))
    q.push_task(FakeTask("high", 4, 14))
    assert [q.pop().name for _ in range(5)] == [
        "high", "retry7", "t11", "t12", "new13"]
    assert q.pop() is None and len(q) == 0


def test_level_queue_matches_a_sorted_model():
    seed = int(os.environ.get("LBD_TEST_SEED", random.randrange(1 << 30)))
    print(f"LevelQueue model seed {seed}")
    rng = random.Random(seed)
    q = lbd.ReadyQueue()
    model = {}          # name -> (key, seq)
    queued = {}         # name -> task
    popped = []         # tasks that may come back as retries
    seq = 0
    for step in range(20000):
        op = rng.random()
        if op < 0.45 or not model:
            seq += 1
            task = FakeTask(f"n{seq}", rng.randrange(-3, 4), seq)
        elif op < 0.55 and popped:
            task = popped.pop(rng.randrange(len(popped)))   # a retry
        elif op < 0.75:
            name = rng.choice(list(model))
            gone = queued.pop(name)
            q.remove_task(gone)
            q.remove_task(gone)                              # no-op twice
            del model[name]
            continue
        else:
            expected = min(model, key=model.get)
            assert q.peek_key() == model[expected][0], (seed, step)
            task = q.pop()
            assert task.name == expected, (seed, step)
            del model[task.name], queued[task.name]
            popped.append(task)
            continue
        q.push_task(task)
        queued[task.name] = task
        model[task.name] = (-task.priority, task.seq)
        assert len(q) == len(model), (seed, step)
        assert q.heap_size() <= 2 * len(q) + lbd.COMPACT_MIN + 1
    while model:
        expected = min(model, key=model.get)
        assert q.pop().name == expected, seed
        del model[expected]
    assert q.pop() is None and q.peek_key() is None and len(q) == 0


def test_a_task_removed_and_queued_again_pops_once_in_its_place():
    # A removed task stays in its FIFO until it reaches the head; queued
    # again meanwhile, it must pop once, by its sequence, and not twice.
    q = lbd.ReadyQueue()
    tasks = [FakeTask(f"t{i}", 0, i) for i in range(1, 5)]
    for t in tasks:
        q.push_task(t)
    q.remove_task(tasks[1])
    q.push_task(tasks[1])
    assert len(q) == 4
    assert drain(q) == tasks
    assert q.pop() is None and len(q) == 0 and q.heap_size() == 0


def test_a_queued_task_carries_its_queue_entry_until_it_leaves():
    for q in (lbd.ReadyQueue(), lbd.ReadyQueue(0.5)):
        a, b = FakeTask("a", 1, 1), FakeTask("b", 0, 2)
        q.push_task(a)
        q.push_task(b)
        assert a.entry is not None and b.entry is not None
        assert q.pop() is a and a.entry is None
        q.remove_task(b)
        assert b.entry is None and len(q) == 0
