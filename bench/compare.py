#!/usr/bin/env python3
"""lbd beside the task queues its users would otherwise pick, in one run.

The workload of bench/throughput.py, smaller (the broker-based systems
run about a thousand tasks a second): N no-op tasks submitted back to
back, then every result collected; then M sequential submit-then-wait
round trips. Every system gets 2 worker processes, a fresh broker and a
warm-up, and runs in turn, R rounds, in alternating order:

* multiprocessing.Pool(2) and lbd (fsync "submits"): as in throughput.py.
* Huey + Redis: ``huey_consumer -w 2 -k process``; ``task().get(True)``
  with ``notify_result=True`` (BLPOP, not polling).
* Celery + Redis: ``celery worker -P prefork -c 2``; ``delay().get()``.
* RQ + Redis: two ``rq worker`` processes (SimpleWorker: no fork per
  job); ``job.latest_result(timeout)``.
* beanstalkd (binlog on): two worker processes reserving from one tube
  and putting each result on a reply tube.

Redis runs with ``appendonly yes`` and ``appendfsync everysec``, its usual
durable setting; beanstalkd with ``-b`` (binlog). The broker libraries are
not lbd's dependencies; a system whose pieces are missing is skipped with
the command that installs them:

    sudo apt-get install redis-server beanstalkd
    python3 -m venv .venv-bench
    .venv-bench/bin/pip install celery redis rq huey greenstalk packaging
    .venv-bench/bin/python bench/compare.py [--n 2000] [--m 200] [--rounds 3]
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import _benchlib as B           # noqa: E402
import throughput as T          # noqa: E402

BIN = os.path.dirname(sys.executable)
TIMEOUT = 120.0

TASKS = textwrap.dedent('''
    import os

    SOCK = os.environ["BENCH_REDIS"]


    def noop(*args):
        return list(args)


    try:
        from huey import RedisHuey
        from redis import ConnectionPool
        # notify_result: get() waits on BLPOP instead of polling with
        # backoff from 50 ms, Huey's option for low latency.
        huey = RedisHuey("bench", connection_pool=ConnectionPool.from_url(
            "unix://" + SOCK), notify_result=True)
        huey_noop = huey.task()(noop)
    except ImportError:
        pass

    try:
        from celery import Celery
        app = Celery("benchtasks", broker="redis+socket://" + SOCK,
                     backend="redis+socket://" + SOCK)
        celery_noop = app.task(name="noop")(noop)
    except ImportError:
        pass
''')

BEANS_WORKER = textwrap.dedent('''
    import sys
    import greenstalk

    client = greenstalk.Client(("127.0.0.1", int(sys.argv[1])),
                               watch="jobs", use="results")
    while True:
        job = client.reserve()
        client.put(job.body)        # the no-op: the result is the input
        client.delete(job)
''')


# -- processes ----------------------------------------------------------------

class Group:
    """Processes one system needs, each in its own session, ended by pid."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.procs = []

    def start(self, argv, env=None, name="proc"):
        log = open(os.path.join(self.workdir, f"{name}.log"), "ab")
        proc = subprocess.Popen(argv, cwd=self.workdir, stdout=log,
                                stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL,
                                env=dict(os.environ, **(env or {})),
                                start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def stop(self):
        for proc in reversed(self.procs):
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            deadline = time.monotonic() + 10
            while B.group_members(proc.pid) and time.monotonic() < deadline:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
        self.procs.clear()


def wait_for(check, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:           # not up yet: any client error
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(group):
    sock = os.path.join(group.workdir, "redis.sock")
    group.start(["redis-server", "--port", "0", "--unixsocket", sock,
                 "--dir", group.workdir, "--save", "", "--appendonly", "yes",
                 "--appendfsync", "everysec"], name="redis")
    import redis
    wait_for(lambda: redis.Redis(unix_socket_path=sock).ping(), "redis")
    return sock


# -- the systems --------------------------------------------------------------

def run_huey(group, n, m):
    sock = start_redis(group)
    env = {"BENCH_REDIS": sock, "PYTHONPATH": group.workdir}
    os.environ.update(env)
    group.start([os.path.join(BIN, "huey_consumer"), "benchtasks.huey",
                 "-w", "2", "-k", "process", "-q"], env=env, name="huey")
    sys.path.insert(0, group.workdir)
    import benchtasks
    return T.measure_in_memory(
        lambda: benchtasks.huey_noop(),
        lambda r: r.get(blocking=True, timeout=TIMEOUT), n, m)


def run_celery(group, n, m):
    sock = start_redis(group)
    env = {"BENCH_REDIS": sock, "PYTHONPATH": group.workdir}
    os.environ.update(env)
    group.start([os.path.join(BIN, "celery"), "-A", "benchtasks", "worker",
                 "-P", "prefork", "-c", "2", "-l", "warning",
                 "--without-gossip", "--without-mingle",
                 "--without-heartbeat"], env=env, name="celery")
    sys.path.insert(0, group.workdir)
    import benchtasks
    wait_for(lambda: benchtasks.celery_noop.delay().get(timeout=5) == [],
             "celery workers")
    return T.measure_in_memory(lambda: benchtasks.celery_noop.delay(),
                               lambda r: r.get(timeout=TIMEOUT), n, m)


def run_rq(group, n, m):
    sock = start_redis(group)
    env = {"BENCH_REDIS": sock, "PYTHONPATH": group.workdir}
    os.environ.update(env)
    for i in range(2):
        group.start([os.path.join(BIN, "rq"), "worker", "--url",
                     f"unix://{sock}", "-w", "rq.worker.SimpleWorker",
                     "-q", "--name", f"w{i}-{os.getpid()}"],
                    env=env, name=f"rq{i}")
    sys.path.insert(0, group.workdir)
    import benchtasks
    import redis
    import rq
    queue = rq.Queue(connection=redis.Redis(unix_socket_path=sock))

    def result(job):
        got = job.latest_result(timeout=int(TIMEOUT))
        if got is None or got.type != got.Type.SUCCESSFUL:
            raise RuntimeError(f"rq job {job.id} did not succeed: {got}")
        return got.return_value
    return T.measure_in_memory(lambda: queue.enqueue(benchtasks.noop),
                               result, n, m)


def run_beanstalkd(group, n, m):
    import greenstalk
    port = free_port()
    binlog = os.path.join(group.workdir, "binlog")
    os.mkdir(binlog)
    group.start(["beanstalkd", "-l", "127.0.0.1", "-p", str(port),
                 "-b", binlog], name="beanstalkd")
    wait_for(lambda: greenstalk.Client(("127.0.0.1", port)).close() or True,
             "beanstalkd")
    worker = os.path.join(group.workdir, "beans_worker.py")
    with open(worker, "w") as f:
        f.write(BEANS_WORKER)
    for i in range(2):
        group.start([sys.executable, worker, str(port)], name=f"beans{i}")
    client = greenstalk.Client(("127.0.0.1", port), use="jobs",
                               watch="results")
    counter = iter(range(1 << 62))

    def submit():
        client.put(str(next(counter)))

    def result(_handle):
        # Results come back in about the order they were put; the no-op
        # workload only needs each one collected.
        job = client.reserve(timeout=int(TIMEOUT))
        client.delete(job)
    try:
        return T.measure_in_memory(submit, result, n, m)
    finally:
        client.close()


def run_pool(group, n, m):
    return T.run_pool(2, n, m, 0)


def run_lbd(group, n, m):
    return T.run_lbd(2, n, m, 0, "submits")


SYSTEMS = [
    ("multiprocessing.Pool(2)", run_pool, [], [], "none: in memory"),
    ("lbd, fsync submits", run_lbd, [], [],
     "journal, fsync before each ack"),
    ("Huey + Redis", run_huey, ["redis-server"], ["huey", "redis"],
     "Redis AOF, fsync every second"),
    ("Celery + Redis, prefork -c 2", run_celery, ["redis-server"],
     ["celery", "redis"], "Redis AOF, fsync every second"),
    ("RQ SimpleWorker + Redis", run_rq, ["redis-server"], ["rq", "redis"],
     "Redis AOF, fsync every second"),
    ("beanstalkd", run_beanstalkd, ["beanstalkd"], ["greenstalk"],
     "binlog (-b), its default fsync"),
]


def missing(binaries, modules):
    gone = [b for b in binaries if shutil.which(b) is None]
    for name in modules:
        try:
            __import__(name)
        except ImportError:
            gone.append(f"python: {name}")
    return gone


def run_one(name, fn, n, m):
    workdir = B.mkdtemp("lbdcmp-")
    with open(os.path.join(workdir, "benchtasks.py"), "w") as f:
        f.write(TASKS)
    group = Group(workdir)
    try:
        return fn(group, n, m)
    finally:
        group.stop()
        sys.modules.pop("benchtasks", None)
        if workdir in sys.path:
            sys.path.remove(workdir)
        B.rmtree(workdir)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, metavar="N")
    p.add_argument("--m", type=int, default=200, metavar="M")
    p.add_argument("--rounds", type=int, default=3, metavar="R")
    p.add_argument("--max-seconds", type=float, default=1500)
    args = p.parse_args(argv)
    started = time.monotonic()
    B.install(args.max_seconds)
    B.header("lbd beside Pool, Huey, Celery, RQ and beanstalkd")
    print(f"workload: no-op task; N={args.n} back to back then every "
          f"result; M={args.m} sequential round trips; 2 workers each; "
          f"R={args.rounds} rounds\n", flush=True)
    systems = []
    for name, fn, binaries, modules, durable in SYSTEMS:
        gone = missing(binaries, modules)
        if gone:
            print(f"skipped {name}: missing {', '.join(gone)}")
        else:
            systems.append((name, fn, durable))
    results = {name: [] for name, _, _ in systems}
    failures = {}
    try:
        for rnd in range(args.rounds):
            order = systems if rnd % 2 == 0 else systems[::-1]
            for name, fn, _ in order:
                if name in failures:
                    continue
                B.log(f"round {rnd + 1}/{args.rounds}: {name}")
                try:
                    r = run_one(name, fn, args.n, args.m)
                except B.BudgetExceeded:
                    raise
                except Exception as exc:
                    failures[name] = f"{type(exc).__name__}: {exc}"[:200]
                    B.log(f"  failed: {failures[name]}")
                    continue
                B.log(f"  {r['rate']:.0f} tasks/s, p50 {r['p50']:.3f} ms, "
                      f"p99 {r['p99']:.3f} ms")
                results[name].append(r)
    except B.BudgetExceeded:
        B.log("time budget exhausted; reporting the rounds completed")
    pool = results.get(SYSTEMS[0][0]) or []
    rows = []
    for name, _, durable in systems:
        runs = results[name]
        if not runs:
            rows.append([name, "failed: " + failures.get(name, "no run"),
                         "", "", "", "", durable])
            continue
        rate = B.median([r["rate"] for r in runs])
        rows.append([name, rate, B.spread([r["rate"] for r in runs]),
                     B.median([r["p50"] for r in runs]),
                     B.median([r["p99"] for r in runs]),
                     B.ratio(rate, B.median([r["rate"] for r in pool]))
                     if pool else "-", durable])
    print(f"\nresults: medians over the rounds each system completed\n")
    B.table(["system", "tasks/s", "range", "p50 ms", "p99 ms", "vs Pool",
             "durability as run"], rows)
    B.cleanup()
    print(f"total run time: {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
