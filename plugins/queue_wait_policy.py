"""An example scaling policy: keep the p95 queue wait under a target.

Copy it and change it. A policy is what its factory returns: a callable
taking the metrics snapshot and the bounds ({"min", "max", "current",
"target"}) and returning the worker count it wants; lbd clamps the answer
to [min, max]. It runs in a process of its own: it may keep state, and if
it raises or hangs, lbd disables it and the default policy takes over::

    [plugins]
    policy = "plugins/queue_wait_policy.py:policy"
    options = { queue_wait_policy = { p95 = 0.25, calm_intervals = 30 } }
"""


class QueueWaitP95:
    def __init__(self, p95=0.5, calm_intervals=30):
        self.p95 = p95
        self.calm_intervals = calm_intervals
        self.calm = 0

    def __call__(self, snap, bounds):
        p95 = snap["queue_wait"]["p95"]
        target = bounds["target"]
        if snap["queue"]["ready"] and (p95 is None or p95 > self.p95):
            self.calm = 0
            return target + max(1, target // 2)      # grow by half
        if p95 is not None and p95 > self.p95 / 4:
            self.calm = 0
            return target
        self.calm += 1
        if self.calm >= self.calm_intervals:          # quiet for a while
            self.calm = 0
            return target - 1
        return target


def policy(options):
    """The plugin factory named in [plugins] policy."""
    return QueueWaitP95(options.get("p95", 0.5),
                        options.get("calm_intervals", 30))
