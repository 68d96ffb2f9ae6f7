"""Crash the master with kill -9 while it journals, mid-compaction included.

Rounds of submits (some delayed, some with far deadlines or keys) run on a
daemon whose journal compacts every few kilobytes; each round ends with a
SIGKILL of the master at a seeded-random instant, then a restart. Some
rounds make a compaction start and kill the master while its child is
still writing the snapshot.

At the end every acknowledged task must be DONE, every witnessed task must
have run, a task may run twice only when a kill cut it between its side
effect and its journaled result (at most one per busy worker per kill:
duplicates <= 2 * kills), the journal must check clean after a graceful
shutdown, and no snapshot file of a dead master may be left behind.

The seed is printed; set LBD_CHAOS_SEED to replay the same choices.
"""

import collections
import glob
import os
import random
import re
import subprocess
import sys
import time

import pytest

from conftest import LBD, wait_until

H = "lbdtest_handlers"
WORKERS = 2
ROUNDS = 20
CONFIG = {
    "journal": {"compact_bytes": 8192},
    "workers": {"min": WORKERS, "max": WORKERS, "kill_grace": 0.5,
                "heartbeat_interval": 0.2, "heartbeat_timeout": 5.0,
                "stop_grace": 2.0},
    "tasks": {"retry_backoff": 0.01, "retry_backoff_max": 0.05},
}
#: The largest padding submit; max_request_bytes is 1 MiB.
MAX_PAD = 800_000
#: How a round ends: kill while a compaction child writes its snapshot;
#: after a compaction was installed, at a random point of progress; at a
#: random point of progress; as soon as the submits are acknowledged.
MODES = ("mid-compaction", "mid-compaction", "compaction", "progress",
         "progress", "ack")
FORCED = {1: "mid-compaction", 2: "compaction"}

COMPACTING = re.compile(rb"compacting in child pid (\d+)")
COMPACTION_END = re.compile(
    rb"compacted to \d+ bytes|compaction failed|compaction child \d+ failed")


def witnessed(path):
    """Return Counter((task id, attempt)) of every run the handler saw."""
    try:
        with open(path) as f:
            return collections.Counter(tuple(line.split()) for line in f)
    except FileNotFoundError:
        return collections.Counter()


def runs(path):
    return sum(witnessed(path).values())


def log_since(daemon, offset):
    with open(daemon.log_path, "rb") as f:
        f.seek(offset)
        return f.read()


def compaction_cut(log_bytes):
    """Return the pid of a compaction the log shows started, never ended."""
    starts = list(COMPACTING.finditer(log_bytes))
    if not starts:
        return None
    last = starts[-1]
    if COMPACTION_END.search(log_bytes, last.end()):
        return None
    return int(last.group(1))


def parent_of(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[1])


def snapshot_files(journal):
    return sorted(glob.glob(glob.escape(journal) + ".compact-*"))


def stale_snapshots(daemon):
    """Snapshot files no compaction child of the running master owns."""
    return [path for path in snapshot_files(daemon.journal)
            if parent_of(int(path.rsplit("-", 1)[1])) != daemon.pid]


def make_tasks(rng, witness, round_, count):
    tasks = []
    for i in range(count):
        task = {"handler": f"{H}:busy_record",
                "args": [witness, rng.choice((0.0, 0.001, 0.002))],
                "max_attempts": 40, "priority": rng.randint(-2, 2)}
        if rng.random() < 0.2:
            task["delay"] = rng.uniform(0.02, 0.3)
        if rng.random() < 0.3:
            task["deadline"] = 900.0
        if rng.random() < 0.3:
            task["key"] = f"r{round_}-{i}"
        tasks.append(task)
    return tasks


def submit_all(client, tasks):
    responses = client.pipeline([{"op": "submit", "task": t} for t in tasks])
    assert all(r["ok"] for r in responses), \
        [r for r in responses if not r["ok"]][:3]
    assert not any(r["duplicate"] for r in responses)
    return [r["id"] for r in responses]


@pytest.mark.chaos
def test_kill9_at_random_instants_and_mid_compaction_loses_nothing(
        start_daemon, tmp_path):
    seed = int(os.environ.get("LBD_CHAOS_SEED") or time.time_ns() % 2 ** 32)
    print(f"journal crash seed {seed} (LBD_CHAOS_SEED={seed} to replay)")
    rng = random.Random(seed)
    began = time.monotonic()
    d = start_daemon(config=CONFIG, args=["--handlers", H])
    witness = str(tmp_path / "witness")
    busy_ids, all_ids, keyed = [], [], {}
    kills, mid_compaction, modes = 0, 0, collections.Counter()
    log_from = 0

    def submit_round(c, round_, count):
        tasks = make_tasks(rng, witness, round_, count)
        ids = submit_all(c, tasks)
        busy_ids.extend(ids)
        all_ids.extend(ids)
        keyed.update({t["key"]: tid for t, tid in zip(tasks, ids)
                      if "key" in t})
        return ids

    def compaction(c, since):
        """"running", "over" (it ran and was installed), or None."""
        if c.status()["journal"]["compacting"]:
            return "running"
        if COMPACTION_END.search(log_since(d, since)) and \
                not c.status()["journal"]["compacting"]:
            return "over"
        return None

    for round_ in range(ROUNDS):
        # Round 1 always kills mid-compaction at once, round 2 always
        # after one: each run covers both, whatever the seed.
        mode = FORCED.get(round_) or rng.choice(MODES)
        quick = round_ in FORCED
        with d.client(timeout=30) as c:
            ids = submit_round(c, round_, rng.randint(15, 40))
            size = c.status()["journal"]["bytes"]
            if mode.endswith("compaction") and size > MAX_PAD:
                mode = "progress"       # keep the journal (and run) small
            if mode.endswith("compaction"):
                # A submit as big as the whole journal at least doubles
                # it, so a compaction starts once it is written (or one
                # already running takes it in). The forced mid-compaction
                # round tries again until it sees one running.
                tries = 3 if quick and mode == "mid-compaction" else 1
                for _ in range(tries):
                    since = d.log_path.stat().st_size
                    pad = c.request("submit", task={
                        "handler": f"{H}:fail_until",
                        "args": [1, "p" * c.status()["journal"]["bytes"]],
                        "priority": -5})
                    assert pad["ok"], pad
                    all_ids.append(pad["id"])
                    state = wait_until(lambda: compaction(c, since), 10,
                                       interval=0,
                                       what="a compaction to start")
                    if state == "running":
                        break
                if state == "running" and not quick and \
                        rng.random() < 0.7:
                    # Submits while the child writes: only the records
                    # written since the fork carry these.
                    ids += submit_round(c, f"{round_}c", rng.randint(1, 10))
                if mode == "mid-compaction":
                    # Kill while the child writes the snapshot, a few polls
                    # in (it may have finished: the log tells).
                    for _ in range(0 if quick else rng.randint(0, 3)):
                        c.status()
                else:
                    wait_until(lambda: compaction(c, since) == "over", 20,
                               what="the compaction to be installed")
                    mode = "after-compaction"
            if mode in ("progress", "after-compaction"):
                # Reachable: every id runs at least once, in the end.
                target = min(len(busy_ids), runs(witness) +
                             rng.randint(1, len(ids)))
                wait_until(lambda: runs(witness) >= target, 30,
                           what="progress before the kill")
            # "ack": kill as soon as every submit is acknowledged.
        d.kill9()
        kills += 1
        modes[mode] += 1
        if compaction_cut(log_since(d, log_from)) is not None:
            mid_compaction += 1
        log_from = d.log_path.stat().st_size
        d.start()

    # The final daemon: everything acknowledged finishes, once recovered.
    with d.client(timeout=90) as c:
        assert not stale_snapshots(d), snapshot_files(d.journal)
        waited = c.pipeline([{"op": "wait", "id": tid, "timeout": 60}
                             for tid in all_ids])
        failed = [r for r in waited if not r["ok"]]
        assert not failed, f"{len(failed)} waits failed: {failed[:3]}"
        views = [r["task"] for r in waited]
        states = collections.Counter(v["state"] for v in views)
        assert states == {"DONE": len(all_ids)}, states
        # Keys survived every crash: a resubmit is the old task.
        for key, tid in sorted(keyed.items())[:20]:
            again = c.request("submit", task={"handler": "lbd:echo",
                                              "key": key})
            assert again == {"ok": True, "id": tid, "duplicate": True}, key

    seen = witnessed(witness)
    ran = collections.Counter(tid for tid, _ in seen.elements())
    missing = [tid for tid in busy_ids if tid not in ran]
    assert not missing, f"{len(missing)} tasks never ran: {missing[:5]}"
    assert set(ran) <= set(busy_ids)
    # Fencing across restarts: an attempt number is never handed out twice.
    twice = [pair for pair, n in seen.items() if n > 1]
    assert not twice, f"attempts that ran twice: {twice[:5]}"
    duplicates = sum(n - 1 for n in ran.values())
    views = {v["id"]: v for v in views}
    for tid in busy_ids:
        view = views[tid]
        attempts = sorted(int(a) for t, a in seen if t == tid)
        # The attempt that ended it DONE is the last one that ran, and
        # every earlier one was cut by a kill, recorded once.
        assert attempts[-1] == view["attempts"], (view, attempts)
        assert len(view["errors"]) == view["attempts"] - 1, view
        assert {e["reason"] for e in view["errors"]} <= {"interrupted"}, \
            view["errors"]
        assert view["crashes"] == 0 and view["attempts"] <= kills + 1, view
    print(f"tasks {len(all_ids)}, kills {kills} {dict(modes)}, "
          f"kills mid-compaction {mid_compaction}, duplicates {duplicates}, "
          f"journal {os.path.getsize(d.journal)} bytes, "
          f"compactions {d.log_text().count('compacting in child')}, "
          f"seconds {time.monotonic() - began:.1f}")
    assert duplicates <= WORKERS * kills, (duplicates, kills)
    assert mid_compaction >= 1, "no kill landed during a compaction"

    d.request("shutdown")
    assert d.proc.wait(30) == 0
    check = subprocess.run([sys.executable, LBD, "journal", "check",
                            d.journal], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "clean" in check.stdout
    assert snapshot_files(d.journal) == []
    assert time.monotonic() - began < 50
