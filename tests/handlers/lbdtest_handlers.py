"""Handlers the tests run in real workers.

Handlers that wait do so on a file (a gate) with a bound, so a test
controls when they finish without sleeping for a guessed time.
"""

import os
import signal
import time

import lbd


def _wait_for(path, limit):
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"gate {path} never opened")
        time.sleep(0.005)


def record(path, tag):
    """Append ``tag`` to the file at ``path``; return it."""
    with open(path, "a") as f:
        f.write(f"{tag}\n")
    return tag


def gated(gate, path=None, tag=None, limit=60):
    """Wait until ``gate`` exists, then record ``tag`` (if a path is given)."""
    if path is not None:
        record(path + ".started", tag)
    _wait_for(gate, limit)
    if path is not None:
        record(path, tag)
    return tag


def record_id(path):
    """Append this task's id and attempt to ``path``: the chaos witness."""
    task = lbd.current_task()
    with open(path, "a") as f:
        f.write(f"{task.id} {task.attempt}\n")
    return task.id


def busy_record(path, seconds):
    """Work for ``seconds``, then record the task id (for kill storms)."""
    time.sleep(seconds)
    return record_id(path)


def current():
    """Return what lbd.current_task() says, as a dict."""
    task = lbd.current_task()
    return {"id": task.id, "attempt": task.attempt,
            "priority": task.priority, "deadline_at": task.deadline_at,
            "type": type(task).__name__}


def fail_until(attempt, message="not yet"):
    """Raise until the current attempt reaches ``attempt``."""
    current_attempt = lbd.current_task().attempt
    if current_attempt < attempt:
        raise RuntimeError(f"{message} (attempt {current_attempt})")
    return current_attempt


def boom(message="boom"):
    raise ValueError(message)


def exit_now(code=1):
    """Kill the worker process from inside the handler."""
    os._exit(code)


def crash_until(attempt):
    """Kill the worker until the current attempt reaches ``attempt``."""
    if lbd.current_task().attempt < attempt:
        os._exit(7)
    return "survived"


def hang(seconds=3600):
    time.sleep(seconds)
    return "woke"


def freeze():
    """Stop the whole worker, heartbeat thread included."""
    os.kill(os.getpid(), signal.SIGSTOP)
    return "thawed"


def unserialisable():
    return object()


def pid():
    return os.getpid()


def add(a, b):
    return a + b


def pid_then_hang(path, seconds=3600):
    """Record this worker's pid in ``path``, then sleep."""
    record(path, os.getpid())
    time.sleep(seconds)
    return "woke"


def pid_then_freeze(path):
    """Record this worker's pid in ``path``, then stop the whole worker."""
    record(path, os.getpid())
    return freeze()


def freeze_until(attempt):
    """Freeze the worker until the current attempt reaches ``attempt``."""
    if lbd.current_task().attempt < attempt:
        freeze()
    return "thawed"


def late_result(path, seconds):
    """Ignore SIGTERM, work ``seconds``, record "late" and return it.

    Run with a timeout shorter than ``seconds`` and a kill_grace longer:
    the result reaches the master after the attempt was given up.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(seconds)
    return record(path, "late")
