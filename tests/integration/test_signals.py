"""Signals to the master and to its workers."""

import os
import signal

from conftest import wait_until


def test_second_sigterm_skips_the_grace(start_daemon, gate):
    d = start_daemon(config={"workers": {"stop_grace": 600,
                                         "kill_grace": 0.5}},
                     args=["--handlers", "lbdtest_handlers"])
    with d.client() as c:
        c.submit("lbdtest_handlers:gated", gate.path)
        wait_until(lambda: len(d.workers("BUSY")) == 1, 20, what="busy")
    d.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: d.status()["stopping"], 20, what="stopping")
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(30) == 0      # long before the 600 s grace


def test_sigttin_and_sigttou_move_the_target_within_bounds(start_daemon):
    d = start_daemon(args=["--min-workers", "1", "--max-workers", "3"])
    wait_until(lambda: len(d.workers("IDLE")) == 1, 20, what="one worker")

    def step(signum, target):
        # Signals of one kind coalesce while pending: one at a time.
        d.proc.send_signal(signum)
        wait_until(lambda: d.status()["target_workers"] == target, 20,
                   what=f"target {target}")

    step(signal.SIGTTIN, 2)
    step(signal.SIGTTIN, 3)
    d.proc.send_signal(signal.SIGTTIN)       # beyond max: stays at 3
    wait_until(lambda: len(d.workers("IDLE")) == 3, 20,
               what="three workers")
    assert d.status()["target_workers"] == 3
    step(signal.SIGTTOU, 2)
    step(signal.SIGTTOU, 1)
    d.proc.send_signal(signal.SIGTTOU)       # below min: stays at 1
    wait_until(lambda: len(d.workers()) == 1, 20, what="back to one")
    assert d.status()["target_workers"] == 1


def test_workers_ignore_sigint_and_sighup(daemon):
    wait_until(lambda: len(daemon.workers("IDLE")) == 2, 20,
               what="two workers")
    before = {w["pid"] for w in daemon.workers()}
    for pid in before:
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGHUP)
    with daemon.client() as c:
        tids = [c.submit("lbd:echo", i) for i in range(4)]
        assert all(c.wait(t, timeout=20)["state"] == "DONE" for t in tids)
    assert {w["pid"] for w in daemon.workers()} == before
