"""Protocol fuzz: thousands of random, mutated and hostile request lines.

Over a few connections the test sends invalid UTF-8, deep nesting, huge
numbers, NaN and infinities, wrong types, unknown ops, valid-looking ops
with garbage fields, binary garbage with embedded newlines, very long and
empty lines. Every non-blank request line must get its own well-formed
response (ok, or a known error code, never internal_error), or the
connection is closed after a too_large answer, and then the test
reconnects and goes on. Afterwards the daemon still answers, the tasks it
held before are unchanged, its memory has not run away, and its log has
no traceback.

Nesting right at the JSON parser's limit is covered separately in
tests/integration/test_security.py; here depths stay well inside or well
beyond it.

The seed is printed; set LBD_FUZZ_SEED to replay the same run.
"""

import collections
import json
import os
import random
import socket
import threading
import time

import pytest

import lbd
from conftest import wait_until

H = "lbdtest_handlers"
REQUESTS = 5000
CONNECTIONS = 4
LIMIT = 1 << 20                     # server.max_request_bytes (default)
RSS_GROWTH_BOUND = 50 * 1024        # kB
KNOWN_ERRORS = {lbd.BAD_JSON, lbd.BAD_REQUEST, lbd.UNKNOWN_OP,
                lbd.NOT_FOUND, lbd.UNKNOWN_HANDLER, lbd.NOT_CANCELLABLE,
                lbd.TOO_LARGE}
SAFE_OPS = ("ping", "submit", "get", "wait", "cancel", "status", "metrics")
# Ops that would change the daemon under test: only ever sent with an
# unknown field, which must get them refused before they act.
DANGEROUS_OPS = ("shutdown", "scale", "drain", "reload")
# Handlers with side effects (files, sleeps, kills) are never named.
HANDLERS = ("lbd:echo", f"{H}:add", f"{H}:boom", f"{H}:current",
            f"{H}:nosuch",
            "lbd:nosuch", "os:system", "builtins:eval", "lbd", ":", "a:b:c",
            "lbd:echo ", " lbd:echo", "LBD:ECHO", "lbd.echo", "")


def vm_rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


class Fuzzer:
    def __init__(self, rng):
        self.rng = rng

    # -- values --------------------------------------------------------------

    def string(self):
        r = self.rng
        kind = r.randrange(6)
        if kind == 0:
            return ""
        if kind == 1:
            return "".join(chr(r.randrange(32, 127))
                           for _ in range(r.randrange(1, 40)))
        if kind == 2:    # any code point, lone surrogates included
            return "".join(chr(r.randrange(0x110000))
                           for _ in range(r.randrange(1, 20)))
        if kind == 3:
            return str(r.randrange(10 ** 18))
        if kind == 4:
            return r.choice(["\x00", "\n", "\r\n", "\u2028", "\ufeff",
                             "../../etc/passwd", "%s%n", "' OR 1=1"])
        return "x" * r.randrange(1, 3000)

    def number(self):
        r = self.rng
        return r.choice([
            0, -1, 1, 2 ** 31, -2 ** 63, 2 ** 64, 10 ** 30, -10 ** 300,
            r.randrange(-1000, 1000), r.random(), -r.random() * 1e6, 1e308,
            -1e308, 5e-324, -0.0, 0.001, 1e-9, r.uniform(0, 5)])

    def value(self, depth=0):
        r = self.rng
        kind = r.randrange(7 if depth < 4 else 4)
        if kind == 0:
            return r.choice([None, True, False])
        if kind == 1:
            return self.number()
        if kind in (2, 3):
            return self.string()
        if kind == 4:
            return [self.value(depth + 1) for _ in range(r.randrange(4))]
        if kind == 5:
            return {self.string(): self.value(depth + 1)
                    for _ in range(r.randrange(4))}
        return self.nested(r.randrange(1, 200))

    def nested(self, depth):
        inner = self.rng.choice([None, 1, "x", [], {}])
        for _ in range(depth):
            inner = self.rng.choice([[inner], {"a": inner}])
        return inner

    # -- requests ------------------------------------------------------------

    def task(self):
        r = self.rng
        task = {}
        if r.random() < 0.9:
            task["handler"] = r.choice(HANDLERS) if r.random() < 0.8 \
                else self.value()
        if r.random() < 0.7:
            task["args"] = [self.value() for _ in range(r.randrange(4))] \
                if r.random() < 0.8 else self.value()
        if r.random() < 0.3:
            task["kwargs"] = {self.string(): self.value()
                              for _ in range(r.randrange(3))} \
                if r.random() < 0.7 else self.value()
        for name in ("priority", "timeout", "deadline", "delay",
                     "max_attempts"):
            if r.random() < 0.2:
                task[name] = self.number() if r.random() < 0.7 \
                    else self.value()
        if r.random() < 0.15:
            task["key"] = self.string() if r.random() < 0.7 else self.value()
        if r.random() < 0.1:
            task["retry_on_error"] = self.value()
        if r.random() < 0.05:
            task[self.string()] = self.value()
        return task

    def request(self):
        r = self.rng
        op = r.choice(SAFE_OPS)
        req = {"op": op}
        if op == "submit":
            req["task"] = self.task() if r.random() < 0.9 else self.value()
        elif op in ("get", "wait", "cancel"):
            if r.random() < 0.9:
                req["id"] = self.string() if r.random() < 0.7 \
                    else self.value()
            if op == "wait" and r.random() < 0.5:
                req["timeout"] = r.choice([0, 0.001, -1, "1", None, 1e300,
                                           float(2 ** 70)])
        if r.random() < 0.2:
            req["req"] = self.value()
        if r.random() < 0.1:
            req[self.string()] = self.value()     # unknown field
        if r.random() < 0.05:
            req["op"] = r.choice([self.value(), op.upper(), op + " ", "",
                                  "__init__", "_ops", "op_ping"])
        return req

    def dangerous(self):
        op = self.rng.choice(DANGEROUS_OPS)
        req = {"op": op, "lbdtest_bogus": self.value()}
        if op == "scale":
            req.update(min=self.value(), max=self.value())
        if op == "drain":
            req["worker"] = self.value()
        return req

    def encode(self, obj, ascii=None):
        if ascii is None:       # else lone surrogates make invalid UTF-8
            ascii = self.rng.random() < 0.5
        text = json.dumps(obj, ensure_ascii=ascii)
        return text.encode("utf-8", "surrogatepass")

    def mutate(self, data):
        r = self.rng
        data = bytearray(data)
        for _ in range(r.randrange(1, 6)):
            if not data:
                data += b"{"
            pos = r.randrange(len(data))
            kind = r.randrange(5)
            if kind == 0:
                data[pos] = r.randrange(256)
            elif kind == 1:
                del data[pos:pos + r.randrange(1, 8)]
            elif kind == 2:
                data[pos:pos] = r.choice([
                    b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\x00", b"{",
                    b"[", b'"', b"\\", b"\\u", b"NaN", b"-Infinity", b"1e999",
                    b",", b"}"])
            elif kind == 3:
                del data[pos:]
            else:
                data[pos:pos] = data[r.randrange(len(data)):][:20]
        return bytes(data)

    def payload(self):
        """Return (bytes ending in a newline, expect_close, expected code).

        The expected code (None: anything known) is what every response
        to that write must say: "ok", or an error code.
        """
        r = self.rng
        kind = r.randrange(100)
        expect = None
        if kind < 30:
            line = self.encode(self.request())
        elif kind < 50:
            line = self.mutate(self.encode(self.request()))
        elif kind < 53:
            line = self.encode(self.dangerous(), ascii=True)
            expect = lbd.BAD_REQUEST
        elif kind < 58:
            line, expect = r.choice(FIXED)
            if callable(line):
                line = line(r)
        elif kind < 63:     # far beyond any parser's depth limit
            depth = r.randrange(20_000, 200_000)
            line = b'{"op":"ping","req":' + b"[" * depth + b"]" * depth + b"}"
            if r.random() < 0.5:
                line = b"[" * depth
            expect = lbd.BAD_JSON
        elif kind < 73:     # binary garbage, newlines and all
            line = r.randbytes(r.randrange(1, 300))
        elif kind < 80:     # invalid UTF-8 inside otherwise good JSON
            line = b'{"op":"ping","req":"' + r.choice(
                [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88"]) + bytes(
                r.randrange(0x80, 0x100) for _ in range(r.randrange(9))) \
                + b'"}'
            expect = lbd.BAD_JSON
        elif kind < 88:
            line = r.choice([b"", b" ", b"\t", b"\r", b"   \t  ", b"\x0b"])
        elif kind < 98:     # several requests in one write
            line = b"\n".join(self.encode(self.request())
                              for _ in range(r.randrange(2, 20)))
        elif kind < 99:     # very long, but under the limit
            size = r.randrange(100_000, LIMIT - 100)
            line, expect = r.choice([
                (b'{"op":"ping","req":"' + b"z" * (size - 25) + b'"}', "ok"),
                (b"q" * size, lbd.BAD_JSON),
                (b'{"op":"submit","task":{"handler":"lbd:echo","args":["' +
                 b"a" * (size // 5) + b'"]}}', "ok")])
        else:               # over the limit: answered too_large, closed
            line = b"w" * (LIMIT + r.randrange(1, 5000))
            return line + b"\n", True, lbd.TOO_LARGE
        return line + b"\n", False, expect


#: Hand-picked lines and what each must be answered.
FIXED = [
    (b'{"op":"ping","req":NaN}', lbd.BAD_JSON),
    (b'{"op":"ping","req":Infinity}', lbd.BAD_JSON),
    (b'{"op":"get","id":-Infinity}', lbd.BAD_JSON),
    (b'{"op":"ping","req":1e400}', lbd.BAD_JSON),
    (b'{"op":"ping","req":-1e400}', lbd.BAD_JSON),
    (lambda r: b'{"op":"ping","req":' + b"9" * r.randrange(4400, 6000) +
     b"}", lbd.BAD_JSON),
    (b'{"op":"submit","task":{"handler":"lbd:echo","priority":' +
     b"1" * 5000 + b"}}", lbd.BAD_JSON),
    (b'{"op":"submit","task":{"handler":"lbd:echo","priority":1e300}}',
     lbd.BAD_REQUEST),
    (b'{"op":"submit","task":{"handler":"lbd:echo","timeout":0}}',
     lbd.BAD_REQUEST),
    (b'{"op":"submit","task":{"handler":"lbd:echo","max_attempts":true}}',
     lbd.BAD_REQUEST),
    (b'{"op":"submit","task":{"handler":"lbd:echo","args":{}}}',
     lbd.BAD_REQUEST),
    (b'{"op":"submit","task":[]}', lbd.BAD_REQUEST),
    (b'{"op":"wait","id":"1","timeout":-1}', None),
    (b'{"op":"get","id":7}', lbd.BAD_REQUEST),
    (b'{"op":"get"}', lbd.BAD_REQUEST),
    (b'{"op":"cancel","id":"no-such-task"}', lbd.NOT_FOUND),
    (b'{"op":"submit","task":{"handler":"os:system","args":["true"]}}',
     lbd.UNKNOWN_HANDLER),
    (b'{"op":"ping","op":"status"}', "ok"),
    (b'\xef\xbb\xbf{"op":"ping"}', lbd.BAD_JSON),
    (b'{"op":"ping"} trailing', lbd.BAD_JSON),
    (b'{"op":"ping"', lbd.BAD_JSON),
    (b'[{"op":"ping"}]', lbd.BAD_REQUEST),
    (b'"ping"', lbd.BAD_REQUEST),
    (b"null", lbd.BAD_REQUEST),
    (b"42", lbd.BAD_REQUEST),
    (b"true", lbd.BAD_REQUEST),
    (b"{}", lbd.UNKNOWN_OP),
    (b'{"op":null}', lbd.UNKNOWN_OP),
    (b'{"op":["ping"]}', lbd.UNKNOWN_OP),
    (b'{"op":"\\ud800"}', lbd.UNKNOWN_OP),
    (b'{"op":"ping\\u0000"}', lbd.UNKNOWN_OP),
    (b'{"op":"__init__"}', lbd.UNKNOWN_OP),
    (b'{"op":"ping","bogus":1}', lbd.BAD_REQUEST),
    (b'{"op":"ping","req":"\xff"}', lbd.BAD_JSON),
]


def expected_answers(data):
    """How many responses a write owes: one per non-blank line."""
    return sum(1 for seg in data.split(b"\n")[:-1] if seg.strip())


class Conn:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(path)
        self.reader = self.sock.makefile("rb")

    def close(self):
        self.reader.close()
        self.sock.close()

    def read(self):
        """One response, or None if the daemon closed the connection."""
        try:
            line = self.reader.readline()
        except ConnectionResetError:
            return None
        if not line:
            return None
        assert line.endswith(b"\n"), f"torn response {line[:200]!r}"
        return json.loads(line)


def check_response(response, data):
    assert isinstance(response, dict) and isinstance(
        response.get("ok"), bool), (response, data[:300])
    if not response["ok"]:
        assert response.get("error") in KNOWN_ERRORS, (response, data[:300])
        assert isinstance(response.get("message"), str)


def fuzz_connection(path, rng, count, results, slot):
    """Send ``count`` fuzzed writes; results[slot] = stats or the error."""
    fuzz = Fuzzer(rng)
    stats = collections.Counter()
    conn = Conn(path)
    try:
        for _ in range(count):
            data, expect_close, expect = fuzz.payload()
            owed = expected_answers(data)
            try:
                conn.sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                raise AssertionError(f"connection closed under a write "
                                     f"of {data[:200]!r}")
            closed = False
            for _ in range(owed):
                response = conn.read()
                if response is None:
                    closed = True
                    break
                check_response(response, data)
                got = "ok" if response["ok"] else response["error"]
                if expect is not None:
                    assert got == expect, (response, data[:300])
                stats[got] += 1
                if got == lbd.TOO_LARGE:
                    closed = conn.read() is None
                    assert closed, "still open after too_large"
                    break
            else:
                closed = expect_close and conn.read() is None
            if expect_close:
                assert closed, f"a {len(data)}-byte line was not refused"
            elif closed:
                raise AssertionError(f"closed without too_large after "
                                     f"{data[:300]!r}")
            if closed:
                stats["reconnects"] += 1
                conn.close()
                conn = Conn(path)
        results[slot] = stats
    except BaseException as exc:
        results[slot] = exc
    finally:
        conn.close()


@pytest.mark.chaos
def test_fuzz_requests(start_daemon, gate, request):
    request.addfinalizer(gate.open)   # a failure must not hold the daemon
    seed = int(os.environ.get("LBD_FUZZ_SEED") or time.time_ns() % 2 ** 32)
    print(f"fuzz seed {seed} (LBD_FUZZ_SEED={seed} to replay)")
    d = start_daemon(config={"workers": {"min": 1, "max": 1},
                             "tasks": {"retry_backoff": 0.01,
                                       "retry_backoff_max": 0.05}},
                     args=["--handlers", H])

    # Tasks from before the fuzz: some done, some queued behind a gate.
    with d.client() as c:
        done_ids = [c.submit("lbd:echo", i, {"n": [i]}) for i in range(5)]
        for tid in done_ids:
            assert c.wait(tid, timeout=30)["state"] == "DONE"
        blocker = c.submit(f"{H}:gated", gate.path)
        wait_until(lambda: c.get(blocker)["state"] == "RUNNING", 20,
                   what="the gated task to start")
        queued_ids = [c.submit("lbd:echo", "q", i, priority=i % 3,
                               key=f"pre-{i}") for i in range(10)]
        delayed_id = c.submit("lbd:echo", "later", delay=3600)
        kept = {tid: c.get(tid) for tid in
                done_ids + queued_ids + [delayed_id, blocker]}
    rss_before = vm_rss_kb(d.pid)

    # A few connections at once, each from its own thread with its own
    # seeded generator: the content replays, the interleaving varies.
    results = [None] * CONNECTIONS
    threads = [threading.Thread(target=fuzz_connection, args=(
        d.socket, random.Random(f"{seed}/{i}"), REQUESTS // CONNECTIONS,
        results, i)) for i in range(CONNECTIONS)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a fuzz thread hung"
    stats = collections.Counter()
    for result in results:
        if isinstance(result, BaseException):
            raise result
        stats.update(result)
    elapsed = time.monotonic() - started
    print(f"{REQUESTS} writes in {elapsed:.1f} s: {dict(stats)}")
    assert stats[lbd.TOO_LARGE] == stats["reconnects"]

    with d.client() as c:
        assert c.ping() == lbd.__version__
        for tid, view in kept.items():
            assert c.get(tid) == view, f"task {tid} changed under the fuzz"
        rss_after = vm_rss_kb(d.pid)
        print(f"master VmRSS {rss_before} kB -> {rss_after} kB")
        assert rss_after - rss_before < RSS_GROWTH_BOUND
        # The queue still works: everything held before finishes.
        gate.open()
        c.cancel(delayed_id)
        for tid in [blocker] + queued_ids:
            assert c.wait(tid, timeout=60)["state"] == "DONE"
        wait_until(lambda: c.status()["queue"]["ready"] == 0 and
                   c.status()["queue"]["running"] == 0, 60,
                   what="the fuzzed tasks to drain")
        tid = c.submit("lbd:echo", "after")
        assert c.wait(tid, timeout=30)["result"] == ["after"]
    log = d.log_text()
    assert "Traceback" not in log
    assert "internal error" not in log
    assert d.terminate() == 0
