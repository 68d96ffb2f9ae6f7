"""Durability with real processes: kill -9, torn tails, restarts, disk full."""

import os
import subprocess
import sys
import threading

import pytest

import lbd
from conftest import Daemon, LBD, ROOT, ids_in, wait_until

H = "lbdtest_handlers"
FAST = {"workers": {"kill_grace": 0.5, "heartbeat_interval": 0.2,
                    "heartbeat_timeout": 5.0},
        "tasks": {"retry_backoff": 0.01, "retry_backoff_max": 0.05}}


def journal_check(path):
    proc = subprocess.run([sys.executable, LBD, "journal", "check", path],
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr


def submit_all(daemon, tasks):
    with daemon.client() as c:
        responses = c.pipeline([{"op": "submit", "task": t} for t in tasks])
    assert all(r["ok"] for r in responses), responses[:3]
    return [r["id"] for r in responses]


def wait_all(daemon, ids, timeout=60):
    with daemon.client(timeout=timeout + 5) as c:
        return [c.wait(tid, timeout=timeout) for tid in ids]


def test_acknowledged_tasks_survive_kill9(start_daemon, tmp_path):
    d = start_daemon(config=FAST, args=["--handlers", H])
    out = str(tmp_path / "ran")
    tasks = []
    for i in range(300):
        task = {"handler": f"{H}:busy_record", "args": [out, 0.002],
                "max_attempts": 5}
        if i % 7 == 0:
            task["delay"] = 0.3
        if i % 5 == 0:
            task["deadline"] = 600
        if i % 3 == 0:
            task["key"] = f"k{i}"
        tasks.append(task)
    ids = submit_all(d, tasks)
    wait_until(lambda: sum(ids_in(out).values()) >= 40, 30,
               what="some tasks to finish")
    busy = len(d.workers("BUSY"))
    d.kill9()
    d.start()
    views = wait_all(d, ids)
    assert [v["state"] for v in views] == ["DONE"] * len(ids)
    ran = ids_in(out)
    assert set(ran) == set(ids)
    duplicates = sum(ran.values()) - len(ids)
    print(f"tasks {len(ids)}, busy at kill {busy}, duplicates {duplicates}")
    assert duplicates <= 2   # at most one per worker (2 workers)
    # Keys came back: resubmitting one is a duplicate of the old task.
    with d.client() as c:
        again = c.request("submit", task={"handler": "lbd:echo",
                                          "key": "k3"})
    assert again["duplicate"] and again["id"] == ids[3]
    d.request("shutdown")
    d.proc.wait(30)
    code, report = journal_check(d.journal)
    assert code == 0, report


def test_kill9_at_random_instants_loses_nothing(start_daemon, tmp_path):
    import random
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    d = start_daemon(config=FAST, args=["--handlers", H])
    out = str(tmp_path / "ran")
    ids, kills = [], 0
    for _ in range(4):
        ids += submit_all(d, [{"handler": f"{H}:busy_record",
                               "args": [out, 0.001], "max_attempts": 10}
                              for _ in range(60)])
        target = min(len(ids), sum(ids_in(out).values()) +
                     rng.randrange(1, 40))
        wait_until(lambda: sum(ids_in(out).values()) >= target, 30,
                   what="progress")
        d.kill9()
        kills += 1
        d.start()
    views = wait_all(d, ids)
    assert all(v["state"] == "DONE" for v in views)
    ran = ids_in(out)
    assert set(ran) == set(ids)
    duplicates = sum(ran.values()) - len(ids)
    print(f"tasks {len(ids)}, kills {kills}, duplicates {duplicates}")
    assert duplicates <= 2 * kills


def test_half_a_record_at_the_end_is_truncated_on_start(
        start_daemon, tmp_path):
    d = start_daemon(config=FAST)
    ids = submit_all(d, [{"handler": "lbd:echo", "args": [i]}
                         for i in range(5)])
    wait_all(d, ids)
    d.request("shutdown")
    d.proc.wait(30)
    with open(d.journal, "ab") as f:
        f.write(b'0badc0de {"k":"s","t":{"seq":')
    code, report = journal_check(d.journal)
    assert code != 0 and "torn tail" in report
    d.start()
    assert "truncating" in d.log_text()
    with d.client() as c:
        assert [c.get(t)["result"] for t in ids] == [[i] for i in range(5)]
    d.request("shutdown")
    d.proc.wait(30)
    assert journal_check(d.journal)[0] == 0


def test_corruption_mid_file_refuses_start_naming_the_offset(tmp_path):
    d = Daemon(tmp_path / "d", config=FAST)
    d.start()
    try:
        ids = submit_all(d, [{"handler": "lbd:echo", "args": [i]}
                             for i in range(5)])
        wait_all(d, ids)
        d.request("shutdown")
        d.proc.wait(30)
        data = bytearray(open(d.journal, "rb").read())
        second = data.index(b"\n") + 1
        data[second + 20] ^= 0x01          # flip a bit in record two
        open(d.journal, "wb").write(bytes(data))
        proc = subprocess.run(
            [sys.executable, LBD, "serve", "--socket", d.socket,
             "--journal", d.journal], capture_output=True, text=True,
            timeout=60, stdin=subprocess.DEVNULL)
        assert proc.returncode != 0
        assert f"byte {second}" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not os.path.exists(d.socket)
        repair = subprocess.run(
            [sys.executable, LBD, "journal", "repair", d.journal],
            capture_output=True, text=True, timeout=60)
        assert repair.returncode == 0, repair.stderr
        backups = [p for p in os.listdir(os.path.dirname(d.journal))
                   if ".bak-" in p]
        assert len(backups) == 1
        assert journal_check(d.journal)[0] == 0
        d.start()
        with d.client() as c:
            # The damaged record was the first task's submit; the rest stay.
            for i, tid in enumerate(ids[1:], 1):
                assert c.get(tid)["result"] == [i]
    finally:
        d.stop()


def test_sigterm_requeues_running_tasks_and_they_complete_once(
        start_daemon, tmp_path, gate):
    config = {**FAST, "workers": {**FAST["workers"], "stop_grace": 0.5}}
    d = start_daemon(config=config, args=["--handlers", H])
    out = str(tmp_path / "ran")
    ids = submit_all(d, [{"handler": f"{H}:gated",
                          "args": [gate.path, out, f"t{i}"]}
                         for i in range(5)])
    wait_until(lambda: len(d.workers("BUSY")) == 2, 20,
               what="two running tasks")
    assert d.terminate(30) == 0
    assert not os.path.exists(d.socket)
    assert not os.path.exists(out)          # nothing finished
    gate.open()
    d.start()
    views = wait_all(d, ids)
    assert all(v["state"] == "DONE" for v in views)
    assert all(v["attempts"] == 1 for v in views)   # the kill did not count
    with open(out) as f:
        tags = f.read().split()
    assert sorted(tags) == sorted(f"t{i}" for i in range(5))


def test_second_daemon_on_the_same_journal_is_refused(daemon, tmp_path):
    other = os.path.join(os.path.dirname(daemon.socket), "other")
    proc = subprocess.run(
        [sys.executable, LBD, "serve", "--socket", other, "--journal",
         daemon.journal], capture_output=True, text=True, timeout=30,
        stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert daemon.journal in proc.stderr
    assert f"pid {daemon.pid}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert daemon.request("ping")["ok"]


def finished(daemon):
    counters = daemon.status()["counters"]
    return counters["done"] + counters["dead"] + counters["expired"]


def test_journal_stays_bounded_under_churn_and_replays(start_daemon):
    compact = 32 * 1024
    config = {**FAST, "journal": {"compact_bytes": compact},
              "tasks": {**FAST["tasks"], "result_ttl": 0.0,
                        "dedupe_window": 0.0}}
    d = start_daemon(config=config, args=["--handlers", H])
    biggest, total = 0, 0
    for round_ in range(150):    # 7,500 tasks, at most 50 live at a time
        tasks = []
        for i in range(50):
            kind = i % 4
            if kind == 0:     # fails once, retried after a backoff
                tasks.append({"handler": f"{H}:fail_until", "args": [2],
                              "key": f"r{round_}-{i}"})
            elif kind == 1:   # delayed
                tasks.append({"handler": "lbd:echo", "args": ["x" * 50],
                              "delay": 0.01})
            elif kind == 2:
                tasks.append({"handler": "lbd:echo", "args": [i],
                              "deadline": 30})
            else:             # expires before it may run
                tasks.append({"handler": "lbd:echo", "args": [i],
                              "delay": 60, "deadline": 0.05})
        submit_all(d, tasks)
        total += len(tasks)
        wait_until(lambda: finished(d) >= total, 60,
                   what="the round to finish")
        biggest = max(biggest, os.path.getsize(d.journal))
    print(f"tasks {total}, largest journal {biggest} bytes, "
          f"compact_bytes {compact}")
    assert "compacted" in d.log_text()
    assert biggest < 8 * compact
    live = submit_all(d, [{"handler": "lbd:echo", "args": [i],
                           "delay": 600, "priority": i % 3}
                          for i in range(20)])
    before = {tid: d.request("get", id=tid)["task"] for tid in live}
    d.kill9()
    d.start()
    for tid, view in before.items():
        assert d.request("get", id=tid)["task"] == view
    assert d.status()["queue"] == {"ready": 0, "delayed": 20, "running": 0}


def test_every_fsync_mode_runs_tasks(start_daemon):
    for mode in ("always", "interval", "never", "submits"):
        d = start_daemon(config={"journal": {"fsync": mode}}, name=mode)
        ids = submit_all(d, [{"handler": "lbd:echo", "args": [mode]}] * 3)
        assert [v["result"] for v in wait_all(d, ids)] == [[mode]] * 3
        assert d.status()["journal"]["fsync"] == mode
        d.kill9()
        d.start()
        assert all(v["state"] == "DONE" for v in wait_all(d, ids))


FAULTY = """
import errno, os, sys
sys.path.insert(0, {root!r})
import lbd
real = os.write
def faulty(fd, data):
    if os.path.exists({flag!r}):
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(fd, data)
lbd._write = faulty
sys.exit(lbd.main(sys.argv[1:]))
"""


def test_disk_full_refuses_submits_and_recovers(tmp_path):
    flag = str(tmp_path / "disk-full")
    wrapper = tmp_path / "faulty_lbd.py"
    wrapper.write_text(FAULTY.format(root=str(ROOT), flag=flag))
    d = Daemon(tmp_path / "d", config=FAST)
    d.script = str(wrapper)
    d.start()
    try:
        open(flag, "w").close()
        held = {}

        def submit():
            with d.client() as c:
                held["id"] = c.submit("lbd:echo", "held")

        thread = threading.Thread(target=submit, daemon=True)
        thread.start()
        wait_until(lambda: d.status()["journal"]["error"], 20,
                   what="the journal error to show in status")
        assert "held" not in held           # not acknowledged while failing
        with pytest.raises(lbd.RequestError) as err:
            with d.client() as c:
                c.submit("lbd:echo", "refused")
        assert err.value.code == "journal_error"
        assert "No space left" in d.log_text()
        os.unlink(flag)
        thread.join(20)
        assert "id" in held                 # acknowledged once written
        assert d.status()["journal"]["error"] is None
        with d.client() as c:
            assert c.wait(held["id"], timeout=20)["state"] == "DONE"
            ok = c.submit("lbd:echo", "after")
            assert c.wait(ok, timeout=20)["state"] == "DONE"
        d.kill9()
        d.start()
        assert d.request("get", id=held["id"])["task"]["state"] == "DONE"
    finally:
        d.stop()
