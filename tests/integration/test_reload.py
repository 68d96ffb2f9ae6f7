"""Live reload (`lbd reload`, SIGHUP): the config is re-read and applied,
the workers roll to a new generation, and nothing is lost on the way."""

import os
import signal

import pytest

import lbd
from conftest import Daemon, LBD, ids_in, wait_until, write_config

H = "lbdtest_handlers"


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def rolled_to(d, generation, count):
    """True once exactly ``count`` workers run, all IDLE and new."""
    workers = d.workers()
    return len(workers) == count and all(
        w["generation"] == generation and w["state"] == "IDLE"
        for w in workers)


def reload_cli(d):
    proc = d.cli("reload")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_reload_under_load_loses_and_repeats_nothing(start_daemon, tmp_path):
    config = {"workers": {"min": 2, "max": 2, "handlers": [H]},
              "tasks": {"timeout": 300.0}}
    d = start_daemon(config=config)
    conf = d.workdir / "lbd.toml"
    out = str(tmp_path / "ran")
    first = {w["pid"] for w in d.workers()}
    total = 200
    with d.client() as c:
        responses = c.pipeline([{"op": "submit", "task": {
            "handler": f"{H}:busy_record", "args": [out, 0.01]}}
            for _ in range(total)])
    assert all(r["ok"] for r in responses)
    ids = [r["id"] for r in responses]

    seen = set(first)
    for step, (how, timeout, progress) in enumerate(
            [("lbd reload", 120.0, 20), ("SIGHUP", 90.0, 80)]):
        wait_until(lambda: sum(ids_in(out).values()) >= progress, 30,
                   what=f"{progress} tasks to finish")
        config["tasks"]["timeout"] = timeout
        write_config(conf, config)
        if how == "SIGHUP":
            os.kill(d.pid, signal.SIGHUP)
        else:
            assert "generation 2" in reload_cli(d)
        done = sum(ids_in(out).values())
        assert done < total, f"reload {step + 1} came after the load"
        seen |= {w["pid"] for w in d.workers()}

    with d.client(timeout=120) as c:
        views = [c.wait(tid, timeout=60) for tid in ids]
        assert [v["state"] for v in views] == ["DONE"] * total
        assert all(v["attempts"] == 1 for v in views)
        # The new default applies to tasks submitted from now on.
        late = c.submit("lbd:echo", 1)
        assert c.wait(late, timeout=30)["timeout"] == 90.0
    ran = ids_in(out)
    assert set(ran) == set(ids)
    assert [tid for tid, n in ran.items() if n != 1] == []

    wait_until(lambda: rolled_to(d, 3, 2), 30,
               what="both workers to be of generation 3")
    now = {w["pid"] for w in d.workers()}
    old = (seen | first) - now
    assert first <= old, "a generation-1 worker is still serving"
    wait_until(lambda: not any(alive(pid) for pid in old), 20,
               what="the old workers to exit")


VERSION_1 = '''\
def version():
    return "v1"
'''

VERSION_2 = '''\
VERSION = "v2"      # the new code


def version():
    return VERSION


def added():
    return "new handler"
'''


def test_reload_loads_new_handler_code(start_daemon, tmp_path):
    workdir = tmp_path / "code"
    workdir.mkdir()
    (workdir / "verhandler.py").write_text(VERSION_1)
    d = start_daemon(name="code", config={
        "workers": {"min": 2, "max": 2, "handlers": ["verhandler"]}})
    with d.client() as c:
        assert c.wait(c.submit("verhandler:version"), timeout=30)[
            "result"] == "v1"
        with pytest.raises(lbd.RequestError) as err:
            c.submit("verhandler:added")     # not there yet
        assert err.value.code == lbd.UNKNOWN_HANDLER

    (workdir / "verhandler.py").write_text(VERSION_2)
    response = d.request("reload")
    generation = response["generation"]
    assert generation == 2
    wait_until(lambda: rolled_to(d, generation, 2), 30,
               what="the workers to roll to the new code")
    with d.client() as c:
        ids = [c.submit("verhandler:version") for _ in range(6)]
        assert [c.wait(t, timeout=30)["result"] for t in ids] == ["v2"] * 6
        assert c.wait(c.submit("verhandler:added"), timeout=30)[
            "result"] == "new handler"


def test_invalid_config_is_rejected_and_the_old_one_stays(start_daemon):
    config = {"workers": {"min": 2, "max": 2, "handlers": [H]},
              "tasks": {"timeout": 300.0}}
    d = start_daemon(config=config)
    conf = d.workdir / "lbd.toml"
    before = d.status()
    bad = {"workers": {"min": 3, "max": 3, "handlers": [H]},
           "tasks": {"timeout": 5.0, "bogus_key": 1}}
    write_config(conf, bad)
    proc = d.cli("reload")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "tasks.bogus_key" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    after = d.status()
    assert after["min_workers"] == before["min_workers"] == 2
    assert after["max_workers"] == before["max_workers"] == 2
    assert [(w["pid"], w["generation"]) for w in after["workers"]] == \
        [(w["pid"], w["generation"]) for w in before["workers"]]
    with d.client() as c:
        assert c.wait(c.submit("lbd:echo", 1), timeout=30)["timeout"] == 300.0
    assert "rejected" in d.log_text()
    # A SIGHUP with the same bad file: still rejected, still serving.
    os.kill(d.pid, signal.SIGHUP)
    wait_until(lambda: d.log_text().count("rejected") >= 2, 10,
               what="the second rejection")
    assert d.status()["min_workers"] == 2

    # Fixed, the next reload goes through.
    write_config(conf, config)
    assert "generation 2" in reload_cli(d)


# Runs lbd without --socket and --journal, so that they come from the
# config file alone (the command line would override the file).
FROM_FILE_ONLY = """\
import os, sys
argv = sys.argv[1:]
for option in ("--socket", "--journal"):
    i = argv.index(option)
    del argv[i:i + 2]
os.execv(sys.executable, [sys.executable, {lbd!r}] + argv)
"""


def test_socket_and_journal_changes_need_a_restart(tmp_path):
    wrapper = tmp_path / "from_file_only.py"
    wrapper.write_text(FROM_FILE_ONLY.format(lbd=LBD))
    d = Daemon(tmp_path / "restart")
    d.script = str(wrapper)
    config = {"server": {"socket": d.socket},
              "journal": {"path": d.journal},
              "workers": {"min": 1, "max": 1}}
    d.config = config
    other_socket = os.path.join(d.sockdir, "other")
    other_journal = str(d.workdir / "other.journal")
    try:
        d.start()
        config["server"]["socket"] = other_socket
        config["journal"]["path"] = other_journal
        config["workers"]["max"] = 2       # this one applies at once
        write_config(d.workdir / "lbd.toml", config)
        out = reload_cli(d)
        assert "server.socket" in out and "restart" in out, out
        assert "journal.path" in out, out
        log = d.log_text()
        assert "WARNING" in log and "server.socket" in log
        assert d.status()["max_workers"] == 2
        # Still on the old socket and journal; nothing at the new paths.
        with d.client() as c:
            size = os.path.getsize(d.journal)
            assert c.wait(c.submit("lbd:echo", 1), timeout=30)[
                "state"] == "DONE"
        assert os.path.getsize(d.journal) > size
        assert not os.path.exists(other_socket)
        assert not os.path.exists(other_journal)
    finally:
        d.stop()


def test_pool_bounds_change_at_once(start_daemon):
    config = {"workers": {"min": 1, "max": 1}}
    d = start_daemon(config=config)
    conf = d.workdir / "lbd.toml"
    for low, high, generation in ((3, 4, 2), (1, 1, 3)):
        config["workers"].update(min=low, max=high)
        write_config(conf, config)
        response = d.request("reload")
        assert response["generation"] == generation
        status = d.status()     # at once, not eventually
        assert (status["min_workers"], status["max_workers"]) == (low, high)
        assert low <= status["target_workers"] <= high
        wait_until(lambda: rolled_to(d, generation, low), 30,
                   what=f"{low} worker(s) of generation {generation}")


def test_reload_without_a_config_file_rolls_workers(start_daemon):
    # No -c: a reload re-applies the defaults and the command line.
    d = start_daemon(args=["--min-workers", "2", "--max-workers", "2"])
    before = {w["pid"] for w in d.workers()}
    assert "generation 2" in reload_cli(d)
    wait_until(lambda: rolled_to(d, 2, 2), 30, what="the roll")
    status = d.status()
    assert (status["min_workers"], status["max_workers"]) == (2, 2)
    assert not before & {w["pid"] for w in status["workers"]}
