"""The metric primitives the scaler reads: rates, windowed histograms and
the busy meter. All of them are driven with fake times."""

import math
import random

import pytest

import lbd


# -- Rate ---------------------------------------------------------------------

def test_rate_starts_at_zero():
    rate = lbd.Rate(5.0, now=100.0)
    assert rate.get(100.0) == 0.0
    assert rate.get(1000.0) == 0.0


def test_rate_decays_exponentially_after_the_last_event():
    tau = 2.0
    rate = lbd.Rate(tau, now=0.0)
    rate.add(0.0, count=10)
    start = rate.get(0.0)
    assert start == pytest.approx(10 / tau)
    for t in (0.5, 1.0, 2.0, 4.0, 10.0):
        assert rate.get(t) == pytest.approx(start * math.exp(-t / tau),
                                            rel=1e-9), t
    # One time constant loses 1 - 1/e of the value; many lose all of it.
    assert rate.get(10.0 + 50 * tau) < 1e-9


def test_rate_reads_do_not_change_the_curve():
    """Reading in between (which decays and re-stamps) must not distort."""
    a, b = lbd.Rate(3.0, 0.0), lbd.Rate(3.0, 0.0)
    a.add(0.0, 7)
    b.add(0.0, 7)
    for i in range(1, 100):
        a.get(i * 0.05)
    assert a.get(5.0) == pytest.approx(b.get(5.0), rel=1e-9)


@pytest.mark.parametrize("true_rate", [0.5, 4.0, 50.0])
def test_rate_approaches_the_true_rate_for_steady_events(true_rate):
    tau = 3.0
    rate = lbd.Rate(tau, now=0.0)
    period = 1.0 / true_rate
    t = 0.0
    while t < 20 * tau:                 # long enough to forget the start
        t += period
        rate.add(t)
    # Between events the estimate swings by one event / tau; in the middle
    # of a period it is within a few percent of the true rate.
    peak = rate.get(t)
    middle = rate.get(t + period / 2)
    trough = rate.get(t + period * 0.999)
    assert peak > true_rate > trough
    assert middle == pytest.approx(true_rate, rel=0.05)
    # Early on it is still climbing: well below the true rate at t = tau/4
    # when events are frequent enough to measure that.
    if true_rate * tau >= 10:
        early = lbd.Rate(tau, now=0.0)
        s = 0.0
        while s < tau / 4:
            s += period
            early.add(s)
        assert early.get(s) < 0.5 * true_rate


def test_rate_follows_a_change_of_rate():
    tau = 1.0
    rate = lbd.Rate(tau, 0.0)
    t = 0.0
    for _ in range(400):                # 40/s for 10 s
        t += 0.025
        rate.add(t)
    assert rate.get(t) == pytest.approx(40, rel=0.1)
    for _ in range(100):                # then 5/s for 20 s
        t += 0.2
        rate.add(t)
    assert rate.get(t) == pytest.approx(5, rel=0.25)


def test_rate_counts_batches():
    a, b = lbd.Rate(2.0, 0.0), lbd.Rate(2.0, 0.0)
    a.add(1.0, count=5)
    for _ in range(5):
        b.add(1.0)
    assert a.get(3.0) == pytest.approx(b.get(3.0))


# -- WindowHistogram ----------------------------------------------------------

def test_buckets_are_increasing_and_span_the_documented_range():
    bounds = lbd.BUCKETS
    assert all(a < b for a, b in zip(bounds, bounds[1:]))
    assert bounds[0] == pytest.approx(1e-4)
    assert bounds[-1] == pytest.approx(1e4)
    assert len(bounds) == 33            # 4 per decade over 8 decades, + 1


def test_empty_histogram_has_no_quantiles():
    hist = lbd.WindowHistogram(5)
    quantiles, total = hist.quantiles()
    assert total == 0
    assert all(v is None for v in quantiles.values())
    assert hist.summary() == {"p50": None, "p95": None, "p99": None,
                              "count": 0}


def test_quantile_is_the_upper_bound_of_the_bucket_it_falls_in():
    bounds = (0.1, 1.0, 10.0)
    hist = lbd.WindowHistogram(3, bounds)
    for _ in range(50):
        hist.observe(0.05)              # bucket le=0.1
    for _ in range(45):
        hist.observe(0.5)               # bucket le=1.0
    for _ in range(5):
        hist.observe(5.0)               # bucket le=10
    quantiles, total = hist.quantiles((0.25, 0.5, 0.51, 0.95, 0.96, 1.0))
    assert total == 100
    assert quantiles[0.25] == 0.1
    assert quantiles[0.5] == 0.1
    assert quantiles[0.51] == 1.0
    assert quantiles[0.95] == 1.0
    assert quantiles[0.96] == 10.0
    assert quantiles[1.0] == 10.0


def test_value_on_a_bound_counts_in_that_bucket_as_prometheus_le():
    bounds = (0.1, 1.0, 10.0)
    hist = lbd.WindowHistogram(2, bounds)
    hist.observe(1.0)
    assert hist.quantiles((0.5,))[0][0.5] == 1.0
    assert hist.cumulative()["counts"] == [0, 1, 1, 1]


def test_overflow_is_reported_as_the_last_bound():
    bounds = (0.1, 1.0)
    hist = lbd.WindowHistogram(2, bounds)
    hist.observe(1e9)
    assert hist.quantiles((0.5, 0.99))[0] == {0.5: 1.0, 0.99: 1.0}
    assert hist.cumulative()["counts"] == [0, 0, 1]


def test_quantiles_with_the_default_buckets():
    hist = lbd.WindowHistogram(10)
    rng = random.Random(7)
    values = [rng.uniform(0.001, 2.0) for _ in range(2000)]
    for v in values:
        hist.observe(v)
    quantiles, total = hist.quantiles()
    assert total == 2000
    values.sort()
    for q in (0.5, 0.95, 0.99):
        exact = values[int(q * len(values)) - 1]
        # The answer is the upper bound of exact's bucket: >= exact and
        # within one bucket width (a factor 10 ** 0.25) of it.
        assert exact <= quantiles[q] <= exact * 10 ** 0.25 * 1.0001, q
        assert quantiles[q] in lbd.BUCKETS
    summary = hist.summary()
    assert summary == {"p50": quantiles[0.5], "p95": quantiles[0.95],
                       "p99": quantiles[0.99], "count": 2000}


def test_rotation_drops_the_oldest_slot_from_the_window():
    bounds = (1.0, 2.0, 3.0)
    hist = lbd.WindowHistogram(3, bounds)
    hist.observe(2.5)                   # slot A
    hist.rotate()
    hist.observe(0.5)                   # slot B
    hist.observe(0.5)
    assert hist.quantiles()[1] == 3
    hist.rotate()                       # window: A, B, C
    assert hist.quantiles()[1] == 3
    assert hist.quantiles((1.0,))[0][1.0] == 3.0
    hist.rotate()                       # A leaves
    quantiles, total = hist.quantiles((1.0,))
    assert total == 2
    assert quantiles[1.0] == 1.0
    hist.rotate()                       # B leaves
    assert hist.quantiles()[1] == 0
    assert hist.summary()["p50"] is None
    # All-time totals keep everything.
    cum = hist.cumulative()
    assert cum["count"] == 3
    assert cum["sum"] == pytest.approx(3.5)


def test_window_counts_sum_the_live_slots():
    hist = lbd.WindowHistogram(2, (1.0,))
    hist.observe(0.5)
    hist.rotate()
    hist.observe(0.5)
    hist.observe(5.0)
    assert hist.window_counts() == [2, 1]
    hist.rotate()
    assert hist.window_counts() == [1, 1]


def test_cumulative_is_cumulative_and_ends_with_the_total():
    hist = lbd.WindowHistogram(4)
    rng = random.Random(3)
    total = 0.0
    for i in range(3000):
        v = rng.expovariate(1.0) * 10 ** rng.uniform(-4, 4)
        hist.observe(v)
        total += v
        if i % 500 == 0:
            hist.rotate()
    cum = hist.cumulative()
    assert cum["le"] == list(lbd.BUCKETS)
    counts = cum["counts"]
    assert len(counts) == len(cum["le"]) + 1        # the last one is +Inf
    assert all(a <= b for a, b in zip(counts, counts[1:]))
    assert counts[-1] == cum["count"] == 3000
    assert cum["sum"] == pytest.approx(total)


def test_cumulative_counts_match_values_at_or_below_each_bound():
    bounds = (0.1, 1.0, 10.0)
    hist = lbd.WindowHistogram(1, bounds)
    values = [0.01, 0.1, 0.2, 1.0, 3.0, 10.0, 11.0, 500.0]
    for v in values:
        hist.observe(v)
    counts = hist.cumulative()["counts"]
    for bound, count in zip(bounds, counts):
        assert count == sum(v <= bound for v in values), bound
    assert counts[-1] == len(values)


def test_cumulative_is_a_copy():
    hist = lbd.WindowHistogram(2, (1.0,))
    hist.observe(0.5)
    cum = hist.cumulative()
    cum["le"].append(99)
    cum["counts"][0] = 1000
    assert hist.cumulative() == {"le": [1.0], "counts": [1, 1], "sum": 0.5,
                                 "count": 1}


def test_histogram_size_is_fixed_whatever_the_traffic():
    hist = lbd.WindowHistogram(6)
    size = len(lbd.BUCKETS) + 1

    def shape():
        return (len(hist.slots), [len(s) for s in hist.slots],
                len(hist.totals), len(hist.cumulative()["counts"]))

    before = shape()
    assert before == (6, [size] * 6, size, size)
    rng = random.Random(1)
    for i in range(50_000):
        hist.observe(rng.uniform(0, 20_000))
        if i % 100 == 0:
            hist.rotate()
    assert shape() == before
    assert hist.count == 50_000


# -- BusyMeter ----------------------------------------------------------------

def test_busy_meter_integrates_busy_and_live_seconds():
    meter = lbd.BusyMeter(0.0, slots=4)
    meter.set(0.0, busy=1, live=2)
    assert meter.sample(1.0) == pytest.approx((1.0, 2.0))
    meter.set(1.5, busy=2, live=2)      # half a second at 1, then at 2
    assert meter.sample(2.0) == pytest.approx((1.0 + 0.5 + 1.0, 4.0))


def test_busy_meter_utilization_over_a_sliding_window():
    interval, slots = 1.0, 4
    meter = lbd.BusyMeter(0.0, slots)
    meter.set(0.0, busy=2, live=2)      # fully busy for 4 intervals
    t = 0.0
    for _ in range(4):
        t += interval
        busy, live = meter.sample(t)
    assert busy / live == pytest.approx(1.0)
    assert live == pytest.approx(2 * 4 * interval)
    meter.set(t, busy=0, live=2)        # then idle
    utilizations = []
    for _ in range(6):
        t += interval
        busy, live = meter.sample(t)
        utilizations.append(busy / live)
        # The window never spans more than `slots` intervals.
        assert live == pytest.approx(2 * slots * interval)
    assert utilizations[:4] == pytest.approx([0.75, 0.5, 0.25, 0.0])
    assert utilizations[4:] == pytest.approx([0.0, 0.0])


def test_busy_meter_half_busy_pool():
    meter = lbd.BusyMeter(10.0, slots=10)
    rng = random.Random(5)
    t = 10.0
    meter.set(t, busy=2, live=4)
    for _ in range(200):                # changes inside slots average out
        step = rng.uniform(0.01, 0.2)
        t += step
        meter.set(t, busy=rng.choice([1, 3]), live=4)
        t += step
        meter.set(t, busy=2, live=4)
    busy, live = meter.sample(t)
    assert busy / live == pytest.approx(0.5, abs=0.1)


def test_busy_meter_with_no_live_workers_reports_zero_live_time():
    meter = lbd.BusyMeter(0.0, slots=3)
    assert meter.sample(5.0) == (0.0, 0.0)


def test_busy_meter_keeps_a_fixed_number_of_samples():
    meter = lbd.BusyMeter(0.0, slots=5)
    for i in range(1, 10_000):
        meter.set(i - 0.5, busy=i % 3, live=3)
        meter.sample(float(i))
    assert len(meter.samples) == 6
