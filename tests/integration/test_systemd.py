"""systemd integration with real processes: sd_notify, the watchdog, and
socket activation, with the test playing systemd's part.

The test binds the notify socket itself (a path, or an abstract name) and
reads the datagrams the daemon sends; for socket activation it creates
and listens on the socket and hands it over as fd 3 with LISTEN_PID set to
the daemon's own pid, as systemd does.
"""

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import lbd
from conftest import HANDLERS, LBD, Daemon, group_alive, wait_until

H = "lbdtest_handlers"


class NotifyListener:
    """The receiving end of $NOTIFY_SOCKET: collects parsed datagrams."""

    def __init__(self, abstract=False):
        self.dir = tempfile.mkdtemp(prefix="lbdn-", dir="/tmp")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"lbdtest-notify-{os.getpid()}-{os.urandom(4).hex()}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            path = os.path.join(self.dir, "notify")
            self.sock.bind(path)
            self.env_value = path
        self.messages = []      # (monotonic arrival, {KEY: VALUE}, raw)
        self.cursor = 0         # next_message() starts looking here

    def env(self, **extra):
        return {"NOTIFY_SOCKET": self.env_value, **extra}

    def _receive(self, timeout):
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, BlockingIOError):
            return False
        text = data.decode()
        fields = dict(line.split("=", 1) for line in text.split("\n")
                      if "=" in line)
        self.messages.append((time.monotonic(), fields, text))
        return True

    def next_message(self, predicate, timeout=20.0, what="a datagram"):
        """Return the first message from the cursor on that matches; the
        cursor moves past it. Raises AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            while self.cursor < len(self.messages):
                _, fields, _ = self.messages[self.cursor]
                self.cursor += 1
                if predicate(fields):
                    return fields
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no {what} within {timeout} s; got: "
                    f"{[m[2] for m in self.messages[-10:]]}")
            self._receive(left)

    def collect(self, seconds):
        """Receive for a fixed window; return the messages that arrived."""
        first = len(self.messages)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._receive(left)
        self.cursor = len(self.messages)
        return [m for m in self.messages[first:]]

    def close(self):
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def notify():
    listeners = []

    def make(abstract=False):
        listener = NotifyListener(abstract)
        listeners.append(listener)
        return listener

    yield make
    for listener in listeners:
        listener.close()


def is_ready(fields):
    return fields.get("READY") == "1"


def pure_status(fields):
    """A STATUS= update on its own (not part of READY/RELOADING/...)."""
    return set(fields) == {"STATUS"}


def status_counts(text):
    m = re.search(r"(\d+) ready, (\d+) delayed, (\d+) running", text)
    assert m, f"STATUS= does not show the queue counts: {text!r}"
    return tuple(int(g) for g in m.groups())


def monotonic_usec():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# -- sd_notify ---------------------------------------------------------------


SLOW_BOOT = """\
import time

time.sleep(1.0)     # workers take a while to import their handlers


def hello():
    return "hello"
"""


def test_ready_only_once_workers_idle_and_journal_replayed(
        start_daemon, notify, tmp_path):
    listener = notify()
    workdir = tmp_path / "ready"
    workdir.mkdir()
    (workdir / "slowboot.py").write_text(SLOW_BOOT)
    d = start_daemon(name="ready", env=listener.env(), args=[
        "--handlers", f"{H},slowboot", "--min-workers", "2",
        "--max-workers", "2"])
    listener.next_message(is_ready, what="READY=1")
    idle = d.workers("IDLE")
    assert len(idle) >= 2, f"READY=1 came with workers {d.workers()}"

    with d.client() as c:
        ids = [c.submit("slowboot:hello") for _ in range(3)]
        before = [c.wait(tid, timeout=30) for tid in ids]
    assert [v["state"] for v in before] == ["DONE"] * 3
    d.request("shutdown")
    assert d.proc.wait(30) == 0
    listener.next_message(lambda f: f.get("STOPPING") == "1",
                          what="STOPPING=1")

    # A restart: READY=1 again only once the journal is replayed and two
    # workers are idle, while start() is still polling for an answer.
    starter = threading.Thread(target=d.start)
    starter.start()
    try:
        listener.next_message(is_ready, what="READY=1 after the restart")
        # Straight away: the socket answers, the old tasks are back and the
        # workers are idle.
        with d.client(timeout=10) as c:
            status = c.status()
            after = [c.get(tid) for tid in ids]
    finally:
        starter.join(30)
    idle = [w for w in status["workers"] if w["state"] == "IDLE"]
    assert len(idle) >= 2, f"READY=1 came with workers {status['workers']}"
    assert [(v["id"], v["state"], v["result"]) for v in after] == \
        [(v["id"], v["state"], v["result"]) for v in before]


def test_status_follows_queue_counts(start_daemon, notify, gate, request):
    request.addfinalizer(gate.open)   # a failure must not hold the daemon
    listener = notify()
    d = start_daemon(env=listener.env(), args=[
        "--handlers", H, "--min-workers", "1", "--max-workers", "1"])
    listener.next_message(is_ready, what="READY=1")

    def status_shows(counts):
        return listener.next_message(
            lambda f: pure_status(f) and status_counts(f["STATUS"]) == counts,
            what=f"STATUS= with (ready, delayed, running) = {counts}")

    with d.client() as c:
        blocker = c.submit(f"{H}:gated", gate.path)
        status_shows((0, 0, 1))
        for _ in range(3):
            c.submit("lbd:echo", 1)
        later = c.submit("lbd:echo", 2, delay=600)
        text = status_shows((3, 1, 1))["STATUS"]
        assert "1 worker" in text, text
        gate.open()
        assert c.wait(blocker, timeout=30)["state"] == "DONE"
        # The last change is reported even though it came within a second
        # of the one before: a rate limit must not swallow the final state.
        status_shows((0, 1, 0))
        c.cancel(later)
        status_shows((0, 0, 0))


def test_status_is_rate_limited_over_a_burst(start_daemon, notify):
    listener = notify()
    d = start_daemon(env=listener.env(), args=[
        "--min-workers", "1", "--max-workers", "1"])
    listener.next_message(is_ready, what="READY=1")
    listener.collect(1.2)     # let any start-up STATUS= go out first
    # Receive on a thread, so that arrival times are sending times.
    receiver = threading.Thread(target=listener.collect, args=(3.0 + 1.5,))
    start = time.monotonic()
    receiver.start()
    submitted = 0
    try:
        with d.client() as c:
            while time.monotonic() - start < 3.0:
                responses = c.pipeline([{"op": "submit", "task": {
                    "handler": "lbd:echo", "args": [i]}} for i in range(20)])
                assert all(r["ok"] for r in responses)
                submitted += len(responses)
    finally:
        receiver.join(30)
    window = [m for m in listener.messages
              if m[0] >= start and pure_status(m[1])]
    elapsed = window[-1][0] - start if window else 0
    print(f"{submitted} submits in 3 s: {len(window)} STATUS= datagrams")
    # Counts changed all the time: reported, but about once a second.
    assert 2 <= len(window) <= 4.5 + 2, [m[2] for m in window]
    times = [m[0] for m in window]
    gaps = [round(b - a, 3) for a, b in zip(times, times[1:])]
    assert all(g > 0.8 for g in gaps), gaps
    assert elapsed < 4.5


def test_reload_sends_reloading_then_ready(start_daemon, notify, tmp_path):
    listener = notify()
    d = start_daemon(env=listener.env(), config={
        "workers": {"min": 1, "max": 1, "handlers": [H]}})
    listener.next_message(is_ready, what="READY=1")

    for how in ("lbd reload", "SIGHUP"):
        before = monotonic_usec()
        if how == "lbd reload":
            proc = d.cli("reload")
            assert proc.returncode == 0, proc.stderr
        else:
            os.kill(d.pid, signal.SIGHUP)
        reloading = listener.next_message(
            lambda f: f.get("RELOADING") == "1", what=f"RELOADING=1 ({how})")
        after = monotonic_usec()
        usec = reloading.get("MONOTONIC_USEC", "")
        assert usec.isdigit(), f"RELOADING=1 without MONOTONIC_USEC: " \
            f"{reloading}"
        assert before <= int(usec) <= after, (before, usec, after)
        listener.next_message(is_ready, what=f"READY=1 after {how}")
    wait_until(lambda: [w["generation"] for w in d.workers("IDLE")] == [3],
               20, what="the workers to roll twice")


def test_stopping_on_sigterm(start_daemon, notify):
    listener = notify()
    d = start_daemon(env=listener.env())
    listener.next_message(is_ready, what="READY=1")
    assert d.terminate() == 0
    listener.next_message(lambda f: f.get("STOPPING") == "1",
                          what="STOPPING=1")


def test_abstract_notify_socket(start_daemon, notify):
    listener = notify(abstract=True)
    assert listener.env_value.startswith("@")
    d = start_daemon(env=listener.env())
    listener.next_message(is_ready, what="READY=1 on the abstract socket")
    d.request("shutdown")
    listener.next_message(lambda f: f.get("STOPPING") == "1",
                          what="STOPPING=1 on the abstract socket")


def test_unreachable_notify_socket_is_not_fatal(start_daemon, tmp_path):
    d = start_daemon(env={"NOTIFY_SOCKET": str(tmp_path / "nobody-here")})
    with d.client() as c:
        assert c.wait(c.submit("lbd:echo", 1), timeout=30)["state"] == "DONE"
    assert "sd_notify" in d.log_text()
    assert d.terminate() == 0
    assert d.log_text().count("sd_notify") == 1   # warned once, not each


# -- the watchdog ------------------------------------------------------------


def count_watchdog(listener, seconds=1.5):
    return sum(1 for _, fields, _ in listener.collect(seconds)
               if fields.get("WATCHDOG") == "1")


def test_watchdog_pings_at_half_the_interval(start_daemon, notify):
    listener = notify()
    start_daemon(env=listener.env(WATCHDOG_USEC="400000"))
    listener.next_message(is_ready, what="READY=1")
    pings = count_watchdog(listener)
    print(f"{pings} WATCHDOG=1 in 1.5 s")
    assert 5 <= pings <= 9, pings


def test_watchdog_for_another_pid_sends_nothing(start_daemon, notify):
    listener = notify()
    start_daemon(env=listener.env(WATCHDOG_USEC="400000", WATCHDOG_PID="1"))
    listener.next_message(is_ready, what="READY=1")
    assert count_watchdog(listener) == 0


WATCHDOG_OWN_PID = """\
import os, sys
os.environ["WATCHDOG_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, {lbd!r}] + sys.argv[1:])
"""


def test_watchdog_pid_naming_the_daemon_pings(start_daemon, notify,
                                              tmp_path):
    # systemd sets WATCHDOG_PID to the main pid: the daemon's own.
    listener = notify()
    wrapper = tmp_path / "own_pid.py"
    wrapper.write_text(WATCHDOG_OWN_PID.format(lbd=LBD))
    d = Daemon(tmp_path / "own", env=listener.env(WATCHDOG_USEC="400000"))
    d.script = str(wrapper)
    try:
        d.start()
        listener.next_message(is_ready, what="READY=1")
        assert 5 <= count_watchdog(listener) <= 9
    finally:
        d.stop()


# -- socket activation -------------------------------------------------------

# Plays systemd: fd LBDTEST_FD becomes fd 3, LISTEN_PID is the pid that
# then execs lbd (the same process), LISTEN_FDS=1.
ACTIVATE = """\
import os, sys
src = os.environ.pop("LBDTEST_FD")
if src != "none" and int(src) != 3:
    os.dup2(int(src), 3)
    os.close(int(src))
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = "1"
os.execv(sys.executable, [sys.executable] + sys.argv[1:])
"""


class Activated:
    """An lbd started by the test with a descriptor passed as fd 3."""

    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.journal = str(self.workdir / "lbd.journal")
        self.log_path = self.workdir / "daemon.log"
        self.proc = None

    def start(self, fd, extra=()):
        env = dict(os.environ, LBDTEST_FD=str(fd) if fd is not None
                   else "none", PYTHONPATH=HANDLERS)
        for name in ("LBD_SOCKET", "LISTEN_PID", "LISTEN_FDS",
                     "NOTIFY_SOCKET"):
            env.pop(name, None)
        self.logfile = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ACTIVATE, LBD, "serve", "--socket",
             "/nonexistent/x", "--journal", self.journal, "--log-level",
             "DEBUG", "--min-workers", "2", "--max-workers", "2", *extra],
            pass_fds=() if fd is None else (fd,), cwd=self.workdir, env=env,
            stdin=subprocess.DEVNULL, stdout=self.logfile,
            stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid
        return self

    def log_text(self):
        return self.log_path.read_text(errors="replace")

    def stop(self):
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if self.proc.poll() is None:
                self.proc.wait(10)
            self.logfile.close()
            wait_until(lambda: not group_alive(self.pid), 10,
                       what="the activated daemon's group to exit")
            self.proc = None


@pytest.fixture
def activated(tmp_path):
    started = []

    def make(name="act"):
        a = Activated(tmp_path / name)
        started.append(a)
        return a

    yield make
    for a in started:
        a.stop()


@pytest.fixture
def sockdir():
    path = tempfile.mkdtemp(prefix="lbdt-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def answers(path):
    try:
        with lbd.Client(path, timeout=5) as c:
            return c.ping()
    except lbd.Unavailable:
        return None


def test_socket_activation_serves_on_the_passed_socket(activated, sockdir):
    assert not os.path.exists("/nonexistent")
    path = os.path.join(sockdir, "act.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    inode = os.fstat(listener.fileno()).st_ino
    a = activated().start(listener.fileno())
    listener.close()      # the daemon holds its own copy now
    try:
        wait_until(lambda: a.proc.poll() is not None or answers(path), 20,
                   what="the activated daemon to answer")
        assert a.proc.poll() is None, a.log_text()
        with lbd.Client(path, timeout=30) as c:
            assert c.ping() == lbd.__version__
            tid = c.submit("lbd:echo", "hi")
            assert c.wait(tid, timeout=30)["result"] == ["hi"]
            # A worker closes what it inherited before it reports ready;
            # one just forked may not have yet.
            status = wait_until(
                lambda: (st := c.status())["workers"] and all(
                    w["state"] == "IDLE" for w in st["workers"]) and st, 30,
                what="every worker to be ready")
        assert status["pid"] == a.pid
        # The workers do not hold the listening socket: only the master.
        for w in status["workers"]:
            fds = os.listdir(f"/proc/{w['pid']}/fd")
            links = {os.readlink(f"/proc/{w['pid']}/fd/{fd}") for fd in fds
                     if os.path.exists(f"/proc/{w['pid']}/fd/{fd}")}
            assert f"socket:[{inode}]" not in links, w
        with lbd.Client(path, timeout=30) as c:
            c.shutdown()
        assert a.proc.wait(30) == 0, a.log_text()
    finally:
        a.stop()
    # systemd owns the socket: it is still there after the daemon stopped,
    # and the daemon never made the path it was given on the command line.
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert not os.path.exists("/nonexistent")
    assert "Traceback" not in a.log_text()


NOT_LISTENING = "not a listening Unix stream socket"


def _regular_file(tmp_path):
    f = open(tmp_path / "plain", "w+b")
    return f, "is not a socket"


def _unbound_socket(tmp_path):
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), NOT_LISTENING


def _bound_not_listening(tmp_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(tempfile.mktemp(prefix="lbdt-nl-", dir="/tmp"))
    return s, NOT_LISTENING


def _datagram_socket(tmp_path):
    return socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM), NOT_LISTENING


def _tcp_listener(tmp_path):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    return s, NOT_LISTENING


@pytest.mark.parametrize("make", [
    _regular_file, _unbound_socket, _bound_not_listening, _datagram_socket,
    _tcp_listener], ids=lambda f: f.__name__.strip("_"))
def test_socket_activation_with_a_bad_descriptor_fails_cleanly(
        activated, tmp_path, make):
    obj, expected = make(tmp_path)
    try:
        a = activated().start(obj.fileno())
        code = a.proc.wait(30)
    finally:
        name = getattr(obj, "getsockname", lambda: "")()
        obj.close()
        if isinstance(name, str) and name.startswith("/tmp/"):
            os.unlink(name)
    text = a.log_text()
    assert code == 1, text
    assert "socket activation" in text and expected in text, text
    assert "Traceback" not in text and "internal error" not in text, text
    assert not os.path.exists("/nonexistent")


def test_socket_activation_without_fd3_fails_cleanly(activated):
    # LISTEN_FDS=1 but nothing was passed: whatever fd 3 is, it is not the
    # listening socket, and the daemon says so instead of crashing.
    a = activated().start(None)
    code = a.proc.wait(30)
    text = a.log_text()
    assert code == 1, text
    assert "socket activation" in text, text
    assert "Traceback" not in text and "internal error" not in text, text


def test_listen_fds_for_another_pid_are_ignored(start_daemon):
    # LISTEN_PID names someone else (a parent that forgot to unset it): the
    # daemon binds its own socket, and removes it when it stops.
    d = start_daemon(env={"LISTEN_PID": "1", "LISTEN_FDS": "1"})
    assert stat.S_ISSOCK(os.lstat(d.socket).st_mode)
    with d.client() as c:
        assert c.ping() == lbd.__version__
    assert d.terminate() == 0
    assert not os.path.exists(d.socket)
