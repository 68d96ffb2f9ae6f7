"""Autoscaling, drain/scale, and plugins, on real daemons.

Config files here have nested tables (plugin options), which conftest's
write_config does not write: each test writes its own TOML with
``toml_text()`` into the daemon's workdir and passes ``-c``. Plugin files are
written into the workdir before the daemon starts; relative plugin paths
resolve against the daemon's cwd, which is that workdir.
"""

import collections
import json
import os
import re
import signal
import socket
import textwrap
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest

import lbd
from conftest import ROOT, group_alive, toml_text, wait_until

PROMETHEUS = str(ROOT / "plugins" / "prometheus.py")
QUEUE_WAIT_POLICY = str(ROOT / "plugins" / "queue_wait_policy.py")

FAST_SCALING = {"interval": 0.2, "window": 2.0, "scale_in_delay": 2.0,
                "target_queue_wait": 0.1}
LIVE = ("STARTING", "IDLE", "BUSY")


# -- helpers ------------------------------------------------------------------

def start(start_daemon, tmp_path, name, *, low=1, high=4, scaling=None,
          plugins=None, files=None):
    """Start a daemon in tmp_path/name with its own config and files."""
    workdir = tmp_path / name
    workdir.mkdir(parents=True)
    for filename, text in (files or {}).items():
        (workdir / filename).write_text(textwrap.dedent(text))
    config = {"workers": {"min": low, "max": high,
                          "handlers": ["lbdtest_handlers"]},
              "scaling": dict(FAST_SCALING, **(scaling or {}))}
    if plugins:
        config["plugins"] = plugins
    path = workdir / "test.toml"
    path.write_text(toml_text(config))
    return start_daemon(args=["-c", str(path)], name=name)


def live(status):
    return [w for w in status["workers"] if w["state"] in LIVE]


def read_ids(path):
    try:
        with open(path) as f:
            return [line.split() for line in f.read().splitlines()]
    except FileNotFoundError:
        return []


def submit_many(d, handler, args, count):
    with d.client() as c:
        responses = c.pipeline([{"op": "submit", "task": {
            "handler": handler, "args": list(args)}} for _ in range(count)])
    assert all(r["ok"] for r in responses), responses[:3]
    return [r["id"] for r in responses]


def wait_all(d, ids, timeout=40):
    views = []
    with d.client(timeout=timeout + 5) as c:
        deadline = time.monotonic() + timeout
        for tid in ids:
            left = max(0.1, deadline - time.monotonic())
            views.append(c.wait(tid, timeout=left))
    return views


def plugins(d):
    return d.request("metrics")["metrics"]["plugins"]


def plugin(d, spec):
    return next(p for p in plugins(d) if p["spec"] == spec)


def pid_gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def log_times(d, pattern):
    """Wall times of the log lines matching ``pattern``."""
    stamps = []
    for line in d.log_text().splitlines():
        if re.search(pattern, line):
            stamps.append(datetime.strptime(
                line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return stamps


# -- the default autoscaler ---------------------------------------------------

def test_burst_scales_out_then_back_in_and_runs_every_task_once(
        start_daemon, tmp_path):
    d = start(start_daemon, tmp_path, "burst")
    wait_until(lambda: len(live(d.status())) == 1, 10, what="one worker")
    out = str(tmp_path / "done")
    ids = submit_many(d, "lbdtest_handlers:busy_record", [out, 0.2], 40)

    sizes = []

    def grown():
        status = d.status()
        sizes.append(len(live(status)))
        return status["target_workers"] > 1 and sizes[-1] > 1
    wait_until(grown, 8, interval=0.05, what="the pool to grow")

    views = wait_all(d, ids, 40)
    assert [v["state"] for v in views] == ["DONE"] * 40
    assert all(v["attempts"] == 1 for v in views)

    def shrunk():
        status = d.status()
        sizes.append(len(live(status)))
        return status["target_workers"] == 1 and len(status["workers"]) == 1
    wait_until(shrunk, 30, interval=0.05, what="the pool to shrink to 1")
    assert max(sizes) <= 4

    recorded = read_ids(out)
    assert collections.Counter(tid for tid, _ in recorded) == \
        collections.Counter(ids)              # each exactly once
    assert {attempt for _, attempt in recorded} == {"1"}

    decision = d.request("metrics")["metrics"]["last_decision"]
    assert decision["to"] == 1 and decision["from"] == 2
    assert decision["source"] == "default policy"
    assert "backlog" in decision["reason"]
    text = d.log_text()
    assert re.search(r" INFO scaling out: target 1 -> \d", text), text[-3000:]
    assert re.search(r" INFO scaling in: target \d -> \d", text)
    # Scale-in waits scale_in_delay after the last scale-out.
    outs = log_times(d, r" INFO scaling out: ")
    first_in = log_times(d, r" INFO scaling in: ")[0]
    last_out = max(t for t in outs if t < first_in)
    assert first_in - last_out >= FAST_SCALING["scale_in_delay"] - 0.05


def test_fixed_pool_never_changes_size_under_a_burst(start_daemon, tmp_path):
    d = start(start_daemon, tmp_path, "fixed", low=2, high=2)
    wait_until(lambda: len(d.workers("IDLE")) == 2, 10, what="two workers")
    ids = submit_many(d, "lbdtest_handlers:busy_record",
                      [str(tmp_path / "out"), 0.05], 40)
    seen, targets = set(), set()

    def done():
        status = d.status()
        seen.add(len(status["workers"]))
        targets.add(status["target_workers"])
        return status["counters"]["done"] == 40
    wait_until(done, 30, interval=0.02, what="the burst to finish")
    assert seen == {2} and targets == {2}
    status = d.status()
    assert status["counters"]["worker_starts"] == 2
    assert d.request("metrics")["metrics"]["last_decision"] is None
    assert "scaling out" not in d.log_text()
    assert len(wait_all(d, ids)) == 40


def test_sigttin_on_an_idle_autoscaled_pool_lasts_the_scale_in_delay(
        start_daemon, tmp_path):
    d = start(start_daemon, tmp_path, "ttin", scaling={
        "scale_in_delay": 60.0})
    wait_until(lambda: len(d.workers("IDLE")) == 1, 10, what="one worker")
    mark = len(d.log_text())
    d.proc.send_signal(signal.SIGTTIN)
    wait_until(lambda: "pool target 1 -> 2 (SIGTTIN)" in d.log_text(), 10,
               what="the SIGTTIN")

    def ten_ticks_or_a_scale_in():
        text = d.log_text()[mark:]
        return "scaling in" in text or \
            len(re.findall(r"DEBUG scaling: hold at 2 ", text)) >= 10
    wait_until(ten_ticks_or_a_scale_in, 10, what="ten scaling intervals")
    assert "scaling in" not in d.log_text()[mark:], \
        "a worker was retired within 2 s, not after 60 s of surplus"
    assert d.status()["target_workers"] == 2


# -- drain and scale ----------------------------------------------------------

def test_drain_lets_the_running_task_finish_on_its_worker(
        start_daemon, tmp_path, gate):
    d = start(start_daemon, tmp_path, "drain", low=2, high=2)
    wait_until(lambda: len(d.workers("IDLE")) == 2, 10, what="two workers")
    with d.client() as c:
        tid = c.submit("lbdtest_handlers:gated", gate.path)
        wait_until(lambda: c.get(tid)["state"] == "RUNNING", 10,
                   what="the gated task to run")
        wid = c.get(tid)["worker"]
        view = d.request("drain", worker=wid)["worker"]
        assert view["id"] == wid and view["state"] == "DRAINING"
        assert view["task"] == tid
        # It gets nothing new while draining: others run the new tasks.
        others = [c.submit("lbd:echo", i) for i in range(6)]
        for other in others:
            done = c.wait(other, timeout=20)
            assert done["state"] == "DONE" and done["worker"] != wid
        mine = next(w for w in d.workers() if w["id"] == wid)
        assert mine["state"] == "DRAINING" and mine["task"] == tid
        assert mine["tasks_done"] == 0
        gate.open()
        final = c.wait(tid, timeout=20)
    assert final["state"] == "DONE"
    assert final["worker"] == wid and final["attempts"] == 1
    # Then it exits, and a replacement keeps the pool at min = max = 2.
    wait_until(lambda: wid not in {w["id"] for w in d.workers()}, 10,
               what="the drained worker to exit")
    wait_until(lambda: len(d.workers("IDLE")) == 2, 10,
               what="a replacement worker")
    status = d.status()
    assert len(status["workers"]) == 2 and status["target_workers"] == 2

    # The CLI prints what it did; an idle worker goes straight to STOPPING.
    idle = d.workers("IDLE")[0]["id"]
    proc = d.cli("drain", str(idle))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"worker {idle} STOPPING\n"
    wait_until(lambda: idle not in {w["id"] for w in d.workers()} and
               len(d.workers("IDLE")) == 2, 10, what="another replacement")

    with pytest.raises(lbd.RequestError) as info:
        d.request("drain", worker=9999)
    assert info.value.code == lbd.NOT_FOUND
    proc = d.cli("drain", "9999")
    assert proc.returncode == lbd.EXIT_FAILED
    assert "not_found" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(lbd.RequestError) as info:
        d.request("drain", worker="1")
    assert info.value.code == lbd.BAD_REQUEST


def test_scale_changes_the_bounds_and_the_pool_follows(start_daemon,
                                                       tmp_path):
    d = start(start_daemon, tmp_path, "scale", scaling={
        "scale_in_delay": 60.0})
    wait_until(lambda: len(live(d.status())) == 1, 10, what="one worker")
    proc = d.cli("scale", "--min", "3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "min 3, max 4\n"
    status = d.status()
    assert (status["min_workers"], status["max_workers"]) == (3, 4)
    wait_until(lambda: len(d.workers("IDLE")) == 3, 10,
               what="the pool to follow min")

    # Lowering max below the pool shrinks it at once; lowering min leaves
    # the surplus to the autoscaler, which waits scale_in_delay (60 s).
    assert d.request("scale", min=1, max=2)["max_workers"] == 2
    wait_until(lambda: len(d.status()["workers"]) == 2, 10,
               what="the pool to follow max")
    assert d.status()["target_workers"] == 2

    for bad in ({"min": 3, "max": 2}, {"min": 0}, {"max": 0},
                {"min": 5}, {"max": 5000}, {"min": "2"}, {"min": 1.5}):
        with pytest.raises(lbd.RequestError) as info:
            d.request("scale", **bad)
        assert info.value.code == lbd.BAD_REQUEST, bad
    status = d.status()
    assert (status["min_workers"], status["max_workers"]) == (1, 2)
    proc = d.cli("scale", "--min", "5", "--max", "3")
    assert proc.returncode == lbd.EXIT_FAILED
    assert "bad_request" in proc.stderr
    proc = d.cli("scale", "--min", "0")
    assert proc.returncode == lbd.EXIT_USAGE
    assert "Traceback" not in proc.stderr
    status = d.status()
    assert (status["min_workers"], status["max_workers"]) == (1, 2)
    assert len(live(status)) == 2 and status["target_workers"] == 2


# -- plugins that misbehave ---------------------------------------------------

RAISING_POLICY = """
    class Policy:
        def __call__(self, snap, bounds):
            raise RuntimeError("policy exploded")

    def policy(options):
        return Policy()
"""

HANGING_POLICY = """
    import time

    def policy(options):
        def decide(snap, bounds):
            time.sleep(3600)
        return decide
"""

GOOD_POLICY = """
    # A good policy: always the most workers allowed. (Not the same size
    # as the broken one, so no stale bytecode can be used.)
    def policy(options):
        def decide(snap, bounds):
            return bounds["max"]
        return decide
"""

SLOW_SINK = """
    import time

    class Sink:
        def on_event(self, event):
            time.sleep(3600)

    def sink(options):
        return Sink()
"""

NON_INT_POLICY = """
    def policy(options):
        return lambda snap, bounds: "3"
"""

BROKEN_IMPORT = """
    import frobnicate_no_such_module

    def sink(options):
        return object()
"""

CLOSING_SINK = """
    import time

    class Sink:
        def __init__(self, path):
            self.path = path

        def close(self):
            time.sleep(0.2)             # flushing takes a moment
            with open(self.path, "w") as f:
                f.write("closed")

    def sink(options):
        return Sink(options["marker"])
"""


def test_raising_policy_is_disabled_and_the_default_policy_scales(
        start_daemon, tmp_path):
    d = start(start_daemon, tmp_path, "raising",
              plugins={"policy": "bad_policy.py:policy"},
              files={"bad_policy.py": RAISING_POLICY})
    spec = "bad_policy.py:policy"
    wait_until(lambda: plugin(d, spec)["disabled"], 10,
               what="the policy to be disabled")
    info = plugin(d, spec)
    assert "policy exploded" in info["error"]
    assert info["kind"] == "policy"
    wait_until(lambda: "disabled" in d.log_text(), 5, what="the log line")
    assert re.search(r"plugin bad_policy.py:policy disabled: .*policy "
                     r"exploded", d.log_text())
    ids = submit_many(d, "lbdtest_handlers:busy_record",
                      [str(tmp_path / "out"), 0.2], 20)
    wait_until(lambda: d.status()["target_workers"] > 1, 10,
               what="the default policy to scale out")
    assert all(v["state"] == "DONE" for v in wait_all(d, ids))
    decision = d.request("metrics")["metrics"]["last_decision"]
    assert decision["source"] == "default policy"


def test_hanging_policy_times_out_and_dispatch_continues(start_daemon,
                                                         tmp_path):
    d = start(start_daemon, tmp_path, "hanging",
              plugins={"policy": "hang_policy.py:policy", "timeout": 1.0},
              files={"hang_policy.py": HANGING_POLICY})
    spec = "hang_policy.py:policy"
    pid = plugin(d, spec)["pid"]
    assert pid and not pid_gone(pid)
    # Tasks run while the policy hangs; when it is given up on, the
    # default policy sees the backlog and scales out.
    ids = submit_many(d, "lbdtest_handlers:busy_record",
                      [str(tmp_path / "out"), 0.2], 25)
    with d.client() as c:
        assert c.wait(ids[0], timeout=10)["state"] == "DONE"
    wait_until(lambda: plugin(d, spec)["disabled"], 10,
               what="the hanging policy to be disabled")
    assert "did not answer within 1 s" in plugin(d, spec)["error"]
    started = log_times(d, r"plugin hang_policy.py:policy \(policy\) "
                        r"started")[0]
    disabled = log_times(d, r"plugin hang_policy.py:policy disabled")[0]
    assert disabled - started >= 1.0 - 0.01     # not before the timeout
    wait_until(lambda: pid_gone(pid), 10, what="the policy process to go")
    wait_until(lambda: d.status()["target_workers"] > 1, 10,
               what="the default policy to scale out")
    assert all(v["state"] == "DONE" for v in wait_all(d, ids))
    assert d.request("metrics")["metrics"]["last_decision"]["source"] == \
        "default policy"


def test_slow_sink_loses_messages_not_dispatch(start_daemon, tmp_path):
    d = start(start_daemon, tmp_path, "slow", low=2, high=2,
              plugins={"sinks": ["slow_sink.py:sink"],
                       "buffer_bytes": 4096},
              files={"slow_sink.py": SLOW_SINK})
    spec = "slow_sink.py:sink"
    wait_until(lambda: len(d.workers("IDLE")) == 2, 10, what="two workers")
    started = time.monotonic()
    ids = submit_many(d, "lbd:echo", [1], 500)
    views = wait_all(d, ids, 30)
    assert all(v["state"] == "DONE" for v in views)
    assert time.monotonic() - started < 30
    info = plugin(d, spec)
    assert info["dropped"] > 0 and not info["disabled"], info
    assert "falls behind" in d.log_text()
    t0 = time.monotonic()
    d.request("ping")
    assert time.monotonic() - t0 < 2.0
    # A graceful stop leaves no plugin (or worker) process behind.
    sink_pid = info["pid"]
    assert d.terminate(30) == 0
    wait_until(lambda: not group_alive(d.pid), 5,
               what="every process of the daemon to exit")
    assert pid_gone(sink_pid)


def test_plugins_that_fail_to_load_or_answer_badly_are_disabled(
        start_daemon, tmp_path):
    specs = {"policy": "non_int_policy.py:policy",
             "import": "broken_import.py:sink",
             "missing": "does_not_exist.py:sink",
             "no_factory": "non_int_policy.py:no_such_factory"}
    d = start(start_daemon, tmp_path, "broken",
              plugins={"policy": specs["policy"],
                       "sinks": [specs["import"], specs["missing"],
                                 specs["no_factory"]]},
              files={"non_int_policy.py": NON_INT_POLICY,
                     "broken_import.py": BROKEN_IMPORT})
    wait_until(lambda: all(p["disabled"] for p in plugins(d)), 10,
               what="every broken plugin to be disabled")
    errors = {p["spec"]: p["error"] for p in plugins(d)}
    assert "returned '3', not an int" in errors[specs["policy"]]
    assert "frobnicate_no_such_module" in errors[specs["import"]]
    assert "does_not_exist.py" in errors[specs["missing"]] or \
        "No such file" in errors[specs["missing"]]
    assert "no_such_factory" in errors[specs["no_factory"]]
    with d.client() as c:
        tids = [c.submit("lbd:echo", i) for i in range(5)]
        assert [c.wait(t, timeout=20)["result"] for t in tids] == \
            [[i] for i in range(5)]
    assert d.terminate(30) == 0
    wait_until(lambda: not group_alive(d.pid), 5,
               what="every process of the daemon to exit")


EXPLODING_SINK = """
    import signal

    def explode(signum, frame):
        raise ValueError("sink exploded")

    class Sink:
        def on_event(self, event):
            pass

    def sink(options):
        signal.signal(signal.SIGUSR1, explode)
        open("sink-ready", "w").close()
        return Sink()
"""


def proc_state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def test_a_sink_that_raises_is_disabled_with_its_error(start_daemon,
                                                       tmp_path):
    """The sink raises (on SIGUSR1) just before the master sends it an
    event: the master must still report the sink's own error.

    Made deterministic by stopping the master: a submit is queued on an
    accepted connection, then the sink raises and exits, then the master
    resumes and handles the submit (emitting an event) before it reads
    the sink's socket.
    """
    spec = "exploding_sink.py:sink"
    d = start(start_daemon, tmp_path, "exploding", low=1, high=1,
              plugins={"sinks": [spec]},
              files={"exploding_sink.py": EXPLODING_SINK})
    wait_until(lambda: (d.workdir / "sink-ready").exists(), 10,
               what="the sink to start")
    sink_pid = plugin(d, spec)["pid"]
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(20)
        conn.connect(d.socket)
        reader = conn.makefile("rb")
        conn.sendall(lbd.dumps({"op": "ping"}))
        assert json.loads(reader.readline())["ok"]
        os.kill(d.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: proc_state(d.pid) == "T", 10,
                       what="the master to stop")
            conn.sendall(lbd.dumps({"op": "submit",
                                    "task": {"handler": "lbd:echo"}}))
            os.kill(sink_pid, signal.SIGUSR1)
            wait_until(lambda: proc_state(sink_pid) in ("Z", None), 10,
                       what="the sink to exit")
        finally:
            os.kill(d.pid, signal.SIGCONT)
        assert json.loads(reader.readline())["ok"]
    info = wait_until(lambda: plugin(d, spec)["disabled"] and
                      plugin(d, spec), 10, what="the sink to be disabled")
    assert "sink exploded" in info["error"], info
    assert "ValueError: sink exploded" in d.log_text()


def test_sighup_reloads_a_fixed_policy(start_daemon, tmp_path):
    d = start(start_daemon, tmp_path, "hup",
              plugins={"policy": "hup_policy.py:policy"},
              files={"hup_policy.py": RAISING_POLICY})
    spec = "hup_policy.py:policy"
    wait_until(lambda: plugin(d, spec)["disabled"], 10,
               what="the broken policy to be disabled")
    old_pid = plugin(d, spec)["pid"]
    (d.workdir / "hup_policy.py").write_text(textwrap.dedent(GOOD_POLICY))
    d.proc.send_signal(signal.SIGHUP)

    def running():
        info = plugin(d, spec)
        return not info["disabled"] and info["pid"] and \
            info["pid"] != old_pid and info
    info = wait_until(running, 10, what="the policy to run again")
    assert info["error"] is None
    # It is the new code that decides now: it asks for max.
    wait_until(lambda: d.status()["target_workers"] == 4, 10,
               what="the reloaded policy to decide")
    decision = d.request("metrics")["metrics"]["last_decision"]
    assert decision["source"] == f"policy {spec}"
    assert len(plugins(d)) == 1
    assert re.search(r" INFO SIGHUP: reloading", d.log_text())


def test_sink_close_runs_at_shutdown(start_daemon, tmp_path):
    marker = str(tmp_path / "closed")
    d = start(start_daemon, tmp_path, "closing", low=1, high=1,
              plugins={"sinks": ["closing_sink.py:sink"],
                       "options": {"closing_sink": {"marker": marker}}},
              files={"closing_sink.py": CLOSING_SINK})
    wait_until(lambda: plugin(d, "closing_sink.py:sink")["pid"], 10,
               what="the sink to start")
    assert d.terminate(30) == 0
    assert os.path.exists(marker), "close() was not called"


# -- the shipped plugins ------------------------------------------------------

SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)")


def parse_exposition(text):
    """Check the text format's structure; return {family: [samples]}.

    Each sample is (name, {label: value}, float).
    """
    assert text.endswith("\n")
    families = {}
    kinds = {}
    current = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in families, f"family {name} is not contiguous"
            families[name] = []
            current = name
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name == current and name not in kinds, line
            assert kind in ("counter", "gauge", "histogram", "summary",
                            "untyped")
            kinds[name] = kind
            continue
        if line.startswith("#"):
            continue                    # a comment
        match = SAMPLE.fullmatch(line)
        assert match, f"bad sample line {line!r}"
        name, labels, value = match.groups()
        assert current is not None and current in kinds, \
            f"{name}: sample before its HELP and TYPE"
        allowed = {current}
        if kinds[current] == "histogram":
            allowed = {current + s for s in ("_bucket", "_sum", "_count")}
        assert name in allowed, f"{name} outside its family {current}"
        parsed = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|'
                                 r'\\.)*)"', labels or ""))
        families[current].append((name, parsed, float(value)))
    assert set(families) == set(kinds)
    return families, kinds


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                timeout=10) as response:
        return response.headers["Content-Type"], response.read().decode()


def test_prometheus_sink_serves_and_writes_valid_metrics(start_daemon,
                                                         tmp_path):
    port_file = str(tmp_path / "prom" / "port")
    textfile = str(tmp_path / "prom" / "lbd.prom")
    d = start(start_daemon, tmp_path, "prom", low=2, high=2, plugins={
        "sinks": [f"{PROMETHEUS}:sink"],
        "options": {"prometheus": {"port": 0, "port_file": port_file,
                                   "textfile": textfile}}})
    port = int(wait_until(lambda: os.path.exists(port_file) and
                          Path(port_file).read_text(), 10,
                          what="the port file"))
    with d.client() as c:
        ids = [c.submit("lbd:echo", i) for i in range(25)]
        dead = c.submit("lbdtest_handlers:boom", max_attempts=1)
        for tid in ids:
            assert c.wait(tid, timeout=20)["state"] == "DONE"
        assert c.wait(dead, timeout=20)["state"] == "DEAD"
    done = d.status()["counters"]["done"]
    assert done == 25

    def counted():
        _, body = scrape(port)
        families, _ = parse_exposition(body)
        if "lbd_tasks_total" not in families:
            return False                # "# no snapshot yet"
        by_state = {labels["state"]: value for _, labels, value in
                    families["lbd_tasks_total"]}
        return by_state == {"done": 25, "dead": 1, "expired": 0,
                            "cancelled": 0} and body
    body = wait_until(counted, 10, interval=0.05,
                      what="a snapshot with every task")
    content_type, _ = scrape(port)
    assert "text/plain" in content_type and "version=0.0.4" in content_type

    families, kinds = parse_exposition(body)
    assert kinds["lbd_tasks_total"] == "counter"
    assert kinds["lbd_queue_wait_seconds"] == "histogram"
    samples = families["lbd_queue_wait_seconds"]
    buckets = [(labels["le"], value) for name, labels, value in samples
               if name.endswith("_bucket")]
    count = next(v for n, _, v in samples if n.endswith("_count"))
    bounds = [float(le) for le, _ in buckets]
    assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds)
    assert buckets[-1][0] == "+Inf"
    values = [v for _, v in buckets]
    assert all(a <= b for a, b in zip(values, values[1:])), values
    assert values[-1] == count == 26           # every attempt waited once
    run_count = next(v for n, _, v in families["lbd_run_time_seconds"]
                     if n.endswith("_count"))
    assert run_count == 26
    workers = {labels["state"]: v for _, labels, v in families["lbd_workers"]}
    assert workers["IDLE"] + workers["BUSY"] == 2
    dropped = families["lbd_plugin_messages_dropped_total"]
    assert [(labels["plugin"], v) for _, labels, v in dropped] == \
        [(f"{PROMETHEUS}:sink", 0)]

    # Unknown paths are 404s, not metrics.
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=10)
    assert info.value.code == 404

    # The textfile holds the same text, and is replaced atomically: every
    # read sees a whole exposition while snapshots keep coming.
    def same_text():
        before = Path(textfile).read_text()
        _, served = scrape(port)
        return before == served == Path(textfile).read_text()
    wait_until(same_text, 10, interval=0.05, what="the textfile to match")
    inode = os.stat(textfile).st_ino       # a new file each time, renamed
    wait_until(lambda: os.stat(textfile).st_ino != inode, 10,
               what="the textfile to be replaced by the next snapshot")
    reads = 0
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        parse_exposition(Path(textfile).read_text())
        reads += 1
    assert reads > 10
    # A temporary file exists while a snapshot is being written; once the
    # sink has stopped, none may be left.
    d.request("shutdown")
    assert d.proc.wait(30) == 0
    leftovers = [p for p in os.listdir(os.path.dirname(textfile))
                 if p.startswith("lbd.prom.")]
    assert leftovers == []


def test_prometheus_gets_snapshots_at_the_minimum_buffer(start_daemon,
                                                         tmp_path):
    textfile = str(tmp_path / "minbuf.prom")
    d = start(start_daemon, tmp_path, "minbuf", low=1, high=1, plugins={
        "sinks": [f"{PROMETHEUS}:sink"], "buffer_bytes": 1024,
        "options": {"prometheus": {"textfile": textfile}}})
    wait_until(lambda: os.path.exists(textfile), 3, what="a first snapshot")
    assert plugin(d, f"{PROMETHEUS}:sink")["dropped"] == 0


def test_example_queue_wait_policy_scales_out_on_a_burst(start_daemon,
                                                         tmp_path):
    spec = f"{QUEUE_WAIT_POLICY}:policy"
    d = start(start_daemon, tmp_path, "qwp", plugins={
        "policy": spec,
        "options": {"queue_wait_policy": {"p95": 0.05,
                                          "calm_intervals": 3}}})
    wait_until(lambda: len(live(d.status())) == 1, 10, what="one worker")
    ids = submit_many(d, "lbdtest_handlers:busy_record",
                      [str(tmp_path / "out"), 0.1], 40)
    wait_until(lambda: d.status()["target_workers"] > 1, 10,
               what="the example policy to scale out")
    decision = d.request("metrics")["metrics"]["last_decision"]
    assert decision["source"] == f"policy {spec}"
    assert all(v["state"] == "DONE" for v in wait_all(d, ids))
    # Calm again: it gives the workers back, one at a time.
    wait_until(lambda: d.status()["target_workers"] == 1, 20,
               what="the example policy to scale in")
    assert not plugin(d, spec)["disabled"]
