"""Kill storm: SIGKILL busy workers at random while hundreds of tasks run.

Every task must still end DONE, every task must have run (its id is in the
witness file), and a task may run twice only when a kill landed between
its side effect and its result reaching the master: duplicates <= kills.

The seed is printed; set LBD_CHAOS_SEED to replay the same choices.
"""

import collections
import os
import random
import signal
import time

import pytest

from conftest import wait_until

TASKS = 300
WORKERS = 4


def pgid_of(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


@pytest.mark.chaos
def test_kill_storm_loses_no_task(start_daemon, tmp_path):
    seed = int(os.environ.get("LBD_CHAOS_SEED") or
               time.time_ns() % 2 ** 32)
    print(f"kill storm seed {seed} (LBD_CHAOS_SEED={seed} to replay)")
    rng = random.Random(seed)
    target_kills = rng.randint(15, 25)
    d = start_daemon(config={
        "workers": {"min": WORKERS, "max": WORKERS,
                    "heartbeat_interval": 0.2, "heartbeat_timeout": 5.0,
                    "kill_grace": 0.5, "start_timeout": 10,
                    "stop_grace": 2.0},
        "tasks": {"max_crashes": 100, "max_attempts": 50,
                  "retry_backoff": 0.01, "retry_backoff_max": 0.05},
    }, args=["--handlers", "lbdtest_handlers"])
    wait_until(lambda: len(d.workers("IDLE")) == WORKERS, 20,
               what=f"{WORKERS} idle workers")
    witness = str(tmp_path / "witness")
    start = time.monotonic()
    killed = set()
    with d.client(timeout=60) as c:
        responses = c.pipeline([
            {"op": "submit", "task": {
                "handler": "lbdtest_handlers:busy_record",
                "args": [witness, 0.01]}}
            for _ in range(TASKS)])
        assert all(r["ok"] for r in responses), \
            [r for r in responses if not r["ok"]][:3]
        ids = [r["id"] for r in responses]
        assert len(set(ids)) == TASKS

        storm_end = time.monotonic() + 30
        while len(killed) < target_kills and time.monotonic() < storm_end:
            status = c.status()
            done = status["counters"]["done"]
            if done >= TASKS:
                break
            busy = [w["pid"] for w in status["workers"]
                    if w["state"] == "BUSY" and w["pid"] not in killed
                    and pgid_of(w["pid"]) == d.pid]
            if not busy:
                time.sleep(0.002)   # polling for a busy worker, bounded
                continue
            victim = rng.choice(sorted(busy))
            os.kill(victim, signal.SIGKILL)
            killed.add(victim)
            # Space the kills by progress, so the storm spans the run.
            wait_until(lambda: c.status()["counters"]["done"] >=
                       min(TASKS, done + 3), 20,
                       what="progress between kills")

        waited = c.pipeline([{"op": "wait", "id": tid, "timeout": 40}
                             for tid in ids])
        failed = [r for r in waited if not r["ok"]]
        assert not failed, f"{len(failed)} waits failed: {failed[:3]}"
        views = [r["task"] for r in waited]
        idle = wait_until(lambda: len(ws := [
            w for w in c.status()["workers"] if w["state"] == "IDLE"])
            == WORKERS and ws, 20, what="the pool to be refilled")
        counts = c.status()["counters"]
    seconds = time.monotonic() - start

    kills = len(killed)
    with open(witness) as f:
        runs = collections.Counter(line.split()[0] for line in f)
    duplicates = sum(n - 1 for n in runs.values())
    extra_attempts = sum(v["attempts"] - 1 for v in views)
    print(f"tasks {TASKS}, kills {kills}, duplicates {duplicates}, "
          f"retried {extra_attempts}, seconds {seconds:.2f}")

    assert kills >= 10, f"the storm only managed {kills} kills"
    assert [v["state"] for v in views].count("DONE") == TASKS, \
        collections.Counter(v["state"] for v in views)
    missing = [tid for tid in ids if tid not in runs]
    assert not missing, f"{len(missing)} tasks never ran: {missing[:5]}"
    assert set(runs) <= set(ids)
    assert duplicates <= kills, (duplicates, kills)
    # Each kill orphans at most one attempt, and nothing else failed.
    assert extra_attempts <= kills, (extra_attempts, kills)
    assert all(e["reason"] == "crash" for v in views for e in v["errors"])
    assert counts["worker_crashes"] == kills
    assert counts["retried"] == extra_attempts
    assert counts["done"] == TASKS and counts["dead"] == 0
    assert not {w["pid"] for w in idle} & killed
    assert seconds < 45, seconds
