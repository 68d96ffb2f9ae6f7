"""The command line, as a user types it: output, exit codes, no tracebacks."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import LBD, Daemon, wait_until


def run(*args, env=None, input=None, cwd=None):
    return subprocess.run([sys.executable, LBD, *args], capture_output=True,
                          text=True, timeout=60, input=input, cwd=cwd,
                          env=env, stdin=None if input else subprocess.DEVNULL)


def no_traceback(proc):
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr


def test_submit_wait_prints_the_result_and_exits_0(daemon):
    proc = daemon.cli("submit", "lbd:echo", "a", "1", '{"x": [2]}', "text",
                      "--wait")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["a", 1, {"x": [2]}, "text"]


def test_submit_wait_exits_1_when_the_task_is_not_done(daemon):
    proc = daemon.cli("submit", "lbdtest_handlers:boom", "--max-attempts",
                      "1", "--wait")
    assert proc.returncode == 1
    assert "DEAD" in proc.stderr and "boom" in proc.stderr
    no_traceback(proc)


def test_submit_get_wait_cancel(daemon, gate):
    proc = daemon.cli("submit", "lbdtest_handlers:gated", gate.path,
                      "--priority", "5", "--key", "cli-k")
    assert proc.returncode == 0
    tid = proc.stdout.strip()
    view = json.loads(daemon.cli("get", tid).stdout)
    assert view["id"] == tid and view["priority"] == 5
    assert view["key"] == "cli-k"
    proc = daemon.cli("wait", tid, "--timeout", "0.1")
    assert proc.returncode == 1 and "timeout" in proc.stderr
    proc = daemon.cli("cancel", tid)
    assert proc.returncode == 0 and "CANCELLED" in proc.stdout
    proc = daemon.cli("wait", tid)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["state"] == "CANCELLED"
    proc = daemon.cli("cancel", tid)
    assert proc.returncode == 1 and "not_cancellable" in proc.stderr
    no_traceback(proc)


def test_submit_options_reach_the_task(daemon):
    proc = daemon.cli("submit", "lbdtest_handlers:add", "1", "--kwargs",
                      '{"b": 2}', "--timeout", "9", "--deadline", "100",
                      "--max-attempts", "4", "--wait", "--json")
    assert proc.returncode == 0, proc.stderr
    view = json.loads(proc.stdout)
    assert view["result"] == 3
    assert view["timeout"] == 9 and view["max_attempts"] == 4
    assert view["deadline_at"] is not None


def test_submit_dash_pipelines_stdin(daemon):
    lines = [json.dumps({"handler": "lbd:echo", "args": [i]})
             for i in range(50)]
    lines.insert(10, "this is not json")
    lines.insert(20, json.dumps({"handler": "os:system"}))
    proc = daemon.cli("submit", "-", input="\n".join(lines) + "\n")
    assert proc.returncode == 1
    ids = proc.stdout.split()
    assert len(ids) == 50 and len(set(ids)) == 50
    assert "line 11" in proc.stderr and "unknown_handler" in proc.stderr
    with daemon.client() as c:
        assert [c.wait(t, timeout=20)["result"] for t in ids] == \
            [[i] for i in range(50)]


def test_status_table_and_json(daemon):
    wait_until(lambda: len(daemon.workers("IDLE")) == 2, 20,
               what="idle workers")
    proc = daemon.cli("status")
    assert proc.returncode == 0
    assert "WORKER" in proc.stdout and "IDLE" in proc.stdout
    assert "min 2" in proc.stdout
    status = json.loads(daemon.cli("status", "--json").stdout)
    assert len(status["workers"]) == 2
    metrics = json.loads(daemon.cli("metrics", "--json").stdout)
    assert metrics["workers"]["IDLE"] == 2


def test_shutdown_command(daemon):
    proc = daemon.cli("shutdown")
    assert proc.returncode == 0
    assert daemon.proc.wait(30) == 0


@pytest.mark.parametrize("args", [
    ["ping"], ["status"], ["submit", "lbd:echo", "x"], ["get", "1"],
    ["wait", "1"], ["cancel", "1"], ["shutdown"], ["metrics"],
    ["drain", "1"], ["scale", "--min", "1"]])
def test_no_daemon_is_one_clear_line_and_exit_3(tmp_path, args):
    path = str(tmp_path / "nobody.sock")
    proc = run(*args, "--socket", path)
    assert proc.returncode == 3
    assert proc.stderr.strip().count("\n") == 0
    assert path in proc.stderr
    no_traceback(proc)


def test_lbd_socket_variable_is_honoured(tmp_path):
    path = str(tmp_path / "env.sock")
    proc = run("ping", env=dict(os.environ, LBD_SOCKET=path))
    assert proc.returncode == 3 and path in proc.stderr


def test_bad_arguments_are_clear_errors(daemon):
    proc = daemon.cli("submit", "lbd:echo", "--kwargs", "{not json")
    assert proc.returncode == 1 and "bad_json" in proc.stderr
    no_traceback(proc)
    proc = daemon.cli("submit", "lbd:echo", "--priority", "high")
    assert proc.returncode == 2
    no_traceback(proc)
    proc = daemon.cli("submit", "lbd:echo", "--timeout", "-1")
    assert proc.returncode == 1 and "timeout" in proc.stderr
    no_traceback(proc)


def test_serve_config_errors_name_the_problem(tmp_path):
    sock = str(tmp_path / "s")
    proc = run("serve", "-c", str(tmp_path / "missing.toml"),
               "--socket", sock)
    assert proc.returncode == 1 and "missing.toml" in proc.stderr
    no_traceback(proc)
    bad = tmp_path / "bad.toml"
    bad.write_text("[workers]\nmni = 3\n")
    proc = run("serve", "-c", str(bad), "--socket", sock)
    assert proc.returncode == 1 and "workers.mni" in proc.stderr
    no_traceback(proc)
    bad.write_text("[tasks]\ntimeout = 'soon'\n")
    proc = run("serve", "-c", str(bad), "--socket", sock)
    assert proc.returncode == 1 and "tasks.timeout" in proc.stderr
    no_traceback(proc)
    bad.write_text("[workers\n")
    proc = run("serve", "-c", str(bad), "--socket", sock)
    assert proc.returncode == 1 and "bad.toml" in proc.stderr
    no_traceback(proc)
    assert not os.path.exists(sock)


def test_serve_with_a_config_file(start_daemon, tmp_path):
    d = start_daemon(config={"workers": {"min": 1, "max": 1,
                                         "handlers": ["lbdtest_handlers"]},
                             "tasks": {"max_attempts": 7}})
    wait_until(lambda: len(d.workers("IDLE")) == 1, 20, what="one worker")
    with d.client() as c:
        tid = c.submit("lbdtest_handlers:add", 1, 2)
        view = c.wait(tid, timeout=20)
    assert view["result"] == 3 and view["max_attempts"] == 7
    assert d.status()["max_workers"] == 1


def test_version():
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("lbd ")


def installed_lbd():
    return shutil.which("lbd", path=os.path.dirname(sys.executable))


@pytest.mark.skipif(installed_lbd() is None,
                    reason="lbd is not installed in this environment "
                    "(tox installs it)")
def test_installed_command_serves_and_current_task_works(tmp_path):
    # The console script imports the module as 'lbd'; python3 lbd.py runs
    # it as '__main__'. Handlers import 'lbd' either way and must see the
    # task the worker is running.
    d = Daemon(tmp_path / "inst", args=["--handlers", "lbdtest_handlers"])
    d.script = installed_lbd()     # a Python file: run as sys.executable X
    try:
        d.start()
        with d.client() as c:
            view = c.wait(c.submit("lbdtest_handlers:current", priority=4),
                          timeout=20)
        assert view["state"] == "DONE", view["error"]
        assert view["result"]["priority"] == 4
        assert view["result"]["type"] == "CurrentTask"
    finally:
        d.stop()
