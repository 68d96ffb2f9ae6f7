#!/usr/bin/env python3
"""The master's own Python per task, this lbd.py against a git revision.

Drives a Master in-process: no worker processes and no client, so the
scheduler's noise (a woken worker preempting the master) stays out and
small changes to the per-task path show. Two fake workers are socketpairs
whose far ends are drained; results are fed to the master as the lines a
worker would send. Per task it times, in microseconds:

* submit: one submit request line handled (decode, validate, journal);
* dispatch: the turn's dispatch (run record, dispatch line);
* result: one result line handled (finish, done record, answers);
* wait: one wait request line handled (answered at once: it is done);
* turn: the end of each turn (journal write, sends, and the commit and
  answers where the revision does that separately).

The baseline is ``lbd.py`` as of ``--baseline REV`` (default HEAD),
loaded from a temporary file; the two run in turn, R rounds, alternating,
and each phase reports its best round: on a shared machine other jobs
only ever add time.

    python3 bench/master_cpu.py [--baseline REV] [--n 20000] [--rounds 5]
"""

import argparse
import collections
import gc
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import _benchlib as B           # noqa: E402

PHASES = ("submit", "dispatch", "result", "wait", "turn")
SUBMIT = b'{"op":"submit","task":{"handler":"lbd:echo","args":[]}}'


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def drain(socks):
    for sock in socks:
        try:
            while sock.recv(1 << 20):
                pass
        except BlockingIOError:
            pass


def run(lbd, n, workdir):
    """Time n tasks through one fresh Master; return us/task per phase.

    The collector runs with the thresholds the daemon's master sets
    (Master.serve), where the module has them."""
    gc.collect()
    saved = gc.get_threshold()
    gc.set_threshold(*getattr(lbd, "GC_THRESHOLDS", saved))
    try:
        return _run(lbd, n, workdir)
    finally:
        gc.set_threshold(*saved)


def _run(lbd, n, workdir):
    m = lbd.Master(lbd.build_config({"journal": {
        "path": os.path.join(workdir, f"j-{time.monotonic_ns()}")}}))
    m._recover()
    far = []
    for wid in (1, 2):
        near, end = socket.socketpair()
        near.setblocking(False)
        end.setblocking(False)
        far.append(end)
        worker = lbd.Worker(wid, 10 ** 6 + wid, near, m.clock())
        m._worker_to(worker, lbd.WorkerState.STARTING)
        m.workers[worker.id] = worker
        m._worker_ready(worker, {"handlers": ["lbd:echo"]})
    near, end = socket.socketpair()
    near.setblocking(False)
    end.setblocking(False)
    far.append(end)
    conn = lbd.Conn(near)
    m.conns[conn.fd] = conn
    flush = getattr(m, "_flush_answers", None)
    spent = dict.fromkeys(PHASES, 0.0)
    clock = time.perf_counter

    def end_turn():
        t = clock()
        m._before_sleep()
        if flush is not None:
            flush()
        spent["turn"] += clock() - t
        drain(far)

    for i in range(n):
        t = clock()
        m._handle_line(conn, SUBMIT)
        spent["submit"] += clock() - t
        if i % 512 == 511:
            end_turn()
    end_turn()
    conn.slots.clear()
    waits = collections.deque(b'{"op":"wait","id":"%s"}' % tid.encode()
                              for tid in list(m.tasks))
    while m.ready or any(w.task for w in m.workers.values()):
        t = clock()
        m._dispatch()
        spent["dispatch"] += clock() - t
        end_turn()
        t = clock()
        for worker in m.workers.values():
            task = worker.task
            if task is not None:
                m._worker_lines(worker, [
                    b'{"t":"ok","id":"%s","a":%d,"r":[]}' % (
                        task.id.encode(), task.attempts)])
        spent["result"] += clock() - t
        t = clock()
        for _ in range(2):
            if waits:
                m._handle_line(conn, waits.popleft())
        spent["wait"] += clock() - t
        conn.slots.clear()
    for sock in far + [near] + [w.sock for w in m.workers.values()]:
        sock.close()
    m.journal.close()
    m.selector.close()
    return {k: v / n * 1e6 for k, v in spent.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default="HEAD", metavar="REV")
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    started = time.monotonic()
    B.header(f"master CPU per task: lbd.py against {args.baseline}")
    workdir = B.mkdtemp("lbdm-")
    base_path = os.path.join(workdir, "lbd_baseline.py")
    with open(base_path, "wb") as f:
        f.write(subprocess.run(["git", "show", f"{args.baseline}:lbd.py"],
                               cwd=ROOT, check=True,
                               capture_output=True).stdout)
    systems = [("lbd.py", load(os.path.join(ROOT, "lbd.py"), "lbd_now")),
               (args.baseline, load(base_path, "lbd_baseline"))]
    results = {name: [] for name, _ in systems}
    try:
        for rnd in range(args.rounds):
            order = systems if rnd % 2 == 0 else systems[::-1]
            for name, module in order:
                with tempfile.TemporaryDirectory(dir=workdir) as d:
                    r = run(module, args.n, d)
                B.log(f"round {rnd + 1}/{args.rounds} {name}: "
                      f"{sum(r.values()):.1f} us/task")
                results[name].append(r)
    finally:
        B.rmtree(workdir)
    rows = []
    for name, _ in systems:
        best = {k: min(r[k] for r in results[name]) for k in PHASES}
        rows.append([name] + [best[k] for k in PHASES] +
                    [min(sum(r.values()) for r in results[name])])
    now, base = rows
    rows.append(["ratio"] + [B.ratio(a, b) for a, b in zip(now[1:],
                                                           base[1:])])
    print(f"\nbest of {args.rounds} rounds of N={args.n} tasks (the least "
          "disturbed: other jobs only ever add time), "
          "us per task\n")
    B.table(["lbd"] + list(PHASES) + ["total"], rows)
    print(f"total run time: {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
