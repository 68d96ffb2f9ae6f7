"""Failures end to end: retries, timeouts, crashes, hangs, boot errors,
recycling, idempotency and the master's own death, on real daemons."""

import collections
import os
import time

import pytest

import lbd
from conftest import group_alive, read_lines, wait_until

HANDLERS = ["--handlers", "lbdtest_handlers"]

#: Fast supervision so failures are noticed in well under a second.
FAST = {
    "workers": {"heartbeat_interval": 0.1, "heartbeat_timeout": 1.0,
                "kill_grace": 0.5, "start_timeout": 5, "stop_grace": 1.0},
    "tasks": {"retry_backoff": 0.05, "retry_backoff_max": 0.2},
}


def config(**sections):
    """FAST with some keys changed: config(tasks={"max_crashes": 5})."""
    merged = {name: dict(keys) for name, keys in FAST.items()}
    for name, keys in sections.items():
        merged.setdefault(name, {}).update(keys)
    return merged


def gone(pid):
    """True once ``pid`` has exited (a zombie nobody reaps counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def proc_state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def counters(d):
    return d.status()["counters"]


def wait_running(c, tid, timeout=20):
    return wait_until(lambda: (v := c.get(tid))["state"] == "RUNNING" and v,
                      timeout, what=f"task {tid} to run")


def wait_pool(d, n, timeout=20):
    """Wait until ``n`` workers are IDLE; return them."""
    return wait_until(lambda: len(ws := d.workers("IDLE")) == n and ws,
                      timeout, what=f"{n} idle workers")


# -- handler exceptions --------------------------------------------------------


def test_raise_then_succeed_is_done_and_keeps_the_first_error(start_daemon):
    d = start_daemon(config=FAST, args=HANDLERS)
    with d.client() as c:
        tid = c.submit("lbdtest_handlers:fail_until", 2, max_attempts=3)
        view = c.wait(tid, timeout=20)
    assert view["state"] == "DONE"
    assert view["result"] == 2
    assert view["attempts"] == 2
    assert view["error"] is None
    assert len(view["errors"]) == 1
    first = view["errors"][0]
    assert first["reason"] == "exception"
    assert first["type"] == "RuntimeError"
    assert first["message"] == "not yet (attempt 1)"
    assert "fail_until" in first["traceback"]
    assert counters(d)["retried"] == 1


def test_retry_on_error_false_ends_a_raising_task_after_one_attempt(
        start_daemon):
    d = start_daemon(config=FAST, args=HANDLERS)
    with d.client() as c:
        tid = c.submit("lbdtest_handlers:boom", "once", max_attempts=5,
                       retry_on_error=False)
        view = c.wait(tid, timeout=20)
    assert view["state"] == "DEAD"
    assert view["attempts"] == 1
    assert view["error"]["reason"] == "exception"
    assert view["error"]["message"] == "once"
    assert len(view["errors"]) == 1
    assert counters(d)["retried"] == 0


def test_retry_on_error_false_still_retries_a_crash(start_daemon):
    d = start_daemon(config=FAST, args=HANDLERS)
    with d.client() as c:
        tid = c.submit("lbdtest_handlers:crash_until", 2, max_attempts=5,
                       retry_on_error=False)
        view = c.wait(tid, timeout=20)
    assert view["state"] == "DONE", view["error"]
    assert view["result"] == "survived"
    assert view["attempts"] == 2
    assert [e["reason"] for e in view["errors"]] == ["crash"]


# -- timeouts ------------------------------------------------------------------


def test_timeout_kills_and_replaces_the_worker_each_attempt(
        start_daemon, tmp_path):
    d = start_daemon(config=FAST, args=HANDLERS)
    wait_pool(d, 2)
    pids_file = str(tmp_path / "pids")
    start = time.monotonic()
    with d.client() as c:
        tid = c.submit("lbdtest_handlers:pid_then_hang", pids_file,
                       timeout=0.3, max_attempts=2)
        view = c.wait(tid, timeout=30)
    elapsed = time.monotonic() - start
    assert view["state"] == "DEAD"
    assert view["attempts"] == 2
    assert view["result"] is None
    assert view["error"]["reason"] == "timeout"
    assert "0.3" in view["error"]["message"]
    errors = view["errors"]
    assert [e["reason"] for e in errors] == ["timeout", "timeout"]
    worker_ids = [e["worker"] for e in errors]
    assert len(set(worker_ids)) == 2, worker_ids
    # Each attempt ran in its own process, and both processes are gone:
    # the task is settled only after its worker has been reaped.
    pids = [int(p) for p in read_lines(pids_file)]
    assert len(pids) == 2 and len(set(pids)) == 2, pids
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    # Generous: two 0.3 s attempts, a SIGTERM each and a short backoff.
    assert elapsed < 10, elapsed
    # The pool is refilled with fresh workers that still serve tasks.
    idle = wait_pool(d, 2)
    assert not {w["id"] for w in idle} & set(worker_ids)
    assert not {w["pid"] for w in idle} & set(pids)
    with d.client() as c:
        assert c.wait(c.submit("lbd:echo", 1), timeout=20)["state"] == "DONE"
    counts = counters(d)
    assert counts["timeouts"] == 2
    assert counts["worker_crashes"] == 0   # a kill we asked for is no crash
    assert counts["dead"] == 1


def test_a_late_result_after_a_timeout_is_ignored(start_daemon, tmp_path):
    """The handler outlives its timeout (it ignores SIGTERM) and sends a
    result before the SIGKILL: the task must stay a timeout, not DONE."""
    d = start_daemon(config=config(workers={"kill_grace": 3.0}),
                     args=HANDLERS)
    out = str(tmp_path / "late")
    with d.client() as c:
        tid = c.submit("lbdtest_handlers:late_result", out, 0.8,
                       timeout=0.3, max_attempts=1)
        view = c.wait(tid, timeout=30)
    assert view["state"] == "DEAD"
    assert view["error"]["reason"] == "timeout"
    assert view["result"] is None
    assert read_lines(out) == ["late"]   # the handler did finish ...
    counts = counters(d)
    assert counts["stale_results"] == 1  # ... and its result was fenced
    assert counts["done"] == 0


# -- crashes -------------------------------------------------------------------


def test_crash_is_recorded_with_exit_code_and_rss_and_retried(start_daemon):
    d = start_daemon(config=config(tasks={"max_crashes": 5}), args=HANDLERS)
    with d.client() as c:
        tid = c.submit("lbdtest_handlers:exit_now", 3, max_attempts=2)
        view = c.wait(tid, timeout=30)
    assert view["state"] == "DEAD"
    assert view["attempts"] == 2            # retried once
    assert view["crashes"] == 2
    assert view["error"]["reason"] == "crash"
    assert len(view["errors"]) == 2
    for error in view["errors"]:
        assert error["reason"] == "crash"
        assert error["exit_code"] == 3
        assert error["signal"] is None
        assert isinstance(error["max_rss_kb"], int)
        assert error["max_rss_kb"] > 0
        assert "exited with code 3" in error["message"]
    assert len({e["worker"] for e in view["errors"]}) == 2
    counts = counters(d)
    assert counts["worker_crashes"] == 2
    assert counts["retried"] == 1
    wait_pool(d, 2)   # the crashed workers were replaced


def test_poison_task_is_quarantined_after_max_crashes(start_daemon):
    d = start_daemon(config=config(tasks={"max_crashes": 2}), args=HANDLERS)
    with d.client() as c:
        tid = c.submit("lbdtest_handlers:exit_now", 1, max_attempts=5)
        view = c.wait(tid, timeout=30)
    assert view["state"] == "DEAD"
    assert view["attempts"] == 2
    assert view["crashes"] == 2
    assert view["error"]["reason"] == "poison"
    assert "quarantined" in view["error"]["message"]
    assert [e["reason"] for e in view["errors"]] == ["crash", "crash"]
    assert counters(d)["worker_crashes"] == 2
    # The daemon is fine and the pool is whole again.
    wait_pool(d, 2)
    with d.client() as c:
        assert c.wait(c.submit("lbd:echo", 1), timeout=20)["state"] == "DONE"


def test_task_that_crashes_once_survives_its_second_attempt(start_daemon):
    d = start_daemon(config=FAST, args=HANDLERS)
    with d.client() as c:
        tid = c.submit("lbdtest_handlers:crash_until", 2)
        view = c.wait(tid, timeout=30)
    assert view["state"] == "DONE"
    assert view["result"] == "survived"
    assert view["attempts"] == 2
    assert view["error"] is None
    (crash,) = view["errors"]
    assert crash["reason"] == "crash" and crash["exit_code"] == 7
    assert counters(d)["worker_crashes"] == 1


# -- hangs (no heartbeat) ------------------------------------------------------


def test_frozen_worker_is_killed_as_unresponsive_and_the_task_ends(
        start_daemon, tmp_path):
    d = start_daemon(config=FAST, args=HANDLERS)
    pids_file = str(tmp_path / "pids")
    with d.client() as c:
        tid = c.submit("lbdtest_handlers:pid_then_freeze", pids_file,
                       timeout=600, max_attempts=2)
        view = c.wait(tid, timeout=40)
    assert view["state"] == "DEAD"
    assert view["attempts"] == 2
    assert view["error"]["reason"] == "unresponsive"
    assert [e["reason"] for e in view["errors"]] == ["unresponsive"] * 2
    assert len({e["worker"] for e in view["errors"]}) == 2
    pids = [int(p) for p in read_lines(pids_file)]
    assert len(set(pids)) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    counts = counters(d)
    assert counts["hangs"] >= 2
    assert counts["timeouts"] == 0          # 600 s was never reached
    assert counts["worker_crashes"] == 0
    wait_pool(d, 2)


def test_frozen_worker_is_replaced_and_the_retry_succeeds(start_daemon):
    d = start_daemon(config=FAST, args=HANDLERS)
    with d.client() as c:
        tid = c.submit("lbdtest_handlers:freeze_until", 2, timeout=600,
                       max_attempts=2)
        view = c.wait(tid, timeout=40)
    assert view["state"] == "DONE"
    assert view["result"] == "thawed"
    assert view["attempts"] == 2
    assert [e["reason"] for e in view["errors"]] == ["unresponsive"]
    assert counters(d)["hangs"] >= 1


def test_frozen_fresh_worker_is_detected_within_heartbeat_timeout(
        start_daemon):
    # heartbeat_timeout 1 s, start_timeout 30 s (the default).
    d = start_daemon(config=config(workers={"start_timeout": 30.0}),
                     args=HANDLERS)
    with d.client() as c:
        tid = c.submit("lbdtest_handlers:freeze", timeout=600,
                       max_attempts=1)
        wait_running(c, tid)
        start = time.monotonic()
        # 1 s of silence + 0.5 s kill grace; 8 s is very generous.
        try:
            view = c.wait(tid, timeout=8)
        except lbd.RequestError as exc:
            assert exc.code == "timeout"
            pytest.fail(f"the frozen worker was not noticed within 8 s "
                        f"(heartbeat_timeout 1 s); state "
                        f"{c.get(tid)['state']}, hangs "
                        f"{c.status()['counters']['hangs']}")
    assert time.monotonic() - start < 8
    assert view["state"] == "DEAD"
    assert view["error"]["reason"] == "unresponsive"


# -- handler modules that do not import ---------------------------------------


def test_broken_handler_module_backs_off_and_the_daemon_stays_up(
        start_daemon, tmp_path):
    workdir = tmp_path / "broken"
    workdir.mkdir()
    module = workdir / "broken_mod.py"
    module.write_text("def work(:\n    return 1\n")
    d = start_daemon(config=FAST, args=["--handlers", "broken_mod"],
                     name="broken")
    # (The message arrives before the failed worker is reaped and counted.)
    error = wait_until(lambda: (e := d.status()["worker_error"])
                       and e["failures"] >= 1 and e, 20,
                       what="the boot failure to be reported")
    assert "SyntaxError" in error["message"]
    assert "broken_mod.py" in error["message"]
    assert error["retry_in"] >= 0
    first = d.status()
    # Watch for 3 s: the daemon answers throughout, restarts back off.
    most_alive = 0
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        assert d.request("ping")["ok"]
        most_alive = max(most_alive, len(group_alive(d.pid)))
        time.sleep(0.05)
    last = d.status()
    assert d.proc.poll() is None
    started = last["counters"]["worker_starts"] - \
        first["counters"]["worker_starts"]
    assert started < 15, started             # backoff, not a fork bomb
    assert most_alive <= 1 + last["max_workers"], most_alive
    assert last["worker_error"]["failures"] > first["worker_error"][
        "failures"]
    assert "SyntaxError" in last["worker_error"]["message"]
    assert last["counters"]["boot_failures"] == \
        last["worker_error"]["failures"]
    assert last["counters"]["worker_crashes"] == 0
    assert not [w for w in last["workers"] if w["state"] == "IDLE"]
    # Fix the module: the next try boots, the error clears, tasks run.
    module.write_text("def work():\n    return 'fixed'\n")
    wait_until(lambda: (s := d.status())["worker_error"] is None
               and [w for w in s["workers"] if w["state"] == "IDLE"],
               40, what="workers to boot once the module is fixed")
    with d.client() as c:
        view = c.wait(c.submit("broken_mod:work"), timeout=20)
    assert view["result"] == "fixed"


# -- recycling -----------------------------------------------------------------


def test_max_tasks_recycles_workers(start_daemon):
    d = start_daemon(config=config(workers={"min": 1, "max": 1,
                                            "max_tasks": 3}),
                     args=HANDLERS)
    with d.client() as c:
        ids = [c.submit("lbdtest_handlers:pid") for _ in range(9)]
        views = [c.wait(tid, timeout=30) for tid in ids]
    assert [v["state"] for v in views] == ["DONE"] * 9
    served = collections.Counter(v["result"] for v in views)
    assert len(served) >= 3, served
    assert max(served.values()) <= 3, served
    assert all(v["attempts"] == 1 for v in views)
    counts = counters(d)
    assert counts["worker_starts"] >= 3
    assert counts["worker_crashes"] == 0     # recycling is not crashing


# -- idempotency keys ----------------------------------------------------------


def test_idempotency_key_runs_the_task_once(start_daemon, tmp_path, gate):
    d = start_daemon(config=FAST, args=HANDLERS)
    out = str(tmp_path / "ran")
    with d.client() as c:
        task = {"handler": "lbdtest_handlers:gated",
                "args": [gate.path, out, "x"], "key": "order-17"}
        first = c.request("submit", task=task)
        wait_running(c, first["id"])
        second = c.request("submit", task=task)
        assert first["duplicate"] is False
        assert second["duplicate"] is True
        assert second["id"] == first["id"]
        gate.open()
        assert c.wait(first["id"], timeout=20)["state"] == "DONE"
        # Finished, but inside the dedupe window (an hour by default).
        third = c.request("submit", task=task)
        assert third["duplicate"] is True and third["id"] == first["id"]
        # Another key is another task.
        other = c.request("submit", task=dict(task, key="order-18"))
        assert other["duplicate"] is False and other["id"] != first["id"]
        assert c.wait(other["id"], timeout=20)["state"] == "DONE"
    assert read_lines(out) == ["x", "x"]     # order-17 once, order-18 once
    counts = counters(d)
    assert counts["duplicates"] == 2
    assert counts["submitted"] == 2


def test_dedupe_window_ends_after_the_task_finishes(start_daemon, tmp_path):
    d = start_daemon(config=config(tasks={"dedupe_window": 0.5}),
                     args=HANDLERS)
    out = str(tmp_path / "ran")
    task = {"handler": "lbdtest_handlers:record", "args": [out, "r"],
            "key": "k"}
    with d.client() as c:
        first = c.request("submit", task=task)
        assert c.wait(first["id"], timeout=20)["state"] == "DONE"
        again = c.request("submit", task=task)
        assert again["duplicate"] is True and again["id"] == first["id"]
        time.sleep(0.6)   # a deliberate clock wait: let the window pass
        later = c.request("submit", task=task)
        assert later["duplicate"] is False
        assert later["id"] != first["id"]
        assert c.wait(later["id"], timeout=20)["state"] == "DONE"
        # The new task now owns the key.
        latest = c.request("submit", task=task)
        assert latest["duplicate"] is True and latest["id"] == later["id"]
    assert read_lines(out) == ["r", "r"]
    assert counters(d)["duplicates"] == 2


# -- the master dies -----------------------------------------------------------


def test_workers_exit_when_the_master_is_killed(start_daemon):
    d = start_daemon(config=FAST, args=HANDLERS)
    with d.client() as c:
        tid = c.submit("lbdtest_handlers:hang")
        wait_running(c, tid)
        pids = [w["pid"] for w in c.status()["workers"]]
    assert len(pids) == 2 and all(not gone(p) for p in pids)
    d.kill9()
    wait_until(lambda: all(gone(p) for p in pids), 10,
               what=f"workers {pids} to exit after the master died")
    wait_until(lambda: not group_alive(d.pid), 10,
               what="the daemon's process group to be empty")


def test_a_frozen_worker_exits_too_when_the_master_is_killed(
        start_daemon, tmp_path):
    d = start_daemon(config=config(workers={"heartbeat_timeout": 60.0,
                                            "start_timeout": 60.0}),
                     args=HANDLERS)
    pids_file = str(tmp_path / "pids")
    with d.client() as c:
        tid = c.submit("lbdtest_handlers:pid_then_freeze", pids_file,
                       timeout=600)
        wait_running(c, tid)
        frozen = int(wait_until(lambda: read_lines(pids_file), 10,
                                what="the pid")[0])
        wait_until(lambda: proc_state(frozen) == "T", 10,
                   what="the worker to stop itself")
        pids = [w["pid"] for w in c.status()["workers"]]
    assert frozen in pids
    d.kill9()
    wait_until(lambda: all(gone(p) for p in pids), 5,
               what=f"workers {pids} to exit after the master died")
    wait_until(lambda: not group_alive(d.pid), 10,
               what="the daemon's process group to be empty")
