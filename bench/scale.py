#!/usr/bin/env python3
"""lbd with a million tasks queued: submit rate, memory, replay, dispatch.

The procedure, on a fresh daemon and journal in a temporary directory:

1. start lbd with one worker (--min-workers 1 --max-workers 1) and block
   it with a gate task (``lbd:sleep 3600``, priority 100, max_attempts 1),
   so that everything submitted after it stays on the ready queue;
2. pipeline K ``lbd:echo`` submits (one client, batch 512), timing the
   first S (default 10,000; the queue is empty at the first) and, when
   K >= 2 S, the last S; read the daemon's VmRSS before and after
   (bytes per queued task beyond the baseline);
3. kill -9 the daemon and restart it on the same journal with two workers
   (--min-workers 2 --max-workers 2); time from the start of the process
   to the first ping answered (replay to ready). The gate's interrupted
   attempt was its only one, so it ends DEAD and the workers take the
   queue in FIFO order;
4. dispatch rate: the daemon's own started_at / finished_at stamps of D
   (default 10,000) consecutive tasks, taken after a margin of 2,000 tasks
   (so both runs time the same steady state, not the workers' start).

The baseline is K = 2,000 + D (the queue is empty at its first submit and
never holds more than K; it drains to empty in the window); it is repeated
--rounds times, each on a fresh daemon. The big run is K = N (default
1,000,000), filled once; its step 3-4 is repeated --rounds times, each
restart after a kill -9 that ends the previous window (the queue stays
within (2,000 + D) x rounds of N). The table gives medians over rounds
(submit rates: over 5 slices of each window) and big / baseline ratios.

    python3 bench/scale.py [--n 1000000] [--sample 10000] [--dispatch 10000]
        [--rounds 3] [--profile] [--max-seconds 2400]

Progress goes to stderr; the table to stdout.
"""

import argparse
import io
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _benchlib as B  # noqa: E402

SLICES = 5
MARGIN = 2000
CHUNK = 10000
TIMEOUT = 900.0
ECHO = {"op": "submit", "task": {"handler": "lbd:echo", "args": []}}
GATE = {"handler": "lbd:sleep", "args": [3600], "priority": 100,
        "max_attempts": 1, "timeout": 7200}


def config(max_queued):
    return {"server": {"max_queued": max_queued},
            "workers": {"stop_grace": 2.0, "kill_grace": 1.0}}


def ack_ids(acks):
    bad = [a for a in acks if not a.get("ok")]
    if bad:
        raise RuntimeError(f"{len(bad)} submits refused, e.g. {bad[0]}")
    return [a["id"] for a in acks]


def timed_submits(client, count):
    """Pipeline ``count`` echo submits; return (ids, [slice rates])."""
    ids, rates = [], []
    per = max(1, count // SLICES)
    while len(ids) < count:
        size = min(per, count - len(ids))
        t = time.perf_counter()
        acks = client.pipeline([ECHO] * size, batch=512)
        rates.append(size / (time.perf_counter() - t))
        ids.extend(ack_ids(acks))
    return ids, rates


def wait_state(client, tid, state, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        view = client.get(tid)
        if view["state"] == state:
            return view
        if time.monotonic() > deadline:
            raise RuntimeError(f"task {tid} is {view['state']}, not {state}")
        time.sleep(0.01)


def profile_text(path, top=15):
    buf = io.StringIO()
    stats = pstats.Stats(path, stream=buf)
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    return buf.getvalue()


class Run:
    """One daemon directory: the fill, then kill -9 / restart windows."""

    def __init__(self, label, k, args, deadline):
        self.label, self.k, self.args, self.deadline = label, k, args, \
            deadline
        self.workdir = B.mkdtemp("lbds-")
        self.max_queued = max(1_000_000, k + 1)
        self.cfg = config(self.max_queued)
        self.daemon = None
        self.ids = []
        self.next = 0             # index in ids of the next window's start
        self.m = {"first": [], "last": [], "replay": [], "dispatch": [],
                  "rss_replayed": []}

    def log(self, text):
        B.log(f"[{self.label}] {text}")

    def fill(self):
        args, k = self.args, self.k
        self.daemon = B.Daemon(self.workdir, 1, 1, self.cfg)
        self.daemon.start_ready()
        with self.daemon.client(TIMEOUT) as c:
            self.gate = c.request("submit", task=GATE)["id"]
            wait_state(c, self.gate, "RUNNING")
            time.sleep(0.2)
            self.m["rss0"] = self.daemon.rss_bytes()
            sample = min(args.sample, k)
            ids, first = timed_submits(c, sample)
            self.m["first"] += first
            self.log(f"first {sample:,}: {B.median(first):.0f} submits/s")
            tail = sample if k >= 2 * sample else 0
            t_fill = last_log = time.monotonic()
            while len(ids) < k - tail:
                if time.monotonic() > self.deadline:
                    raise B.BudgetExceeded(f"filling: {len(ids)} of {k}")
                size = min(CHUNK, k - tail - len(ids))
                ids.extend(ack_ids(c.pipeline([ECHO] * size, batch=512)))
                if time.monotonic() - last_log > 10:
                    last_log = time.monotonic()
                    st = c.status()["journal"]
                    self.log(
                        f"{len(ids):,} queued, "
                        f"{(len(ids) - sample) / (last_log - t_fill):.0f} "
                        f"submits/s, RSS "
                        f"{self.daemon.rss_bytes() / 2**20:.0f} MiB, "
                        f"journal {st['bytes'] / 2**20:.0f} MiB"
                        f"{' (compacting)' if st['compacting'] else ''}")
            if tail:
                more, last = timed_submits(c, tail)
                ids.extend(more)
                self.m["last"] += last
                self.log(f"last {tail:,}: {B.median(last):.0f} submits/s")
            self.m["fill_s"] = time.monotonic() - t_fill
            time.sleep(0.5)
            self.m["rss1"] = self.daemon.rss_bytes()
            st = c.status()
            self.m["journal_bytes"] = st["journal"]["bytes"]
            if st["queue"]["ready"] != k:
                raise RuntimeError(f"expected {k} ready, status says "
                                   f"{st['queue']}")
        self.ids = ids
        self.log(f"{k:,} queued; RSS {self.m['rss0'] / 2**20:.1f} -> "
                 f"{self.m['rss1'] / 2**20:.1f} MiB; journal "
                 f"{self.m['journal_bytes'] / 2**20:.1f} MiB; kill -9")
        self.daemon.kill9()

    def window(self, profile=None):
        """Restart with 2 workers; time the replay and one D window."""
        d = self.args.dispatch
        start = self.next + MARGIN
        self.daemon = B.Daemon(self.workdir, 2, 2, self.cfg, profile=profile)
        wall0 = time.time()
        t0 = self.daemon.start()
        t1 = self.daemon.wait_ping(
            timeout=max(60.0, self.deadline - time.monotonic()))
        self.m["replay"].append(t1 - t0)
        with self.daemon.client(TIMEOUT) as c:
            self.m["gate"] = c.get(self.gate)["state"]
            for _ in range(5):
                if start + d > len(self.ids):
                    raise RuntimeError(f"{self.label}: no tasks left for a "
                                       "window")
                views = [r["task"] for r in c.pipeline(
                    [{"op": "wait", "id": tid}
                     for tid in self.ids[start:start + d]], batch=512)]
                # Tasks the previous daemon ran between the end of its
                # window and its kill -9 come back DONE at once: slide
                # past them (the margin was too small on a busy machine).
                early = [i for i, v in enumerate(views)
                         if v["started_at"] < wall0]
                if not early:
                    break
                self.log(f"{len(early)} window tasks ran before the "
                         "restart; sliding the window")
                start += max(early) + 1 + MARGIN
            else:
                raise RuntimeError(f"{self.label}: no clean window")
        self.m["rss_replayed"].append(self.daemon.rss_bytes())
        self.next = start + d
        bad = [v for v in views if v["state"] != "DONE"]
        if bad:
            raise RuntimeError(f"{self.label}: {len(bad)} tasks not DONE, "
                               f"e.g. {bad[0]}")
        rate = dispatch_rate(views)
        self.m["dispatch"].append(rate)
        self.log(f"restart: ping after {t1 - t0:.2f} s; dispatch "
                 f"{rate:.0f} tasks/s")

    def stop(self, graceful):
        t = time.monotonic()
        self.daemon.stop(graceful=graceful, timeout=300.0)
        self.m["shutdown_s"] = time.monotonic() - t

    def close(self):
        if self.daemon is not None:
            self.daemon.stop(graceful=False)
        B.rmtree(self.workdir)


def dispatch_rate(views):
    start = min(v["started_at"] for v in views)
    end = max(v["finished_at"] for v in views)
    return len(views) / (end - start)


def run_baseline(args, deadline):
    """--rounds fresh daemons, each: fill K, kill -9, one window."""
    k = MARGIN + args.dispatch
    merged = None
    for rnd in range(args.rounds):
        run = Run(f"baseline {rnd + 1}/{args.rounds}", k, args, deadline)
        try:
            run.fill()
            last = rnd == args.rounds - 1
            prof = os.path.join(run.workdir, "d.prof") \
                if last and args.profile else None
            run.window(prof)
            run.stop(graceful=True)
            if prof:
                run.m["profile"] = profile_text(prof)
        finally:
            run.close()
        m = run.m
        m["per_task"] = [(m["rss1"] - m["rss0"]) / k]
        if merged is None:
            merged = dict(m, k=k, max_queued=run.max_queued,
                          journal_bytes=[m["journal_bytes"]],
                          shutdown_s=[m["shutdown_s"]])
        else:
            for key in ("first", "replay", "dispatch", "rss_replayed",
                        "per_task"):
                merged[key] += m[key]
            merged["journal_bytes"].append(m["journal_bytes"])
            merged["shutdown_s"].append(m["shutdown_s"])
            merged["profile"] = m.get("profile")
            for key in ("rss0", "rss1"):
                merged[key] = m[key]
    return merged


def run_big(args, deadline):
    run = Run("big", args.n, args, deadline)
    try:
        run.fill()
        for rnd in range(args.rounds):
            last = rnd == args.rounds - 1
            prof = os.path.join(run.workdir, "d.prof") \
                if last and args.profile else None
            run.log(f"restart {rnd + 1}/{args.rounds}")
            run.window(prof)
            if last:
                run.stop(graceful=True)
            else:
                run.daemon.kill9()
            if prof:
                run.m["profile"] = profile_text(prof)
    finally:
        run.close()
    m = run.m
    m.update(k=args.n, max_queued=run.max_queued,
             per_task=[(m["rss1"] - m["rss0"]) / args.n],
             journal_bytes=[m["journal_bytes"]],
             shutdown_s=[m["shutdown_s"]])
    return m


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, metavar="N",
                   help="tasks queued in the big run (default 1000000)")
    p.add_argument("--sample", type=int, default=10000, metavar="S",
                   help="submits timed at the start and at the end")
    p.add_argument("--dispatch", type=int, default=10000, metavar="D",
                   help="tasks per timed dispatch window")
    p.add_argument("--rounds", type=int, default=3,
                   help="baseline daemons, and big-run restarts (default 3)")
    p.add_argument("--profile", action="store_true",
                   help="run the last restart of each run (replay, "
                   "dispatch, shutdown) under cProfile and print its top "
                   "15 by tottime; that restart is then not comparable")
    p.add_argument("--max-seconds", type=float, default=2400)
    args = p.parse_args(argv)
    if args.sample < SLICES or args.dispatch < 1 or args.rounds < 1:
        p.error(f"--sample must be >= {SLICES}, --dispatch and --rounds "
                ">= 1")
    if args.n < max(2 * args.sample, (MARGIN + args.dispatch) *
                    args.rounds):
        p.error("--n must be at least 2 x --sample and (2000 + --dispatch)"
                " x --rounds")
    return args


def main(argv=None):
    args = parse_args(argv)
    started = time.monotonic()
    deadline = B.install(args.max_seconds)
    B.header("lbd with N tasks queued")
    base_k = MARGIN + args.dispatch
    print(f"workload: lbd:echo no-op tasks held on the ready queue behind "
          f"a gate task on the only worker; baseline K={base_k:,} "
          f"({args.rounds} fresh daemons), big run "
          f"K=N={args.n:,} (filled once, {args.rounds} kill -9 + restart "
          f"windows); submit windows S={args.sample:,}; dispatch windows "
          f"D={args.dispatch:,} after a {MARGIN:,}-task margin, on 2 "
          f"workers after a kill -9 and restart; fsync=submits "
          f"(default)\n", flush=True)
    base = run_baseline(args, deadline)
    big = run_big(args, deadline)
    report(args, base, big)
    if args.profile:
        for label, run in (("baseline", base), ("big", big)):
            print(f"profile of the {label} run's last restart (K="
                  f"{run['k']:,}: replay, dispatch, graceful shutdown), top "
                  f"15 by tottime (that restart's figures are in the "
                  f"medians above: read them with care):\n"
                  f"{run.get('profile')}")
    B.cleanup()
    print(f"total run time: {time.monotonic() - started:.1f} s")


def report(args, base, big):
    med, rng = B.median, B.spread
    n, s = args.n, args.sample
    r = args.rounds
    print(f"medians: submit rates over {SLICES} slices of each window "
          f"(baseline: of all {r} daemons); the rest over {r} round(s); "
          f"range = min..max\n")
    mib = 2 ** 20
    rows = [
        [f"submit rate, first {s:,} (empty queue), /s",
         med(base["first"]), med(big["first"]),
         B.ratio(med(big["first"]), med(base["first"])), rng(big["first"])],
        [f"submit rate, last {s:,} ({n - s:,}+ queued), /s", "-",
         med(big["last"]), B.ratio(med(big["last"]), med(big["first"])),
         rng(big["last"])],
        ["daemon RSS before submits, MiB", base["rss0"] / mib,
         big["rss0"] / mib, B.ratio(big["rss0"], base["rss0"]), "-"],
        ["daemon RSS with K queued, MiB", base["rss1"] / mib,
         big["rss1"] / mib, B.ratio(big["rss1"], base["rss1"]), "-"],
        ["RSS bytes per queued task", med(base["per_task"]),
         med(big["per_task"]), B.ratio(med(big["per_task"]),
                                       med(base["per_task"])), "-"],
        ["daemon RSS after replay + window, MiB",
         med(base["rss_replayed"]) / mib, med(big["rss_replayed"]) / mib,
         B.ratio(med(big["rss_replayed"]), med(base["rss_replayed"])),
         "-"],
        ["journal bytes with K queued", med(base["journal_bytes"]),
         med(big["journal_bytes"]), B.ratio(med(big["journal_bytes"]),
                                            med(base["journal_bytes"])),
         "-"],
        ["journal bytes per queued task",
         med(base["journal_bytes"]) / base["k"],
         med(big["journal_bytes"]) / big["k"], None, "-"],
        ["replay: process start to ping, s", med(base["replay"]),
         med(big["replay"]), B.ratio(med(big["replay"]),
                                     med(base["replay"])),
         rng(big["replay"])],
        ["replay rate, queued tasks/s", base["k"] / med(base["replay"]),
         big["k"] / med(big["replay"]),
         B.ratio(big["k"] / med(big["replay"]),
                 base["k"] / med(base["replay"])), "-"],
        [f"dispatch rate, {args.dispatch:,} tasks on 2 workers, /s",
         med(base["dispatch"]), med(big["dispatch"]),
         B.ratio(med(big["dispatch"]), med(base["dispatch"])),
         rng(big["dispatch"])],
        ["graceful shutdown at the end, s", med(base["shutdown_s"]),
         med(big["shutdown_s"]), B.ratio(med(big["shutdown_s"]),
                                         med(base["shutdown_s"])), "-"],
    ]
    B.table(["measure", f"baseline K={base['k']:,}", f"big K={big['k']:,}",
             "ratio", "big range"], rows)
    print(f"ratio column: big / baseline, except the last-{s:,} submit "
          f"rate: last / first of the big run. Baseline dispatch range: "
          f"{rng(base['dispatch'])}; baseline replay range: "
          f"{rng(base['replay'])}. max_queued was {big['max_queued']:,}; "
          f"the gate ended {big['gate']} after the restart; filling the "
          f"big run took {big['fill_s']:.1f} s\n")


if __name__ == "__main__":
    main()
