"""Shared test machinery: a real lbd daemon in a temporary directory.

Every daemon runs as ``python lbd.py serve`` in its own session (so its
workers share its process group), logs to a file, and is ended by pid in
teardown: SIGTERM, a bounded wait, then SIGKILL to the whole group. Every
wait goes through ``wait_until``, which is bounded.
"""

import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LBD = str(ROOT / "lbd.py")
HANDLERS = str(ROOT / "tests" / "handlers")
sys.path.insert(0, str(ROOT))
sys.path.insert(0, HANDLERS)

import lbd  # noqa: E402


def wait_until(predicate, timeout=10.0, interval=0.01, what="a condition"):
    """Poll ``predicate`` until it returns a true value; return that value.

    Raises AssertionError after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for "
                                 f"{what}")
        time.sleep(interval)


def read_lines(path):
    """The whitespace-separated words of a file; [] if it does not exist."""
    try:
        with open(path) as f:
            return f.read().split()
    except FileNotFoundError:
        return []


def ids_in(path):
    """How often each task id starts a line of a record file."""
    try:
        with open(path) as f:
            return collections.Counter(line.split()[0] for line in f)
    except FileNotFoundError:
        return collections.Counter()


def _toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}"
                                for k, v in value.items()) + " }"
    return repr(value)


def toml_text(config):
    """{section: {key: value}} as TOML; dict values become inline tables."""
    lines = []
    for section, keys in config.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in keys.items())
    return "\n".join(lines) + "\n"


def write_config(path, config):
    """Write {section: {key: value}} as a TOML file; return its path."""
    Path(path).write_text(toml_text(config))
    return str(path)


def group_alive(pgid):
    """Return the pids in process group ``pgid`` that are not zombies."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(entry))
    return alive


class Daemon:
    """One lbd daemon under test."""

    def __init__(self, workdir, config=None, args=(), env=None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Unix socket paths are limited to 108 bytes: keep it short.
        self.sockdir = tempfile.mkdtemp(prefix="lbdt-", dir="/tmp")
        self.socket = os.path.join(self.sockdir, "s")
        self.log_path = self.workdir / "daemon.log"
        self.journal = str(self.workdir / "lbd.journal")
        self.config = config or {}
        self.args = list(args)
        self.env = env or {}
        self.proc = None
        self.script = LBD   # a test may run lbd through a wrapper script
        self.pids = []   # every master this object started, for teardown

    # -- lifecycle -----------------------------------------------------------

    def start(self, timeout=20.0):
        cmd = [sys.executable, self.script, "serve", "--socket", self.socket,
               "--journal", self.journal, "--log-level", "DEBUG"]
        if self.config:
            cmd += ["-c", write_config(self.workdir / "lbd.toml",
                                       self.config)]
        cmd += self.args
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [HANDLERS, str(self.workdir)]), **self.env)
        env.pop("LBD_SOCKET", None)
        self.logfile = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            cmd, cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
            stdout=self.logfile, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.pid = self.proc.pid
        self.pids.append(self.pid)
        wait_until(self._answers, timeout, what=f"the daemon to answer "
                   f"on {self.socket}")
        return self

    def _answers(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}"
                                 f" before answering:\n{self.log_tail()}")
        try:
            with lbd.Client(self.socket, timeout=5) as c:
                c.ping()
            return True
        except lbd.Unavailable:
            return False

    def log_tail(self, lines=40):
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_text(self):
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout=30.0):
        """SIGTERM the daemon and wait for it; return its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill9(self):
        """SIGKILL the master alone, as a crash would."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        """End the daemon and every process it started; leave nothing."""
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                try:
                    self.terminate(30)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            for pgid in self.pids:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if self.proc.poll() is None:
                self.proc.wait(10)
            self.logfile.close()
            for pgid in self.pids:
                wait_until(lambda: not group_alive(pgid), 10,
                           what="the daemon's workers to exit")
            shutil.rmtree(self.sockdir, ignore_errors=True)
            clean_exit = self.proc.returncode == 0
            self.proc = None
        self._check_and_remove_journal(clean_exit)

    def _check_and_remove_journal(self, clean_exit):
        """After a graceful exit the journal must scan clean; then go."""
        if not os.path.exists(self.journal):
            return
        with open(self.journal, "rb") as f:
            _, bad = lbd.survey_journal(f.read())
        if clean_exit:
            assert not bad, f"journal damaged after a clean exit: {bad}"
        for path in [self.journal] + [
                os.path.join(self.workdir, p) for p in os.listdir(
                    self.workdir) if ".compact-" in p]:
            os.unlink(path)

    # -- talking to it -------------------------------------------------------

    def client(self, timeout=30):
        return lbd.Client(self.socket, timeout=timeout)

    def request(self, op, **fields):
        with self.client() as c:
            return c.request(op, **fields)

    def raw(self, *lines, timeout=10):
        """Send raw request lines on one connection; return the responses."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.socket)
            s.sendall(b"".join(lines))
            reader = s.makefile("rb")
            return [json.loads(reader.readline()) for _ in lines]

    def cli(self, *args, input=None, timeout=60):
        """Run an lbd client command; return the CompletedProcess."""
        env = dict(os.environ, LBD_SOCKET=self.socket)
        return subprocess.run([sys.executable, LBD, *args], env=env,
                              input=input, capture_output=True, text=True,
                              timeout=timeout, cwd=self.workdir)

    def status(self):
        return self.request("status")

    def workers(self, state=None):
        return [w for w in self.status()["workers"]
                if state is None or w["state"] == state]

    def wait_task(self, task_id, timeout=30):
        with self.client(timeout=timeout + 5) as c:
            return c.wait(task_id, timeout=timeout)


@pytest.fixture
def start_daemon(tmp_path):
    """Return a function that starts a daemon; all are stopped afterwards."""
    daemons = []

    def start(config=None, args=(), env=None, name=None):
        workdir = tmp_path / (name or f"d{len(daemons)}")
        daemon = Daemon(workdir, config=config, args=args, env=env)
        daemons.append(daemon)
        return daemon.start()

    yield start
    for daemon in daemons:
        daemon.stop()


@pytest.fixture
def daemon(start_daemon):
    """One daemon with two workers and the test handlers allowed."""
    return start_daemon(args=["--handlers", "lbdtest_handlers"])


@pytest.fixture
def gate(tmp_path):
    """A file-based gate: handlers wait on it until the test opens it."""
    return Gate(tmp_path / "gate")


class Gate:
    def __init__(self, path):
        self.path = str(path)

    def open(self):
        Path(self.path).touch()
