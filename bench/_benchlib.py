"""Shared machinery for the lbd benchmarks (not a benchmark itself).

Every daemon a benchmark starts is ``python3 lbd.py serve`` in its own
session, in a temporary directory made with ``mkdtemp(dir="/tmp")`` so the
socket path stays short. Each one is ended by pid: the shutdown op (or
SIGTERM), a bounded wait, then SIGKILL to its whole process group; its
directory is removed. ``cleanup()`` does that for whatever is still
running and runs at exit, on SIGTERM/SIGINT and when the time budget
(SIGALRM) runs out.

Pure standard library.
"""

import atexit
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LBD = os.path.join(ROOT, "lbd.py")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import lbd  # noqa: E402  (the client; the daemon runs as a subprocess)

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

_daemons = []       # every Daemon started and not yet stopped
_tempdirs = []      # every directory made and not yet removed


class BudgetExceeded(Exception):
    """The benchmark's --max-seconds ran out."""


def log(*parts):
    """Progress goes to stderr, tables to stdout."""
    print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)


# -- time budget and cleanup --------------------------------------------------

def _on_alarm(_signum, _frame):
    raise BudgetExceeded("time budget exhausted")


_main_pid = os.getpid()


def _on_term(signum, _frame):
    if os.getpid() != _main_pid:
        # A forked child (a multiprocessing.Pool worker) inherited this
        # handler: die of the signal as it would have without it.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise KeyboardInterrupt(f"signal {signum}")


def install(max_seconds):
    """Arm the hard time limit and the cleanup hooks; return the deadline.

    The returned monotonic deadline is for soft checks (skip a round that
    would not fit); SIGALRM fires a little after it as the hard stop.
    """
    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(max(1, int(math.ceil(max_seconds))) + 30)
    return time.monotonic() + max_seconds


def disarm():
    signal.alarm(0)


def cleanup():
    """Stop every daemon still running and remove every temp dir."""
    if os.getpid() != _main_pid:
        return
    disarm()
    for daemon in list(_daemons):
        try:
            daemon.stop(graceful=False)
        except Exception as exc:  # keep going: nothing may be left behind
            print(f"cleanup: {exc}", file=sys.stderr)
    for path in list(_tempdirs):
        rmtree(path)


def mkdtemp(prefix):
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    _tempdirs.append(path)
    return path


def rmtree(path):
    shutil.rmtree(path, ignore_errors=True)
    if path in _tempdirs:
        _tempdirs.remove(path)


# -- the machine and the command line -----------------------------------------

def git_revision():
    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short",
                              "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain",
                                "--untracked-files=no", "--", "lbd.py"],
                               capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + (" (lbd.py modified)" if dirty else "")


def header(title):
    """Print the benchmark title, the machine and the exact command."""
    print(f"== {title} ==")
    print(f"command:  {shlex.join(sys.orig_argv)}")
    print(f"machine:  cpu_count={os.cpu_count()}  {platform.platform()}  "
          f"{platform.python_implementation()} {platform.python_version()}")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"lbd:      {lbd.__version__} at {git_revision()}  "
          f"(load average at start: {load})")
    print(f"started:  {time.strftime('%Y-%m-%d %H:%M:%S %z')}")
    print(flush=True)


# -- statistics and tables ----------------------------------------------------

def percentile(values, q):
    """Linear-interpolated percentile, q in [0, 100]; None when empty."""
    if not values:
        return None
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def spread(values):
    """'min..max' of the rounds, to show the noise next to a median."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{fmt(min(values))}..{fmt(max(values))}"


def fmt(value, digits=3):
    """A number with about ``digits`` significant digits; '-' for None."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if value == 0:
        return "0"
    mag = abs(value)
    if mag >= 10 ** digits:
        return f"{value:,.0f}"
    decimals = max(0, digits - 1 - int(math.floor(math.log10(mag))))
    return f"{value:.{decimals}f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def table(headers, rows):
    """Print a plain-text table; cells are strings or numbers."""
    cells = [[fmt(c) if not isinstance(c, str) else c for c in row]
             for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                     for i, (h, w) in enumerate(zip(headers, widths)))
    print(line)
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))))
    print(flush=True)


# -- /proc --------------------------------------------------------------------

def proc_cpu_seconds(pid):
    """utime + stime of ``pid`` itself (not its children), in seconds."""
    return sum(proc_cpu_split(pid))


def proc_cpu_split(pid):
    """(utime, stime) of ``pid`` itself (not its children), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_rss_bytes(pid):
    """VmRSS of ``pid`` in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


def group_members(pgid):
    """Pids in process group ``pgid`` that are alive and not zombies."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            alive.append(int(entry))
    return alive


# -- a daemon under benchmark -------------------------------------------------

def toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def write_config(path, config):
    lines = []
    for section, keys in config.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in keys.items())
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


#: ``python3 -c PROFILE_LAUNCHER ROOT OUT serve ...``: lbd.main() under
#: cProfile, stats written to OUT when the daemon returns; forked children
#: (workers, the compactor) stop profiling at once, so they run at speed.
PROFILE_LAUNCHER = (
    "import cProfile, os, sys; sys.path.insert(0, sys.argv[1]); import lbd; "
    "out = sys.argv[2]; argv = sys.argv[3:]; p = cProfile.Profile(); "
    "os.register_at_fork(after_in_child=p.disable); p.enable(); "
    "rc = lbd.main(argv); p.disable(); p.dump_stats(out); sys.exit(rc)")


class Daemon:
    """One ``lbd.py serve`` subprocess in its own session.

    ``workdir`` holds the socket, journal, config and log; the caller owns
    the directory (several daemons may use one in turn, e.g. a restart on
    the same journal).
    """

    def __init__(self, workdir, min_workers, max_workers, config=None,
                 profile=None, log_level="WARNING", journal=None):
        self.workdir = workdir
        self.socket = os.path.join(workdir, "s")
        self.journal = journal or os.path.join(workdir, "j")
        self.config_path = os.path.join(workdir, "lbd.toml")
        self.log_path = os.path.join(workdir, "daemon.log")
        self.min_workers = min_workers
        self.max_workers = max_workers
        self.config = config or {}
        self.profile = profile
        self.log_level = log_level
        self.proc = None
        self.pid = None
        self.started = None

    def command(self):
        write_config(self.config_path, self.config)
        if self.profile:
            # Rather than "python3 -m cProfile -o OUT lbd.py serve": that
            # profiles the forked workers too (slowing them), and before
            # c345fb1 its workers could not even find the built-in
            # handlers (module '__main__' has no attribute 'sleep').
            cmd = [sys.executable, "-c", PROFILE_LAUNCHER, ROOT,
                   self.profile]
        else:
            cmd = [sys.executable, LBD]
        cmd += ["serve", "--socket", self.socket, "--journal",
                self.journal, "--min-workers", str(self.min_workers),
                "--max-workers", str(self.max_workers), "-c",
                self.config_path, "--log-level", self.log_level]
        return cmd

    def start(self):
        """Start the process; return the monotonic time it was started."""
        env = dict(os.environ)
        env.pop("LBD_SOCKET", None)
        logfile = open(self.log_path, "ab")
        try:
            self.started = time.monotonic()
            self.proc = subprocess.Popen(
                self.command(), cwd=self.workdir, env=env,
                stdin=subprocess.DEVNULL, stdout=logfile,
                stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            logfile.close()
        self.pid = self.proc.pid
        _daemons.append(self)
        return self.started

    def client(self, timeout=120.0):
        return lbd.Client(self.socket, timeout=timeout)

    def wait_ping(self, timeout=60.0, interval=0.002):
        """Poll ping until it answers; return the monotonic time it did."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                with self.client(timeout=5.0) as c:
                    c.ping()
                return time.monotonic()
            except lbd.Unavailable:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon pid {self.pid} did not answer "
                                   f"ping within {timeout} s\n{self.tail()}")
            time.sleep(interval)

    def wait_idle(self, count=None, timeout=60.0):
        """Wait until status shows ``count`` (default min) IDLE workers."""
        count = self.min_workers if count is None else count
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while True:
                self._check_alive()
                workers = c.status()["workers"]
                if sum(w["state"] == "IDLE" for w in workers) >= count:
                    return workers
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no {count} IDLE workers within "
                                       f"{timeout} s: {workers}\n"
                                       f"{self.tail()}")
                time.sleep(0.01)

    def start_ready(self, timeout=60.0):
        self.start()
        self.wait_ping(timeout)
        self.wait_idle(timeout=timeout)
        return self

    def _check_alive(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"daemon pid {self.pid} exited with "
                               f"{self.proc.returncode}\n{self.tail()}")

    def tail(self, lines=20):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def cpu_seconds(self):
        return proc_cpu_seconds(self.pid)

    def rss_bytes(self):
        return proc_rss_bytes(self.pid)

    def kill9(self):
        """kill -9 the master only (its workers notice and exit)."""
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._reap_group()

    def stop(self, graceful=True, timeout=60.0):
        """shutdown op (or SIGTERM), bounded wait, SIGKILL the group."""
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                asked = False
                if graceful:
                    try:
                        with self.client(timeout=10.0) as c:
                            c.shutdown()
                        asked = True
                    except (lbd.LbdError, OSError):
                        pass
                if not asked:
                    os.kill(self.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout if graceful else 10.0)
                except subprocess.TimeoutExpired:
                    log(f"daemon pid {self.pid} did not stop; SIGKILL")
                    try:
                        os.killpg(self.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    self.proc.wait(10)
            self._reap_group()
        finally:
            if self in _daemons:
                _daemons.remove(self)

    def _reap_group(self):
        """Leave no worker behind: SIGKILL what is left of the group."""
        deadline = time.monotonic() + 5.0
        killed = False
        while group_members(self.pid):
            if time.monotonic() > deadline:
                if killed:
                    log(f"process group {self.pid} survives SIGKILL: "
                        f"{group_members(self.pid)}")
                    return
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    return
                killed = True
                deadline = time.monotonic() + 5.0
            time.sleep(0.02)
