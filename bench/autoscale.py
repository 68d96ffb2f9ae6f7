#!/usr/bin/env python3
"""lbd's autoscaler against fixed pools, on a bursty workload.

One open-loop schedule of ``lbd:sleep`` tasks (each 0.05-0.1 s, uniform;
Poisson arrivals at a rate fixed per phase: idle, burst, steady, idle) is
run three ways, each on a fresh daemon:

* fixed-min   --min-workers MIN --max-workers MIN
* fixed-max   --min-workers MAX --max-workers MAX
* autoscaled  --min-workers MIN --max-workers MAX, the default policy with
  [scaling] interval 0.5, window 10, scale_in_delay 5,
  target_queue_wait 0.2 (printed at the start)

For each: the p95 (and p50) queue wait from each task's own view
(started_at - submitted_at, read with get after the run); worker-seconds,
the number of worker processes in ``status`` (any state) polled every
0.2 s and integrated over the schedule's window; and the tasks completed
within the window and in all. After the window the daemon gets up to
--drain seconds to finish what is left; a task still not started then
counts with the wait it had so far (a lower bound) and is reported.

Each round runs the three modes on the same schedule (a new seed per
round), in a rotated order; the table gives medians over the rounds and
ratios against the fixed max pool.

    python3 bench/autoscale.py [--quick] [--duration 60] [--rounds 3]
        [--min 1] [--max 4] [--seed 1] [--max-seconds 1800]

--quick: a 20 s schedule and 1 round (unless --rounds is given).
"""

import argparse
import os
import random
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _benchlib as B  # noqa: E402

#: (name, share of the duration, arrivals per second)
PHASES = [("idle", 0.15, 0.5), ("burst", 0.20, 30.0),
          ("steady", 0.40, 6.0), ("idle", 0.25, 0.5)]
TASK_SECONDS = (0.05, 0.10)
SCALING = {"interval": 0.5, "window": 10.0, "scale_in_delay": 5.0,
           "target_queue_wait": 0.2}
POLL = 0.2


def schedule(duration, seed):
    """Return [(offset s, phase index, task seconds)], sorted by offset."""
    rng = random.Random(seed)
    out, start = [], 0.0
    for index, (_name, share, rate) in enumerate(PHASES):
        end = start + share * duration
        t = start
        while True:
            t += rng.expovariate(rate)
            if t >= end:
                break
            out.append((t, index, round(rng.uniform(*TASK_SECONDS), 4)))
        start = end
    return out


class Poller(threading.Thread):
    """Polls status every POLL s: (monotonic, worker processes, busy)."""

    def __init__(self, daemon):
        super().__init__(daemon=True, name="status-poller")
        self.lbd = daemon
        self.samples = []
        self.stop_event = threading.Event()
        self.error = None

    def run(self):
        try:
            with self.lbd.client(30.0) as c:
                while not self.stop_event.is_set():
                    workers = c.status()["workers"]
                    self.samples.append((
                        time.monotonic(), len(workers),
                        sum(w["state"] == "BUSY" for w in workers)))
                    self.stop_event.wait(POLL)
        except Exception as exc:  # reported by the main thread
            self.error = exc

    def worker_seconds(self, start, end):
        """Integrate the worker count over [start, end] (step function)."""
        total = 0.0
        samples = self.samples
        for (t, n, _), nxt in zip(samples, samples[1:] + [None]):
            t_next = nxt[0] if nxt else end
            lo, hi = max(t, start), min(t_next, end)
            if hi > lo:
                total += n * (hi - lo)
        return total

    def mean_workers(self, start, end):
        span = end - start
        return self.worker_seconds(start, end) / span if span > 0 else None


def run_mode(mode, low, high, plan, duration, drain):
    workdir = B.mkdtemp("lbda-")
    daemon = B.Daemon(workdir, low, high, {
        "scaling": SCALING, "workers": {"stop_grace": 2.0,
                                        "kill_grace": 1.0}})
    poller = None
    try:
        daemon.start_ready()
        poller = Poller(daemon)
        poller.start()
        time.sleep(2 * POLL)
        submitted = []       # (id, phase)
        with daemon.client(60.0) as c:
            t0, wall0 = time.monotonic(), time.time()
            for offset, phase, seconds in plan:
                delay = t0 + offset - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                tid = c.submit("lbd:sleep", seconds)
                submitted.append((tid, phase))
            time.sleep(max(0.0, t0 + duration - time.monotonic()))
            t_end = time.monotonic()
            drain_deadline = t_end + drain
            while time.monotonic() < drain_deadline:
                q = c.status()["queue"]
                if q["ready"] == 0 and q["running"] == 0 and \
                        q["delayed"] == 0:
                    break
                time.sleep(0.1)
            views = [r["task"] for r in c.pipeline(
                [{"op": "get", "id": tid} for tid, _ in submitted])]
            now_wall = time.time()
        poller.stop_event.set()
        poller.join(5)
        if poller.error:
            raise RuntimeError(f"status poller failed: {poller.error}")
        waits, by_phase, censored = [], {}, 0
        done_in_window = done = 0
        for (tid, phase), view in zip(submitted, views):
            if view["started_at"] is None:
                wait = now_wall - view["submitted_at"]
                censored += 1
            else:
                wait = view["started_at"] - view["submitted_at"]
            waits.append(wait)
            by_phase.setdefault(phase, []).append(wait)
            if view["state"] == "DONE":
                done += 1
                if view["finished_at"] <= wall0 + duration:
                    done_in_window += 1
        phase_bounds, start = [], t0
        for _name, share, _rate in PHASES:
            phase_bounds.append((start, start + share * duration))
            start += share * duration
        daemon.stop()
        return {
            "mode": mode, "submitted": len(submitted), "done": done,
            "done_in_window": done_in_window, "censored": censored,
            "p50": B.percentile(waits, 50), "p95": B.percentile(waits, 95),
            "max_wait": max(waits) if waits else None,
            "worker_s": poller.worker_seconds(t0, t0 + duration),
            "phase_workers": [poller.mean_workers(a, b)
                              for a, b in phase_bounds],
            "phase_p95": [B.percentile(by_phase.get(i, []), 95)
                          for i in range(len(PHASES))],
        }
    finally:
        if poller is not None:
            poller.stop_event.set()
        daemon.stop(graceful=False)
        B.rmtree(workdir)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a 20 s schedule, 1 round unless --rounds is given")
    p.add_argument("--duration", type=float, default=None,
                   help="schedule length in seconds (default 60, quick 20)")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds (default 3, quick 1)")
    p.add_argument("--min", type=int, default=1, dest="low")
    p.add_argument("--max", type=int, default=4, dest="high")
    p.add_argument("--drain", type=float, default=None,
                   help="seconds after the window to let tasks finish "
                   "(default: the duration)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=1800)
    args = p.parse_args(argv)
    args.duration = args.duration or (20.0 if args.quick else 60.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.drain = args.duration if args.drain is None else args.drain
    if not 1 <= args.low < args.high:
        p.error("need 1 <= --min < --max")
    return args


def main(argv=None):
    args = parse_args(argv)
    started = time.monotonic()
    deadline = B.install(args.max_seconds)
    modes = [("fixed-min", args.low, args.low),
             ("fixed-max", args.high, args.high),
             ("autoscaled", args.low, args.high)]
    B.header("lbd autoscaling vs fixed pools")
    print(f"workload: lbd:sleep tasks of {TASK_SECONDS[0]}-"
          f"{TASK_SECONDS[1]} s (uniform), Poisson arrivals; schedule of "
          f"{args.duration:g} s; {args.rounds} round(s), seed {args.seed}+"
          f"round; drain up to {args.drain:g} s after the window")
    start = 0.0
    for name, share, rate in PHASES:
        print(f"  {start:6.1f}-{start + share * args.duration:6.1f} s  "
              f"{name:<7} {rate:5.1f} tasks/s")
        start += share * args.duration
    print(f"modes: fixed-min {args.low}, fixed-max {args.high}, autoscaled "
          f"{args.low}..{args.high} with [scaling] " + ", ".join(
              f"{k} = {v:g}" for k, v in SCALING.items()) +
          " (other keys default)\n", flush=True)

    results = {name: [] for name, _, _ in modes}
    per_round = None
    try:
        for rnd in range(args.rounds):
            plan = schedule(args.duration, args.seed + rnd)
            est = 3 * (args.duration + 5)
            if rnd and time.monotonic() + (per_round or est) > deadline:
                B.log(f"skipping rounds {rnd + 1}..: out of time budget")
                break
            t_round = time.monotonic()
            order = modes[rnd % 3:] + modes[:rnd % 3]
            for name, low, high in order:
                B.log(f"round {rnd + 1}/{args.rounds}: {name} "
                      f"({low}..{high} workers), {len(plan)} tasks")
                r = run_mode(name, low, high, plan, args.duration,
                             args.drain)
                B.log(f"  p95 wait {r['p95'] * 1e3:.0f} ms, "
                      f"{r['worker_s']:.1f} worker-s, "
                      f"{r['done_in_window']}/{r['submitted']} done in "
                      f"window")
                results[name].append(r)
            per_round = time.monotonic() - t_round
    except B.BudgetExceeded:
        B.log("time budget exhausted; reporting the rounds completed")
    report(args, modes, results)
    B.cleanup()
    print(f"total run time: {time.monotonic() - started:.1f} s")


def report(args, modes, results):
    def med(name, key):
        return B.median([r[key] for r in results[name]])

    rounds = min(len(v) for v in results.values())
    print(f"results: medians over {rounds} round(s); waits in ms; "
          f"worker-s over the {args.duration:g} s window\n")
    ref = "fixed-max"
    rows = []
    for name, low, high in modes:
        if not results[name]:
            continue
        p95 = med(name, "p95")
        ws = med(name, "worker_s")
        rows.append([
            name, f"{low}..{high}" if low != high else str(low),
            p95 * 1e3, med(name, "p50") * 1e3, med(name, "max_wait") * 1e3,
            ws, f"{med(name, 'done_in_window'):g}/"
            f"{med(name, 'submitted'):g}", f"{med(name, 'done'):g}",
            f"{med(name, 'censored'):g}",
            B.ratio(p95, med(ref, "p95")) if results[ref] else None,
            B.ratio(ws, med(ref, "worker_s")) if results[ref] else None])
    B.table(["mode", "workers", "p95 wait", "p50 wait", "max wait",
             "worker-s", "done in window", "done", "never started",
             "p95 / fixed-max", "worker-s / fixed-max"], rows)

    print("per phase (medians over rounds): mean worker processes | p95 "
          "wait ms of the tasks submitted in that phase\n")
    headers = ["mode"] + [f"{i + 1}:{p[0]}" for i, p in enumerate(PHASES)]
    rows = []
    for name, _, _ in modes:
        if not results[name]:
            continue
        row = [name]
        for i in range(len(PHASES)):
            workers = B.median([r["phase_workers"][i]
                                for r in results[name]])
            p95 = B.median([r["phase_p95"][i] for r in results[name]])
            row.append(f"{B.fmt(workers)} | "
                       f"{B.fmt(None if p95 is None else p95 * 1e3)}")
        rows.append(row)
    B.table(headers, rows)


if __name__ == "__main__":
    main()
