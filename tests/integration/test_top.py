"""`lbd top`: a plain frame without a terminal, a live screen with one."""

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest

from conftest import LBD, wait_until

H = "lbdtest_handlers"


def settled(d, count=2):
    """Wait until ``count`` workers are past STARTING; return the status."""
    wait_until(lambda: len([w for w in d.workers() if w["state"] in
                            ("IDLE", "BUSY")]) == count, 20,
               what="the workers to be ready")
    return d.status()


def check_frame(text, status):
    lines = text.splitlines()
    header = [line for line in lines if "WORKER" in line]
    assert len(header) == 1, f"not one frame:\n{text}"
    assert re.search(r"WORKER\s+PID\s+STATE", header[0]), header[0]
    queue = [line for line in lines if line.startswith("queue:")]
    assert len(queue) == 1, text
    q = status["queue"]
    assert f"{q['ready']} ready" in queue[0] and \
        f"{q['running']} running" in queue[0], queue[0]
    for w in status["workers"]:
        assert re.search(rf"^\s*{w['id']}\s+{w['pid']}\s+{w['state']}\b",
                         text, re.M), f"no row for worker {w}:\n{text}"
    assert f"pid {status['pid']}" in text


@pytest.mark.parametrize("once", [False, True], ids=["plain", "once"])
def test_top_without_a_terminal_prints_one_frame(daemon, gate, request,
                                                 once):
    request.addfinalizer(gate.open)
    with daemon.client() as c:
        busy = c.submit(f"{H}:gated", gate.path)
        wait_until(lambda: c.get(busy)["state"] == "RUNNING", 20,
                   what="a task to run")
    status = settled(daemon)
    args = ["top", "--once"] if once else ["top"]
    started = time.monotonic()
    proc = daemon.cli(*args, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 20
    check_frame(proc.stdout, status)
    row = [line for line in proc.stdout.splitlines() if busy in line]
    assert row and "BUSY" in row[0], proc.stdout
    assert "\x1b" not in proc.stdout       # plain text, no escapes


def test_top_without_a_daemon_fails_cleanly(tmp_path):
    proc = subprocess.run(
        [sys.executable, LBD, "top", "--socket", str(tmp_path / "nobody")],
        capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr


class Pty:
    """A child process on a pseudo-terminal of a fixed size."""

    def __init__(self, argv, rows=30, cols=100, env=None):
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ,
                    struct.pack("HHHH", rows, cols, 0, 0))
        try:
            self.proc = subprocess.Popen(
                argv, stdin=slave, stdout=slave, stderr=slave,
                env=dict(os.environ, TERM="xterm", **(env or {})),
                start_new_session=True, close_fds=True)
        finally:
            os.close(slave)
        self.output = b""

    def read_until(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while not predicate(self.output):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}; "
                                     f"screen so far: {self.output[-2000:]!r}")
            if not self._read(left):
                raise AssertionError(f"terminal closed before {what}: "
                                     f"{self.output[-2000:]!r}")

    def _read(self, timeout):
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:         # EIO: the child closed the terminal
            return False
        self.output += data
        return bool(data)

    def write(self, data):
        os.write(self.master, data)

    def wait(self, timeout):
        """Keep draining the terminal until the child exits."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("the child did not exit; screen: "
                                     f"{self.output[-2000:]!r}")
            self._read(min(left, 0.1))
        return self.proc.returncode

    def close(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        os.close(self.master)


@pytest.fixture
def pty_run():
    started = []

    def run(argv, **kwargs):
        p = Pty(argv, **kwargs)
        started.append(p)
        return p

    yield run
    for p in started:
        p.close()


def test_top_on_a_terminal_draws_and_quits_on_q(daemon, pty_run):
    status = settled(daemon)
    t = pty_run([sys.executable, LBD, "top", "--socket", daemon.socket,
                 "--interval", "0.2"])
    t.read_until(lambda out: b"WORKER" in out and b"q: quit" in out, 20,
                 "the screen to be drawn")
    assert b"\x1b[" in t.output            # a curses screen, not plain text
    for w in status["workers"]:
        assert str(w["pid"]).encode() in t.output
    # It keeps refreshing: more frames arrive while it runs.
    drawn = len(t.output)
    t.read_until(lambda out: len(out) > drawn, 10, "a refresh")
    started = time.monotonic()
    t.write(b"q")
    assert t.wait(10) == 0
    assert time.monotonic() - started < 10
    assert b"Traceback" not in t.output


def test_top_once_on_a_terminal_prints_plain_text(daemon, pty_run):
    settled(daemon)
    t = pty_run([sys.executable, LBD, "top", "--once", "--socket",
                 daemon.socket])
    assert t.wait(20) == 0
    text = t.output.decode(errors="replace").replace("\r\n", "\n")
    check_frame(text, daemon.status())
    assert "\x1b" not in text


def test_top_on_a_terminal_exits_cleanly_when_the_daemon_goes(daemon,
                                                              pty_run):
    t = pty_run([sys.executable, LBD, "top", "--socket", daemon.socket,
                 "--interval", "0.2"])
    t.read_until(lambda out: b"WORKER" in out, 20, "the screen to be drawn")
    assert daemon.terminate() == 0
    assert t.wait(20) == 3          # no daemon answering
    assert b"Traceback" not in t.output
    assert b"lbd:" in t.output      # the reason, on the restored terminal
