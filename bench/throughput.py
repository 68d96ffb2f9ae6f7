#!/usr/bin/env python3
"""Throughput, latency and master CPU: lbd against multiprocessing.Pool.

Both run the same no-op task in the same process, in turn, for R rounds
(the order alternates between rounds so drift on a shared machine hits
both alike):

* throughput: N tasks submitted back to back, then every result
  collected. Pool: ``apply_async`` N times, then ``.get()`` each. lbd: one
  client pipelines N submits (``Client.pipeline``, batches of 512), then
  pipelines a ``wait`` for every id.
* latency: M sequential round trips, one at a time. Pool:
  ``apply_async(...).get()``. lbd: on one connection, a submit and, once
  it has the id, a wait.
* master CPU per task over the throughput phase: for lbd the daemon's own
  utime+stime from /proc/<pid>/stat (its workers not included); for Pool
  the parent's getrusage(RUSAGE_SELF), which includes Pool's feeder and
  result threads (its workers not included); "of it system" is the
  stime part. lbd's client CPU is shown
  too: in the Pool run the parent is client and master at once. "master
  preempted /task": the daemon's involuntary context switches over the
  throughput phase (/proc/<pid>/status), per task.

The no-op: ``lbd:echo`` (returns its args) and, for Pool, a module-level
function returning its args; --payload BYTES adds one string argument of
that size to every task. Every lbd run is a fresh daemon (W fixed
workers, [journal] fsync = MODE) on a fresh journal in a temporary
directory; every Pool run a fresh Pool(W). 200 warm-up tasks precede
each measurement.

    python3 bench/throughput.py [--workers 2] [--n 20000] [--m 2000]
        [--rounds 5] [--fsync all|submits|always|interval|never]
        [--payload 0] [--executor] [--profile [FILE]] [--max-seconds 1500]

``--fsync all`` (the default) runs submits and always side by side;
``--executor`` adds concurrent.futures.ProcessPoolExecutor(W) as a second
in-memory reference. ``--profile`` adds one extra lbd run (not in the
medians) with the daemon's master under cProfile (workers unprofiled) and
prints its top 15 functions by tottime.
It runs ``lbd.main()`` under ``cProfile.Profile`` from ``python3 -c`` and
stops profiling in forked children (see _benchlib.PROFILE_LAUNCHER).
"""

import argparse
import concurrent.futures
import multiprocessing
import os
import pstats
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _benchlib as B  # noqa: E402

WARMUP = 200
CLIENT_TIMEOUT = 300.0


def noop(*args):
    """Pool's no-op: return the arguments (like lbd:echo)."""
    return list(args)


def self_cpu():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def self_system_cpu():
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def preemptions(pid):
    """Involuntary context switches of ``pid`` so far (/proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("nonvoluntary_ctxt_switches:"):
                return int(line.split()[1])
    return 0


def task_args(payload):
    return ["x" * payload] if payload else []


# -- Pool ---------------------------------------------------------------------

def run_pool(workers, n, m, payload):
    args = task_args(payload)
    pool = multiprocessing.Pool(workers)
    try:
        result = measure_in_memory(lambda: pool.apply_async(noop, args),
                                   lambda r: r.get(CLIENT_TIMEOUT), n, m)
    except BaseException:
        pool.terminate()
        raise
    # close + join, not terminate: Pool.terminate() can leave a worker
    # blocked on the task queue's lock, and its join then never returns.
    pool.close()
    pool.join()
    return result


def run_executor(workers, n, m, payload):
    args = task_args(payload)
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        return measure_in_memory(lambda: pool.submit(noop, *args),
                                 lambda f: f.result(CLIENT_TIMEOUT), n, m)


def measure_in_memory(submit, result, n, m):
    """The workload through submit() -> handle and result(handle): the
    in-memory pools here, and the broker-based systems of compare.py."""
    for r in [submit() for _ in range(WARMUP)]:
        result(r)
    cpu0, sys0, t0 = self_cpu(), self_system_cpu(), time.perf_counter()
    pending = [submit() for _ in range(n)]
    for r in pending:
        result(r)
    elapsed = time.perf_counter() - t0
    cpu, system = self_cpu() - cpu0, self_system_cpu() - sys0
    del pending
    lat = []
    for _ in range(m):
        t = time.perf_counter()
        result(submit())
        lat.append(time.perf_counter() - t)
    return {"rate": n / elapsed, "elapsed": elapsed,
            "p50": B.percentile(lat, 50) * 1e3,
            "p99": B.percentile(lat, 99) * 1e3,
            "master_us": cpu / n * 1e6, "master_sys_us": system / n * 1e6,
            "client_us": None, "preempted": None,
            "journal_bpt": None, "journal_bytes": None}


# -- lbd ----------------------------------------------------------------------

def submit_request(payload):
    return {"op": "submit", "task": {"handler": "lbd:echo",
                                     "args": task_args(payload)}}


def submit_and_collect(client, requests):
    """Pipeline the submits, then a wait for each id; return the views."""
    acks = client.pipeline(requests, batch=512)
    bad = [a for a in acks if not a.get("ok")]
    if bad:
        raise RuntimeError(f"{len(bad)} submits failed, e.g. {bad[0]}")
    views = client.pipeline([{"op": "wait", "id": a["id"]} for a in acks],
                            batch=512)
    failed = [v for v in views if not v.get("ok") or
              v["task"]["state"] != "DONE"]
    if failed:
        raise RuntimeError(f"{len(failed)} tasks did not end DONE, e.g. "
                           f"{failed[0]}")
    return views


def lbd_config(mode):
    return {"journal": {"fsync": mode}, "workers": {"stop_grace": 5.0}}


def run_lbd(workers, n, m, payload, mode, profile=None):
    workdir = B.mkdtemp("lbdb-")
    daemon = B.Daemon(workdir, workers, workers, lbd_config(mode),
                      profile=profile)
    try:
        daemon.start_ready()
        request = submit_request(payload)
        with daemon.client(CLIENT_TIMEOUT) as c:
            submit_and_collect(c, [request] * WARMUP)
            size0 = os.path.getsize(daemon.journal)
            dcpu0, ccpu0 = B.proc_cpu_split(daemon.pid), self_cpu()
            pre0 = preemptions(daemon.pid)
            t0 = time.perf_counter()
            submit_and_collect(c, [request] * n)
            elapsed = time.perf_counter() - t0
            duser, dsys = (b - a for a, b in zip(
                dcpu0, B.proc_cpu_split(daemon.pid)))
            dcpu, ccpu = duser + dsys, self_cpu() - ccpu0
            pre = preemptions(daemon.pid) - pre0
            size1 = os.path.getsize(daemon.journal)
            lat = []
            task = request["task"]
            for _ in range(m):
                t = time.perf_counter()
                tid = c.request("submit", task=task)["id"]
                view = c.request("wait", id=tid)["task"]
                lat.append(time.perf_counter() - t)
                if view["state"] != "DONE":
                    raise RuntimeError(f"latency task ended {view}")
            journal_bytes = os.path.getsize(daemon.journal)
        daemon.stop()
        return {"rate": n / elapsed, "elapsed": elapsed,
                "p50": B.percentile(lat, 50) * 1e3,
                "p99": B.percentile(lat, 99) * 1e3,
                "master_us": dcpu / n * 1e6, "master_sys_us": dsys / n * 1e6,
                "client_us": ccpu / n * 1e6,
                "preempted": pre / n,
                "journal_bpt": (size1 - size0) / n,
                "journal_bytes": journal_bytes}
    finally:
        daemon.stop(graceful=False)
        if profile is None:
            B.rmtree(workdir)


# -- main ---------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2, metavar="W")
    p.add_argument("--executor", action="store_true",
                   help="also run concurrent.futures.ProcessPoolExecutor")
    p.add_argument("--n", type=int, default=20000, metavar="N",
                   help="tasks in the throughput phase (default 20000)")
    p.add_argument("--m", type=int, default=2000, metavar="M",
                   help="sequential round trips in the latency phase "
                   "(default 2000)")
    p.add_argument("--rounds", type=int, default=5, metavar="R")
    p.add_argument("--fsync", default="all",
                   choices=["submits", "always", "interval", "never", "all"],
                   help="[journal] fsync of the lbd daemon; 'all' (the "
                   "default) runs submits and always side by side")
    p.add_argument("--payload", type=int, default=0, metavar="BYTES",
                   help="size of a string argument every task carries")
    p.add_argument("--profile", nargs="?", const="", default=None,
                   metavar="FILE", help="one extra lbd run under cProfile; "
                   "print the top 15 by tottime (keep the .prof in FILE)")
    p.add_argument("--max-seconds", type=float, default=1500,
                   help="time budget; rounds that would not fit are "
                   "skipped (default 1500)")
    args = p.parse_args(argv)
    if min(args.workers, args.n, args.m, args.rounds) < 1 or \
            args.payload < 0:
        p.error("--workers, --n, --m, --rounds must be >= 1, --payload >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    started = time.monotonic()
    deadline = B.install(args.max_seconds)
    modes = ["submits", "always"] if args.fsync == "all" else [args.fsync]
    systems = [("pool", None)] + [("lbd", mode) for mode in modes]
    if args.executor:
        systems.append(("executor", None))
    B.header("lbd throughput vs multiprocessing.Pool")
    print(f"workload: no-op task, payload {args.payload} B; throughput "
          f"N={args.n} back to back; latency M={args.m} sequential round "
          f"trips; W={args.workers} workers; R={args.rounds} rounds; lbd "
          f"fsync: {', '.join(modes)}\n", flush=True)

    results = {s: [] for s in systems}
    round_times = []
    try:
        for rnd in range(args.rounds):
            left = deadline - time.monotonic()
            if round_times and left < 1.5 * max(round_times):
                B.log(f"skipping rounds {rnd + 1}..{args.rounds}: "
                      f"{left:.0f} s of budget left")
                break
            t_round = time.monotonic()
            order = systems if rnd % 2 == 0 else systems[::-1]
            for name, mode in order:
                B.log(f"round {rnd + 1}/{args.rounds}: {name}"
                      f"{'' if mode is None else ' fsync=' + mode}")
                if name == "pool":
                    r = run_pool(args.workers, args.n, args.m, args.payload)
                elif name == "executor":
                    r = run_executor(args.workers, args.n, args.m,
                                     args.payload)
                else:
                    r = run_lbd(args.workers, args.n, args.m, args.payload,
                                mode)
                B.log(f"  {r['rate']:.0f} tasks/s, p50 {r['p50']:.3f} ms, "
                      f"p99 {r['p99']:.3f} ms, master "
                      f"{r['master_us']:.1f} us/task")
                results[name, mode].append(r)
            round_times.append(time.monotonic() - t_round)
    except B.BudgetExceeded:
        B.log("time budget exhausted; reporting the rounds completed")

    report(args, systems, results)
    if args.profile is not None and time.monotonic() < deadline:
        profile_run(args, modes[0])
    B.cleanup()
    print(f"total run time: {time.monotonic() - started:.1f} s")


def report(args, systems, results):
    def med(system, key):
        return B.median([r[key] for r in results[system]])

    rounds = min(len(v) for v in results.values())
    print(f"results: medians over {rounds} round(s); 'range' is the "
          "min..max of the rounds\n")
    rows = []
    for system in systems:
        name, mode = system
        if not results[system]:
            continue
        rows.append([
            {"pool": "Pool", "executor": "ProcessPoolExecutor"}.get(
                name, "lbd") + f"({args.workers})",
            mode or "-", med(system, "rate"),
            B.spread([r["rate"] for r in results[system]]),
            med(system, "p50"), med(system, "p99"),
            med(system, "master_us"), med(system, "master_sys_us"),
            med(system, "client_us"),
            med(system, "preempted"),
            med(system, "journal_bpt"), med(system, "journal_bytes")])
    B.table(["system", "fsync", "tasks/s", "range", "p50 ms", "p99 ms",
             "master CPU us/task", "of it system", "client CPU us/task",
             "master preempted /task", "journal B/task", "journal bytes"],
            rows)
    pool = ("pool", None)
    rows = []
    for system in systems[1:]:
        if system[0] != "lbd" or not results[system] or not results[pool]:
            continue
        rows.append([
            f"lbd/Pool ({system[1]})",
            B.ratio(med(system, "rate"), med(pool, "rate")),
            B.ratio(med(system, "p50"), med(pool, "p50")),
            B.ratio(med(system, "p99"), med(pool, "p99")),
            B.ratio(med(system, "master_us"), med(pool, "master_us"))])
    if rows:
        B.table(["ratio", "throughput", "p50 latency", "p99 latency",
                 "master CPU/task"], rows)
    print("journal bytes: the file at the end of a run (warm-up, "
          "throughput and latency tasks); B/task over the throughput "
          "phase\n")


def profile_run(args, mode):
    workdir = B.mkdtemp("lbdp-")
    prof = args.profile or os.path.join(workdir, "daemon.prof")
    B.log(f"profiling: one lbd run (fsync={mode}) under cProfile -> {prof}")
    try:
        r = run_lbd(args.workers, args.n, args.m, args.payload, mode,
                    profile=prof)
        print(f"profiled run (not in the medians): {r['rate']:.0f} tasks/s,"
              f" master CPU {r['master_us']:.1f} us/task, p50 "
              f"{r['p50']:.3f} ms")
        print(f"daemon master under cProfile -> {prof} (fsync={mode}, "
              f"W={args.workers}); the whole daemon lifetime: start-up, "
              f"{WARMUP} warm-up + N={args.n} + M={args.m} tasks, "
              f"shutdown\n")
        stats = pstats.Stats(prof, stream=sys.stdout)
        stats.strip_dirs().sort_stats("tottime").print_stats(15)
    finally:
        B.rmtree(workdir)
        # run_lbd left its own workdir for the .prof; remove them all
        B.cleanup()


if __name__ == "__main__":
    main()
