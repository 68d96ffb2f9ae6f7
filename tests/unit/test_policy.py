"""lbd.DefaultPolicy on scripted snapshot sequences.

The master calls the policy once per [scaling] interval with a snapshot
and the bounds, clamps the answer and makes it the next target; these
tests do the same (``Driver``), with fake clocks and seeded noise.
"""

import random

import pytest

import lbd


def snap(clock, ready=0, delayed=0, running=0, oldest_wait=0.0,
         arrival_rate=0.0, service_rate=None, utilization=None,
         live_workers=1):
    return {"clock": clock,
            "queue": {"ready": ready, "delayed": delayed, "running": running},
            "oldest_wait": oldest_wait, "arrival_rate": arrival_rate,
            "service_rate": service_rate, "utilization": utilization,
            "live_workers": live_workers}


class Driver:
    """Feeds snapshots to a policy and its answers back as the target."""

    def __init__(self, policy, low, high, target=None):
        self.policy = policy
        self.low, self.high = low, high
        self.target = low if target is None else target
        self.history = []               # (clock, target after the call)

    def step(self, s, current=None):
        bounds = {"min": self.low, "max": self.high,
                  "current": self.target if current is None else current,
                  "target": self.target}
        want = self.policy(s, bounds)
        assert isinstance(want, int) and not isinstance(want, bool), want
        assert self.low <= want <= self.high, (want, bounds)
        assert self.policy.reason, "every decision explains itself"
        self.target = max(self.low, min(self.high, want))
        self.history.append((s["clock"], self.target))
        return self.target

    def changes(self):
        return [(t, a, b) for (_, a), (t, b) in zip(self.history,
                                                    self.history[1:])
                if a != b]


def quiet(clock, live, util=0.02):
    return snap(clock, utilization=util, live_workers=live,
                service_rate=5.0, arrival_rate=0.1)


# -- scaling out --------------------------------------------------------------

def test_burst_scales_out_within_a_few_intervals_several_at_once():
    policy = lbd.DefaultPolicy(target_queue_wait=0.5, target_utilization=0.8,
                               scale_in_delay=30.0, tolerance=0.1)
    d = Driver(policy, 1, 10)
    t = 0.0
    for _ in range(10):                 # quiet: stays at min
        t += 1.0
        d.step(quiet(t, d.target))
    assert d.target == 1
    # The burst: 60 tasks arrive; one worker serving 4/s barely dents it.
    ready, oldest = 60, 0.0
    burst_start = t
    out_at = None
    for _ in range(3):
        t += 1.0
        oldest += 1.0
        d.step(snap(t, ready=ready, running=d.target, oldest_wait=oldest,
                    arrival_rate=30.0, service_rate=4.0, utilization=1.0,
                    live_workers=d.target))
        ready += 20
        if d.target > 1 and out_at is None:
            out_at = t
    assert out_at is not None, "no scale-out within 3 intervals of a burst"
    assert out_at - burst_start <= 3.0
    # One decision may add several workers at once.
    jumps = [b - a for _, a, b in d.changes()]
    assert max(jumps) >= 2, jumps


def test_backlog_need_follows_the_documented_formula():
    policy = lbd.DefaultPolicy(target_queue_wait=0.5)
    s = snap(10.0, ready=20, oldest_wait=2.0, arrival_rate=10.0,
             service_rate=5.0, utilization=1.0, live_workers=2)
    bounds = {"min": 1, "max": 50, "current": 2, "target": 2}
    # ceil((arrival + ready / target_queue_wait) / mu) = ceil(50 / 5)
    assert policy.needs(s, bounds)[0] == 10
    assert policy(s, bounds) == 10
    assert "backlog" in policy.reason


def test_backlog_alone_scales_out_even_when_utilization_is_low():
    """Old work waiting is reason enough, whatever utilization says."""
    policy = lbd.DefaultPolicy(target_queue_wait=0.5)
    s = snap(1.0, ready=12, oldest_wait=3.0, arrival_rate=1.0,
             service_rate=2.0, utilization=0.1, live_workers=2)
    assert policy(s, {"min": 1, "max": 20, "current": 2, "target": 2}) > 2


def test_hot_utilization_scales_out_without_a_queue():
    policy = lbd.DefaultPolicy(target_utilization=0.8, tolerance=0.1)
    s = snap(1.0, utilization=0.95, live_workers=5, service_rate=3.0,
             arrival_rate=14.0)
    # ceil(5 * 0.95 / 0.8) = 6
    assert policy(s, {"min": 1, "max": 20, "current": 5, "target": 5}) == 6


def test_waiting_below_the_target_wait_does_not_scale_out():
    policy = lbd.DefaultPolicy(target_queue_wait=0.5, target_utilization=0.8)
    d = Driver(policy, 1, 10, target=3)
    for i in range(50):
        d.step(snap(float(i), ready=2, oldest_wait=0.3, service_rate=5.0,
                    arrival_rate=10.0, utilization=0.8, live_workers=3))
    assert d.target == 3 and not d.changes()


@pytest.mark.parametrize("mu", [None, 0.0])
def test_unknown_service_rate_still_scales_out_on_a_backlog(mu):
    policy = lbd.DefaultPolicy(target_queue_wait=0.5)
    bounds = {"min": 1, "max": 8, "current": 1, "target": 1}
    s = snap(1.0, ready=3, oldest_wait=1.0, arrival_rate=3.0,
             service_rate=mu, utilization=None, live_workers=1)
    # Before any completion: one more worker per waiting task.
    assert policy(s, bounds) == 4
    policy = lbd.DefaultPolicy(target_queue_wait=0.5)
    s = snap(1.0, ready=300, oldest_wait=1.0, arrival_rate=300.0,
             service_rate=mu, utilization=None, live_workers=0)
    assert policy(s, dict(bounds, current=0)) == 8


# -- holding steady -----------------------------------------------------------

def test_steady_load_inside_the_tolerance_band_never_flaps():
    tu, tol, tqw = 0.8, 0.1, 0.5
    policy = lbd.DefaultPolicy(target_queue_wait=tqw, target_utilization=tu,
                               scale_in_delay=20.0, tolerance=tol)
    d = Driver(policy, 1, 16, target=5)
    rng = random.Random(20240601)
    low, high = tu * (1 - tol), tu * (1 + tol)
    margin = 0.002
    for i in range(600):
        ready = rng.choice([0, 0, 0, 1, 2])
        d.step(snap(i * 1.0, ready=ready, running=rng.randint(3, 5),
                    oldest_wait=rng.uniform(0, tqw * 0.95) if ready else 0.0,
                    arrival_rate=rng.uniform(15, 17),
                    service_rate=rng.uniform(3.5, 4.5),
                    utilization=rng.uniform(low + margin, high - margin),
                    live_workers=5))
    assert d.changes() == []
    assert d.target == 5


def test_constant_load_settles_and_then_holds():
    """A load worth 4.8 busy workers, +-4 %: the pool finds a size at which
    utilization sits inside the band, and stays there."""
    policy = lbd.DefaultPolicy(target_queue_wait=0.5, target_utilization=0.8,
                               scale_in_delay=10.0, tolerance=0.1)
    d = Driver(policy, 1, 16)
    rng = random.Random(99)
    for i in range(500):
        load = 4.8 * rng.uniform(0.96, 1.04)
        live = d.target
        util = min(1.0, load / live)
        d.step(snap(float(i), utilization=util, live_workers=live,
                    running=min(live, round(load)), service_rate=4.0,
                    arrival_rate=load * 4.0))
    changes = d.changes()
    assert changes, "it never left min under a load of ~5 workers"
    settled_at = changes[-1][0]
    assert settled_at < 100, changes    # settles early...
    # ...at a size that is not hot and not far too big (at 7, the noise
    # rounds the utilization need up to 7 half of the time: it holds),
    assert 4.8 / d.target < 0.88 and d.target <= 7, d.target
    # ...and never moves again in the remaining 400 intervals.
    assert all(t < 100 for t, _, _ in changes)


# -- scaling in ---------------------------------------------------------------

def test_quiet_queue_scales_in_only_after_the_delay_then_one_per_interval():
    delay = 10.0
    policy = lbd.DefaultPolicy(target_queue_wait=0.5, target_utilization=0.8,
                               scale_in_delay=delay, tolerance=0.1)
    d = Driver(policy, 1, 8)
    t = 0.0
    for _ in range(4):                  # a burst takes the pool to max
        t += 1.0
        d.step(snap(t, ready=100, oldest_wait=t, arrival_rate=50.0,
                    service_rate=2.0, utilization=1.0,
                    live_workers=d.target))
    assert d.target == 8
    last_busy = t
    quiet_targets = []
    while t < last_busy + delay + 20:
        t += 1.0
        d.step(quiet(t, d.target))
        quiet_targets.append((t, d.target))
    first_in = next(at for at, n in quiet_targets if n < 8)
    # Not before scale_in_delay seconds of surplus...
    assert first_in > last_busy + delay - 1e-9
    # ...but soon after it.
    assert first_in <= last_busy + delay + 2.0
    # Then one worker per interval, down to min, and it stays there.
    after = [n for at, n in quiet_targets if at >= first_in]
    assert after[:8] == [7, 6, 5, 4, 3, 2, 1, 1]
    assert set(after[7:]) == {1}


def test_a_busy_moment_restarts_the_scale_in_delay():
    delay = 10.0
    policy = lbd.DefaultPolicy(target_queue_wait=0.5, target_utilization=0.8,
                               scale_in_delay=delay, tolerance=0.1)
    d = Driver(policy, 1, 8, target=1)
    t = 1.0
    d.step(snap(t, ready=50, oldest_wait=2.0, arrival_rate=20.0,
                service_rate=5.0, utilization=1.0, live_workers=1))
    assert d.target > 1
    top = d.target
    for _ in range(int(delay) - 2):     # quiet, not yet long enough
        t += 1.0
        d.step(quiet(t, d.target))
    assert d.target == top
    t += 1.0                            # one interval at target utilization
    d.step(snap(t, utilization=0.8, live_workers=top, service_rate=5.0,
                arrival_rate=top * 4.0))
    blip = t
    while d.target == top:
        t += 1.0
        d.step(quiet(t, d.target))
        assert t < blip + delay + 5, "never scaled in"
    assert t > blip + delay - 1e-9, "scaled in before a full quiet delay"


def test_cold_but_with_ready_tasks_does_not_scale_in():
    policy = lbd.DefaultPolicy(target_queue_wait=0.5, target_utilization=0.8,
                               scale_in_delay=5.0)
    d = Driver(policy, 1, 8, target=4)
    for i in range(100):
        d.step(snap(float(i), ready=3, oldest_wait=0.1, utilization=0.1,
                    live_workers=4, service_rate=10.0, arrival_rate=5.0))
    assert d.target == 4


def test_scale_in_stops_at_min():
    policy = lbd.DefaultPolicy(scale_in_delay=0.0)
    d = Driver(policy, 3, 8, target=6)
    for i in range(50):
        d.step(quiet(float(i), d.target, util=0.0))
    assert d.target == 3


# -- bounds -------------------------------------------------------------------

def random_snapshot(rng, clock, live):
    ready = rng.choice([0, 0, rng.randint(0, 5), rng.randint(0, 10_000)])
    return snap(
        clock, ready=ready, delayed=rng.randint(0, 50),
        running=rng.randint(0, 64),
        oldest_wait=rng.choice([0.0, rng.uniform(0, 0.5),
                                rng.uniform(0, 1e4)]) if ready else 0.0,
        arrival_rate=rng.choice([0.0, rng.uniform(0, 5),
                                 rng.uniform(0, 1e5)]),
        service_rate=rng.choice([None, 0.0, rng.uniform(1e-3, 1),
                                 rng.uniform(1, 1e4)]),
        utilization=rng.choice([None, 0.0, 1.0, rng.random()]),
        live_workers=live)


@pytest.mark.parametrize("seed", range(8))
def test_bounds_always_hold(seed):
    rng = random.Random(seed)
    policy = lbd.DefaultPolicy(
        target_queue_wait=rng.choice([0.01, 0.5, 10.0]),
        target_utilization=rng.choice([0.1, 0.8, 1.0]),
        scale_in_delay=rng.choice([0.0, 1.0, 30.0]),
        tolerance=rng.choice([0.0, 0.1, 0.5]))
    low = rng.randint(1, 5)
    high = rng.randint(low, 40)
    d = Driver(policy, low, high, target=rng.randint(low, high))
    clock = 0.0
    for i in range(3000):
        clock += rng.choice([0.001, 0.5, 1.0, 7.0])
        if i % 200 == 0:                # the operator changes the bounds
            d.low = rng.randint(1, 6)
            d.high = rng.randint(d.low, 40)
            d.target = max(d.low, min(d.high, d.target))
        live = rng.choice([d.target, rng.randint(0, d.high + 3)])
        d.step(random_snapshot(rng, clock, live),
               current=rng.randint(0, d.high + 3))
    assert len({n for _, n in d.history}) > 1   # it did move around


def test_answer_is_clamped_even_for_a_target_outside_the_bounds():
    policy = lbd.DefaultPolicy()
    hold = snap(1.0, utilization=0.8, live_workers=9)
    assert policy(hold, {"min": 2, "max": 4, "current": 9, "target": 9}) == 4
    policy = lbd.DefaultPolicy()
    assert policy(snap(1.0, utilization=0.8, live_workers=1),
                  {"min": 2, "max": 4, "current": 1, "target": 1}) == 2


# -- targets set from outside -------------------------------------------------

@pytest.mark.parametrize("how", ["raised", "fresh"])
def test_a_target_set_from_outside_lasts_the_scale_in_delay(how):
    delay = 10.0
    policy = lbd.DefaultPolicy(scale_in_delay=delay)
    d = Driver(policy, 1, 8)
    t = 0.0
    if how == "raised":
        for _ in range(5):              # quiet at min: recommendations of 1
            t += 1.0
            d.step(quiet(t, d.target))
    else:                               # SIGHUP makes a new DefaultPolicy
        t = 100.0
    d.target = 3                        # e.g. two SIGTTINs
    raised = t
    while t < raised + delay - 1.0:
        t += 1.0
        d.step(quiet(t, 3))
        assert d.target == 3, f"retired a worker {t - raised:g} s after " \
            "the target was raised"
    while d.target == 3:                # ...and then it does scale in
        t += 1.0
        d.step(quiet(t, 3))
        assert t <= raised + delay + 2.0, "never scaled in"
    assert d.target == 2
