"""Who may talk to the daemon, and what a hostile or careless client costs.

Socket permissions and SO_PEERCRED checks; every limit answered with its
own error code; slow, stalled and flooding clients that must not hurt the
others; handler names that must never reach eval, pickle or a shell.
"""

import grp
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import lbd
from conftest import LBD, Daemon, wait_until

H = "lbdtest_handlers"
OTHER_UID = OTHER_GID = 65534      # nobody / nogroup


def connect(path, timeout=10):
    """A raw connection. Connecting blocks while the daemon's listen
    backlog is full (with a timeout set, AF_UNIX says EAGAIN instead)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except BaseException:
        s.close()
        raise
    s.settimeout(timeout)
    return s


def read_line(sock):
    """One response line from a raw socket (bytes before the newline)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise EOFError(f"connection closed after {data!r}")
        data += chunk
    return json.loads(data)


def closed_by_peer(sock):
    """True once the daemon has closed its end (EOF or a reset)."""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return True
    except ConnectionResetError:
        return True


# -- socket file permissions -------------------------------------------------


def test_socket_mode_defaults_to_0600(start_daemon):
    d = start_daemon()
    info = os.stat(d.socket)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.geteuid()


def _other_group():
    """A group this process may give a file: not its own gid if possible."""
    mine = os.getegid()
    candidates = []
    if os.geteuid() == 0:
        try:
            candidates.append(grp.getgrnam("nogroup").gr_gid)
        except KeyError:
            pass
    candidates += os.getgroups()
    for gid in candidates:
        if gid != mine:
            try:
                return grp.getgrgid(gid).gr_name, gid
            except KeyError:
                continue
    return grp.getgrgid(mine).gr_name, mine


def test_socket_mode_and_group_from_config(start_daemon):
    name, gid = _other_group()
    d = start_daemon(config={"server": {"socket_mode": 0o660,
                                        "socket_group": name}})
    info = os.stat(d.socket)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_gid == gid, (name, gid, info.st_gid)
    with d.client() as c:
        assert c.ping() == lbd.__version__


def _start_with_unknown_group(workdir):
    d = Daemon(workdir, config={"server": {
        "socket_group": "no-such-group-lbdtest"}})
    with pytest.raises(AssertionError, match="exited"):
        d.start(timeout=20)
    return d


def test_unknown_socket_group_is_a_clean_startup_error(tmp_path):
    d = _start_with_unknown_group(tmp_path / "g")
    try:
        assert d.proc.returncode == 1
        text = d.log_text()
        assert "no-such-group-lbdtest" in text and "Traceback" not in text
    finally:
        d.stop()


def test_unknown_socket_group_leaves_no_socket_file(tmp_path):
    # The socket is bound before the group is set: a failure must not
    # leave a dead socket file behind.
    d = _start_with_unknown_group(tmp_path / "g")
    try:
        assert not os.path.exists(d.socket)
    finally:
        d.stop()


# -- peer credentials --------------------------------------------------------


def _python_for(uid, gid, script):
    """An interpreter (3.11+) that user ``uid`` can run ``script`` with."""
    seen = []
    for candidate in (sys.executable, shutil.which("python3"),
                      "/usr/bin/python3", "/usr/local/bin/python3"):
        if not candidate or candidate in seen or \
                not os.path.exists(candidate):
            continue
        seen.append(candidate)
        try:
            proc = subprocess.run(
                [candidate, script, "--version"], user=uid, group=gid,
                extra_groups=[], env={"PATH": "/usr/bin:/bin"}, cwd="/",
                capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if proc.returncode == 0 and "lbd" in proc.stdout:
            return candidate
    return None


# What a client that only listens is told: the refusal itself, free of
# any race between its request and the daemon closing the connection.
FIRST_WORDS = """\
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
s.connect(sys.argv[1])
data = b""
while not data.endswith(b"\\n"):
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
sys.stdout.write(data.decode())
"""


class OtherUser:
    """Runs clients as another user."""

    def __init__(self, python, script):
        self.python = python
        self.script = script

    def _run(self, argv, uid, gid):
        return subprocess.run(
            [self.python, *argv], user=uid, group=gid, extra_groups=[],
            env={"PATH": "/usr/bin:/bin"}, cwd="/", capture_output=True,
            text=True, timeout=60)

    def cli(self, socket_path, *args, uid=OTHER_UID, gid=OTHER_GID):
        """``lbd ARGS --socket PATH`` (default: ping)."""
        return self._run([self.script, *(args or ("ping",)), "--socket",
                          socket_path], uid, gid)

    def first_words(self, socket_path, uid=OTHER_UID, gid=OTHER_GID):
        """Connect, send nothing, return the first line the daemon sent."""
        proc = self._run(["-c", FIRST_WORDS, socket_path], uid, gid)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout) if proc.stdout else None


@pytest.fixture
def other_user():
    if os.geteuid() != 0:
        pytest.skip("peer-credential tests need root to run a client as "
                    "another user")
    # The checkout may sit in a directory only root can enter: give the
    # other user a copy of lbd.py it can read.
    folder = tempfile.mkdtemp(prefix="lbd-other-", dir="/tmp")
    try:
        os.chmod(folder, 0o755)
        script = os.path.join(folder, "lbd.py")
        shutil.copyfile(LBD, script)
        os.chmod(script, 0o644)
        python = _python_for(OTHER_UID, OTHER_GID, script)
        if python is None:
            pytest.skip(f"no Python 3.11+ that uid {OTHER_UID} can run "
                        f"{script} with")
        yield OtherUser(python, script)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def open_to_all(d):
    """Let other users reach the socket (its directory is 0700)."""
    os.chmod(d.sockdir, 0o755)


def test_peer_not_in_allowed_uids_is_forbidden(start_daemon, other_user):
    d = start_daemon(config={"server": {"socket_mode": 0o666,
                                        "allowed_uids": [12345]}})
    open_to_all(d)
    told = other_user.first_words(d.socket)
    assert told is not None and told["error"] == lbd.FORBIDDEN, told
    proc = other_user.cli(d.socket)
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    wait_until(lambda: f"uid {OTHER_UID}" in d.log_text(), 10,
               what="the daemon to log the refusal")
    assert "refused" in d.log_text()
    # The daemon's own user always gets in.
    with d.client() as c:
        assert c.ping() == lbd.__version__
        assert c.status()["ok"]


def test_refused_cli_always_says_forbidden(start_daemon, other_user):
    # Whether the client's request is written before or after the daemon
    # closes the refused connection, the CLI reports the refusal itself.
    d = start_daemon(config={"server": {"socket_mode": 0o666,
                                        "allowed_uids": [12345]}})
    open_to_all(d)
    results = [other_user.cli(d.socket) for _ in range(20)]
    assert [(r.returncode, "forbidden" in r.stderr) for r in results] == \
        [(1, True)] * 20, [r.stderr for r in results]


def test_peer_in_allowed_uids_gets_in(start_daemon, other_user):
    d = start_daemon(config={"server": {"socket_mode": 0o666,
                                        "allowed_uids": [OTHER_UID]}})
    open_to_all(d)
    proc = other_user.cli(d.socket)
    assert proc.returncode == 0, proc.stderr
    assert lbd.__version__ in proc.stdout
    # ... and may submit: the daemon runs the task as its own user.
    proc = other_user.cli(d.socket, "submit", "lbd:echo", "7", "--wait")
    assert proc.returncode == 0, proc.stderr
    assert "7" in proc.stdout


def test_allowed_gids(start_daemon, other_user):
    d = start_daemon(config={"server": {"socket_mode": 0o666,
                                        "allowed_gids": [4242]}})
    open_to_all(d)
    allowed = other_user.cli(d.socket, gid=4242)
    assert allowed.returncode == 0, allowed.stderr
    told = other_user.first_words(d.socket, gid=OTHER_GID)
    assert told is not None and told["error"] == lbd.FORBIDDEN, told
    refused = other_user.cli(d.socket, gid=OTHER_GID)
    assert refused.returncode != 0 and refused.stdout == "", refused
    with d.client() as c:
        assert c.ping() == lbd.__version__


def test_socket_mode_keeps_other_users_out(start_daemon, other_user):
    # With the default 0600 and no allow lists, the kernel refuses them.
    d = start_daemon()
    open_to_all(d)
    proc = other_user.cli(d.socket)
    assert proc.returncode == lbd.EXIT_UNAVAILABLE, proc.stderr
    assert "Permission denied" in proc.stderr or "denied" in proc.stderr


# -- limits, each with its own error -----------------------------------------


def test_request_too_large_is_refused_and_closed(start_daemon):
    d = start_daemon(config={"server": {"max_request_bytes": 256}})
    # Exactly at the limit is fine.
    at_limit = b'{"op":"ping"}'.ljust(256) + b"\n"
    assert d.raw(at_limit)[0]["ok"]
    with connect(d.socket) as s:
        s.sendall(b'{"op":"ping"}\n' + b'{"op":"ping","req":"' +
                  b"x" * 300 + b'"}\n' + b'{"op":"ping"}\n')
        assert read_line(s)["ok"]          # answered before the long one
        response = read_line(s)
        assert response["error"] == lbd.TOO_LARGE, response
        assert closed_by_peer(s)
    # A line that never ends is cut off too, without waiting for it.
    with connect(d.socket) as s:
        s.sendall(b"y" * 1000)
        response = read_line(s)
        assert response["error"] == lbd.TOO_LARGE, response
        assert closed_by_peer(s)
    with d.client() as c:
        assert c.ping() == lbd.__version__


def test_queue_full(start_daemon, gate, request):
    request.addfinalizer(gate.open)   # a failure must not hold the daemon
    d = start_daemon(config={"server": {"max_queued": 5},
                             "workers": {"min": 1, "max": 1}},
                     args=["--handlers", H])
    with d.client() as c:
        blocker = c.submit(f"{H}:gated", gate.path)
        wait_until(lambda: c.get(blocker)["state"] == "RUNNING", 20,
                   what="the gated task to run")
        queued = [c.submit("lbd:echo", i) for i in range(4)]
        queued.append(c.submit("lbd:echo", 4, delay=0.2))  # delayed counts
        with pytest.raises(lbd.RequestError) as err:
            c.submit("lbd:echo", 5)
        assert err.value.code == lbd.QUEUE_FULL
        assert c.status()["counters"]["submitted"] == 6
        gate.open()
        views = [c.wait(t, timeout=30) for t in [blocker] + queued]
        assert [v["state"] for v in views] == ["DONE"] * 6
        again = c.submit("lbd:echo", 6)
        assert c.wait(again, timeout=30)["result"] == [6]


def _accepted(path):
    """A connection the daemon took in (a ping answered on it)."""
    def attempt():
        s = connect(path)
        s.sendall(b'{"op":"ping"}\n')
        try:
            if read_line(s).get("ok"):
                return s
        except (EOFError, ConnectionResetError):
            pass
        s.close()
        return None
    return wait_until(attempt, 20, interval=0.05,
                      what="a connection to be accepted")


def test_too_many_clients(start_daemon):
    d = start_daemon(config={"server": {"max_clients": 5}})
    conns = [_accepted(d.socket) for _ in range(5)]
    try:
        extra = connect(d.socket)
        with extra:
            response = read_line(extra)
            assert response["error"] == lbd.TOO_MANY_CLIENTS, response
            assert closed_by_peer(extra)
        # The five are still served.
        for s in conns:
            s.sendall(b'{"op":"ping"}\n')
            assert read_line(s)["ok"]
        conns.pop().close()
        conns.append(_accepted(d.socket))    # room again once one closes
    finally:
        for s in conns:
            s.close()


def test_client_that_never_reads_is_disconnected(start_daemon):
    d = start_daemon(config={"server": {"max_output_bytes": 4096}})
    flooder = connect(d.socket, timeout=30)
    done = threading.Event()
    sent = [0]

    def flood():
        chunk = b'{"op":"ping"}\n' * 1000
        try:
            for _ in range(300):
                flooder.sendall(chunk)
                sent[0] += 1000
        except OSError:
            pass
        done.set()

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    latencies = []
    try:
        with d.client(timeout=10) as c:
            deadline = time.monotonic() + 30
            while not done.is_set() and time.monotonic() < deadline:
                started = time.monotonic()
                assert c.ping() == lbd.__version__
                latencies.append(time.monotonic() - started)
            wait_until(lambda: "does not read its responses" in
                       d.log_text(), 20, what="the daemon to log it")
            for _ in range(5):
                started = time.monotonic()
                assert c.ping() == lbd.__version__
                latencies.append(time.monotonic() - started)
        thread.join(30)
        assert done.is_set()
        assert sent[0] < 300_000, "the daemon kept taking requests"
        assert closed_by_peer(flooder)
    finally:
        flooder.close()
    print(f"{sent[0]} pings flooded; {len(latencies)} served meanwhile, "
          f"slowest {max(latencies):.3f} s")
    assert max(latencies) < 2.0


def test_idle_and_stalled_connections_cost_the_others_nothing(start_daemon):
    d = start_daemon()
    idle = []
    try:
        for _ in range(300):
            idle.append(connect(d.socket))
        staller = connect(d.socket)
        idle.append(staller)
        staller.sendall(b'{"op": "pi')       # half a line, then nothing
        with d.client(timeout=10) as c:
            for _ in range(3):
                started = time.monotonic()
                assert c.ping() == lbd.__version__
                assert time.monotonic() - started < 2.0
            started = time.monotonic()
            tid = c.submit("lbd:echo", "still")
            assert c.wait(tid, timeout=30)["result"] == ["still"]
            assert time.monotonic() - started < 5.0
        # The staller finishes its line and is answered; an idle one too.
        staller.sendall(b'ng"}\n')
        assert read_line(staller)["ok"]
        idle[0].sendall(b'{"op":"ping"}\n')
        assert read_line(idle[0])["ok"]
    finally:
        for s in idle:
            s.close()


def _nested(depth):
    return b"[" * depth + b"]" * depth


def test_nesting_at_the_parser_limit_cannot_break_the_daemon(start_daemon):
    """Whatever depth is accepted can be journaled, run and answered.

    On Python 3.11 the JSON parser's limit depends on the stack depth, and
    the journal encoder runs deeper than the parser: a task nested just
    inside the limit used to be queued, then fail to encode (internal_error
    to the client, the task running anyway), and its result then raised
    RecursionError out of the event loop, stopping the daemon.
    """
    d = start_daemon(config={"workers": {"min": 1, "max": 1}})
    try:
        _deep_requests(d)
    finally:
        # This process may be unable to parse the deep journal records
        # that conftest would check: _deep_requests checks the journal in
        # a fresh process; on a failure, stop and take it away here.
        if d.proc.poll() is None:
            d.terminate()
        if os.path.exists(d.journal):
            os.unlink(d.journal)


def _deep_requests(d):
    with connect(d.socket, timeout=30) as s:
        reader = s.makefile("rb")

        def send(line):
            s.sendall(line + b"\n")
            return reader.readline()

        # The deepest "req" a ping accepts: the daemon's limit, whether its
        # own or the parser's. (The echo is not decoded here: this
        # process's parser may reach less deep.)
        low, high = 1, 200_000
        while low < high:
            mid = (low + high + 1) // 2
            answer = send(b'{"op":"ping","req":' + _nested(mid) + b"}")
            if answer.startswith(b'{"ok":false'):
                assert json.loads(answer)["error"] in (
                    lbd.BAD_JSON, lbd.BAD_REQUEST), answer
                high = mid - 1
            else:
                assert answer.startswith(b'{"ok":true'), answer[:200]
                low = mid
        print(f"deepest request accepted: {low}")
        accepted = []
        for depth in range(max(1, low - 40), low + 3):
            response = json.loads(send(
                b'{"op":"submit","task":{"handler":"lbd:echo","args":[' +
                _nested(depth) + b"]}}"))
            assert response["ok"] or response["error"] in (
                lbd.BAD_JSON, lbd.BAD_REQUEST), (depth, response)
            if response["ok"]:
                accepted.append(response["id"])
        reader.close()
    assert accepted
    with connect(d.socket, timeout=60) as s:
        reader = s.makefile("rb")
        for tid in accepted:     # the views hold deep lists: not decoded
            s.sendall(json.dumps({"op": "wait", "id": tid,
                                  "timeout": 30}).encode() + b"\n")
            answer = reader.readline()
            assert answer.startswith(b'{"ok":true'), answer[:300]
            assert b'"state":"DONE"' in answer, answer[-300:]
        reader.close()
    with d.client(timeout=60) as c:
        assert c.ping() == lbd.__version__
        assert c.status()["counters"]["submitted"] == len(accepted)
    text = d.log_text()
    assert "Traceback" not in text and "internal error" not in text
    # The journal holds the deep records; check it in a fresh process (this
    # one's parser may not reach that deep), then take it away.
    d.request("shutdown")
    assert d.proc.wait(30) == 0
    check = subprocess.run([sys.executable, LBD, "journal", "check",
                            d.journal], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    os.unlink(d.journal)


# -- never eval, pickle or a shell -------------------------------------------


@pytest.mark.parametrize("handler,args", [
    ("os:system", ["touch {marker}"]),
    ("builtins:eval", ["open({marker!r}, 'w')"]),
    ("builtins:exec", ["open({marker!r}, 'w')"]),
    ("subprocess:call", [["touch", "{marker}"]]),
    ("lbd:main", [["submit", "--help"]]),
    ("lbdtest_handlers:os.system", ["touch {marker}"]),
])
def test_arbitrary_callables_are_refused(daemon, tmp_path, handler, args):
    marker = str(tmp_path / "pwned")

    def fill(value):
        if isinstance(value, list):
            return [fill(v) for v in value]
        return value.format(marker=marker)

    with daemon.client() as c:
        with pytest.raises(lbd.RequestError) as err:
            c.submit(handler, *fill(args))
        assert err.value.code in (lbd.UNKNOWN_HANDLER, lbd.BAD_REQUEST)
        if ":" in handler and "." not in handler.split(":")[1]:
            assert err.value.code == lbd.UNKNOWN_HANDLER
        # Workers have had every chance to run something by now.
        tid = c.submit(f"{H}:add", 1, 2)
        assert c.wait(tid, timeout=30)["result"] == 3
        assert c.status()["counters"]["submitted"] == 1
    assert not os.path.exists(marker)
