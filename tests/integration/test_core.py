"""The daemon end to end: real process, real forked workers, real socket."""

import json
import os
import time

import pytest

import lbd
from conftest import read_lines, wait_until


def start_one_worker(start_daemon):
    return start_daemon(args=["--handlers", "lbdtest_handlers",
                              "--min-workers", "1", "--max-workers", "1"])


def block_the_worker(client, gate):
    """Occupy a one-worker pool until the gate opens; return the task."""
    blocker = client.submit("lbdtest_handlers:gated", gate.path)
    wait_until(lambda: client.get(blocker)["state"] == "RUNNING", 20,
               what="the blocker to run")
    return blocker


def test_ping_answers_with_the_version(daemon):
    assert daemon.request("ping")["version"] == lbd.__version__


def test_builtin_echo_runs_and_returns_its_arguments(daemon):
    with daemon.client() as c:
        tid = c.submit("lbd:echo", "a", 1, {"b": [2]})
        view = c.wait(tid, timeout=20)
    assert view["state"] == "DONE"
    assert view["result"] == ["a", 1, {"b": [2]}]
    assert view["attempts"] == 1
    assert view["error"] is None
    assert view["finished_at"] >= view["started_at"] >= view["submitted_at"]


def test_task_view_has_every_documented_field(daemon):
    with daemon.client() as c:
        tid = c.submit("lbd:echo", 1, priority=3, deadline=60, key="k-view")
        view = c.wait(tid, timeout=20)
    for name in ("id", "handler", "args", "kwargs", "priority", "state",
                 "attempts", "max_attempts", "timeout", "deadline_at",
                 "run_at", "key", "submitted_at", "started_at",
                 "finished_at", "result", "error", "worker"):
        assert name in view, name
    assert view["id"] == tid and view["priority"] == 3
    assert view["key"] == "k-view"
    assert view["deadline_at"] == pytest.approx(view["submitted_at"] + 60)


def test_user_handler_with_kwargs_and_current_task(daemon):
    with daemon.client() as c:
        tid = c.submit("lbdtest_handlers:add", 2, kwargs={"b": 40})
        assert c.wait(tid, timeout=20)["result"] == 42
        tid = c.submit("lbdtest_handlers:current", priority=7, deadline=100)
        view = c.wait(tid, timeout=20)
    info = view["result"]
    assert info["id"] == tid
    assert info["attempt"] == 1
    assert info["priority"] == 7
    assert info["deadline_at"] == pytest.approx(view["deadline_at"])
    assert info["type"] == "CurrentTask"


def test_current_task_is_read_only(daemon):
    with daemon.client() as c:
        tid = c.submit("lbdtest_handlers:current")
        assert c.wait(tid, timeout=20)["state"] == "DONE"
    task = lbd.CurrentTask("x", 1, 0, None)
    with pytest.raises(AttributeError):
        task.attempt = 2


def test_priority_order_with_one_worker(start_daemon, tmp_path, gate):
    d = start_one_worker(start_daemon)
    out = str(tmp_path / "order")
    with d.client() as c:
        block_the_worker(c, gate)
        plan = [(0, "p0a"), (5, "p5a"), (-3, "m3"), (5, "p5b"), (9, "p9"),
                (0, "p0b"), (5, "p5c")]
        ids = [c.submit("lbdtest_handlers:record", out, tag, priority=p)
               for p, tag in plan]
        gate.open()
        for tid in ids:
            assert c.wait(tid, timeout=30)["state"] == "DONE"
    assert read_lines(out) == ["p9", "p5a", "p5b", "p5c", "p0a", "p0b", "m3"]


def test_waiting_task_expires_at_its_deadline_and_never_runs(
        start_daemon, tmp_path, gate):
    d = start_one_worker(start_daemon)
    out = str(tmp_path / "ran")
    with d.client() as c:
        blocker = block_the_worker(c, gate)
        tid = c.submit("lbdtest_handlers:record", out, "late",
                       priority=100, deadline=0.3)
        view = c.wait(tid, timeout=20)   # expires while the blocker runs
        assert view["state"] == "EXPIRED"
        assert view["error"]["reason"] == "expired"
        assert view["attempts"] == 0
        assert c.get(blocker)["state"] == "RUNNING"
        gate.open()
        assert c.wait(blocker, timeout=20)["state"] == "DONE"
    assert read_lines(out) == []


def test_running_task_is_not_killed_by_its_deadline(daemon):
    with daemon.client() as c:
        tid = c.submit("lbd:sleep", 0.5, deadline=0.1)
        view = c.wait(tid, timeout=20)
    assert view["state"] == "DONE"
    assert view["result"] == 0.5


def test_delayed_task_waits_then_runs(daemon):
    with daemon.client() as c:
        start = time.time()
        tid = c.submit("lbd:echo", "later", delay=0.5)
        view = c.get(tid)
        assert view["state"] == "DELAYED"
        assert view["run_at"] == pytest.approx(view["submitted_at"] + 0.5)
        assert c.status()["queue"]["delayed"] == 1
        view = c.wait(tid, timeout=20)
    assert view["state"] == "DONE"
    assert view["started_at"] >= start + 0.5


def test_cancel_a_queued_task(start_daemon, tmp_path, gate):
    d = start_one_worker(start_daemon)
    out = str(tmp_path / "ran")
    with d.client() as c:
        blocker = block_the_worker(c, gate)
        tid = c.submit("lbdtest_handlers:record", out, "x")
        view = c.cancel(tid)
        assert view["state"] == "CANCELLED"
        assert view["error"]["reason"] == "cancelled"
        assert c.status()["queue"]["ready"] == 0
        with pytest.raises(lbd.RequestError) as err:
            c.cancel(tid)
        assert err.value.code == "not_cancellable"
        gate.open()
        assert c.wait(blocker, timeout=20)["state"] == "DONE"
    assert read_lines(out) == []


def test_cancel_a_running_task_replaces_its_worker(daemon):
    with daemon.client() as c:
        tid = c.submit("lbdtest_handlers:hang")
        view = wait_until(lambda: (v := c.get(tid))["state"] == "RUNNING"
                          and v, 20, what="the task to run")
        old = view["worker"]
        old_pid = next(w["pid"] for w in c.status()["workers"]
                       if w["id"] == old)
        assert c.cancel(tid)["state"] == "CANCELLED"
        wait_until(lambda: old not in [w["id"] for w in
                                       c.status()["workers"]], 20,
                   what="the cancelled task's worker to go")
        wait_until(lambda: len([w for w in c.status()["workers"]
                                if w["state"] == "IDLE"]) == 2, 20,
                   what="a replacement worker")
        assert c.get(tid)["state"] == "CANCELLED"
        # The replacement serves tasks; the old process is gone.
        assert c.wait(c.submit("lbd:echo", 1), timeout=20)["state"] == "DONE"
    with pytest.raises(ProcessLookupError):
        os.kill(old_pid, 0)


def test_wait_timeout_and_others_are_served_meanwhile(daemon, gate):
    with daemon.client() as c, daemon.client() as other:
        tid = c.submit("lbdtest_handlers:gated", gate.path)
        with pytest.raises(lbd.RequestError) as err:
            c.wait(tid, timeout=0.2)
        assert err.value.code == "timeout"
        # A wait parks the request, not the loop.
        raw = daemon.raw(b'{"op": "ping", "req": 2}\n')
        assert raw[0]["ok"] and raw[0]["req"] == 2
        assert other.ping() == lbd.__version__
        gate.open()
        assert c.wait(tid, timeout=20)["state"] == "DONE"


def test_responses_come_in_request_order_with_parked_waits(daemon, gate):
    with daemon.client() as c:
        tid = c.submit("lbdtest_handlers:gated", gate.path)
    lines = [
        json.dumps({"op": "wait", "id": tid, "req": "w"}).encode() + b"\n",
        b'{"op": "ping", "req": "p"}\n',
    ]
    import threading
    threading.Timer(0.3, gate.open).start()
    responses = daemon.raw(*lines, timeout=20)
    assert [r["req"] for r in responses] == ["w", "p"]
    assert responses[0]["task"]["state"] == "DONE"


def test_status_shows_workers_queue_and_bounds(start_daemon):
    d = start_daemon(args=["--min-workers", "2", "--max-workers", "3"])
    wait_until(lambda: len(d.workers("IDLE")) == 2, 20,
               what="two idle workers")
    status = d.status()
    assert status["min_workers"] == 2 and status["max_workers"] == 3
    assert status["queue"] == {"ready": 0, "delayed": 0, "running": 0}
    ids = [w["id"] for w in status["workers"]]
    assert len(set(ids)) == 2
    for w in status["workers"]:
        assert set(w) >= {"id", "pid", "state", "task", "tasks_done"}
        assert w["task"] is None and w["tasks_done"] == 0
        os.kill(w["pid"], 0)   # a real process


def test_worker_ids_are_never_reused(daemon):
    seen = {w["id"] for w in daemon.workers()}
    with daemon.client() as c:
        for _ in range(3):
            tid = c.submit("lbdtest_handlers:exit_now", 0, max_attempts=1)
            c.wait(tid, timeout=20)
            wait_until(lambda: len(c.status()["workers"]) == 2 and all(
                w["state"] == "IDLE" for w in c.status()["workers"]), 20,
                what="the pool to be refilled")
            now = {w["id"] for w in c.status()["workers"]}
            assert len(now - seen) >= 1
            seen |= now
    assert len(seen) == 5


def test_unknown_handlers_are_refused_at_submit(daemon):
    # A module outside the allowlist is refused at once; a missing function
    # in an allowed module once a worker has reported what it loaded.
    wait_until(lambda: len(daemon.workers("IDLE")) == 2, 20,
               what="the workers to report their handlers")
    for handler in ("os:system", "subprocess:run", "lbd:main",
                    "lbdtest_handlers:no_such_function"):
        with daemon.client() as c:
            with pytest.raises(lbd.RequestError) as err:
                c.submit(handler, "true")
        assert err.value.code == "unknown_handler", handler
        assert err.value.message


BAD_LINES = [
    (b"not json\n", "bad_json"),
    (b'{"op": "ping"\n', "bad_json"),
    (b"\xff\xfe\n", "bad_json"),
    (b'[1, 2]\n', "bad_request"),
    (b'"ping"\n', "bad_request"),
    (b'{"op": "nope"}\n', "unknown_op"),
    (b'{"op": 5}\n', "unknown_op"),
    (b'{}\n', "unknown_op"),
    (b'{"op": "ping", "extra": 1}\n', "bad_request"),
    (b'{"op": "submit"}\n', "bad_request"),
    (b'{"op": "submit", "task": []}\n', "bad_request"),
    (b'{"op": "submit", "task": {"handler": "lbd:echo", "x": 1}}\n',
     "bad_request"),
    (b'{"op": "submit", "task": {"handler": "lbd:echo", "priority": 1.5}}\n',
     "bad_request"),
    (b'{"op": "submit", "task": {"handler": "lbd:echo", "timeout": NaN}}\n',
     "bad_json"),
    (b'{"op": "submit", "task": {"handler": "lbd:echo", "timeout": 1e999}}\n',
     "bad_json"),
    (b'{"op": "submit", "task": {"handler": "lbd:echo", "timeout": -1}}\n',
     "bad_request"),
    (b'{"op": "submit", "task": {"handler": "lbd:echo", "delay": "1"}}\n',
     "bad_request"),
    (b'{"op": "submit", "task": {"handler": "nocolon"}}\n', "bad_request"),
    (b'{"op": "get"}\n', "bad_request"),
    (b'{"op": "get", "id": 5}\n', "bad_request"),
    (b'{"op": "get", "id": "nope"}\n', "not_found"),
    (b'{"op": "wait", "id": "nope"}\n', "not_found"),
    (b'{"op": "wait", "id": "x", "timeout": -1}\n', "not_found"),
    (b'{"op": "cancel", "id": "nope"}\n', "not_found"),
    (b"[" * 100000 + b"\n", "bad_json"),
    (b'{"op": "ping", "n": ' + b"9" * 5000 + b"}\n", "bad_json"),
]


def test_every_malformed_request_gets_an_error_and_the_connection_lives(
        daemon):
    lines = [line for line, _ in BAD_LINES] + [b'{"op": "ping"}\n']
    responses = daemon.raw(*lines)
    for (line, code), response in zip(BAD_LINES, responses):
        assert response["ok"] is False, line[:60]
        assert response["error"] == code, (line[:60], response)
        assert isinstance(response["message"], str) and response["message"]
    assert responses[-1]["ok"] is True
    assert daemon.request("ping")["ok"]


def test_error_messages_name_the_bad_field(daemon):
    cases = {"priority": "high", "max_attempts": 0, "timeout": 0,
             "deadline": 0, "delay": -1, "key": "", "args": {},
             "kwargs": [], "retry_on_error": "yes"}
    for name, value in cases.items():
        line = json.dumps({"op": "submit", "task": {
            "handler": "lbd:echo", name: value}}).encode() + b"\n"
        (response,) = daemon.raw(line)
        assert response["error"] == "bad_request", name
        assert name in response["message"], (name, response["message"])


def test_req_is_echoed(daemon):
    (ok, bad) = daemon.raw(b'{"op": "ping", "req": {"n": 1}}\n',
                           b'{"op": "get", "id": "x", "req": 7}\n')
    assert ok["req"] == {"n": 1}
    assert bad["req"] == 7 and bad["error"] == "not_found"


def test_too_large_request_is_refused_and_the_daemon_stays_up(start_daemon):
    d = start_daemon(config={"server": {"max_request_bytes": 4096}})
    (response,) = d.raw(b'{"op": "ping", "pad": "' + b"x" * 10000 + b'"}\n')
    assert response["error"] == "too_large"
    assert d.request("ping")["ok"]


def test_half_a_line_does_not_stall_anyone(daemon):
    import socket
    with socket.socket(socket.AF_UNIX) as stalled:
        stalled.connect(daemon.socket)
        stalled.sendall(b'{"op": "pi')
        assert daemon.request("ping")["ok"]
        with daemon.client() as c:
            assert c.wait(c.submit("lbd:echo", 1), timeout=20)["result"] == [1]


def test_last_request_without_newline_is_answered_at_eof(daemon):
    import socket
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(daemon.socket)
        s.sendall(b'{"op": "ping", "req": "eof"}')
        s.shutdown(socket.SHUT_WR)
        response = json.loads(s.makefile("rb").readline())
    assert response["req"] == "eof" and response["ok"]


def test_handler_exception_is_reported_with_type_message_traceback(daemon):
    with daemon.client() as c:
        tid = c.submit("lbdtest_handlers:boom", "kaput", max_attempts=1)
        view = c.wait(tid, timeout=20)
    assert view["state"] == "DEAD"
    error = view["error"]
    assert error["reason"] == "exception"
    assert error["type"] == "ValueError"
    assert error["message"] == "kaput"
    assert "Traceback" in error["traceback"] and "boom" in error["traceback"]


def test_unserialisable_result_fails_the_attempt_clearly(daemon):
    with daemon.client() as c:
        tid = c.submit("lbdtest_handlers:unserialisable", max_attempts=1)
        view = c.wait(tid, timeout=20)
    assert view["state"] == "DEAD"
    assert "JSON" in view["error"]["message"]
    assert daemon.request("ping")["ok"]


def test_shutdown_op_stops_the_daemon_cleanly(daemon):
    assert daemon.request("shutdown")["ok"]
    assert daemon.proc.wait(30) == 0
    assert not os.path.exists(daemon.socket)


def test_sigterm_lets_running_tasks_finish(daemon, gate):
    with daemon.client() as c:
        tid = c.submit("lbdtest_handlers:gated", gate.path)
        wait_until(lambda: c.get(tid)["state"] == "RUNNING", 20,
                   what="the task to run")
        daemon.proc.send_signal(15)
        wait_until(lambda: c.status()["stopping"], 20, what="stopping")
        with pytest.raises(lbd.RequestError) as err:
            c.submit("lbd:echo", 1)
        assert err.value.code == "shutting_down"
        gate.open()
        assert c.wait(tid, timeout=20)["state"] == "DONE"
    assert daemon.proc.wait(30) == 0
    assert not os.path.exists(daemon.socket)


def test_second_daemon_on_a_live_socket_refuses_to_start(daemon, tmp_path):
    import subprocess
    import sys
    proc = subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(lbd.__file__),
                                      "lbd.py"),
         "serve", "--socket", daemon.socket], capture_output=True, text=True,
        timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert "already serving" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert daemon.request("ping")["ok"]


def test_stale_socket_file_is_replaced(start_daemon):
    d = start_daemon()
    path = d.socket
    d.kill9()   # leaves the socket file behind
    assert os.path.exists(path)
    d.start()
    assert d.request("ping")["ok"]
    assert os.path.exists(path)


def test_closing_the_connection_ends_its_parked_waits(daemon, gate):
    import socket
    with daemon.client() as c:
        tid = c.submit("lbdtest_handlers:gated", gate.path)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(daemon.socket)
        s.sendall(json.dumps({"op": "wait", "id": tid}).encode() + b"\n")
        s.shutdown(socket.SHUT_WR)          # the client is going away
        reader = s.makefile("rb")
        response = json.loads(reader.readline())
        assert response["ok"] is False and response["error"] == "timeout"
        assert reader.readline() == b""     # and the daemon closed it
    gate.open()
    assert daemon.wait_task(tid)["state"] == "DONE"
