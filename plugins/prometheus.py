"""Prometheus metrics for lbd, in the text exposition format 0.0.4.

A metrics sink plugin: it runs in its own process, receives the master's
snapshot every [scaling] interval, and either serves it over HTTP on a
loopback port or writes it to a file for node_exporter's textfile
collector (or both)::

    [plugins]
    sinks = ["plugins/prometheus.py:sink"]
    options = { prometheus = { port = 9464 } }
    # or: options = { prometheus = { textfile = "/var/lib/node_exporter/lbd.prom" } }

Options: ``port`` (0 picks a free one), ``host`` (default 127.0.0.1),
``port_file`` (where to write the bound port), ``textfile``.
"""

import http.server
import os
import threading

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

COUNTERS = (
    ("submitted", "lbd_tasks_submitted_total", "Tasks accepted."),
    ("retried", "lbd_retries_total", "Failed attempts that were retried."),
    ("duplicates", "lbd_duplicates_total",
     "Submits answered with an existing task by their idempotency key."),
    ("stale_results", "lbd_stale_results_total",
     "Results ignored because their attempt was no longer current."),
    ("worker_starts", "lbd_worker_starts_total", "Workers forked."),
    ("worker_crashes", "lbd_worker_crashes_total",
     "Workers that died unasked."),
    ("boot_failures", "lbd_worker_boot_failures_total",
     "Workers that died before they were ready."),
    ("timeouts", "lbd_attempt_timeouts_total", "Attempts that timed out."),
    ("hangs", "lbd_worker_hangs_total",
     "Workers killed for missing heartbeats."),
)
OUTCOMES = ("done", "dead", "expired", "cancelled")


def _escape(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace(
        "\n", "\\n")


def _number(value):
    if value is None:
        return "NaN"
    if value == float("inf"):
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


def _family(lines, name, kind, help_text, samples):
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        label = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        lines.append(f"{name}{{{label}}} {_number(value)}" if label
                     else f"{name} {_number(value)}")


def _histogram(lines, name, help_text, hist):
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} histogram")
    for bound, count in zip(hist["le"], hist["counts"]):
        lines.append(f'{name}_bucket{{le="{bound!r}"}} {count}')
    lines.append(f'{name}_bucket{{le="+Inf"}} {hist["count"]}')
    lines.append(f"{name}_sum {_number(float(hist['sum']))}")
    lines.append(f"{name}_count {hist['count']}")


def render(snap):
    """Return the snapshot as Prometheus text (ends with a newline)."""
    lines = []
    counters = snap["counters"]
    _family(lines, "lbd_tasks_total", "counter",
            "Tasks that reached each terminal state.",
            [({"state": s}, counters[s]) for s in OUTCOMES])
    for key, name, help_text in COUNTERS:
        _family(lines, name, "counter", help_text, [({}, counters[key])])
    _family(lines, "lbd_queue_tasks", "gauge", "Tasks by queue.",
            [({"queue": q}, n) for q, n in sorted(snap["queue"].items())])
    _family(lines, "lbd_oldest_ready_wait_seconds", "gauge",
            "How long the oldest ready task has waited.",
            [({}, snap["oldest_wait"])])
    _family(lines, "lbd_workers", "gauge", "Workers by state.",
            [({"state": s}, n) for s, n in sorted(snap["workers"].items())])
    _family(lines, "lbd_target_workers", "gauge",
            "The pool size the scaler aims for.",
            [({}, snap["target_workers"])])
    _family(lines, "lbd_utilization_ratio", "gauge",
            "Busy share of live worker time over the window.",
            [({}, snap["utilization"])])
    _histogram(lines, "lbd_queue_wait_seconds",
               "Time from ready to dispatch.", snap["queue_wait_histogram"])
    _histogram(lines, "lbd_run_time_seconds", "Time an attempt ran.",
               snap["run_time_histogram"])
    _family(lines, "lbd_plugin_messages_dropped_total", "counter",
            "Messages a slow plugin lost.",
            [({"plugin": p["spec"]}, p["dropped"]) for p in snap["plugins"]])
    return "\n".join(lines) + "\n"


class PrometheusSink:
    """Keeps the latest snapshot; serves and/or writes it as text."""

    def __init__(self, options):
        self.text = "# no snapshot yet\n"
        self.textfile = options.get("textfile")
        self.server = None
        if "port" in options:
            self._serve(options.get("host", "127.0.0.1"), options["port"],
                        options.get("port_file"))

    def _serve(self, host, port, port_file):
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.split("?")[0] not in ("/", "/metrics"):
                    self.send_error(404)
                    return
                body = sink.text.encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        if port_file:
            with open(port_file + ".tmp", "w") as f:
                f.write(str(self.server.server_address[1]))
            os.replace(port_file + ".tmp", port_file)
        threading.Thread(target=self.server.serve_forever, daemon=True,
                         name="prometheus").start()

    def on_snapshot(self, snap):
        self.text = render(snap)
        if self.textfile:
            temp = f"{self.textfile}.{os.getpid()}"
            with open(temp, "w") as f:
                f.write(self.text)
            os.replace(temp, self.textfile)

    def close(self):
        if self.server is not None:
            self.server.shutdown()


def sink(options):
    """The plugin factory named in [plugins] sinks."""
    return PrometheusSink(options)
