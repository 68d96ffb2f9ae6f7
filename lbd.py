#!/usr/bin/env python3
"""lbd -- a lightweight load balancer for Python backends.

One daemon takes tasks over a Unix socket and dispatches them, highest
priority first, to a pool of worker processes that it forks, watches and
replaces. Pure standard library, one file, Python 3.11+.

    python3 lbd.py serve --handlers mymod
    python3 lbd.py submit mymod:work 1 2 --wait

Sections, in dependency order (``grep -n '^# .*####' lbd.py``):

    Constants and errors    versions, error codes, exit codes, exceptions
    States                  worker and task transition tables
    Heaps                   the ready queue and the due-time heaps
    Tasks                   the task record and its view
    Validation              request parsing and task-field checks
    Journal codec           record framing, torn tails, replay (no I/O)
    Metrics                 rates, windowed histograms, utilization
    Scaling policy          the default autoscaler (no I/O)
    Configuration           the schema, its defaults, TOML loading
    Built-in handlers       lbd:echo, lbd:sleep, lbd.current_task()
    Worker process          what a forked child runs
    Journal file            the append-only file: group commit, compaction
    Plugins                 loading, and the process each plugin runs in
    systemd                 sd_notify, the watchdog, socket activation
    Master: records ...     the master's worker and connection records
    Master: connections     accept, read, answer in request order
    Master: journal         group commit, recovery, compaction
    Master: tasks           task state changes, retries, dispatch
    Master: workers         forking workers, their messages
    Master: supervision     deadlines, kills, reaping, pool size
    Master: metrics ...     state counts, the snapshot, the scaling tick
    Master: plugins         plugin processes
    Master: operations      reload, systemd notification, signals
    Commands                one method per protocol op
    Master                  the daemon: its state and its loop
    Client                  the Python client
    CLI                     argparse subcommands and main()
"""

import argparse
import bisect
import collections
import enum
import fcntl
import gc
import glob
import grp
import heapq
import importlib
import importlib.util
import itertools
import json
import logging
import math
import os
import random
import re
import selectors
import signal
import socket
import stat
import struct
import sys
import threading
import time
import tomllib
import traceback
import zlib

__all__ = [
    "Client", "LbdError", "RequestError", "Unavailable", "ConfigError",
    "TransitionError", "JournalError", "current_task", "echo", "sleep", "main",
    "WorkerState", "TaskState", "WORKER_TRANSITIONS", "TASK_TRANSITIONS",
    "__version__",
]

__version__ = "0.1.0"

log = logging.getLogger("lbd")


###############################################################################
# Constants and errors ########################################################
###############################################################################

# Error codes, as they appear in a response's "error" field.
BAD_JSON = "bad_json"
BAD_REQUEST = "bad_request"
UNKNOWN_OP = "unknown_op"
NOT_FOUND = "not_found"
UNKNOWN_HANDLER = "unknown_handler"
NOT_CANCELLABLE = "not_cancellable"
TOO_LARGE = "too_large"
TOO_MANY_CLIENTS = "too_many_clients"
QUEUE_FULL = "queue_full"
SHUTTING_DOWN = "shutting_down"
FORBIDDEN = "forbidden"
TIMEOUT = "timeout"
INTERNAL = "internal_error"
JOURNAL_ERROR = "journal_error"

#: Exit code of a worker whose handler modules failed to import.
WORKER_BOOT_ERROR = 3

#: CLI exit codes: 1 a request failed or a task did not end DONE,
#: 2 a usage error (argparse's own), 3 no daemon answered.
EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 1, 2, 3

#: Handlers every daemon allows, so that ``lbd serve`` needs no config.
BUILTIN_HANDLERS = frozenset({"lbd:echo", "lbd:sleep"})

#: Boot failures back off from this delay, doubling, up to the cap, so a
#: handler module that cannot import never becomes a fork bomb.
BOOT_BACKOFF_BASE, BOOT_BACKOFF_MAX = 0.1, 30.0

#: Lazy heaps compact once dead entries exceed both this and the live ones.
COMPACT_MIN = 1024

#: A worker's receive chunk; results are small, big ones just take more.
RECV_SIZE = 262144
ANSWER_TURNS = 8                    # most busy loop turns an answer waits
SETTLE_EVERY = 0.001                # seconds between metric settlements
LINES_PER_TURN = 64                 # requests one connection gets a turn
GC_THRESHOLDS = (10000, 20, 100)    # the master's (see Master.serve)
_GC_DEFAULT = gc.get_threshold()


class LbdError(Exception):
    """Root of every error lbd raises on purpose."""


class TransitionError(LbdError):
    """A state change that the transition table does not allow."""


class ConfigError(LbdError):
    """A configuration file or option that cannot be used."""


class RequestError(LbdError):
    """An error response: ``code`` is the protocol's error code."""

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Unavailable(LbdError):
    """No daemon answers on the socket, or it went away mid-request."""


class JournalError(LbdError):
    """A journal that cannot be opened, locked, read or trusted."""


class JournalCorrupt(JournalError):
    """A damaged record with valid records after it: not a torn tail."""

    def __init__(self, offset, message):
        super().__init__(message)
        self.offset = offset


###############################################################################
# States ######################################################################
###############################################################################
#
# Worker:   (spawn) -> STARTING -> IDLE <-> BUSY -> DRAINING -> STOPPING
#           any live state -> STOPPING (we asked it to go) or FAILED (it
#           died, hung, timed out or never booted); a worker that has been
#           reaped is removed from the table.
#
# Task:     (submit) -> QUEUED | DELAYED
#           DELAYED -> QUEUED -> RUNNING -> DONE
#           RUNNING -> QUEUED | DELAYED (retry, or re-queued at shutdown)
#           RUNNING -> DEAD (out of attempts, or poison)
#           QUEUED | DELAYED | RUNNING -> EXPIRED | CANCELLED
#           DONE, DEAD, EXPIRED, CANCELLED are terminal.


class WorkerState(enum.StrEnum):
    STARTING = "STARTING"
    IDLE = "IDLE"
    BUSY = "BUSY"
    DRAINING = "DRAINING"
    STOPPING = "STOPPING"
    FAILED = "FAILED"


class TaskState(enum.StrEnum):
    QUEUED = "QUEUED"
    DELAYED = "DELAYED"
    RUNNING = "RUNNING"
    DONE = "DONE"
    DEAD = "DEAD"
    EXPIRED = "EXPIRED"
    CANCELLED = "CANCELLED"


_W, _T = WorkerState, TaskState

#: Allowed worker state changes; None is "not yet in the table".
WORKER_TRANSITIONS = {
    None: frozenset({_W.STARTING}),
    _W.STARTING: frozenset({_W.IDLE, _W.STOPPING, _W.FAILED}),
    _W.IDLE: frozenset({_W.BUSY, _W.STOPPING, _W.FAILED}),
    _W.BUSY: frozenset({_W.IDLE, _W.DRAINING, _W.STOPPING, _W.FAILED}),
    _W.DRAINING: frozenset({_W.STOPPING, _W.FAILED}),
    _W.STOPPING: frozenset(),
    _W.FAILED: frozenset(),
}

#: Allowed task state changes; None is "not yet submitted".
TASK_TRANSITIONS = {
    None: frozenset({_T.QUEUED, _T.DELAYED}),
    _T.QUEUED: frozenset({_T.RUNNING, _T.EXPIRED, _T.CANCELLED}),
    _T.DELAYED: frozenset({_T.QUEUED, _T.EXPIRED, _T.CANCELLED}),
    _T.RUNNING: frozenset({_T.DONE, _T.QUEUED, _T.DELAYED, _T.DEAD,
                           _T.EXPIRED, _T.CANCELLED}),
    _T.DONE: frozenset(),
    _T.DEAD: frozenset(),
    _T.EXPIRED: frozenset(),
    _T.CANCELLED: frozenset(),
}

TERMINAL = frozenset({_T.DONE, _T.DEAD, _T.EXPIRED, _T.CANCELLED})
# The per-task path names states through these globals: on Python 3.11 an
# enum member read as a class attribute costs several plain lookups.
_QUEUED, _DELAYED, _RUNNING, _DONE = _T.QUEUED, _T.DELAYED, _T.RUNNING, _T.DONE
_IDLE, _BUSY, _DRAINING = _W.IDLE, _W.BUSY, _W.DRAINING
#: Worker states that count toward the pool size.
LIVE_WORKER_STATES = frozenset({_W.STARTING, _W.IDLE, _W.BUSY})


def transition(table, obj, new):
    """Move ``obj.state`` to ``new`` if ``table`` allows it; return the old.

    Raises TransitionError naming both states otherwise. The master's
    _task_to and _worker_to, the only places a state changes, apply the
    same test inline (they run several times a task) and call this to
    raise.
    """
    old = obj.state
    if new not in table[old]:
        raise TransitionError(
            f"{type(obj).__name__} {obj.id}: illegal transition "
            f"{old or '(new)'} -> {new}")
    obj.state = new
    return old


###############################################################################
# Heaps #######################################################################
###############################################################################


class LazyHeap:
    """A binary heap of ``[key, seq, item]`` entries with O(1) removal.

    ``remove(entry)`` only marks the entry; marked entries are skipped when
    they reach the top, and the heap is rebuilt once they outnumber the
    live ones, so it never grows past about twice its live size.
    """

    __slots__ = ("_heap", "_dead", "_count")

    def __init__(self):
        self._heap = []
        self._dead = 0
        self._count = itertools.count()

    def __len__(self):
        return len(self._heap) - self._dead

    def push(self, key, item, seq=None):
        """Add ``item`` under ``key``; return its entry, for ``remove``."""
        entry = [key, next(self._count) if seq is None else seq, item]
        heapq.heappush(self._heap, entry)
        return entry

    def remove(self, entry):
        """Drop a pushed entry; popped or removed entries are ignored."""
        if entry is None or entry[2] is None:
            return
        entry[2] = None
        self._dead += 1
        self._maybe_compact()

    def _maybe_compact(self):
        if self._dead > COMPACT_MIN and self._dead * 2 > len(self._heap):
            self._heap = [e for e in self._heap if e[2] is not None]
            heapq.heapify(self._heap)
            self._dead = 0

    def _skip_dead(self):
        heap = self._heap
        while heap and heap[0][2] is None:
            heapq.heappop(heap)
            self._dead -= 1

    def peek_key(self):
        """Return the smallest live key, or None when empty."""
        self._skip_dead()
        return self._heap[0][0] if self._heap else None

    def pop(self):
        """Remove and return the item with the smallest key, or None."""
        self._skip_dead()
        if not self._heap:
            return None
        entry = heapq.heappop(self._heap)
        item, entry[2] = entry[2], None
        self._maybe_compact()
        return item

    def pop_due(self, limit):
        """Remove and return, in order, every item whose key <= limit."""
        heap = self._heap
        if not heap or heap[0][0] > limit:  # dead or not, nothing is due
            return []
        return _pop_due(self, limit)

    def heap_size(self):
        """Return the entry count, dead ones included (for tests)."""
        return len(self._heap)


def _pop_due(queue, limit):
    due = []
    while True:
        key = queue.peek_key()
        if key is None or key > limit:
            return due
        due.append(queue.pop())


class AgingQueue(LazyHeap):
    """Ready tasks with aging: one heap on the static aging key.

    With aging rate r, a task's effective priority is
    ``priority + r * waited``; all waiting tasks age alike, so the order is
    the static key ``priority - r * submitted_at`` and the heap stays one.
    """

    __slots__ = ("aging_rate",)

    def __init__(self, aging_rate):
        super().__init__()
        self.aging_rate = aging_rate

    def push_task(self, task):
        """Queue ``task`` under its priority and original sequence."""
        key = self.aging_rate * task.submitted_at - task.priority
        task.entry = self.push(key, task, task.seq)

    def remove_task(self, task):
        """Drop a queued task; one popped or removed already is ignored."""
        self.remove(task.entry)
        task.entry = None

    def pop(self):
        task = super().pop()
        if task is not None:
            task.entry = None
        return task


#: A task's ``entry`` while it waits in a LevelQueue's FIFO.
_IN_FIFO = "in a FIFO"


class LevelQueue:
    """Ready tasks by strict priority: a FIFO per priority level.

    New tasks arrive in sequence order, so each level is a deque of the
    tasks themselves; a task that comes back with an older sequence (a
    retry keeps its place) goes into that level's small heap instead, as
    an entry ``[-priority, seq, task]``, and a pop takes the older of the
    two heads. A heap of the levels present picks the highest. Pops touch
    only the heads: no sift through a heap of every queued task, whose
    cache misses halve dispatch with a million queued; and no entry per
    task in a FIFO, 96 bytes each.

    The queue owns ``task.entry`` while the task is queued: _IN_FIFO, or
    its heap entry. Removal is lazy, as in LazyHeap: the task's entry is
    cleared (a heap entry's task too), and what a FIFO or heap head holds
    that is no longer queued there is dropped when it reaches the head.
    The Master never queues a removed task again (removal is for tasks
    that end); were one queued again while its removed copy still waits
    in a FIFO, it would go to the heap (its sequence is not above the
    FIFO's tail), so a FIFO never holds a task twice as queued.
    """

    __slots__ = ("_levels", "_keys", "_live", "_dead")
    aging_rate = 0.0

    def __init__(self):
        self._levels = {}       # -priority -> (deque of tasks, heap)
        self._keys = []         # heap of the -priority keys present
        self._live = self._dead = 0

    def __len__(self):
        return self._live

    def heap_size(self):
        """Return the entry count, dead ones included (for tests)."""
        return self._live + self._dead

    def push_task(self, task):
        """Queue ``task`` under its priority and original sequence."""
        key = -task.priority
        level = self._levels.get(key)
        if level is None:
            level = self._levels[key] = (collections.deque(), [])
            heapq.heappush(self._keys, key)
        fifo, late = level
        if fifo and fifo[-1].seq >= task.seq:
            task.entry = entry = [key, task.seq, task]
            heapq.heappush(late, entry)
        else:
            task.entry = _IN_FIFO
            fifo.append(task)
        self._live += 1

    def remove_task(self, task):
        """Drop a queued task; one popped or removed already is ignored."""
        entry = task.entry
        if entry is None:
            return
        if entry is not _IN_FIFO:
            entry[2] = None
        task.entry = None
        self._live -= 1
        self._dead += 1
        if self._dead > COMPACT_MIN and self._dead > self._live:
            self._compact()

    def _compact(self):
        levels = {}
        for key, (fifo, late) in self._levels.items():
            fifo = collections.deque(t for t in fifo if t.entry is _IN_FIFO)
            late = [e for e in late if e[2] is not None]
            if fifo or late:
                heapq.heapify(late)
                levels[key] = (fifo, late)
        self._levels = levels
        self._keys = list(levels)
        heapq.heapify(self._keys)
        self._dead = 0

    def _head(self):
        """Return (level, from_late) of the next live task, or None."""
        while self._keys:
            key = self._keys[0]
            fifo, late = level = self._levels[key]
            while fifo and fifo[0].entry is not _IN_FIFO:
                fifo.popleft()
                self._dead -= 1
            while late and late[0][2] is None:
                heapq.heappop(late)
                self._dead -= 1
            if fifo or late:
                return level, bool(late) and (not fifo or
                                              late[0][1] < fifo[0].seq)
            heapq.heappop(self._keys)
            del self._levels[key]
        return None

    def peek_key(self):
        """Return the next task's key (-priority), or None when empty."""
        head = self._head()
        if head is None:
            return None
        (fifo, late), from_late = head
        return late[0][0] if from_late else -fifo[0].priority

    def pop_due(self, limit):
        """Remove and return, in order, every task whose key <= limit."""
        return _pop_due(self, limit)

    def pop(self):
        """Remove and return the next task, or None."""
        head = self._head()
        if head is None:
            return None
        (fifo, late), from_late = head
        if from_late:
            entry = heapq.heappop(late)
            task, entry[2] = entry[2], None
        else:
            task = fifo.popleft()
        task.entry = None
        self._live -= 1
        return task


def ReadyQueue(aging_rate=0.0):
    """Return the ready queue for ``aging_rate``: highest priority first,
    FIFO among equals, lazy removal (see LevelQueue and AgingQueue)."""
    return AgingQueue(aging_rate) if aging_rate else LevelQueue()


###############################################################################
# Tasks #######################################################################
###############################################################################


_TASK_STATES = {state.value: state for state in TaskState}
_NO_KWARGS = {}     # every task without kwargs shares it; never mutated


class Task:
    """One submitted task: its fields, its state and its history."""

    __slots__ = (
        "id", "seq", "handler", "args", "kwargs", "priority", "timeout",
        "deadline_at", "run_at", "max_attempts", "key", "retry_on_error",
        "state", "attempts", "crashes", "submitted_at", "started_at",
        "finished_at", "result", "error", "errors", "worker",
        "entry", "delay_entry", "deadline_entry", "expires", "finished_mono",
        "queued_mono",
    )

    def __init__(self, seq, spec, submitted_at):
        self.id = str(seq)
        self.seq = seq
        # Shared, not one copy per task: the handler name interned, no
        # kwargs one empty dict (nothing mutates a task's kwargs), args a
        # tuple -- which the cyclic GC stops tracking once it holds plain
        # values, where its full collections scanned every task's list.
        self.handler = sys.intern(spec["handler"])
        self.args = tuple(spec["args"])
        self.kwargs = spec["kwargs"] or _NO_KWARGS
        self.priority = spec["priority"]
        self.timeout = spec["timeout"]
        self.max_attempts = spec["max_attempts"]
        self.key = spec["key"]
        self.retry_on_error = spec["retry_on_error"]
        self.submitted_at = submitted_at
        deadline, delay = spec["deadline"], spec["delay"]
        self.deadline_at = None if deadline is None else \
            submitted_at + deadline
        self.run_at = None if delay is None else submitted_at + delay
        self.state = None
        self.attempts = self.crashes = 0
        self.started_at = self.finished_at = None
        self.result = self.error = self.worker = None
        self.errors = ()        # a list once an attempt has failed
        self.entry = self.delay_entry = self.deadline_entry = None
        self.expires = self.finished_mono = self.queued_mono = None

    #: Fields a journal "s" record carries: what the submit fixed.
    SUBMIT_FIELDS = ("seq", "handler", "args", "kwargs", "priority",
                     "timeout", "deadline_at", "run_at", "max_attempts",
                     "key", "retry_on_error", "submitted_at")
    #: Fields that change as the task runs; with SUBMIT_FIELDS, its state.
    PROGRESS_FIELDS = ("state", "attempts", "crashes", "started_at",
                       "finished_at", "result", "error", "errors", "worker")

    def submit_record(self):
        """Return the fields a journal submit record keeps."""
        return {name: getattr(self, name) for name in self.SUBMIT_FIELDS}

    def state_dict(self):
        """Return the whole task state by name; its containers are new
        ones, the caller's to change."""
        return dict(zip(STATE_FIELDS, self.state_values()))

    def state_values(self):
        """Return the whole task state as a snapshot record keeps it: the
        values of STATE_FIELDS, in that order, in new containers."""
        values = [getattr(self, name) for name in STATE_FIELDS]
        values[_ARGS_AT] = list(self.args)
        values[_KWARGS_AT] = dict(self.kwargs)
        values[_ERRORS_AT] = list(self.errors)
        return values

    @classmethod
    def from_submit(cls, values):
        """Rebuild a task as its submit left it, from the values of its
        SUBMIT_FIELDS in that order (a journal "S" record).

        Every slot is assigned by name (a replay of a million tasks spent
        a third of its time in a setattr loop); a unit test checks that
        none is missed.
        """
        task = cls.__new__(cls)
        (seq, handler, args, kwargs, task.priority, task.timeout,
         task.deadline_at, run_at, task.max_attempts, task.key,
         task.retry_on_error, submitted_at) = values
        task.seq = seq
        task.id = str(seq)
        task.handler = sys.intern(handler)
        task.args = tuple(args)
        task.kwargs = kwargs or _NO_KWARGS
        task.run_at = run_at
        task.submitted_at = submitted_at
        task.state = _DELAYED if run_at is not None and \
            run_at > submitted_at else _QUEUED
        task.attempts = task.crashes = 0
        task.started_at = task.finished_at = None
        task.result = task.error = task.worker = None
        task.errors = ()
        task.entry = task.delay_entry = task.deadline_entry = None
        task.expires = task.finished_mono = task.queued_mono = None
        return task

    @classmethod
    def from_values(cls, values):
        """Rebuild a task from the values of STATE_FIELDS, in that order
        (a journal "T" record)."""
        task = cls.from_submit(values[:len(cls.SUBMIT_FIELDS)])
        (state, task.attempts, task.crashes, task.started_at,
         task.finished_at, task.result, task.error, errors,
         task.worker) = values[len(cls.SUBMIT_FIELDS):]
        task.state = _TASK_STATES[state]
        task.errors = list(errors) or ()
        return task

    @classmethod
    def from_state(cls, state):
        """Rebuild a task from its state by name (a version 1 snapshot's,
        or state_dict's)."""
        return cls.from_values([state[name] for name in STATE_FIELDS])

    def submit_json(self):
        """Return the journal submit record's JSON text, built directly.

        The hot path's equivalent of ``{"k": "S", "t": [the values of
        submit_record(), in SUBMIT_FIELDS order]}`` through the encoder;
        a unit test keeps the two equal.
        """
        dumps_str = _dumps_str
        return _SUBMIT_JSON % (
            self.seq, self.handler,
            dumps_str(self.args) if self.args else "[]",
            dumps_str(self.kwargs) if self.kwargs else "{}",
            self.priority, self.timeout,
            "null" if self.deadline_at is None else repr(self.deadline_at),
            "null" if self.run_at is None else repr(self.run_at),
            self.max_attempts,
            "null" if self.key is None else dumps_str(self.key),
            "true" if self.retry_on_error else "false", self.submitted_at)

    def view_json(self):
        """Return ``view()`` as JSON text, built directly (the wait answer
        is on the hot path); a unit test keeps the two equal."""
        dumps_str = _dumps_str
        return _VIEW_JSON % (
            self.id, self.handler,
            dumps_str(self.args) if self.args else "[]",
            dumps_str(self.kwargs) if self.kwargs else "{}",
            self.priority, self.state, self.attempts, self.max_attempts,
            self.timeout,
            "null" if self.deadline_at is None else repr(self.deadline_at),
            "null" if self.run_at is None else repr(self.run_at),
            "null" if self.key is None else dumps_str(self.key),
            "true" if self.retry_on_error else "false", self.submitted_at,
            "null" if self.started_at is None else repr(self.started_at),
            "null" if self.finished_at is None else repr(self.finished_at),
            dumps_str(self.result),
            "null" if self.error is None else dumps_str(self.error),
            dumps_str(self.errors) if self.errors else "[]", self.crashes,
            "null" if self.worker is None else "%d" % self.worker)

    def view(self):
        """Return the task as the protocol shows it."""
        return {
            "id": self.id, "handler": self.handler, "args": self.args,
            "kwargs": self.kwargs, "priority": self.priority,
            "state": self.state, "attempts": self.attempts,
            "max_attempts": self.max_attempts, "timeout": self.timeout,
            "deadline_at": self.deadline_at, "run_at": self.run_at,
            "key": self.key, "retry_on_error": self.retry_on_error,
            "submitted_at": self.submitted_at, "started_at": self.started_at,
            "finished_at": self.finished_at, "result": self.result,
            "error": self.error, "errors": self.errors,
            "crashes": self.crashes, "worker": self.worker,
        }


#: A task's whole state, in the order a snapshot ("T") record keeps it.
STATE_FIELDS = Task.SUBMIT_FIELDS + Task.PROGRESS_FIELDS
#: Where the containers state_values copies stand in it.
_ARGS_AT, _KWARGS_AT, _ERRORS_AT = map(STATE_FIELDS.index,
                                       ("args", "kwargs", "errors"))

# Templates for the records and messages every task makes. Handlers match
# _HANDLER_RE and ids are decimal, so neither needs escaping; numbers use
# repr, as the json module does.
_SUBMIT_JSON = (
    '{"k":"S","t":[%d,"%s",%s,%s,%d,%r,%s,%s,%d,%s,%s,%r]}')
_VIEW_JSON = (
    '{"id":"%s","handler":"%s","args":%s,"kwargs":%s,"priority":%d,'
    '"state":"%s","attempts":%d,"max_attempts":%d,"timeout":%r,'
    '"deadline_at":%s,"run_at":%s,"key":%s,"retry_on_error":%s,'
    '"submitted_at":%r,"started_at":%s,"finished_at":%s,"result":%s,'
    '"error":%s,"errors":%s,"crashes":%d,"worker":%s}')
_OK_JSON = '{"t":"ok","id":"%s","a":%d,"r":%s}\n'
_RUN_JSON = ('{"t":"run","id":"%s","a":%d,"h":"%s","args":%s,"kw":%s,'
             '"p":%d,"dl":%s}')


def result_is_current(task, worker, task_id, attempt):
    """Return True if a result for (task_id, attempt) may be accepted.

    This is the fencing rule: only the attempt a live, un-killed worker is
    running right now may finish a task; anything else is stale.
    """
    return (task is not None and worker.kill_reason is None
            and task.id == task_id and task.attempts == attempt
            and task.state is _RUNNING)


def backoff_delay(attempt, base, cap, rand=random.random):
    """Return the wait before retry ``attempt`` + 1: full jitter.

    Uniform in [0, min(cap, base * 2 ** (attempt - 1))).
    """
    ceiling = min(cap, base * 2.0 ** min(attempt - 1, 60))
    return ceiling * rand()


###############################################################################
# Validation ##################################################################
###############################################################################

#: Fields a submitted task may carry.
TASK_FIELDS = frozenset({
    "handler", "args", "kwargs", "priority", "timeout", "deadline", "delay",
    "max_attempts", "key", "retry_on_error",
})

#: Bounds that keep every number finite and every timer representable.
MAX_PRIORITY = 10 ** 9
MAX_SECONDS = 10.0 ** 9
MAX_ATTEMPTS = 1000
MAX_KEY_LEN = 1024
#: Deepest nesting of lists and objects in a request or a result. Far past
#: any real payload, and far below the recursion limit, so whatever was
#: decoded can always be encoded again, in the journal and on the wire.
MAX_NESTING = 64

_HANDLER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*\Z")


def nesting_ok(obj, limit=MAX_NESTING):
    """True if lists and objects in ``obj`` nest at most ``limit`` deep."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value
        if depth > limit:
            return False
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, (dict, list)))
    return True


def _bad(message):
    return RequestError(BAD_REQUEST, message)


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _parse_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _quick_decode(decoder):
    """Return ``decoder.decode``, skipping its two whitespace scans when
    the text starts with its document (every line the hot path reads)."""
    scan, decode = decoder.scan_once, decoder.decode

    def quick(text):
        try:
            obj, end = scan(text, 0)
        except StopIteration:       # not a document at 0: say why
            return decode(text)
        if end == len(text) or not text[end:].strip(" \t\n\r"):
            return obj
        return decode(text)         # trailing data: say where
    return quick


_strict_decode = _quick_decode(json.JSONDecoder(
    parse_constant=_reject_constant, parse_float=_parse_float))
#: For lines from our own processes, which encode with dumps.
_plain_decode = _quick_decode(json.JSONDecoder())


def loads(data):
    """Decode one JSON document strictly: no NaN or infinities.

    Raises RequestError(bad_json) for anything that is not valid UTF-8
    JSON, including absurd nesting and integers too long to convert.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return _strict_decode(text)
    except UnicodeDecodeError:
        raise RequestError(BAD_JSON, "request is not valid UTF-8") from None
    except (ValueError, RecursionError) as exc:
        msg = str(exc) if isinstance(exc, ValueError) else "nested too deep"
        raise RequestError(BAD_JSON, f"request is not valid JSON: {msg}"[:200]
                           ) from None


def _unencodable(obj):
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON "
                    "serializable")


def _make_encoder():
    """Return a compact, ASCII, NaN-refusing JSON encoder built once.

    JSONEncoder.encode builds its C encoder anew on every call; on the hot
    path that costs more than the encoding. Without the C accelerator,
    fall back to the plain encoder.
    """
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    plain = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
    if c_make_encoder is None:
        return plain
    encode = c_make_encoder(None, _unencodable,
                            json.encoder.encode_basestring_ascii, None, ":",
                            ",", False, False, False)

    def dumps_str(obj):
        if isinstance(obj, str):
            return plain(obj)
        return "".join(encode(obj, 0))
    return dumps_str


_dumps_str = _make_encoder()


def dumps(obj):
    """Encode ``obj`` as one ASCII JSON line, newline included."""
    return (_dumps_str(obj) + "\n").encode("ascii")


#: encode_response's "the request had no 'req' field".
NO_REQ = object()


def encode_response(response, req=NO_REQ):
    """Return one response line, echoing ``req`` unless it is NO_REQ.

    ``response`` is a dict, or the JSON text of an object without its
    closing brace: the hot path's answers are built as text directly.
    """
    try:
        if response.__class__ is str:
            if req is not NO_REQ:
                response += ',"req":' + _dumps_str(req)
            return (response + "}\n").encode("ascii")
        if req is not NO_REQ:
            response["req"] = req
        return dumps(response)
    except (TypeError, ValueError) as exc:
        return dumps({"ok": False, "error": INTERNAL,
                      "message": f"unencodable: {exc}"})


def _number(spec, name, lo, hi, *, integer=False, low_open=False):
    value = spec[name]
    kind = value.__class__
    if (kind is int or kind is float and not integer) and (
            lo < value <= hi or value == lo and not low_open):
        return value    # the common case, decided without a conversion
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise _bad(f"task field '{name}' must be {kind}")
    # Compare before any float conversion: an int may be too big for one.
    if isinstance(value, float) and not math.isfinite(value) or \
            value > hi or value < lo or (low_open and value == lo):
        low = f"> {lo}" if low_open else f">= {lo}"
        raise _bad(f"task field '{name}' must be {low} and <= {hi}")
    return value


#: What a submitted task gets for a field it leaves out, besides the
#: configured timeout and max_attempts, and a new empty args and kwargs.
_TASK_DEFAULTS = {"priority": 0, "deadline": None, "delay": None,
                  "key": None, "retry_on_error": True}
#: Handler names already matched against _HANDLER_RE (a few, in practice).
_GOOD_HANDLERS = set()


def _good_handler(name):
    if name in _GOOD_HANDLERS:
        return True
    if not _HANDLER_RE.match(name):
        return False
    if len(_GOOD_HANDLERS) >= 4096:
        _GOOD_HANDLERS.clear()
    _GOOD_HANDLERS.add(name)
    return True


def validate_task(obj, defaults):
    """Check a submitted task object; return its fields, filled in.

    ``defaults`` gives ``timeout`` and ``max_attempts`` when absent.
    Raises RequestError(bad_request) naming the first offending field.
    Each number is tested first as decoded JSON gives it (exact types);
    _number then decides, and explains, anything else.
    """
    if obj.__class__ is not dict:
        raise _bad("'task' must be an object")
    if not TASK_FIELDS.issuperset(obj):
        unknown = sorted(set(obj) - TASK_FIELDS)
        raise _bad(f"unknown task field '{unknown[0]}'")
    spec = {"args": [], "kwargs": {}, **_TASK_DEFAULTS, **defaults, **obj}
    handler = spec.get("handler")
    if handler.__class__ is not str or not _good_handler(handler):
        raise _bad("task field 'handler' must be a string 'module:function'")
    if spec["args"].__class__ is not list:
        raise _bad("task field 'args' must be a list")
    if spec["kwargs"].__class__ is not dict:
        raise _bad("task field 'kwargs' must be an object")
    value = spec["priority"]
    if value.__class__ is not int or \
            not -MAX_PRIORITY <= value <= MAX_PRIORITY:
        _number(spec, "priority", -MAX_PRIORITY, MAX_PRIORITY, integer=True)
    value = spec["timeout"]
    if value.__class__ is not float and value.__class__ is not int or \
            not 0 < value <= MAX_SECONDS:
        _number(spec, "timeout", 0, MAX_SECONDS, low_open=True)
    value = spec["max_attempts"]
    if value.__class__ is not int or not 1 <= value <= MAX_ATTEMPTS:
        _number(spec, "max_attempts", 1, MAX_ATTEMPTS, integer=True)
    if spec["deadline"] is not None:
        _number(spec, "deadline", 0, MAX_SECONDS, low_open=True)
    if spec["delay"] is not None:
        _number(spec, "delay", 0, MAX_SECONDS)
    key = spec["key"]
    if key is not None and not (isinstance(key, str)
                                and 0 < len(key) <= MAX_KEY_LEN):
        raise _bad(f"task field 'key' must be a string of 1 to "
                   f"{MAX_KEY_LEN} characters")
    value = spec["retry_on_error"]
    if value is not True and value is not False:
        raise _bad("task field 'retry_on_error' must be true or false")
    return spec


def check_fields(request, allowed):
    """Raise bad_request if ``request`` has a field outside ``allowed``."""
    for name in request:
        if name not in allowed and name not in ("op", "req"):
            raise _bad(f"unknown field '{name}' for op '{request['op']}'")


_MISSING = object()


def field(request, name, kinds, what, required=True):
    """Return ``request[name]`` if it has one of ``kinds``, else raise."""
    value = request.get(name, _MISSING)
    if value.__class__ in kinds:    # decoded JSON has exact types
        return value
    if value is _MISSING:
        if required:
            raise _bad(f"field '{name}' is required")
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(
            value, kinds):
        raise _bad(f"field '{name}' must be {what}")
    return value


def seconds_field(request, name):
    """Return an optional non-negative finite number of seconds."""
    value = field(request, name, (int, float), "a number of seconds",
                  required=False)
    if value is not None and not 0 <= value <= MAX_SECONDS:
        raise _bad(f"field '{name}' must be >= 0 and <= {MAX_SECONDS:g}")
    return value


###############################################################################
# Journal codec ###############################################################
###############################################################################
#
# The journal is one append-only file of lines, each one record:
#
#     <CRC32 of the payload, 8 hex digits> <payload: a JSON object>\n
#
# The first record is the header {"k": "h", "v": JOURNAL_VERSION}. Then,
# keyed by "k", with "id" the task's integer sequence number:
#
#     S  submitted: "t" holds the values of the fields the submit fixed,
#        in Task.SUBMIT_FIELDS order (version 2: a restart decodes one per
#        queued task, and a list decodes in half the time of an object)
#     s  submitted, as version 1 wrote it: "t" maps those fields to values
#     T  a snapshot of one task's whole state, written by compaction: "t"
#        holds the values of STATE_FIELDS, in that order (version 2)
#     t  the same, as version 1 wrote it: "t" maps those fields to values
#     r  an attempt started: attempt "a", worker "w", epoch "at"
#     d  done: result "r", epoch "at"
#     f  an attempt failed and will be retried: error "e", "crash" (bool),
#        "run_at" (epoch when it may run again; null: at once)
#     x  ended otherwise: state "st" (DEAD, EXPIRED or CANCELLED), error
#        "e", epoch "at"; when a failed attempt ended it, that attempt's
#        error "le" and the task's crash count "crash"
#     q  re-queued at shutdown; the interrupted attempt does not count
#
# A reader of version N reads every version <= N; a new record kind or a
# changed field means a new version, and the old reader code stays.

JOURNAL_VERSION = 2


def encode_record(obj):
    """Frame one record: CRC, space, JSON payload, newline."""
    return frame_json(_dumps_str(obj))


def frame_json(text):
    """Frame one record given as ASCII JSON text."""
    payload = text.encode("ascii")
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def decode_record(line):
    """Return the record in ``line`` (no newline), or None if damaged."""
    if len(line) < 11 or line[8:9] != b" ":
        return None
    try:
        crc = int(line[:8], 16)
    except ValueError:
        return None
    payload = line[9:]
    if zlib.crc32(payload) != crc:
        return None
    try:
        obj = _plain_decode(payload.decode("utf-8"))
    except ValueError:      # UnicodeDecodeError included
        return None
    return obj if isinstance(obj, dict) and isinstance(obj.get("k"), str) \
        else None


def _any_valid_after(data, pos):
    """True if a valid record follows the damaged line starting at pos.

    That includes one hiding in the same line behind a damaged newline:
    a torn write only ever cuts records short, it never joins them.
    """
    lines = data[pos:].split(b"\n")
    if _hides_a_record(lines[0]):
        return True
    for line in lines[1:]:
        if decode_record(line) is not None:
            return True
    return False


def _hides_a_record(line):
    """True if ``line`` is two valid records joined by one damaged byte."""
    end = line.find(b"}")
    while end >= 0:
        if decode_record(line[end + 2:]) and decode_record(line[:end + 1]):
            return True
        end = line.find(b"}", end + 1)
    return False


def iter_journal(data, tail):
    """Yield the records of journal bytes in order, decoding each as it
    is reached (a restart holds no million decoded records at once).

    Once every good record is yielded, ``tail`` (a list) gets ``end``,
    the offset just past the last good record, and ``torn``, what damaged
    the tail (None if clean). A damaged record followed by good ones is
    corruption, not a torn write: raises JournalCorrupt naming its byte
    offset.
    """
    pos, size = 0, len(data)
    find = data.find
    while pos < size:
        newline = find(b"\n", pos)
        record = None if newline < 0 else decode_record(data[pos:newline])
        if record is None:
            if _any_valid_after(data, pos):
                raise JournalCorrupt(pos, f"corrupt record at byte {pos}, "
                                     "followed by valid records")
            what = "incomplete" if newline < 0 else "damaged"
            tail += [pos, f"{what} record at byte {pos} ({size - pos} bytes)"]
            return
        yield record
        pos = newline + 1
    tail += [pos, None]


def scan_journal(data):
    """Split journal bytes into records: (records, end, torn), as
    iter_journal yields and ends them."""
    tail = []
    records = list(iter_journal(data, tail))
    return records, *tail


def check_header(records):
    """Check the header record; return the records after it."""
    if not records:
        return []
    _check_head(records[0])
    return records[1:]


def _check_head(head):
    if head.get("k") != "h" or not isinstance(head.get("v"), int):
        raise JournalError("not an lbd journal (no header record)")
    if head["v"] > JOURNAL_VERSION:
        raise JournalError(f"journal version {head['v']} is newer than "
                           f"this lbd reads ({JOURNAL_VERSION})")


_SUBMIT_FIELD_COUNT = len(Task.SUBMIT_FIELDS)
_STATE_FIELD_COUNT = len(STATE_FIELDS)


def _listed(rec, count):
    values = rec["t"]
    if values.__class__ is not list or len(values) != count:
        raise TypeError(f"'t' holds {count} values")
    return values


def _whole_task(kind, rec):
    """The Task a submit or snapshot record holds; None for other kinds."""
    if kind == "S":
        return Task.from_submit(_listed(rec, _SUBMIT_FIELD_COUNT))
    if kind == "T":
        return Task.from_values(_listed(rec, _STATE_FIELD_COUNT))
    if kind == "s":         # version 1: the same fields, by name
        return Task.from_submit([rec["t"][name]
                                 for name in Task.SUBMIT_FIELDS])
    if kind == "t":         # version 1, by name
        return Task.from_state(rec["t"])
    return None


def _apply(tasks, rec):
    """Apply one journal record to {seq: Task}: what replay repeats.

    Returns the sequence number a submit or snapshot record added."""
    kind = rec["k"]
    task = _whole_task(kind, rec)
    if task is not None:
        tasks[task.seq] = task
        return task.seq
    task = tasks.get(rec.get("id"))
    if task is None:
        if kind not in _RECORD_KINDS:
            raise JournalError(f"unknown journal record kind {kind!r}")
        return None     # a task dropped by an earlier compaction
    if kind == "r":
        task.state = _RUNNING
        task.attempts, task.worker, task.started_at = \
            rec["a"], rec["w"], rec["at"]
    elif kind == "d":
        task.state = _DONE
        task.result, task.finished_at = rec["r"], rec["at"]
        task.error = None
    elif kind == "f":
        error, run_at = rec["e"], rec["run_at"]
        task.errors = [*task.errors, error]
        if rec["crash"]:
            task.crashes += 1
        task.error = error
        task.run_at = run_at or task.run_at
        task.state = _DELAYED if run_at else _QUEUED
    elif kind == "x":
        state, error, finished_at = _TASK_STATES[rec["st"]], rec["e"], \
            rec["at"]
        if "le" in rec:     # the failed attempt that ended the task
            task.errors = [*task.errors, rec["le"]]
            task.crashes = rec["crash"]
        task.state, task.error, task.finished_at = state, error, finished_at
    elif kind == "q":
        task.state = _QUEUED
        task.attempts -= 1
    else:
        raise JournalError(f"unknown journal record kind {kind!r}")
    return None


_RECORD_KINDS = frozenset(("S", "s", "T", "t", "r", "d", "f", "x", "q"))


def replay_tasks(records):
    """Rebuild every task from journal records (header excluded).

    Returns {seq: Task}, in submission order. Tasks that were RUNNING
    when the journal ends are left RUNNING: the master decides what
    becomes of them. ``records`` may be any iterable; what it yields is
    not kept (a restart replays a million records through this).
    """
    tasks = {}
    last, in_order = None, True     # a journal's submits come in order
    for rec in records:
        try:
            seq = _apply(tasks, rec)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise JournalError(f"malformed {rec.get('k')!r} record: "
                               f"{exc!r}") from None
        if seq is not None:
            if last is not None and seq <= last:
                in_order = False
            last = seq
    return tasks if in_order else dict(sorted(tasks.items()))


def replay(records):
    """Rebuild every task's state as a dict (see replay_tasks)."""
    return {seq: task.state_dict()
            for seq, task in replay_tasks(records).items()}


def survey_journal(data):
    """Read every line of a journal, good or bad, without raising.

    Returns (records, bad): the valid records in order, and the
    (offset, length) of every damaged or incomplete line.
    """
    records, bad, pos = [], [], 0
    while pos < len(data):
        newline = data.find(b"\n", pos)
        end = len(data) if newline < 0 else newline
        record = None if newline < 0 else decode_record(data[pos:end])
        if record is None:
            bad.append((pos, end - pos + (newline >= 0)))
        else:
            records.append(record)
        pos = end + 1
    return records, bad


def interrupted_error(state):
    """The error an attempt gets when the daemon died while it ran."""
    return {"reason": "interrupted", "type": None, "traceback": None,
            "message": f"the daemon stopped while attempt "
                       f"{state['attempts']} ran", "worker": state["worker"]}

###############################################################################
# Metrics #####################################################################
###############################################################################
#
# Everything here is O(1) per event; windows are rings of per-interval
# slots that the scaling tick rotates, so nothing grows with traffic.


#: Histogram bucket upper bounds: 4 per decade from 0.1 ms to 10,000 s.
BUCKETS = tuple(round(1e-4 * 10 ** (i / 4), 10) for i in range(33))


class Rate:
    """An exponentially weighted event rate, in events per second."""

    __slots__ = ("tau", "value", "stamp")

    def __init__(self, tau, now):
        self.tau = tau
        self.value = 0.0
        self.stamp = now

    def _decay(self, now):
        elapsed = now - self.stamp
        if elapsed > 0:
            self.value *= math.exp(-elapsed / self.tau)
            self.stamp = now

    def add(self, now, count=1):
        self._decay(now)
        self.value += count / self.tau

    def get(self, now):
        self._decay(now)
        return self.value


class WindowHistogram:
    """Fixed-bucket counts over a sliding window, plus all-time totals."""

    __slots__ = ("bounds", "slots", "current", "totals", "sum", "count")

    def __init__(self, slots, bounds=BUCKETS):
        self.bounds = bounds
        size = len(bounds) + 1               # the last bucket is +Inf
        self.slots = collections.deque(
            ([0] * size for _ in range(slots)), maxlen=slots)
        self.current = self.slots[-1]
        self.totals = [0] * size
        self.sum = 0.0
        self.count = 0

    def observe(self, value):
        index = bisect.bisect_left(self.bounds, value)
        self.current[index] += 1
        self.totals[index] += 1
        self.sum += value
        self.count += 1

    def rotate(self):
        """Start a new slot; the oldest one leaves the window."""
        self.current = [0] * (len(self.bounds) + 1)
        self.slots.append(self.current)

    def window_counts(self):
        return [sum(column) for column in zip(*self.slots, strict=True)]

    def quantiles(self, qs=(0.5, 0.95, 0.99)):
        """Return ({q: upper bound of its bucket}, count) over the window.

        A quantile in the +Inf bucket is reported as the last bound.
        """
        counts = self.window_counts()
        total = sum(counts)
        result = {}
        for q in qs:
            if not total:
                result[q] = None
                continue
            rank, seen = q * total, 0
            for index, n in enumerate(counts):
                seen += n
                if seen >= rank:
                    result[q] = self.bounds[min(index, len(self.bounds) - 1)]
                    break
        return result, total

    def summary(self):
        quantiles, total = self.quantiles()
        return {"p50": quantiles[0.5], "p95": quantiles[0.95],
                "p99": quantiles[0.99], "count": total}

    def cumulative(self):
        """All-time cumulative bucket counts, as Prometheus wants them."""
        return {"le": list(self.bounds),
                "counts": list(itertools.accumulate(self.totals)),
                "sum": self.sum, "count": self.count}


class BusyMeter:
    """Integrates busy and live worker counts over time, for utilization."""

    __slots__ = ("busy", "live", "busy_seconds", "live_seconds", "stamp",
                 "samples")

    def __init__(self, now, slots):
        self.busy = self.live = 0
        self.busy_seconds = self.live_seconds = 0.0
        self.stamp = now
        self.samples = collections.deque([(now, 0.0, 0.0)], maxlen=slots + 1)

    def _advance(self, now):
        elapsed = now - self.stamp
        if elapsed > 0:
            self.busy_seconds += self.busy * elapsed
            self.live_seconds += self.live * elapsed
            self.stamp = now

    def set(self, now, busy, live):
        self._advance(now)
        self.busy, self.live = busy, live

    def sample(self, now):
        """Close a window slot; return (busy s, live s) over the window."""
        self._advance(now)
        self.samples.append((now, self.busy_seconds, self.live_seconds))
        _, busy0, live0 = self.samples[0]
        return self.busy_seconds - busy0, self.live_seconds - live0


###############################################################################
# Scaling policy ##############################################################
###############################################################################


class DefaultPolicy:
    """Scale out fast when work waits; scale in slowly; ignore noise.

    Each interval it computes what the load needs:

    * backlog: workers that keep up with arrivals and clear the ready queue
      within target_queue_wait, at the measured per-worker service rate mu
      (completions per busy-worker-second over the window):
      ``ceil((arrival_rate + ready / target_queue_wait) / mu)``; before any
      completion is measured, one more worker per waiting task;
    * utilization, as Kubernetes' HPA: ``ceil(live * util / target)``.

    Out: when the oldest ready task has waited past target_queue_wait or
    utilization is above target * (1 + tolerance), jump to the larger
    need at once. In: only when every recommendation of the last
    scale_in_delay seconds is below the target (a stabilization window),
    one worker per interval. Inside the tolerance band: hold.
    """

    def __init__(self, target_queue_wait=0.5, target_utilization=0.8,
                 scale_in_delay=60.0, tolerance=0.1):
        self.target_queue_wait = target_queue_wait
        self.target_utilization = target_utilization
        self.scale_in_delay = scale_in_delay
        self.tolerance = tolerance
        self.history = collections.deque()    # (time, recommendation)
        self.decided = None                    # what it answered last
        self.reason = ""

    def needs(self, snap, bounds):
        """Return (backlog need, utilization need) in workers."""
        ready = snap["queue"]["ready"]
        mu = snap["service_rate"]
        if ready == 0:
            backlog = 0
        elif mu:
            backlog = math.ceil((snap["arrival_rate"] + ready /
                                 self.target_queue_wait) / mu)
        else:
            backlog = bounds["current"] + ready
        util = snap["utilization"] or 0.0
        live = max(snap["live_workers"], 1)
        return backlog, math.ceil(live * util / self.target_utilization)

    def __call__(self, snap, bounds):
        now = snap["clock"]
        target, low, high = bounds["target"], bounds["min"], bounds["max"]
        if target != self.decided:
            # Set from outside (SIGTTIN, lbd scale, a plugin, a reload):
            # it counts as a recommendation, so it too lasts the delay.
            self.history.append((now, target))
        backlog, by_util = self.needs(snap, bounds)
        util = snap["utilization"] or 0.0
        waiting = snap["oldest_wait"] > self.target_queue_wait
        hot = util > self.target_utilization * (1 + self.tolerance)
        cold = util < self.target_utilization * (1 - self.tolerance) and \
            snap["queue"]["ready"] == 0
        if waiting or hot:
            want = max(target, by_util, backlog if waiting else 0)
        elif cold:
            want = max(by_util, backlog)
        else:
            want = target
        want = max(low, min(high, want))
        self.history.append((now, want))
        while self.history and self.history[0][0] < now - self.scale_in_delay:
            self.history.popleft()
        stable = max(w for _, w in self.history)
        if want > target:
            decision = want
        elif stable < target:
            decision = target - 1
        else:
            decision = target
        self.reason = (
            f"ready {snap['queue']['ready']}, oldest wait "
            f"{snap['oldest_wait']:.3f} s, utilization {util:.2f}, "
            f"arrivals {snap['arrival_rate']:.1f}/s, service "
            f"{snap['service_rate'] or 0:.1f}/s per worker -> backlog "
            f"needs {backlog}, utilization needs {by_util}; stable "
            f"recommendation {stable}")
        self.decided = max(low, min(high, decision))
        return self.decided


###############################################################################
# Configuration ###############################################################
###############################################################################

class IntList(list):
    """Config value type: a list of integers (a plain list is of strings)."""


#: Every configuration key: section -> key -> (default, type, meaning).
#: config.example.toml documents the same keys; a test keeps them equal.
CONFIG_SCHEMA = {
    "server": {
        "socket": ("", str, "control socket path; empty picks "
                   "$LBD_SOCKET, else $RUNTIME_DIRECTORY/lbd.sock, else "
                   "$XDG_RUNTIME_DIR/lbd.sock, else /tmp/lbd-UID/lbd.sock"),
        "socket_mode": (0o600, int, "permission bits of the socket file"),
        "socket_group": ("", str, "group given the socket file; empty "
                         "keeps the daemon's"),
        "allowed_uids": ([], IntList, "user ids allowed to connect (checked "
                         "with SO_PEERCRED); empty lists allow whoever the "
                         "socket's mode lets in. The daemon's own user is "
                         "always allowed"),
        "allowed_gids": ([], IntList, "group ids allowed to connect"),
        "max_request_bytes": (1 << 20, int, "longest request line"),
        "max_output_bytes": (16 << 20, int,
                             "unread responses kept for one client before "
                             "it is disconnected"),
        "max_clients": (1024, int, "open client connections at most"),
        "max_queued": (1_000_000, int, "queued plus delayed tasks at most"),
    },
    "journal": {
        "path": ("", str, "journal file; empty picks "
                 "$STATE_DIRECTORY/lbd.journal, else "
                 "$XDG_STATE_HOME/lbd/lbd.journal, else "
                 "~/.local/state/lbd/lbd.journal; \"none\" keeps tasks in "
                 "memory only"),
        "fsync": ("submits", str, "what is fsynced before a response: "
                  "submits, always, interval or never"),
        "fsync_interval": (0.02, float, "seconds within which other "
                           "records reach the disk"),
        "compact_bytes": (64 << 20, int, "journal size that triggers "
                          "compaction once most of it is history"),
    },
    "workers": {
        "min": (2, int, "workers kept running at least"),
        "max": (0, int, "workers at most; 0 means the number of CPUs "
                "(at least min)"),
        "handlers": ([], list, "modules whose functions tasks may call"),
        "kill_grace": (5.0, float, "seconds between SIGTERM and SIGKILL"),
        "stop_grace": (30.0, float, "seconds running tasks get to finish "
                       "at shutdown"),
        "heartbeat_interval": (1.0, float, "seconds between heartbeats"),
        "heartbeat_timeout": (10.0, float, "silence after which a worker "
                              "is presumed hung"),
        "start_timeout": (30.0, float, "seconds a new worker has to "
                          "report ready"),
        "max_tasks": (0, int, "recycle a worker after this many tasks; "
                      "0 never"),
    },
    "scaling": {
        "interval": (1.0, float, "seconds between scaling decisions and "
                     "metric window slots"),
        "window": (30.0, float, "seconds of the sliding window for "
                   "utilization and the latency quantiles"),
        "target_queue_wait": (0.5, float, "scale out once the oldest "
                              "ready task has waited this long"),
        "target_utilization": (0.8, float, "busy share of the live "
                               "workers to aim for"),
        "scale_in_delay": (60.0, float, "seconds of surplus before a "
                           "worker is retired"),
        "tolerance": (0.1, float, "relative band around the target "
                      "utilization that changes nothing"),
    },
    "plugins": {
        "policy": ("", str, "scaling policy plugin, 'file.py:factory' or "
                   "'module:factory'; empty uses the default policy"),
        "sinks": ([], list, "metrics sink plugins, each "
                  "'file.py:factory' or 'module:factory'"),
        "options": ({}, dict, "a table per plugin name (the file or "
                    "module name), passed to its factory"),
        "timeout": (5.0, float, "seconds a policy plugin has to answer "
                    "before it is disabled"),
        "buffer_bytes": (1 << 20, int, "events kept for a slow plugin "
                         "before new ones are dropped"),
    },
    "tasks": {
        "timeout": (300.0, float, "seconds per attempt"),
        "max_attempts": (3, int, "attempts per task"),
        "aging_rate": (0.0, float, "priority points gained per second "
                       "waited; 0 is strict priority"),
        "retry_backoff": (0.5, float, "base of the exponential backoff"),
        "retry_backoff_max": (30.0, float, "cap of the backoff"),
        "max_crashes": (2, int, "worker crashes before a task is "
                        "quarantined as poison"),
        "dedupe_window": (3600.0, float, "seconds a finished task's key "
                          "still deduplicates"),
        "result_ttl": (86400.0, float, "seconds a finished task is kept"),
    },
}

#: Lower bounds checked after loading: (section, key) -> (minimum, strict).
_CONFIG_MINIMUM = {
    ("server", "max_request_bytes"): (64, False),
    ("server", "max_output_bytes"): (1024, False),
    ("server", "max_clients"): (1, False),
    ("server", "max_queued"): (1, False),
    ("server", "socket_mode"): (0, False),
    ("journal", "fsync_interval"): (0, True),
    ("scaling", "interval"): (0, True),
    ("scaling", "window"): (0, True),
    ("scaling", "target_queue_wait"): (0, True),
    ("scaling", "target_utilization"): (0, True),
    ("scaling", "scale_in_delay"): (0, False),
    ("scaling", "tolerance"): (0, False),
    ("plugins", "timeout"): (0, True),
    ("plugins", "buffer_bytes"): (1024, False),
    ("journal", "compact_bytes"): (4096, False),
    ("workers", "min"): (1, False),
    ("workers", "max"): (0, False),
    ("workers", "kill_grace"): (0, True),
    ("workers", "stop_grace"): (0, False),
    ("workers", "heartbeat_interval"): (0, True),
    ("workers", "heartbeat_timeout"): (0, True),
    ("workers", "start_timeout"): (0, True),
    ("workers", "max_tasks"): (0, False),
    ("tasks", "timeout"): (0, True),
    ("tasks", "max_attempts"): (1, False),
    ("tasks", "aging_rate"): (0, False),
    ("tasks", "retry_backoff"): (0, False),
    ("tasks", "retry_backoff_max"): (0, False),
    ("tasks", "max_crashes"): (1, False),
    ("tasks", "dedupe_window"): (0, False),
    ("tasks", "result_ttl"): (0, False),
}


FSYNC_MODES = ("submits", "always", "interval", "never")


class Section:
    """One configuration section as attributes: ``cfg.workers.min``."""

    def __init__(self, values):
        self.__dict__.update(values)

    def __repr__(self):
        return f"Section({self.__dict__!r})"


def _check_value(where, value, kind):
    if kind is IntList:
        if not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{where} must be a list of integers")
        return IntList(value)
    if kind is float and isinstance(value, int) and not isinstance(
            value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"{where} is too large") from None
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{where} must be of type {kind.__name__}, "
                          f"not {type(value).__name__}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{where} must be finite")
    if kind is list and not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of strings")
    if kind is list:
        value = list(value)         # never share the schema's default
    if kind is dict:
        value = dict(value)
    return value


def build_config(data, source="config"):
    """Return {section: Section} from a parsed TOML mapping.

    Missing keys take their defaults; unknown sections or keys and wrong
    types raise ConfigError naming ``section.key``.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a table")
    for name, table in data.items():
        if name not in CONFIG_SCHEMA:
            raise ConfigError(f"{source}: unknown section [{name}]")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        for key in table:
            if key not in CONFIG_SCHEMA[name]:
                raise ConfigError(f"{source}: unknown key {name}.{key}")
    cfg = {}
    for name, keys in CONFIG_SCHEMA.items():
        given = data.get(name, {})
        values = {}
        for key, (default, kind, _) in keys.items():
            value = given.get(key, default)
            values[key] = _check_value(f"{source}: {name}.{key}", value, kind)
        cfg[name] = Section(values)
    _check_bounds(cfg, source)
    return cfg


def _check_bounds(cfg, source):
    for (name, key), (low, strict) in _CONFIG_MINIMUM.items():
        value = getattr(cfg[name], key)
        if value < low or strict and value == low:
            sign = ">" if strict else ">="
            raise ConfigError(f"{source}: {name}.{key} must be {sign} {low}")
    for name, table in cfg["plugins"].options.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: plugins.options.{name} must be a "
                              "table")
    if cfg["scaling"].target_utilization > 1:
        raise ConfigError(f"{source}: scaling.target_utilization must be "
                          "<= 1")
    if cfg["scaling"].window < cfg["scaling"].interval:
        raise ConfigError(f"{source}: scaling.window must be >= "
                          "scaling.interval")
    workers = cfg["workers"]
    if workers.max == 0:
        workers.max = max(workers.min, os.cpu_count() or 1)
    if workers.max < workers.min:
        raise ConfigError(f"{source}: workers.max ({workers.max}) is below "
                          f"workers.min ({workers.min})")
    if workers.heartbeat_timeout <= workers.heartbeat_interval:
        raise ConfigError(f"{source}: workers.heartbeat_timeout must exceed "
                          "workers.heartbeat_interval")
    if cfg["journal"].fsync not in FSYNC_MODES:
        raise ConfigError(f"{source}: journal.fsync must be one of "
                          f"{', '.join(FSYNC_MODES)}")
    for module in workers.handlers:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", module):
            raise ConfigError(f"{source}: workers.handlers: '{module}' is "
                              "not a module name")


def load_config(path=None, overrides=None):
    """Read the TOML file at ``path`` (if any), apply ``overrides``.

    ``overrides`` maps (section, key) to a value from the command line.
    Raises ConfigError with the file name and the offending key.
    """
    data = {}
    source = "defaults"
    if path:
        source = path
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not valid UTF-8") from None
        except (ValueError, RecursionError) as exc:
            raise ConfigError(f"{path}: cannot parse: "
                              f"{exc or 'nested too deep'}") from None
    for (name, key), value in (overrides or {}).items():
        data.setdefault(name, {})[key] = value
    return build_config(data, source)


def default_journal_path():
    """Return where the journal lives when no path is configured."""
    folder = os.environ.get("STATE_DIRECTORY")
    if folder:
        return os.path.join(folder.split(":")[0], "lbd.journal")
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "lbd", "lbd.journal")


def default_socket_path():
    """Return where serve and the clients meet when no path is given."""
    path = os.environ.get("LBD_SOCKET")
    if path:
        return path
    for var in ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"):
        folder = os.environ.get(var)
        if folder:
            return os.path.join(folder.split(":")[0], "lbd.sock")
    return f"/tmp/lbd-{os.getuid()}/lbd.sock"


###############################################################################
# Built-in handlers ###########################################################
###############################################################################


#: What a handler may know about the task it runs: read-only.
CurrentTask = collections.namedtuple(
    "CurrentTask", ("id", "attempt", "priority", "deadline_at"))


_current = None


def current_task():
    """Return the CurrentTask being run in this worker, or None."""
    return _current


def echo(*args):
    """Return the positional arguments as a list."""
    return list(args)


def sleep(seconds=0):
    """Sleep ``seconds`` and return it."""
    time.sleep(float(seconds))
    return seconds


###############################################################################
# Worker process ##############################################################
###############################################################################


def _load_handlers(modules):
    """Import the handler modules; return {"module:function": callable}."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    table = {name: globals()[name.split(":")[1]]
             for name in BUILTIN_HANDLERS}
    for modname in modules:
        module = importlib.import_module(modname)
        for attr in dir(module):
            fn = getattr(module, attr)
            if not attr.startswith("_") and callable(fn):
                table[f"{modname}:{attr}"] = fn
    return table


def _error_info(reason, exc):
    return {"reason": reason, "type": type(exc).__name__,
            "message": str(exc)[:4096],
            "traceback": traceback.format_exc()[-16384:]}


def _run_one(handlers, msg):
    """Run one task message; return the result message to send back."""
    global _current
    tid, attempt = msg["id"], msg["a"]
    fn = handlers.get(msg["h"])
    if fn is None:
        return {"t": "err", "id": tid, "a": attempt, "e": {
            "reason": "unknown_handler", "type": "LookupError",
            "message": f"no handler {msg['h']} in the worker",
            "traceback": None}}
    _current = CurrentTask(tid, attempt, msg["p"], msg["dl"])
    try:
        return {"t": "ok", "id": tid, "a": attempt,
                "r": fn(*msg["args"], **msg["kw"])}
    except (Exception, SystemExit) as exc:
        return {"t": "err", "id": tid, "a": attempt,
                "e": _error_info("exception", exc)}
    finally:
        _current = None


def _heartbeat(send, interval, parent):
    """Beat every ``interval``; exit the process once the master is gone."""
    tick = min(interval, 0.25)
    last = time.monotonic()
    while True:
        time.sleep(tick)
        if os.getppid() != parent:
            os._exit(1)
        now = time.monotonic()
        if now - last >= interval:
            last = now
            try:
                send({"t": "hb"})
            except OSError:
                os._exit(1)


def _worker_main(sock, modules, heartbeat_interval, parent):
    """Serve tasks from the master over ``sock``; return the exit status."""
    sock.setblocking(True)
    lock = threading.Lock()

    def send(obj):
        data = dumps(obj)
        with lock:
            sock.sendall(data)

    try:
        handlers = _load_handlers(modules)
    except BaseException as exc:  # a broken module may raise anything
        send({"t": "boot_error", "message":
              f"{type(exc).__name__}: {exc}"[:2000]})
        return WORKER_BOOT_ERROR
    threading.Thread(target=_heartbeat, daemon=True, name="lbd-heartbeat",
                     args=(send, heartbeat_interval, parent)).start()
    send({"t": "ready", "handlers": sorted(handlers)})
    for line in sock.makefile("rb"):
        msg = _plain_decode(line.decode("ascii"))
        if msg["t"] == "stop":
            return 0
        reply = _run_one(handlers, msg)
        try:
            data = (_OK_JSON % (reply["id"], reply["a"], _dumps_str(
                reply["r"]))).encode("ascii") if reply["t"] == "ok" \
                else dumps(reply)
            # Fewer brackets than the limit cannot nest past it.
            if len(data) > MAX_NESTING and data.count(b"[") + \
                    data.count(b"{") > MAX_NESTING and not nesting_ok(reply):
                raise ValueError(f"nested deeper than {MAX_NESTING} levels")
        except (TypeError, ValueError, RecursionError) as exc:
            data = dumps({"t": "err", "id": msg["id"], "a": msg["a"], "e": {
                "reason": "exception", "type": type(exc).__name__,
                "message": f"result is not JSON-serialisable: {exc}"[:4096],
                "traceback": None}})
        with lock:
            sock.sendall(data)
    return 0


def _reset_child_signals(handled):
    signal.set_wakeup_fd(-1)
    for signum in handled:
        signal.signal(signum, signal.SIG_DFL)
    # The master owns the lifecycle: a terminal's ^C or hang-up reaches the
    # whole process group, and must not kill a handler mid-task.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


###############################################################################
# Journal file ################################################################
###############################################################################

# Syscall seams: replaced by tests to simulate a full disk or EIO.
_write = os.write
_fsync = os.fsync


def _lock_holder(fd):
    """Return the pid holding a flock on ``fd``'s file, or None."""
    inode = os.fstat(fd).st_ino
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 5 and parts[1] == "FLOCK" and \
                        parts[5].rsplit(":", 1)[-1] == str(inode):
                    return int(parts[4])
    except (OSError, ValueError):
        pass
    return None


def lock_journal(path):
    """Open and exclusively lock the journal; return the descriptor.

    Raises JournalError naming the pid that holds the lock, at once.
    """
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fd)
        os.close(fd)
        who = f"pid {holder}" if holder else "another process"
        raise JournalError(f"journal {path} is locked by {who}: another "
                           "lbd daemon is using it") from None
    return fd


def _read_all(fd):
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def fsync_dir(path):
    """Make a rename in ``path``'s directory durable."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """The append-only journal: buffered records, one write per flush.

    ``append`` buffers; ``flush`` writes the whole buffer and fsyncs as the
    mode asks (group commit: one write and at most one fsync per loop
    iteration). A failed write or fsync keeps the buffer and sets
    ``failed`` until a later flush succeeds.
    """

    def __init__(self, path, mode="submits", interval=0.02):
        self.path = path
        self.mode = mode
        self.interval = interval
        self.fd = -1
        self.buf = bytearray()
        self.sync_wanted = False     # a record whose ack needs an fsync
        self.fresh = False           # appended to since the last commit
        self.appended = 0            # records appended, ever
        self.unsynced = False        # written, not yet fsynced
        self.failed = None           # the last write/fsync error, or None
        self.size = 0                # bytes in the file
        self.base_size = 0           # size right after the last compaction
        self.since_fork = None       # bytes written while a compaction runs
        self.dir_unsynced = False    # a rename whose directory needs fsync
        # The header's version: the records appended are that version's,
        # so the lbd that wrote the file can still read it. A compaction
        # rewrites it as JOURNAL_VERSION.
        self.version = JOURNAL_VERSION

    def open(self):
        """Lock and read the file; return an iterator of its records (the
        header checked and left out), decoded as they are reached.

        Read it once, to its end: then the file is repaired -- a torn
        last record truncated away with a warning -- and ready to append
        to. Corruption elsewhere raises JournalCorrupt when it is reached.
        """
        self.fd = lock_journal(self.path)
        for stale in glob.glob(glob.escape(self.path) + ".compact-*"):
            os.unlink(stale)
        return self._records(_read_all(self.fd))

    def _records(self, data):
        tail = []
        records = iter_journal(data, tail)
        try:
            head = next(records, None)
            if head is not None:
                _check_head(head)
                self.version = head["v"]
                yield from records
        except JournalCorrupt as exc:
            raise JournalCorrupt(exc.offset, f"journal {self.path}: {exc}; "
                                 f"run 'lbd journal check {self.path}'"
                                 ) from None
        end, torn = tail
        if torn:
            log.warning("journal %s: %s; truncating it (a torn write from a "
                        "crash)", self.path, torn)
            os.ftruncate(self.fd, end)
            os.fsync(self.fd)
        self.size = self.base_size = end
        if head is None:
            self.append({"k": "h", "v": JOURNAL_VERSION})
            self.sync_wanted = True

    def append(self, record, sync=False):
        """Buffer one record; ``sync``: its ack waits for an fsync."""
        self.append_json(_dumps_str(record), sync)

    def append_json(self, text, sync=False):
        """Buffer one record given as its JSON text (see append), framed
        as frame_json frames it (inline: three records a task)."""
        payload = text.encode("ascii")
        self.buf += b"%08x %s\n" % (zlib.crc32(payload), payload)
        self.fresh = True
        self.appended += 1
        if sync:
            self.sync_wanted = True

    def flush(self):
        """Write the buffer; fsync if the mode says so now.

        Returns True when every buffered record is as durable as the
        responses waiting on it need.
        """
        return self.write_out() and self.sync_for_acks()

    def write_out(self):
        """Write the buffer (no fsync); return False if the write failed."""
        try:
            while self.buf:
                written = _write(self.fd, self.buf)
                if self.since_fork is not None:
                    self.since_fork += self.buf[:written]
                del self.buf[:written]
                self.size += written
                self.unsynced = True
        except OSError as exc:
            self._fail(exc)
            return False
        return True

    def sync_for_acks(self):
        """fsync if the mode wants it before the acks; return success."""
        try:
            if self.unsynced and (self.mode == "always" or self.sync_wanted
                                  and self.mode == "submits"):
                self.sync()
            self._sync_dir()
        except OSError as exc:
            self._fail(exc)
            return False
        self.sync_wanted = self.fresh = False
        if self.failed:
            log.warning("journal %s: writing again", self.path)
            self.failed = None
        return True

    def sync(self):
        """fsync the file now if anything is unsynced."""
        if self.unsynced:
            _fsync(self.fd)
            self.unsynced = False

    def timed_sync(self):
        """The fsync_interval timer: fsync what waited; return success."""
        try:
            self.sync()
            return True
        except OSError as exc:
            self._fail(exc)
            return False

    def _fail(self, exc):
        message = f"{exc.strerror or exc}"
        if self.failed != message:
            log.error("journal %s: write failed: %s; refusing submits "
                      "until it works again", self.path, message)
        self.failed = message

    def needs_timed_sync(self):
        return self.unsynced and self.mode != "never"

    def close(self):
        if self.fd >= 0:
            try:
                self.flush()
                self.sync()
            except OSError as exc:
                log.error("journal %s: final sync failed: %s", self.path,
                          exc)
            os.close(self.fd)
            self.fd = -1

    def close_in_child(self):
        """Drop the descriptor in a forked child, writing nothing."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.buf = bytearray()

    # -- compaction ----------------------------------------------------------

    def wants_compaction(self, threshold):
        return self.since_fork is None and not self.failed and \
            self.size >= max(threshold, 2 * self.base_size)

    def snapshot_path(self, pid):
        return f"{self.path}.compact-{pid}"

    def write_snapshot(self, pid, tasks):
        """In the compaction child: write a snapshot of ``tasks``, fsync."""
        path = self.snapshot_path(pid)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            out = bytearray(encode_record({"k": "h", "v": JOURNAL_VERSION}))
            for task in tasks:
                out += encode_record({"k": "T", "t": task.state_values()})
                if len(out) > 1 << 20:
                    _write_all(fd, out)
                    out.clear()
            _write_all(fd, out)
            os.fsync(fd)
        finally:
            os.close(fd)

    def install_snapshot(self, pid):
        """In the master: append what came since the fork, swap files in.

        Crash-safe at every step: until the rename the old file is whole;
        after it the new one is.
        """
        path = self.snapshot_path(pid)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _write_all(fd, self.since_fork)
            os.fsync(fd)
            os.replace(path, self.path)
        except OSError:
            os.close(fd)
            raise
        finally:
            self.since_fork = None
        # From the rename on, the new file is the journal, whatever happens.
        old, self.fd = self.fd, fd
        os.close(old)
        self.size = self.base_size = os.fstat(fd).st_size
        self.version = JOURNAL_VERSION
        self.unsynced = False
        self.dir_unsynced = True
        try:
            self._sync_dir()
        except OSError as exc:
            self._fail(exc)     # retried by the next flush

    def _sync_dir(self):
        if self.dir_unsynced:
            fsync_dir(self.path)
            self.dir_unsynced = False

    def abandon_snapshot(self, pid):
        self.since_fork = None
        try:
            os.unlink(self.snapshot_path(pid))
        except FileNotFoundError:
            pass


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


###############################################################################
# Plugins #####################################################################
###############################################################################
#
# A plugin is named by a spec, "path/to/file.py:factory" or
# "package.module:factory" (":plugin" when omitted). factory(options) is
# called with the plugin's table from [plugins] options and returns:
#
#   a policy: a callable (snapshot, bounds) -> desired worker count, where
#       bounds is {"min", "max", "current", "target"};
#   a sink: an object with any of on_event(event), on_snapshot(snapshot)
#       and close().
#
# Each plugin runs in a process of its own, forked from the master and
# fed JSON lines: plugin code never runs in the master, so a plugin that
# raises, hangs or crashes cannot stop dispatch. A policy that raises or
# does not answer within [plugins] timeout is disabled and the default
# policy takes over; messages for a plugin that falls behind by
# [plugins] buffer_bytes are dropped and counted. SIGHUP reloads them all.

PLUGIN_API = 1


def plugin_name(spec):
    """The name a plugin's options are filed under: file or module name."""
    target = spec.rpartition(":")[0] or spec
    if target.endswith(".py"):
        return os.path.splitext(os.path.basename(target))[0]
    return target.rpartition(".")[2]


def load_plugin(spec, options):
    """Import a plugin spec and call its factory; return the plugin."""
    target, sep, attr = spec.rpartition(":")
    if not sep:
        target, attr = spec, "plugin"
    if target.endswith(".py"):
        name = f"lbd_plugin_{plugin_name(spec)}"
        module_spec = importlib.util.spec_from_file_location(name, target)
        if module_spec is None:
            raise ImportError(f"cannot load plugin file {target}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    return getattr(module, attr)(options)


def _plugin_main(sock, kind, spec, options):
    """Run one plugin on its messages; return the exit status."""
    sock.setblocking(True)

    def send(obj):
        sock.sendall(dumps(obj))

    try:
        plugin = load_plugin(spec, options)
        for line in sock.makefile("rb"):
            msg = json.loads(line)
            if msg["t"] == "stop":
                break
            if kind == "policy":
                send({"t": "want", "n": plugin(msg["s"], msg["b"]),
                      "seq": msg["seq"]})
                continue
            hook = getattr(plugin, "on_snapshot" if msg["t"] == "snap"
                           else "on_event", None)
            if hook is not None:
                hook(msg["s"] if msg["t"] == "snap" else msg["e"])
        close = getattr(plugin, "close", None)
        if close is not None:
            close()
        return 0
    except BaseException as exc:  # a plugin may raise anything
        try:
            send({"t": "error", "message": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()[-8000:]})
        except (OSError, TypeError, ValueError):
            pass
        return 1


class PluginHost:
    """The master's record of one plugin and the process it runs in."""

    __slots__ = ("spec", "kind", "pid", "sock", "outbuf", "inbuf", "writing",
                 "dropped", "error", "disabled", "seq", "asked_at")

    def __init__(self, spec, kind):
        self.spec = spec
        self.kind = kind
        self.pid = None
        self.sock = None
        self.outbuf = bytearray()
        self.inbuf = b""
        self.writing = False
        self.dropped = 0
        self.error = None
        self.disabled = False
        self.seq = 0
        self.asked_at = None        # a policy question not yet answered

    def view(self):
        return {"spec": self.spec, "kind": self.kind, "pid": self.pid,
                "disabled": self.disabled, "error": self.error,
                "dropped": self.dropped}


###############################################################################
# systemd #####################################################################
###############################################################################
#
# The notify protocol without libsystemd: one datagram of newline-separated
# KEY=VALUE lines to $NOTIFY_SOCKET (a path, or "@name" for an abstract
# address). Socket activation: $LISTEN_PID/$LISTEN_FDS hand us fd 3.

SD_LISTEN_FDS_START = 3


class Notifier:
    """Sends sd_notify messages; does nothing when not run by systemd."""

    def __init__(self, environ=os.environ):
        self.address = _notify_address(environ.get("NOTIFY_SOCKET", ""))
        self.sock = None
        self.failed = False
        if self.address is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM |
                                      socket.SOCK_CLOEXEC)
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        self.watchdog = None    # seconds between pings
        if usec.isdigit() and int(usec) > 0 and (
                not pid or pid == str(os.getpid())):
            self.watchdog = int(usec) / 2e6

    def send(self, **fields):
        """Send KEY=VALUE lines; return True if a datagram went out."""
        if self.sock is None:
            return False
        text = "\n".join(f"{k}={v}" for k, v in fields.items())
        try:
            self.sock.sendto(text.encode(), self.address)
            return True
        except OSError as exc:
            if not self.failed:
                log.warning("sd_notify to %r failed: %s", self.address, exc)
                self.failed = True
            return False

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _notify_address(value):
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def activated_socket(environ=os.environ):
    """Return the listening socket systemd passed us, or None.

    Raises ConfigError if the passed descriptor is not a listening Unix
    stream socket.
    """
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = environ.get("LISTEN_FDS", "")
    if not count.isdigit() or int(count) < 1:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(name, None)     # not for our children
    fd = SD_LISTEN_FDS_START
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        raise ConfigError(f"socket activation: fd {fd} is not a socket")
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or \
            not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ConfigError(f"socket activation: fd {fd} is not a listening "
                          "Unix stream socket")
    os.set_inheritable(fd, False)
    return sock


def peer_credentials(sock):
    """Return (pid, uid, gid) of the process at the other end of ``sock``."""
    size = struct.calcsize("3i")
    return struct.unpack("3i", sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, size))


###############################################################################
# Master: records and helpers #################################################
###############################################################################


class Worker:
    """The master's record of one forked worker process."""

    __slots__ = (
        "id", "pid", "sock", "state", "task", "tasks_done", "inbuf",
        "outbuf", "started_mono", "ready", "last_beat", "attempt_deadline",
        "kill_reason", "kill_at", "check_entry", "exit", "writing",
        "boot_error", "attempt_started", "generation",
    )

    def __init__(self, wid, pid, sock, now):
        self.id = wid
        self.pid = pid
        self.sock = sock
        self.state = None
        self.task = None
        self.tasks_done = 0
        self.inbuf = b""
        self.outbuf = bytearray()
        self.started_mono = self.last_beat = now
        self.ready = False
        self.attempt_deadline = None
        self.kill_reason = None
        self.kill_at = None
        self.check_entry = None
        self.exit = None
        self.writing = False    # registered for EVENT_WRITE too
        self.boot_error = None  # what the worker said when it could not boot
        self.attempt_started = None
        self.generation = 0

    def view(self, now=None):
        running = None
        if self.task is not None and now is not None:
            running = round(now - self.attempt_started, 3)
        return {"id": self.id, "pid": self.pid, "state": self.state,
                "task": self.task.id if self.task else None,
                "tasks_done": self.tasks_done, "running_for": running,
                "generation": self.generation}


class Conn:
    """One client connection: buffers and the responses owed, in order."""

    __slots__ = ("sock", "fd", "inbuf", "outbuf", "slots", "eof",
                 "closing", "events", "waits", "lines", "next_line")

    def __init__(self, sock):
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = b""
        self.outbuf = bytearray()
        self.slots = collections.deque()  # [response or None], in order
        self.eof = False        # the peer will send nothing more
        self.closing = False    # close once every owed response is out
        self.events = selectors.EVENT_READ   # as registered now
        self.waits = {}         # parked waits: id(slot) -> (tid, slot, timer)
        self.lines = None       # complete request lines not handled yet
        self.next_line = 0      # the first of them not handled


COUNTERS = (
    "submitted", "done", "retried", "dead", "expired", "cancelled",
    "duplicates", "stale_results", "worker_starts", "worker_crashes",
    "boot_failures", "timeouts", "hangs",
)


def _exit_info(status, rusage):
    code = os.waitstatus_to_exitcode(status)
    info = {"exit_code": code if code >= 0 else None, "signal": None,
            "max_rss_kb": rusage.ru_maxrss}
    if code < 0:
        try:
            info["signal"] = signal.Signals(-code).name
        except ValueError:
            info["signal"] = str(-code)
    return info


def _describe_exit(info):
    if info["signal"]:
        hint = " (perhaps out of memory?)" if info["signal"] == "SIGKILL" \
            else ""
        return f"killed by {info['signal']}{hint}"
    return f"exited with code {info['exit_code']}"


def _send_buffered(selector, peer, handler):
    """Send what ``peer.outbuf`` holds without blocking; return False if
    the peer is gone. Write interest is registered (``peer.writing``)
    exactly while something is left to send.
    """
    try:
        sent = peer.sock.send(peer.outbuf)
        del peer.outbuf[:sent]
    except (BlockingIOError, InterruptedError):
        pass
    except OSError:
        return False
    writing = bool(peer.outbuf)
    if writing != peer.writing:
        events = selectors.EVENT_READ | (
            selectors.EVENT_WRITE if writing else 0)
        selector.modify(peer.sock, events, (handler, peer))
        peer.writing = writing
    return True


def _make_journal(jcfg):
    if jcfg.path == "none":
        return None
    return Journal(jcfg.path or default_journal_path(), jcfg.fsync,
                   jcfg.fsync_interval)


def _ignore_signal(_signum, _frame):
    """The signal's byte reaches the loop through the wakeup fd."""


def _signal_pid(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


_libc = None


def _load_libc():
    """Load libc for prctl, in the master, before any fork: a child that
    imported ctypes itself spent milliseconds doing it."""
    global _libc
    if _libc is None:
        try:
            import ctypes
            _libc = ctypes.CDLL(None, use_errno=True)
        except (OSError, AttributeError):
            _libc = False
    return _libc


def _die_with_parent(parent):
    """Have the kernel SIGKILL this worker when the master dies (Linux).

    The heartbeat thread notices a dead master too, but not while the
    whole process is stopped or wedged; this covers those.
    """
    libc = _load_libc()
    try:
        if libc:
            libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except AttributeError:
        return
    if os.getppid() != parent:              # it died before the prctl
        os._exit(1)


def _redirect_stdin():
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)


def _refuse(sock, code, message):
    try:
        sock.setblocking(False)
        sock.send(dumps({"ok": False, "error": code, "message": message}))
    except OSError:
        pass
    sock.close()


def _group_id(name):
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise ConfigError(f"no group {name!r} for server.socket_group"
                          ) from None


def _prepare_socket_dir(path):
    """Create the default private socket directory, or check it is ours."""
    folder = os.path.dirname(path) or "."
    if folder != f"/tmp/lbd-{os.getuid()}":
        return
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        info = os.lstat(folder)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise ConfigError(f"{folder} exists and is not a directory "
                              "owned by this user; use --socket") from None


def _remove_stale_socket(path):
    """Refuse if a live daemon answers at ``path``; remove a dead socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        log.info("removed stale socket %s", path)
        return
    except OSError as exc:
        raise ConfigError(f"cannot check socket {path}: {exc}") from None
    finally:
        probe.close()
    raise ConfigError(f"another lbd daemon is already serving on {path}")


###############################################################################
# Master: connections #########################################################
###############################################################################


class _Connections:
    """The control socket and its clients: accept, read, answer in order."""

    # -- the listening socket ------------------------------------------------

    def _listen(self):
        """Bind (or adopt systemd's socket) with its mode set before listen."""
        sock = activated_socket()
        if sock is not None:
            self.activated = True
            self.socket_path = sock.getsockname() or "(activated)"
            log.info("using the socket systemd passed: %s", self.socket_path)
        else:
            sock = self._bind(self.socket_path)
        sock.setblocking(False)
        self.listener = sock
        self.selector.register(sock, selectors.EVENT_READ,
                               (self._on_accept, None))

    def _bind(self, path):
        scfg = self.cfg["server"]
        _prepare_socket_dir(path)
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, scfg.socket_mode)   # before listen: no window
            if scfg.socket_group:
                os.chown(path, -1, _group_id(scfg.socket_group))
            sock.listen(128)
        except (OSError, ConfigError) as exc:
            sock.close()
            if os.path.exists(path) and stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)     # ours, bound a moment ago
            raise ConfigError(f"cannot listen on {path}: {exc}") from None
        return sock

    def _close_listener(self):
        if self.listener is None:
            return
        self.selector.unregister(self.listener)
        self.listener.close()
        self.listener = None
        if self.activated:
            return          # systemd's socket: never unlink it
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    def _on_accept(self, _obj, _mask):
        for _ in range(64):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: log, keep serving
                log.warning("accept failed: %s", exc)
                return
            if len(self.conns) >= self.cfg["server"].max_clients:
                _refuse(sock, TOO_MANY_CLIENTS, "too many open connections")
                continue
            if not self._peer_allowed(sock):
                continue
            sock.setblocking(False)
            conn = Conn(sock)
            self.conns[conn.fd] = conn
            self.selector.register(sock, selectors.EVENT_READ,
                                   (self._on_conn, conn))

    def _peer_allowed(self, sock):
        """Check SO_PEERCRED against allowed_uids/gids; refuse the rest."""
        scfg = self.cfg["server"]
        if not scfg.allowed_uids and not scfg.allowed_gids:
            return True
        pid, uid, gid = peer_credentials(sock)
        if uid == os.getuid() or uid in scfg.allowed_uids or \
                gid in scfg.allowed_gids:
            return True
        self.refused += 1
        now = self.clock()
        if now >= self.refusal_logged + 10.0:
            log.warning("refused a connection from pid %d uid %d gid %d "
                        "(%d refused so far)", pid, uid, gid, self.refused)
            self.refusal_logged = now
        _refuse(sock, FORBIDDEN, "this user may not use the daemon")
        return False

    # -- client connections --------------------------------------------------

    def _on_conn(self, conn, mask):
        if conn.sock is None:   # closed by this turn's flush of answers
            return
        if mask & selectors.EVENT_WRITE:
            self._send_conn(conn)   # only what a commit already let out
            if conn.sock is None:       # the flush found it gone
                return
        if mask & selectors.EVENT_READ and not conn.eof:
            self._read_conn(conn)

    def _read_conn(self, conn):
        if conn.lines is not None:  # read more once these are handled
            return
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            conn.eof = conn.closing = True
            line, conn.inbuf = conn.inbuf, b""
            if line.strip():   # a last request without its newline
                self._handle_line(conn, line)
            # Nobody will read a parked answer on a closed connection, and
            # holding it open until the task ends would pin its fd.
            for tid, slot in self._drop_waits(conn):
                self._answer_parked(conn, slot, {
                    "ok": False, "error": TIMEOUT, "message":
                    f"the client closed its end before task {tid} ended"})
            self._update_events(conn)
            self._maybe_close(conn)
            return
        limit = self.cfg["server"].max_request_bytes
        lines = (conn.inbuf + data).split(b"\n")
        conn.inbuf = lines.pop()
        if len(conn.inbuf) > limit:
            lines.append(conn.inbuf)    # _handle_lines refuses it in turn
            conn.inbuf = b""
        conn.lines, conn.next_line = lines, 0
        self._handle_lines(conn)

    def _handle_lines(self, conn):
        """Handle up to LINES_PER_TURN of the connection's lines.

        A client pipelining thousands of requests would otherwise hold
        the loop for the whole batch while workers sit idle; what is left
        waits in ``conn.lines`` for the next turn (``self.busy_conns``).
        """
        lines, start = conn.lines, conn.next_line
        end = min(len(lines), start + LINES_PER_TURN)
        limit = self.cfg["server"].max_request_bytes
        for index in range(start, end):
            line = lines[index]
            if len(line) > limit:
                self._too_large(conn, limit)
                end = len(lines)
                break
            if line.strip():
                self._handle_line(conn, line)
        if end < len(lines):
            conn.next_line = end
            self.busy_conns.add(conn)
        else:
            conn.lines = None
            self.busy_conns.discard(conn)

    def _too_large(self, conn, limit):
        slot = [None]
        conn.slots.append(slot)
        self._respond(conn, slot, {"ok": False, "error": TOO_LARGE,
                                   "message": f"request line longer than "
                                   f"{limit} bytes; closing"})
        conn.eof = conn.closing = True
        conn.inbuf = b""
        self._update_events(conn)

    def _handle_line(self, conn, line):
        slot = [None]
        conn.slots.append(slot)
        request = None
        journal = self.journal
        try:
            try:
                request = _strict_decode(line.decode("utf-8"))
            except (ValueError, RecursionError):
                request = loads(line)   # raises, saying what is wrong
            if request.__class__ is not dict:
                raise _bad("a request must be a JSON object")
            # Cheap bounds first: fewer brackets than the limit cannot
            # nest past it (brackets inside strings only make this
            # cautious), and a line shorter than the limit has fewer.
            if len(line) > MAX_NESTING and line.count(b"[") + \
                    line.count(b"{") > MAX_NESTING and \
                    not nesting_ok(request):
                request = None
                raise _bad(f"request nested deeper than {MAX_NESTING} "
                           "levels")
            op = request.get("op")
            entry = self._ops.get(op) if op.__class__ is str else None
            if entry is None:
                raise RequestError(UNKNOWN_OP, f"unknown op {op!r}"[:200])
            method, allowed = entry
            if not allowed.issuperset(request):
                check_fields(request, allowed)
            if journal is None:
                response = method(conn, request, slot)
            else:
                before = journal.appended
                response = method(conn, request, slot)
                if journal.appended != before:
                    self.journal_deps.add(conn)
        except RequestError as exc:
            response = {"ok": False, "error": exc.code,
                        "message": exc.message}
        except Exception as exc:
            log.exception("internal error answering a request")
            response = {"ok": False, "error": INTERNAL,
                        "message": f"internal error: {exc}"[:500]}
        if response is None:   # parked: answered later through the slot
            slot.append(request.get("req"))
            return
        self._respond(conn, slot, response, request.get("req", NO_REQ)
                      if request.__class__ is dict else NO_REQ)

    def _respond(self, conn, slot, response, req=NO_REQ):
        slot[0] = encode_response(response, req)
        self.dirty.add(conn)

    def _answer_parked(self, conn, slot, response):
        """Fill a parked request's slot (its 'req' is kept in slot[1])."""
        req = slot[1] if len(slot) > 1 and slot[1] is not None else NO_REQ
        slot[0] = encode_response(response, req)
        self.dirty.add(conn)
        self.journal_deps.add(conn)

    def _flush_conn(self, conn):
        """Release the answered slots to the output, in order, and send.

        Only _flush_answers (after its commit) and shutdown call this: an
        answer leaves its slot once what it tells of is durable.
        """
        if conn.sock is None:
            return
        slots = conn.slots
        while slots and slots[0][0] is not None:
            conn.outbuf += slots.popleft()[0]
        self._send_conn(conn)

    def _send_conn(self, conn):
        """Send what the connection's output holds, without blocking."""
        if conn.sock is None:
            return
        if conn.outbuf:
            try:
                sent = conn.sock.send(conn.outbuf)
                del conn.outbuf[:sent]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._close_conn(conn)
                return
        if len(conn.outbuf) > self.cfg["server"].max_output_bytes:
            log.warning("client fd %d does not read its responses "
                        "(%d bytes owed); disconnecting", conn.fd,
                        len(conn.outbuf))
            self._close_conn(conn)
            return
        self._update_events(conn)
        self._maybe_close(conn)

    def _update_events(self, conn):
        if conn.sock is None:
            return
        events = 0 if conn.eof else selectors.EVENT_READ
        if conn.outbuf:
            events |= selectors.EVENT_WRITE
        if events == conn.events:
            return
        data = (self._on_conn, conn)
        if not conn.events:
            self.selector.register(conn.sock, events, data)
        elif not events:
            self.selector.unregister(conn.sock)
        else:
            self.selector.modify(conn.sock, events, data)
        conn.events = events

    def _maybe_close(self, conn):
        if conn.closing and not conn.outbuf and not conn.slots:
            self._close_conn(conn)

    def _drop_waits(self, conn):
        """Forget a connection's parked waits; return their slots."""
        slots = []
        for tid, slot, timer in conn.waits.values():
            self.timers.remove(timer)
            parked = self.waiters.get(tid)
            if parked:
                parked[:] = [(c, s) for c, s in parked if s is not slot]
                if not parked:
                    del self.waiters[tid]
            slots.append((tid, slot))
        conn.waits.clear()
        return slots

    def _close_conn(self, conn):
        if conn.sock is None:
            return
        self._drop_waits(conn)
        if conn.events:
            self.selector.unregister(conn.sock)
        conn.sock.close()
        conn.sock = None
        self.conns.pop(conn.fd, None)
        self.dirty.discard(conn)
        self.busy_conns.discard(conn)


###############################################################################
# Master: journal #############################################################
###############################################################################


class _Journaling:
    """Group commit, recovery and compaction, as the loop drives them."""

    # -- the journal ---------------------------------------------------------

    def _record(self, record, sync=False):
        if self.journal is not None:
            self.journal.append(record, sync)

    def _record_json(self, text, sync=False):
        if self.journal is not None:
            self.journal.append_json(text, sync)

    def _flush_journal(self):
        """Write and fsync the journal; on failure arm a retry."""
        return self._journal_done(self.journal.flush())

    def _journal_done(self, ok):
        """After a commit: arm a retry, or release what waited on it."""
        journal = self.journal
        if not ok:
            if self.retry_timer is None:
                self.retry_timer = self.call_at(self.clock() + 1.0,
                                                self._journal_retry)
            return False
        if self.held:
            held, self.held = self.held, set()
            self.dirty |= held
        self._arm_timed_sync()
        return True

    def _arm_timed_sync(self):
        journal = self.journal
        if self.sync_timer is None and journal.needs_timed_sync():
            self.sync_timer = self.call_at(self.clock() + journal.interval,
                                           self._timed_sync)

    def _journal_retry(self, _arg=None):
        self.retry_timer = None
        if self.journal.failed:
            self._flush_journal()

    def _timed_sync(self, _arg=None):
        self.sync_timer = None
        if not self.journal.timed_sync() and self.retry_timer is None:
            self.retry_timer = self.call_at(self.clock() + 1.0,
                                            self._journal_retry)

    def _check_journal(self):
        if self.journal is not None and self.journal.failed:
            raise RequestError(JOURNAL_ERROR, "the journal cannot be written "
                               f"({self.journal.failed}); refusing until it "
                               "can")

    def _recover(self):
        """Replay the journal into the queues, before anyone connects."""
        if self.journal is None:
            return
        started = time.monotonic()
        gc.disable()    # replay makes many objects and no cyclic garbage
        try:
            self._replay_into_queues()
        finally:
            gc.enable()
        # What was recovered lives long: keep it out of every later
        # collection's scan.
        gc.freeze()
        log.info("journal %s replayed in %.3f s", self.journal.path,
                 time.monotonic() - started)

    def _replay_into_queues(self):
        replayed = replay_tasks(self.journal.open())
        now, wall = self.clock(), self.wall()
        tcfg = self.cfg["tasks"]
        keyed_ttl = max(tcfg.result_ttl, tcfg.dedupe_window)
        finished, live = [], []
        if replayed:
            self._next_seq = max(self._next_seq, next(reversed(replayed)) + 1)
        for task in replayed.values():
            if task.state not in TERMINAL:
                live.append(task)
            elif task.finished_at + (tcfg.result_ttl if task.key is None
                                     else keyed_ttl) > wall:
                finished.append(task)
        # The kept results first, oldest first: the retention deques must
        # stay in drop order, and settling the live ones may add to them.
        for task in sorted(finished, key=lambda t: t.finished_at):
            self._retain_recovered(task, now, wall)
        for task in live:
            self.tasks[task.id] = task
            if task.key is not None:
                self.keys[task.key] = task.id
            self._schedule_recovered(task, now, wall)
        log.info("journal %s: %d task(s), %d live, %d finished kept",
                 self.journal.path, len(replayed),
                 len(self.tasks) - len(finished), len(finished))

    def _schedule_recovered(self, task, now, wall):
        if task.deadline_at is not None:
            task.expires = now + (task.deadline_at - wall)
        if task.state is _RUNNING:
            # The attempt ran when the daemon died: it counts, and the task
            # goes back in line at once (at-least-once).
            self.running_count += 1
            self._attempt_failed(task, interrupted_error(
                task.state_dict()), backoff=False)
            return
        if task.expires is not None:
            task.deadline_entry = self.deadlines.push(task.expires, task)
        if task.state is _DELAYED:
            task.delay_entry = self.delayed.push(now + (task.run_at - wall),
                                                 task)
        else:
            self._enqueue(task, now)

    def _retain_recovered(self, task, now, wall):
        task.finished_mono = now - (wall - task.finished_at)
        self.tasks[task.id] = task
        if task.key is not None and now - task.finished_mono < \
                self.cfg["tasks"].dedupe_window:
            self.keys[task.key] = task.id
        self._retain(task)

    def _start_compaction(self):
        """Fork a child that writes a snapshot of the live state."""
        journal = self.journal
        journal.since_fork = bytearray()

        def snapshot(_sock, _master):
            journal.write_snapshot(os.getpid(), self.tasks.values())
            return 0
        pid, sock = self._fork_child(snapshot)
        sock.close()
        self.compactor = pid
        log.info("journal %s is %d bytes: compacting in child pid %d",
                 journal.path, journal.size, pid)

    def _compaction_done(self, status):
        pid, self.compactor = self.compactor, None
        journal = self.journal
        if os.waitstatus_to_exitcode(status) == 0:
            try:
                journal.install_snapshot(pid)
                log.info("journal %s compacted to %d bytes", journal.path,
                         journal.size)
                return
            except OSError as exc:
                log.error("journal compaction failed: %s", exc)
        else:
            log.error("journal compaction child %d failed (status %d)", pid,
                      status)
        journal.abandon_snapshot(pid)
        self.compact_after = self.clock() + 30.0

    def _stop_compactor(self):
        if self.compactor is not None:
            _signal_pid(self.compactor, signal.SIGKILL)
            try:
                os.waitpid(self.compactor, 0)
            except ChildProcessError:
                pass
            self.journal.abandon_snapshot(self.compactor)
            self.compactor = None


###############################################################################
# Master: tasks ###############################################################
###############################################################################


_RESULT_KINDS = frozenset({"ok", "err"})
_END_COUNTERS = {TaskState.DONE: "done", TaskState.DEAD: "dead",
                 TaskState.EXPIRED: "expired",
                 TaskState.CANCELLED: "cancelled"}


class _Tasks:
    """Task state changes, retries, retention and dispatch."""

    # -- tasks ---------------------------------------------------------------

    def _task_to(self, task, new):
        """The one way a task's state changes: table, counts, events."""
        old = task.state
        if new not in TASK_TRANSITIONS[old]:
            transition(TASK_TRANSITIONS, task, new)     # raises
        task.state = new
        if old is _QUEUED:
            by_priority = self.ready_by_priority
            left = by_priority[task.priority] - 1
            if left:
                by_priority[task.priority] = left
            else:
                del by_priority[task.priority]
        elif old is _RUNNING:
            self.running_count -= 1
        if new is _RUNNING:
            self.running_count += 1
        if self.plugins:
            self._emit({"kind": "task", "id": task.id, "state": new,
                        "from": old, "handler": task.handler})
        return old

    def new_task(self, spec):
        """Create a task from validated fields and queue or delay it."""
        seq = self._next_seq
        self._next_seq += 1
        task = Task(seq, spec, self.wall())
        self.tasks[task.id] = task
        now = self.clock()
        if task.key is not None:
            self.keys[task.key] = task.id
        if task.deadline_at is not None:
            task.expires = now + spec["deadline"]
            task.deadline_entry = self.deadlines.push(task.expires, task)
        if task.run_at is not None and spec["delay"] > 0:
            self._task_to(task, _DELAYED)
            task.delay_entry = self.delayed.push(now + spec["delay"], task)
        else:
            self._task_to(task, _QUEUED)
            self._enqueue(task, now)
        self.counters["submitted"] += 1
        self.arrived += 1
        self.metrics_stale = True
        journal = self.journal
        if journal is not None and journal.version < 2:
            # An older lbd's journal: its own kind of submit record.
            journal.append({"k": "s", "t": task.submit_record()}, True)
        else:
            self._record_json(task.submit_json(), True)
        return task

    def _finish(self, task, state, result=None, error=None, attempt=None):
        """Move ``task`` to a terminal state and answer its waiters.

        ``attempt``: the error of the failed attempt that ended it, if any.
        """
        old = self._task_to(task, state)
        task.finished_at = self.wall()
        task.finished_mono = self.clock()
        task.result = result
        task.error = error
        if old is not _RUNNING:    # a running task is in no heap
            self.ready.remove_task(task)
            self.delayed.remove(task.delay_entry)
            self.deadlines.remove(task.deadline_entry)
            task.entry = task.delay_entry = task.deadline_entry = None
        self.counters[_END_COUNTERS[state]] += 1
        if state is _DONE:
            self._record_json('{"k":"d","id":%d,"r":%s,"at":%r}' % (
                task.seq, _dumps_str(result), task.finished_at))
        else:
            record = {"k": "x", "id": task.seq, "st": state, "e": error,
                      "at": task.finished_at}
            if attempt is not None:
                record["le"] = attempt
                record["crash"] = task.crashes
            self._record(record, sync=state is TaskState.CANCELLED)
        waiters = self.waiters.pop(task.id, None)
        if waiters:
            answer = '{"ok":true,"task":' + task.view_json()
            for conn, slot in waiters:
                parked = conn.waits.pop(id(slot), None)
                if parked is not None:
                    self.timers.remove(parked[2])
                self._answer_parked(conn, slot, answer)
        self._retain(task)

    def _retain(self, task):
        """Keep a finished task for result_ttl, then let _purge drop it.

        A task with a key is kept for max(result_ttl, dedupe_window), so
        its key dedupes for the whole window. Each deque has one TTL, so
        each stays in drop order.
        """
        tcfg = self.cfg["tasks"]
        if task.key is None:
            queue, ttl = self.retention, tcfg.result_ttl
        else:
            queue = self.keyed_retention
            ttl = max(tcfg.result_ttl, tcfg.dedupe_window)
        expiry = task.finished_mono + ttl
        queue.append((expiry, task.id))
        timer = self.purge_timer
        if timer is None or timer[2] is None or timer[0] > expiry:
            self._arm_purge()

    def _arm_purge(self):
        heads = [q[0][0] for q in (self.retention, self.keyed_retention) if q]
        if not heads:
            return
        timer = self.purge_timer
        if timer is not None and timer[2] is not None and \
                timer[0] <= min(heads):
            return
        self.timers.remove(timer)
        self.purge_timer = self.call_at(min(heads), self._purge)

    def _purge(self, _arg=None):
        """Forget finished tasks past their retention and their keys."""
        self.purge_timer = None
        now = self.clock()
        for queue in (self.retention, self.keyed_retention):
            while queue and queue[0][0] <= now:
                task = self.tasks.pop(queue.popleft()[1], None)
                if task is not None and self.keys.get(task.key) == task.id:
                    del self.keys[task.key]
        self._arm_purge()

    def find_duplicate(self, key):
        """Return the task that makes a submit with ``key`` a duplicate."""
        task = self.tasks.get(self.keys.get(key))
        if task is None:
            return None
        if task.state in TERMINAL and (self.clock() - task.finished_mono
                                       >= self.cfg["tasks"].dedupe_window):
            return None
        return task

    def _requeue(self, task):
        self._task_to(task, TaskState.QUEUED)
        self._enqueue(task)
        if task.expires is not None:
            task.deadline_entry = self.deadlines.push(task.expires, task)

    def _attempt_failed(self, task, error, crash=False, backoff=True):
        """Retry ``task`` after a failed attempt, or end it."""
        task.errors = [*task.errors, error]
        task.error = error
        if crash:
            task.crashes += 1
        tcfg = self.cfg["tasks"]
        final = None
        if crash and task.crashes >= tcfg.max_crashes:
            final = (TaskState.DEAD, dict(error, reason="poison", message=(
                f"quarantined: killed its worker {task.crashes} times; "
                f"last: {error['message']}")))
        elif error["reason"] == "exception" and not task.retry_on_error:
            final = (TaskState.DEAD, error)
        elif error["reason"] == "unknown_handler":
            final = (TaskState.DEAD, error)
        elif task.attempts >= task.max_attempts:
            final = (TaskState.DEAD, error)
        elif task.expires is not None and self.clock() >= task.expires:
            final = (TaskState.EXPIRED, dict(error, reason="expired", message=(
                f"deadline passed after attempt {task.attempts} failed: "
                f"{error['message']}")))
        if final:
            self._finish(task, final[0], error=final[1], attempt=error)
            return
        self.counters["retried"] += 1
        wait = backoff_delay(task.attempts, tcfg.retry_backoff,
                             tcfg.retry_backoff_max) if backoff else 0.0
        if wait <= 0:
            self._record({"k": "f", "id": task.seq, "e": error,
                          "crash": crash, "run_at": None})
            self._requeue(task)
            return
        task.run_at = self.wall() + wait    # one reading: journal == memory
        self._record({"k": "f", "id": task.seq, "e": error, "crash": crash,
                      "run_at": task.run_at})
        self._task_to(task, TaskState.DELAYED)
        task.delay_entry = self.delayed.push(self.clock() + wait, task)
        if task.expires is not None:
            task.deadline_entry = self.deadlines.push(task.expires, task)

    # -- dispatch ------------------------------------------------------------

    def _dispatch(self):
        if self.stopping:
            return
        idle, ready = self.idle, self.ready
        while idle and ready:
            worker = idle.pop()
            if worker.state is not _IDLE:
                continue
            self._start_attempt(worker, ready.pop())

    def _start_attempt(self, worker, task):
        if task.deadline_entry is not None:
            self.deadlines.remove(task.deadline_entry)
            task.deadline_entry = None
        self._task_to(task, _RUNNING)
        self._worker_to(worker, _BUSY)
        attempt = task.attempts = task.attempts + 1
        started = task.started_at = self.wall()
        wid = task.worker = worker.id
        worker.task = task
        now = worker.attempt_started = self.clock()
        self.queue_wait.observe(now - task.queued_mono)
        deadline = worker.attempt_deadline = now + task.timeout
        self._record_json('{"k":"r","id":%d,"a":%d,"w":%d,"at":%r}' % (
            task.seq, attempt, wid, started))
        self._send_json(worker, _RUN_JSON % (
            task.id, attempt, task.handler,
            _dumps_str(task.args) if task.args else "[]",
            _dumps_str(task.kwargs) if task.kwargs else "{}", task.priority,
            "null" if task.deadline_at is None else repr(task.deadline_at)))
        self._arm_check(worker, deadline)


###############################################################################
# Master: workers #############################################################
###############################################################################


class _Workers:
    """Forking workers and handling what they say."""

    # -- workers: spawning ---------------------------------------------------

    def _maintain_pool(self):
        """Start or retire workers until the pool matches the target."""
        if self.stopping:
            return
        live = [w for w in self.workers.values()
                if w.state in LIVE_WORKER_STATES and
                w.generation == self.generation]
        surplus = len(live) - self.target
        if surplus > 0:
            self._retire_some(live, surplus)
            return
        for _ in range(-surplus):
            if self.clock() < self.spawn_after:
                if self.spawn_timer is None:
                    self.spawn_timer = self.call_at(
                        self.spawn_after, self._spawn_due)
                return
            self._spawn()

    def _spawn_due(self, _arg=None):
        self.spawn_timer = None
        self._maintain_pool()

    def _spawn(self):
        wcfg = self.cfg["workers"]
        pid, parent_sock = self._fork_child(
            lambda sock, master: _worker_main(sock, wcfg.handlers,
                                              wcfg.heartbeat_interval,
                                              master))
        worker = Worker(self._next_wid, pid, parent_sock, self.clock())
        worker.generation = self.generation
        self._next_wid += 1
        self._worker_to(worker, WorkerState.STARTING)
        self.workers[worker.id] = worker
        self.by_pid[pid] = worker
        self.selector.register(parent_sock, selectors.EVENT_READ,
                               (self._on_worker, worker))
        self.counters["worker_starts"] += 1
        self._arm_check(worker, worker.started_mono + wcfg.start_timeout)
        log.debug("worker %d started, pid %d", worker.id, pid)
        return worker

    def _fork_child(self, run):
        """Fork a child that runs ``run(sock, master_pid)``, then exits.

        The child dies with the master, closes everything the master
        holds, reads /dev/null, and exits with run's return value; it
        never returns here. Returns (pid, the master's end of the child's
        socketpair).
        """
        parent_sock, child_sock = socket.socketpair()
        master = os.getpid()
        _load_libc()
        pid = self._fork()
        if pid == 0:
            status = 1
            try:
                # The master's descriptors first: until they are closed
                # this child holds the journal's lock, and a master killed
                # now must be restartable at once.
                parent_sock.close()
                self._close_in_child()
                _die_with_parent(master)
                _redirect_stdin()
                status = run(child_sock, master)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        child_sock.close()
        parent_sock.setblocking(False)
        return pid, parent_sock

    def _fork(self):
        """fork() with the master's signals blocked across it.

        Until the child has reset its handlers it would run the master's,
        whose wakeup fd is the master's own socket: a SIGTERM sent to a
        new worker would reach the master as a second SIGTERM. Blocked,
        such a signal waits in the child until its handlers are reset.
        """
        handled = list(self._signals)
        old = signal.pthread_sigmask(signal.SIG_BLOCK, handled)
        try:
            pid = os.fork()
            if pid == 0:
                _reset_child_signals(handled)
                gc.set_threshold(*_GC_DEFAULT)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return pid

    def _close_in_child(self):
        """Close, in a fresh child, every descriptor the master holds."""
        for obj in (self.listener, self.wake_r, self.wake_w):
            if obj is not None:
                obj.close()
        for worker in self.workers.values():
            if worker.sock is not None:
                worker.sock.close()
        for conn in self.conns.values():
            conn.sock.close()
        for host in self.plugins:
            if host.sock is not None:
                host.sock.close()
        self.notifier.close()
        if self.journal is not None:
            self.journal.close_in_child()
        self.selector.close()
        logging.getLogger().handlers.clear()
        logging.basicConfig(
            level=log.getEffectiveLevel(),
            format="%(asctime)s lbd-worker[%(process)d] %(levelname)s "
                   "%(message)s")

    # -- workers: messages ---------------------------------------------------

    def _send(self, worker, msg):
        """Queue a message; _before_sleep sends it after the journal."""
        self._send_json(worker, _dumps_str(msg))

    def _send_json(self, worker, text):
        """Queue a message given as JSON text (see _send)."""
        if worker.sock is None or worker.exit is not None:
            return
        worker.outbuf += text.encode("ascii") + b"\n"
        self.worker_dirty.add(worker)

    def _flush_worker(self, worker):
        if worker.sock is None or not worker.outbuf:
            return
        if not _send_buffered(self.selector, worker, self._on_worker):
            self._worker_eof(worker)

    def _on_worker(self, worker, mask):
        if mask & selectors.EVENT_WRITE:
            self._flush_worker(worker)
            if worker.sock is None:
                return
        if not mask & selectors.EVENT_READ:
            return
        try:
            data = worker.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._worker_eof(worker)
            return
        lines = (worker.inbuf + data).split(b"\n")
        worker.inbuf = lines.pop()
        worker.last_beat = self.clock()
        self._worker_lines(worker, lines)

    def _worker_lines(self, worker, lines):
        for line in lines:
            try:
                msg = _plain_decode(line.decode("utf-8"))
            except (ValueError, RecursionError):
                log.error("worker %d sent a line that is not JSON; killing "
                          "it", worker.id)
                self._kill_worker(worker, "protocol", WorkerState.FAILED)
                return
            if msg["t"] in _RESULT_KINDS:
                self._worker_result(worker, msg)
            else:
                self._worker_message(worker, msg)

    def _worker_message(self, worker, msg):
        kind = msg["t"]
        if kind == "hb":
            return
        if kind == "ready":
            self._worker_ready(worker, msg)
        elif kind in ("ok", "err"):
            self._worker_result(worker, msg)
        elif kind == "boot_error":
            worker.boot_error = msg["message"]
            log.error("worker %d could not load its handlers: %s",
                      worker.id, msg["message"])

    def _worker_ready(self, worker, msg):
        if worker.state is not WorkerState.STARTING:
            return
        worker.ready = True
        self.known_handlers = frozenset(msg["handlers"])
        self.boot_failures = 0
        self.boot_error = None
        self.spawn_after = 0.0
        self._to_idle(worker)
        self._arm_check(worker, worker.last_beat +
                        self.cfg["workers"].heartbeat_timeout)
        log.debug("worker %d ready", worker.id)
        self._retire_old_generation()
        if not self.ready_sent and self.by_state[WorkerState.IDLE] >= \
                self.min_workers:
            self.ready_sent = True
            self.notifier.send(READY=1, STATUS="serving")
            log.info("ready: %d worker(s) idle", self.min_workers)

    def _retire_old_generation(self):
        """During a roll: one old worker goes for each new one ready."""
        old = [w for w in self.workers.values()
               if w.generation != self.generation
               and w.state in LIVE_WORKER_STATES]
        if not old:
            return
        ready = sum(1 for w in self.workers.values()
                    if w.generation == self.generation
                    and w.state in (WorkerState.IDLE, WorkerState.BUSY))
        excess = len(old) + ready - self.target
        if excess > 0:
            self._retire_some(old, excess)

    def _to_idle(self, worker):
        self._worker_to(worker, _IDLE)
        self.idle.append(worker)

    def _worker_result(self, worker, msg):
        task = worker.task
        if not result_is_current(task, worker, msg["id"], msg["a"]):
            self.counters["stale_results"] += 1
            log.info("ignored a stale result for task %s attempt %s from "
                     "worker %d", msg["id"], msg["a"], worker.id)
            return
        worker.task = None
        worker.attempt_deadline = None
        worker.tasks_done += 1
        now = self.clock()
        self.run_time.observe(now - worker.attempt_started)
        self.completed += 1
        if msg["t"] == "ok":
            self._finish(task, _DONE, msg["r"])
        else:
            self._attempt_failed(task, msg["e"])
        self._after_task(worker)

    def _after_task(self, worker):
        if worker.state is _DRAINING or self.stopping:
            self._stop_worker(worker)
            return
        max_tasks = self.cfg["workers"].max_tasks
        if max_tasks and worker.tasks_done >= max_tasks:
            log.info("worker %d recycled after %d tasks", worker.id,
                     worker.tasks_done)
            self._stop_worker(worker)
            self._maintain_pool()
        else:
            self._to_idle(worker)


###############################################################################
# Master: supervision #########################################################
###############################################################################


class _Supervision:
    """Deadlines, kills, reaping, and the size of the pool."""

    # -- workers: stopping and killing ---------------------------------------

    def _stop_worker(self, worker):
        """Ask an idle or draining worker to exit cleanly."""
        self._worker_to(worker, WorkerState.STOPPING)
        self._send(worker, {"t": "stop"})
        worker.kill_at = self.clock() + self.cfg["workers"].kill_grace
        self._arm_check(worker, worker.kill_at)

    def _kill_worker(self, worker, reason, state):
        """Stop a worker with SIGTERM, then SIGKILL after kill_grace."""
        if worker.kill_reason is None:
            worker.kill_reason = reason
        if worker.state is not state and state in WORKER_TRANSITIONS[
                worker.state]:
            self._worker_to(worker, state)
        if worker.exit is not None:
            return          # reaped already: its pid may be someone else's
        _signal_pid(worker.pid, signal.SIGTERM)
        worker.kill_at = self.clock() + self.cfg["workers"].kill_grace
        self._arm_check(worker, worker.kill_at)

    def _arm_check(self, worker, when):
        """Make sure ``_check_worker`` runs at or before ``when``."""
        entry = worker.check_entry
        if entry is not None and entry[2] is not None and entry[0] <= when:
            return
        self.timers.remove(entry)
        worker.check_entry = self.call_at(when, self._check_worker, worker)

    def _check_worker(self, worker):
        """Enforce a worker's start, attempt, heartbeat and kill deadlines.

        One timer per worker: it fires at the earliest of them and re-arms
        for the next, so heartbeats and dispatches cost no timer churn.
        """
        worker.check_entry = None
        if worker.id not in self.workers:
            return
        now = self.clock()
        wcfg = self.cfg["workers"]
        if worker.kill_at is not None:
            if now >= worker.kill_at:
                _signal_pid(worker.pid, signal.SIGKILL)
                worker.kill_at = None
                return
            self._arm_check(worker, worker.kill_at)
            return
        if worker.state is WorkerState.STARTING:
            limit = worker.started_mono + wcfg.start_timeout
            if now >= limit:
                self.boot_error = (f"worker {worker.id} did not report ready "
                                   f"within {wcfg.start_timeout:g} s")
                log.error("%s; killing it", self.boot_error)
                self._kill_worker(worker, "start_timeout", WorkerState.FAILED)
                return
            self._arm_check(worker, limit)
            return
        if worker.attempt_deadline is not None:
            if now >= worker.attempt_deadline:
                self.counters["timeouts"] += 1
                log.warning("task %s timed out on worker %d after %g s",
                            worker.task.id, worker.id, worker.task.timeout)
                self._kill_worker(worker, "timeout", WorkerState.FAILED)
                return
        hb_limit = worker.last_beat + wcfg.heartbeat_timeout
        if now >= hb_limit:
            self.counters["hangs"] += 1
            log.warning("worker %d sent no heartbeat for %g s; presumed hung",
                        worker.id, now - worker.last_beat)
            self._kill_worker(worker, "unresponsive", WorkerState.FAILED)
            return
        due = [hb_limit]
        if worker.attempt_deadline is not None:
            due.append(worker.attempt_deadline)
        self._arm_check(worker, min(due))

    def _close_worker_sock(self, worker):
        if worker.sock is not None:
            self.selector.unregister(worker.sock)
            worker.sock.close()
            worker.sock = None
        if worker.state not in (WorkerState.STOPPING, WorkerState.FAILED):
            self._worker_to(worker, WorkerState.FAILED)

    def _worker_eof(self, worker):
        """The worker's socket closed: it is exiting (or must be made to)."""
        if worker.sock is None:
            return
        self._close_worker_sock(worker)
        if worker.kill_at is None and worker.exit is None:
            worker.kill_at = self.clock() + self.cfg["workers"].kill_grace
            self._arm_check(worker, worker.kill_at)
        self.reap_needed = True

    def _drain_worker(self, worker):
        """Read what an exited worker sent before it died."""
        data = worker.inbuf
        while True:
            try:
                chunk = worker.sock.recv(RECV_SIZE)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
        worker.inbuf = b""
        self._worker_lines(worker, data.split(b"\n")[:-1])

    def _reap(self, _signum=None):
        """Collect every exited child; settle each one's worker and task."""
        while True:
            try:
                pid, status, rusage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.compactor:
                self._compaction_done(status)
                continue
            host = next((h for h in self.plugins if h.pid == pid), None)
            if host is not None:
                host.pid = None
                # What it sent before it went says why, better than how
                # it exited: read that first.
                for _ in range(64):
                    if host.sock is None or not self._read_plugin(host):
                        break
                self._disable_plugin(host, _describe_exit(
                    _exit_info(status, rusage)))
                continue
            worker = self.by_pid.pop(pid, None)
            if worker is not None:
                self._worker_exited(worker, _exit_info(status, rusage))

    def _worker_exited(self, worker, info):
        worker.exit = info
        if worker.sock is not None:
            self._drain_worker(worker)
        self._close_worker_sock(worker)
        self.timers.remove(worker.check_entry)
        worker.check_entry = None
        self._forget_worker(worker)
        reason = worker.kill_reason
        expected = reason is not None or (
            worker.state is WorkerState.STOPPING and info["exit_code"] == 0)
        level = logging.DEBUG if expected else logging.WARNING
        log.log(level, "worker %d (pid %d) %s%s", worker.id, worker.pid,
                _describe_exit(info),
                f" [{reason}]" if reason else "")
        if not worker.ready and reason in (None, "start_timeout"):
            self._boot_failed(worker, info)
        elif not expected:
            self.counters["worker_crashes"] += 1
        task = worker.task
        worker.task = None
        if task is not None and task.state is TaskState.RUNNING:
            self._settle_orphan(task, worker, reason, info)
        self._maintain_pool()

    def _settle_orphan(self, task, worker, reason, info):
        """Decide the fate of a task whose worker is now confirmed dead."""
        if reason == "shutdown":
            task.attempts -= 1       # not the task's fault: not an attempt
            self._record({"k": "q", "id": task.seq})
            self._requeue(task)
            return
        reason = reason or "crash"
        messages = {
            "timeout": f"attempt timed out after {task.timeout:g} s",
            "unresponsive": "worker stopped sending heartbeats",
            "crash": f"worker {_describe_exit(info)}",
        }
        error = {"reason": reason, "type": None, "traceback": None,
                 "message": messages.get(reason, reason),
                 "worker": worker.id, **info}
        self._attempt_failed(task, error, crash=(reason == "crash"))

    def _boot_failed(self, worker, info):
        self.counters["boot_failures"] += 1
        self.boot_failures += 1
        delay = min(BOOT_BACKOFF_MAX,
                    BOOT_BACKOFF_BASE * 2 ** min(self.boot_failures - 1, 20))
        self.spawn_after = self.clock() + delay
        self.boot_error = worker.boot_error or self.boot_error or (
            f"worker {worker.id} {_describe_exit(info)} before it was ready")
        log.error("worker boot failed %d time(s) in a row; next try in "
                  "%.1f s: %s", self.boot_failures, delay, self.boot_error)

    # -- pool size -----------------------------------------------------------

    def _set_target(self, target, why):
        target = max(self.min_workers, min(self.max_workers, target))
        if target != self.target:
            log.info("pool target %d -> %d (%s)", self.target, target, why)
            self.target = target
        self._maintain_pool()

    def _retire_some(self, live, count):
        """Retire ``count`` workers: idle (or starting) first, then busy."""
        order = {WorkerState.STARTING: 0, WorkerState.IDLE: 1,
                 WorkerState.BUSY: 2}
        for worker in sorted(live, key=lambda w: order[w.state])[:count]:
            self.retire(worker)

    def retire(self, worker):
        """Let a worker go without losing or repeating its task."""
        if worker.state is WorkerState.BUSY:
            self._worker_to(worker, WorkerState.DRAINING)
        elif worker.state is WorkerState.IDLE:
            self._stop_worker(worker)
        elif worker.state is WorkerState.STARTING:
            self._kill_worker(worker, "retired", WorkerState.STOPPING)


###############################################################################
# Master: metrics and scaling #################################################
###############################################################################


class _Scaling:
    """State counts, the metrics snapshot and the scaling tick."""

    # -- metrics and state bookkeeping ---------------------------------------

    def _init_metrics(self, scfg):
        now = self.clock()
        slots = max(1, round(scfg.window / scfg.interval))
        tau = max(scfg.interval, scfg.window / 6)
        self.arrivals = Rate(tau, now)
        self.completions = Rate(tau, now)
        self.queue_wait = WindowHistogram(slots)
        self.run_time = WindowHistogram(slots)
        self.meter = BusyMeter(now, slots)
        self.window_seconds = (0.0, 0.0)    # (busy, live) at the last tick
        self.policy = DefaultPolicy(scfg.target_queue_wait,
                                    scfg.target_utilization,
                                    scfg.scale_in_delay, scfg.tolerance)

    def _worker_to(self, worker, new):
        """The one way a worker's state changes: table, counts, events."""
        old = worker.state
        if new not in WORKER_TRANSITIONS[old]:
            transition(WORKER_TRANSITIONS, worker, new)     # raises
        worker.state = new
        by_state = self.by_state
        if old is not None:
            by_state[old] -= 1
        by_state[new] += 1
        self.metrics_stale = True
        if self.plugins:
            self._emit({"kind": "worker", "id": worker.id, "pid": worker.pid,
                        "state": new, "from": old})
        return old

    def _forget_worker(self, worker):
        self.by_state[worker.state] -= 1
        del self.workers[worker.id]
        if worker in self.idle:
            self.idle.remove(worker)
        self._meter_workers()

    def _meter_workers(self):
        by_state = self.by_state
        busy = by_state[_BUSY] + by_state[_DRAINING]
        live = busy + by_state[_IDLE]
        meter = self.meter
        if busy != meter.busy or live != meter.live:   # else: same slope
            meter.set(self.clock(), busy, live)

    def _settle_metrics(self):
        """Apply what the loop counted since the last call: worker-state
        time, arrivals and completions. Not once a task: a busy loop calls
        this every SETTLE_EVERY, and before it may sleep and before any
        snapshot, so a count moves by at most that much."""
        self.metrics_stale = False
        self._meter_workers()
        now = self.clock()
        self.settle_after = now + SETTLE_EVERY
        if self.arrived:
            self.arrivals.add(now, self.arrived)
            self.arrived = 0
        if self.completed:
            self.completions.add(now, self.completed)
            self.completed = 0

    def _enqueue(self, task, now=None):
        if now is None:
            now = self.clock()
        self.ready_by_priority[task.priority] += 1
        task.queued_mono = now
        self.ready.push_task(task)
        fifo = self.ready_fifo
        fifo.append(now)
        fifo.append(task)

    def oldest_wait(self, now):
        """Seconds the oldest ready task has waited; O(1) amortized.

        ready_fifo holds (queued at, task) pairs in the order queued,
        flat -- a stamp, then its task: a tuple per queued task cost 56
        bytes. A pair is current while its task is still QUEUED since that
        stamp (the very float it was given); the rest are dropped here.
        """
        fifo = self.ready_fifo
        while fifo:
            stamp, task = fifo[0], fifo[1]
            if task.state is _QUEUED and task.queued_mono is stamp:
                return now - stamp
            fifo.popleft()
            fifo.popleft()
        return 0.0

    def snapshot(self):
        """The metrics snapshot: what `metrics` returns and policies see."""
        self._settle_metrics()
        now = self.clock()
        busy_s, live_s = self.window_seconds
        completed = self.run_time.summary()
        live = sum(self.by_state[s] for s in (
            WorkerState.IDLE, WorkerState.BUSY, WorkerState.DRAINING))
        return {
            "clock": now, "at": self.wall(),
            "queue": {"ready": len(self.ready), "delayed": len(self.delayed),
                      "running": self.running_count},
            "oldest_wait": self.oldest_wait(now),
            "arrival_rate": self.arrivals.get(now),
            "completion_rate": self.completions.get(now),
            "workers": {s.value: self.by_state[s] for s in WorkerState},
            "live_workers": live,
            "busy_workers": self.meter.busy,
            "utilization": busy_s / live_s if live_s > 0 else None,
            "service_rate": completed["count"] / busy_s if busy_s > 0 and
            completed["count"] else None,
            "queue_wait": self.queue_wait.summary(),
            "run_time": completed,
            "queue_wait_histogram": self.queue_wait.cumulative(),
            "run_time_histogram": self.run_time.cumulative(),
            "counters": dict(self.counters),
            "tasks_retained": len(self.tasks),
            "min_workers": self.min_workers, "max_workers": self.max_workers,
            "target_workers": self.target,
            "last_decision": self.last_decision,
            "plugins": [host.view() for host in self.plugins],
        }

    def _bounds(self):
        current = sum(1 for w in self.workers.values()
                      if w.state in LIVE_WORKER_STATES)
        return {"min": self.min_workers, "max": self.max_workers,
                "current": current, "target": self.target}

    def _scale_tick(self, _arg=None):
        """Every interval: close a metrics slot, decide, tell the plugins."""
        scfg = self.cfg["scaling"]
        now = self.clock()
        self.call_at(now + scfg.interval, self._scale_tick)
        self.queue_wait.rotate()
        self.run_time.rotate()
        self._settle_metrics()
        self.window_seconds = self.meter.sample(now)
        if self.stopping:
            return
        snap = self.snapshot()
        bounds = self._bounds()
        policy = self._policy_host()
        if self.max_workers > self.min_workers:
            if policy is not None:
                self._ask_policy(policy, snap, bounds, now)
            else:
                self._decide(self.policy(snap, bounds), "default policy",
                             self.policy.reason)
        for host in self.plugins:
            if host.kind == "sink":
                self._plugin_send(host, {"t": "snap", "s": snap})

    def _decide(self, want, source, reason):
        want = max(self.min_workers, min(self.max_workers, want))
        if want == self.target:
            log.debug("scaling: hold at %d (%s): %s", want, source, reason)
            return
        direction = "out" if want > self.target else "in"
        log.info("scaling %s: target %d -> %d (%s): %s", direction,
                 self.target, want, source, reason)
        self.last_decision = {"at": self.wall(), "from": self.target,
                              "to": want, "source": source,
                              "reason": reason}
        self._set_target(want, source)


###############################################################################
# Master: plugins #############################################################
###############################################################################


class _Plugins:
    """Plugin processes: start, feed, listen, disable, reload."""

    # -- plugins -------------------------------------------------------------

    def _start_plugins(self):
        pcfg = self.cfg["plugins"]
        specs = ([(pcfg.policy, "policy")] if pcfg.policy else []) + [
            (spec, "sink") for spec in pcfg.sinks]
        for spec, kind in specs:
            host = PluginHost(spec, kind)
            self.plugins.append(host)
            self._spawn_plugin(host)

    def _spawn_plugin(self, host):
        options = self.cfg["plugins"].options.get(plugin_name(host.spec), {})
        pid, parent_sock = self._fork_child(
            lambda sock, _master: _plugin_main(sock, host.kind, host.spec,
                                               options))
        host.pid, host.sock = pid, parent_sock
        self.selector.register(parent_sock, selectors.EVENT_READ,
                               (self._on_plugin, host))
        log.info("plugin %s (%s) started, pid %d", host.spec, host.kind, pid)

    def _policy_host(self):
        for host in self.plugins:
            if host.kind == "policy" and not host.disabled:
                return host
        return None

    def _ask_policy(self, host, snap, bounds, now):
        if host.asked_at is not None:
            if now - host.asked_at > self.cfg["plugins"].timeout:
                self._disable_plugin(host, "did not answer within "
                                     f"{self.cfg['plugins'].timeout:g} s")
                self._decide(self.policy(snap, bounds), "default policy",
                             self.policy.reason)
            return
        host.seq += 1
        host.asked_at = now
        self._plugin_send(host, {"t": "snap", "s": snap, "b": bounds,
                                 "seq": host.seq})

    def _emit(self, event):
        event["at"] = self.wall()
        for host in self.plugins:
            if host.kind == "sink":
                self._plugin_send(host, {"t": "ev", "e": event})

    def _plugin_send(self, host, msg):
        if host.disabled or host.sock is None:
            return
        data = dumps(msg)
        if host.outbuf and len(host.outbuf) + len(data) > \
                self.cfg["plugins"].buffer_bytes:
            host.dropped += 1
            if host.dropped in (1, 100) or host.dropped % 10000 == 0:
                log.warning("plugin %s falls behind: %d message(s) dropped",
                            host.spec, host.dropped)
            return
        host.outbuf += data
        self._flush_plugin(host)

    def _flush_plugin(self, host):
        if not _send_buffered(self.selector, host, self._on_plugin):
            self._read_plugin(host)     # it may have said why, first
            self._disable_plugin(host, "its process went away")

    def _on_plugin(self, host, mask):
        if mask & selectors.EVENT_WRITE and host.sock is not None:
            self._flush_plugin(host)
        if mask & selectors.EVENT_READ and host.sock is not None:
            if not self._read_plugin(host):
                self._disable_plugin(host, "its process exited")

    def _read_plugin(self, host):
        """Handle what the plugin sent; return False at end of stream."""
        try:
            data = host.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = b""
        if not data:
            return False
        lines = (host.inbuf + data).split(b"\n")
        host.inbuf = lines.pop()
        for line in lines:
            try:
                msg = _plain_decode(line.decode("utf-8"))
            except (ValueError, RecursionError):
                self._disable_plugin(host, "it sent a line that is not JSON")
                return True
            self._plugin_message(host, msg)
            if host.sock is None:
                break
        return True

    def _plugin_message(self, host, msg):
        if msg["t"] == "error":
            log.error("plugin %s raised: %s\n%s", host.spec, msg["message"],
                      msg.get("traceback", ""))
            self._disable_plugin(host, f"raised {msg['message']}")
        elif msg["t"] == "want" and msg.get("seq") == host.seq:
            host.asked_at = None
            want = msg["n"]
            if isinstance(want, bool) or not isinstance(want, int):
                self._disable_plugin(host, f"returned {want!r}, not an int")
                return
            self._decide(want, f"policy {host.spec}", "plugin decision")

    def _disable_plugin(self, host, why):
        if host.disabled:
            return
        host.disabled = True
        host.error = why
        log.error("plugin %s disabled: %s%s", host.spec, why,
                  "; the default policy takes over"
                  if host.kind == "policy" else "")
        self._close_plugin(host)

    def _close_plugin(self, host):
        if host.sock is not None:
            self.selector.unregister(host.sock)
            host.sock.close()
            host.sock = None
        if host.pid is not None:
            _signal_pid(host.pid, signal.SIGKILL)
            self.reap_needed = True

    def _reload_plugins(self):
        """SIGHUP: start every plugin afresh, re-reading its code."""
        for host in self.plugins:
            host.disabled = True
            self._close_plugin(host)
        self.plugins = []
        self._start_plugins()

    def _stop_plugins(self, grace=0.0):
        """End every plugin: ask it to stop, give it ``grace``, then kill."""
        for host in self.plugins:
            if host.sock is not None and not host.disabled and grace:
                try:
                    host.sock.setblocking(True)
                    host.sock.settimeout(grace)
                    host.sock.sendall(bytes(host.outbuf) +
                                      dumps({"t": "stop"}))
                except OSError:
                    pass
        deadline = time.monotonic() + grace
        for host in self.plugins:
            while host.pid is not None and time.monotonic() < deadline:
                try:
                    if os.waitpid(host.pid, os.WNOHANG)[0]:
                        host.pid = None
                except ChildProcessError:
                    host.pid = None
                if host.pid is not None:
                    time.sleep(0.005)   # shutting down: nothing else to do
            host.disabled = True
            self._close_plugin(host)
            if host.pid is not None:
                try:
                    os.waitpid(host.pid, 0)
                except ChildProcessError:
                    pass
                host.pid = None


###############################################################################
# Master: operations ##########################################################
###############################################################################


class _Operations:
    """Reload, systemd notification and signals."""

    # -- reload --------------------------------------------------------------

    #: Keys a running daemon cannot change: they need a restart.
    RESTART_KEYS = (("server", "socket"), ("journal", "path"),
                    ("tasks", "aging_rate"))

    def reload(self):
        """Re-read the config, apply it, then roll the workers.

        Returns (applied, message). An invalid config changes nothing.
        """
        self.notifier.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(
            time.CLOCK_MONOTONIC) // 1000)
        try:
            new = load_config(self.config_path, self.overrides)
        except ConfigError as exc:
            log.error("reload rejected; the old configuration stays: %s",
                      exc)
            self.notifier.send(READY=1, STATUS=f"reload rejected: {exc}")
            return False, str(exc)
        kept = []
        for section, key in self.RESTART_KEYS:
            old = getattr(self.cfg[section], key)
            if getattr(new[section], key) != old:
                kept.append(f"{section}.{key}")
                setattr(new[section], key, old)
        if kept:
            log.warning("reload: %s need(s) a restart; keeping the running "
                        "value(s)", ", ".join(kept))
        self._apply_config(new)
        self.notifier.send(READY=1, STATUS="reloaded")
        message = "reloaded; rolling workers to generation " \
            f"{self.generation}"
        if kept:
            message += f" ({', '.join(kept)} need a restart)"
        log.info("%s", message)
        return True, message

    def _apply_config(self, new):
        old, self.cfg = self.cfg, new
        if self.journal is not None:
            self.journal.mode = new["journal"].fsync
            self.journal.interval = new["journal"].fsync_interval
        scfg = new["scaling"]
        if (scfg.window, scfg.interval) != (old["scaling"].window,
                                            old["scaling"].interval):
            self._init_metrics(scfg)
            self._meter_workers()
        else:
            self.policy = DefaultPolicy(scfg.target_queue_wait,
                                        scfg.target_utilization,
                                        scfg.scale_in_delay, scfg.tolerance)
        self.min_workers = new["workers"].min
        self.max_workers = new["workers"].max
        self.target = max(self.min_workers, min(self.max_workers,
                                                self.target))
        self.known_handlers = None
        self._reload_plugins()
        self.generation += 1
        self.spawn_after = 0.0
        self._maintain_pool()

    # -- systemd -------------------------------------------------------------

    def _start_watchdog(self):
        if self.notifier.watchdog is not None:
            log.info("systemd watchdog: pinging every %.3f s",
                     self.notifier.watchdog)
            self._watchdog_ping()

    def _watchdog_ping(self, _arg=None):
        self.notifier.send(WATCHDOG=1)
        self.call_at(self.clock() + self.notifier.watchdog,
                     self._watchdog_ping)

    def _notify_status(self, _arg=None):
        """Send STATUS= when it changed, at most once a second."""
        if _arg is not None:
            self.status_timer = None
        live = sum(1 for w in self.workers.values()
                   if w.state in LIVE_WORKER_STATES)
        text = (f"{len(self.ready)} ready, {len(self.delayed)} delayed, "
                f"{self.running_count} running; {live} worker(s), "
                f"{self.by_state[WorkerState.IDLE]} idle")
        last, when = self.status_sent
        if text == last:
            return
        now = self.clock()
        if now - when >= 1.0:
            self.notifier.send(STATUS=text)
            self.status_sent = (text, now)
        elif self.status_timer is None:
            self.status_timer = self.call_at(when + 1.0, self._notify_status,
                                             True)

    # -- signals -------------------------------------------------------------

    def _install_signals(self):
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        for signum in self._signals:
            signal.signal(signum, _ignore_signal)
        self.selector.register(self.wake_r, selectors.EVENT_READ,
                               (self._on_wakeup, None))

    def _on_wakeup(self, _obj, _mask):
        try:
            data = self.wake_r.recv(4096)
        except BlockingIOError:
            return
        for signum in data:
            handler = self._signals.get(signum)
            if handler is not None:
                handler(signum)

    def _on_term(self, signum=None):
        if self.stopping:
            log.info("second stop signal: skipping the grace period")
            self._stop_now()
        else:
            self.begin_shutdown()

    def _on_chld(self, _signum):
        self.reap_needed = True

    def _on_hup(self, _signum):
        log.info("SIGHUP: reloading the configuration")
        self.reload()

    def _on_ttin(self, _signum):
        self._set_target(self.target + 1, "SIGTTIN")

    def _on_ttou(self, _signum):
        self._set_target(self.target - 1, "SIGTTOU")


###############################################################################
# Commands ####################################################################
###############################################################################


class _Commands:
    """One method per protocol op.

    Each is (conn, request, slot) -> response, or None when the request is
    parked and answered later through its slot.
    """

    def op_ping(self, conn, request, slot):
        return {"ok": True, "version": __version__}

    def op_submit(self, conn, request, slot):
        if self.stopping:
            raise RequestError(SHUTTING_DOWN, "the daemon is shutting down")
        self._check_journal()
        tcfg = self.cfg["tasks"]
        spec = validate_task(request.get("task"), {
            "timeout": tcfg.timeout, "max_attempts": tcfg.max_attempts})
        self._check_handler(spec["handler"])
        if spec["key"] is not None:
            task = self.find_duplicate(spec["key"])
            if task is not None:
                self.counters["duplicates"] += 1
                return {"ok": True, "id": task.id, "duplicate": True}
        if len(self.ready) + len(self.delayed) >= \
                self.cfg["server"].max_queued:
            raise RequestError(QUEUE_FULL, "the queue is full "
                               f"({self.cfg['server'].max_queued} tasks)")
        task = self.new_task(spec)
        return '{"ok":true,"id":"%s","duplicate":false' % task.id

    def _check_handler(self, name):
        if name in BUILTIN_HANDLERS:
            return
        module = name.split(":")[0]
        if module not in self.cfg["workers"].handlers:
            raise RequestError(UNKNOWN_HANDLER, f"handler module '{module}' "
                               "is not in the allowlist ([workers] handlers)")
        if self.known_handlers is not None and \
                name not in self.known_handlers:
            raise RequestError(UNKNOWN_HANDLER,
                               f"module '{module}' has no handler "
                               f"'{name.split(':')[1]}'")

    def _get_task(self, request):
        tid = field(request, "id", (str,), "a task id string")
        task = self.tasks.get(tid)
        if task is None:
            raise RequestError(NOT_FOUND, f"no task {tid[:100]!r}")
        return task

    def op_get(self, conn, request, slot):
        return '{"ok":true,"task":' + self._get_task(request).view_json()

    def op_wait(self, conn, request, slot):
        task = self._get_task(request)
        timeout = seconds_field(request, "timeout") \
            if "timeout" in request else None
        if task.state in TERMINAL:
            return '{"ok":true,"task":' + task.view_json()
        timer = None
        if timeout is not None:
            timer = self.call_at(self.clock() + timeout, self._wait_timeout,
                                 (conn, slot, task.id))
        self.waiters.setdefault(task.id, []).append((conn, slot))
        conn.waits[id(slot)] = (task.id, slot, timer)
        return None

    def _wait_timeout(self, arg):
        conn, slot, tid = arg
        parked = self.waiters.get(tid)
        if not parked or not any(s is slot for _, s in parked):
            return
        parked[:] = [(c, s) for c, s in parked if s is not slot]
        if not parked:
            del self.waiters[tid]
        conn.waits.pop(id(slot), None)
        self._answer_parked(conn, slot, {
            "ok": False, "error": TIMEOUT,
            "message": f"task {tid} is not finished yet"})

    def op_cancel(self, conn, request, slot):
        task = self._get_task(request)
        if task.state in TERMINAL:
            raise RequestError(NOT_CANCELLABLE,
                               f"task {task.id} is already {task.state}")
        self._check_journal()
        worker = self.workers.get(task.worker)
        running = task.state is TaskState.RUNNING
        self._finish(task, TaskState.CANCELLED, error={
            "reason": "cancelled", "type": None, "traceback": None,
            "message": "cancelled by request"})
        if running and worker is not None and worker.task is task:
            self._kill_worker(worker, "cancel", WorkerState.STOPPING)
        return {"ok": True, "task": task.view()}

    def op_status(self, conn, request, slot):
        return {
            "ok": True, "version": __version__, "pid": os.getpid(),
            "workers": [w.view(self.clock()) for w in self.workers.values()],
            "queue": {"ready": len(self.ready),
                      "delayed": len(self.delayed),
                      "running": self.running_count},
            "min_workers": self.min_workers,
            "max_workers": self.max_workers,
            "target_workers": self.target,
            "ready_by_priority": {
                str(p): n for p, n in sorted(self.ready_by_priority.items(),
                                             reverse=True)[:20]},
            "stopping": self.stopping,
            "worker_error": None if self.boot_error is None else {
                "message": self.boot_error,
                "failures": self.boot_failures,
                "retry_in": round(max(0.0, self.spawn_after - self.clock()),
                                  3)},
            "counters": dict(self.counters),
            "journal": None if self.journal is None else {
                "path": self.journal.path, "fsync": self.journal.mode,
                "bytes": self.journal.size, "error": self.journal.failed,
                "compacting": self.compactor is not None},
        }

    def op_metrics(self, conn, request, slot):
        return {"ok": True, "metrics": self.snapshot()}

    def op_drain(self, conn, request, slot):
        wid = field(request, "worker", (int,), "a worker id (integer)")
        worker = self.workers.get(wid)
        if worker is None or worker.state not in LIVE_WORKER_STATES:
            raise RequestError(NOT_FOUND, f"no live worker {wid}")
        self.target = max(self.min_workers, self.target - 1)
        self.retire(worker)
        self._maintain_pool()
        return {"ok": True, "worker": worker.view()}

    def op_scale(self, conn, request, slot):
        low = field(request, "min", (int,), "an integer", required=False)
        high = field(request, "max", (int,), "an integer", required=False)
        low = self.min_workers if low is None else low
        high = self.max_workers if high is None else high
        if low < 1 or high < low or high > 4096:
            raise _bad(f"need 1 <= min <= max <= 4096, got min {low}, "
                       f"max {high}")
        self.min_workers, self.max_workers = low, high
        self._set_target(self.target, "scale request")
        return {"ok": True, "min_workers": low, "max_workers": high}

    def op_reload(self, conn, request, slot):
        applied, message = self.reload()
        if not applied:
            raise RequestError(BAD_REQUEST, f"reload rejected: {message}")
        return {"ok": True, "message": message,
                "generation": self.generation}

    def op_shutdown(self, conn, request, slot):
        self.begin_shutdown()
        return {"ok": True}


###############################################################################
# Master ######################################################################
###############################################################################


class Master(_Connections, _Journaling, _Tasks, _Workers, _Supervision,
             _Scaling, _Plugins, _Operations, _Commands):
    """The daemon: one selector loop serving clients and supervising workers.

    Loop shape: wait on the selector until the next due time, handle the
    ready sockets, run what has come due, dispatch, then flush every owed
    response (``_before_sleep``).
    """

    def __init__(self, cfg, clock=time.monotonic, wall=time.time,
                 config_path=None, overrides=None):
        self.cfg = cfg
        self.config_path = config_path   # re-read on reload
        self.overrides = overrides or {}
        self.generation = 1              # bumped by a reload: rolls workers
        self.clock = clock
        self.wall = wall
        self.socket_path = cfg["server"].socket or default_socket_path()
        self.selector = selectors.DefaultSelector()
        self.tasks = {}                  # id -> Task, terminal ones kept
        self.ready = ReadyQueue(cfg["tasks"].aging_rate)
        self.delayed = LazyHeap()        # run_at (monotonic) -> Task
        self.deadlines = LazyHeap()      # expiry (monotonic) -> Task
        self.timers = LazyHeap()         # due (monotonic) -> (fn, arg)
        self.keys = {}                   # idempotency key -> task id
        self.retention = collections.deque()  # (drop at, task id)
        self.keyed_retention = collections.deque()   # the same, with keys
        self.workers = {}                # id -> Worker
        self.by_pid = {}
        self.idle = []                   # IDLE workers, most recent last
        self.conns = {}
        self.waiters = {}                # task id -> [(conn, slot)]
        self.dirty = set()               # conns with responses to flush
        self.busy_conns = set()          # conns with request lines left
        self.worker_dirty = set()        # workers with messages to send
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.running_count = 0
        self.ready_by_priority = collections.Counter()
        self.target = cfg["workers"].min
        self.min_workers = cfg["workers"].min
        self.max_workers = cfg["workers"].max
        self.known_handlers = None       # from the latest ready worker
        self.boot_failures = 0           # consecutive, reset on a ready
        self.boot_error = None
        self.spawn_after = 0.0
        self.spawn_timer = None
        self.stopping = False
        self.stop_deadline = None
        self.done = False
        self.reap_needed = False
        self.listener = None
        self.activated = False           # listener came from systemd
        self.refused = 0
        self.refusal_logged = -1e9
        self.notifier = Notifier()
        self.status_sent = (None, -1e9)  # (text, when)
        self.status_timer = None
        self.ready_sent = False
        self.wake_r = self.wake_w = None
        self.purge_timer = None
        self.journal = _make_journal(cfg["journal"])
        self.held = set()                # conns waiting on a failed journal
        self.journal_deps = set()        # conns told of this turn's records
        self.sync_timer = None
        self.retry_timer = None
        self.compactor = None            # pid of the compaction child
        self.compact_after = 0.0
        self.ready_fifo = collections.deque()   # queued at, task, ...: oldest
        self.by_state = collections.Counter()   # workers by state
        self.arrived = self.completed = 0        # since metrics settled
        self.metrics_stale = False      # see _settle_metrics
        self.settle_after = 0.0
        self.owed_turns = 0             # busy turns answers have waited
        self._init_metrics(cfg["scaling"])
        self.plugins = []                # PluginHost, one per plugin
        self.last_decision = None
        self._next_seq = time.time_ns() // 1000
        self._next_wid = 1
        self._ops = {
            "ping": (self.op_ping, ()),
            "submit": (self.op_submit, ("task",)),
            "get": (self.op_get, ("id",)),
            "wait": (self.op_wait, ("id", "timeout")),
            "cancel": (self.op_cancel, ("id",)),
            "status": (self.op_status, ()),
            "metrics": (self.op_metrics, ()),
            "drain": (self.op_drain, ("worker",)),
            "scale": (self.op_scale, ("min", "max")),
            "reload": (self.op_reload, ()),
            "shutdown": (self.op_shutdown, ()),
        }
        # Each op's allowed fields, "op" and "req" included.
        self._ops = {op: (method, frozenset(fields) | {"op", "req"})
                     for op, (method, fields) in self._ops.items()}
        self._signals = {
            signal.SIGTERM: self._on_term,
            signal.SIGINT: self._on_term,
            signal.SIGCHLD: self._on_chld,
            signal.SIGHUP: self._on_hup,
            signal.SIGTTIN: self._on_ttin,
            signal.SIGTTOU: self._on_ttou,
        }

    # -- the loop ------------------------------------------------------------

    def serve(self):
        """Run until shut down; return the process exit status.

        Raises LbdError when start-up is impossible (socket or journal).
        """
        self._install_signals()
        # Full collections scan every retained task: take them ten times
        # less often than the default. The loop's own garbage is acyclic
        # and goes by reference counting. Children get the default back.
        gc.set_threshold(*GC_THRESHOLDS)
        try:
            self._recover()
            self._listen()
            self._maintain_pool()
            self._start_plugins()
            self._start_watchdog()
            self.call_at(self.clock() + self.cfg["scaling"].interval,
                         self._scale_tick)
            log.info("lbd %s serving on %s (journal %s, workers %d..%d, "
                     "handlers: %s)", __version__, self.socket_path,
                     self.journal.path if self.journal else "off",
                     self.min_workers, self.max_workers,
                     ", ".join(self.cfg["workers"].handlers)
                     or "built-in only")
            while not self.done:
                self._step()
        except LbdError:
            self._emergency_stop()
            raise
        except Exception:
            log.exception("internal error; stopping the daemon")
            self._emergency_stop()
            return 1
        finally:
            self._close_listener()
            if self.journal is not None:
                self.journal.close()
        log.info("lbd stopped")
        return 0

    def _step(self):
        # Answers go out when the loop would otherwise sleep, or after
        # ANSWER_TURNS busy turns: under load one send (and one wake-up of
        # the client) carries many answers.
        events = self.selector.select(
            0 if self.dirty or self.busy_conns else self._sleep_timeout())
        if self.dirty:
            idle = not events and not self.busy_conns
            if idle or self.owed_turns >= ANSWER_TURNS:
                self._flush_answers()
                if idle:
                    events = self.selector.select(self._sleep_timeout())
            else:
                self.owed_turns += 1
        if self.busy_conns:
            for conn in list(self.busy_conns):   # lines left from a turn
                self._handle_lines(conn)
        for key, mask in events:
            handler, obj = key.data
            handler(obj, mask)
        if self.reap_needed:
            self.reap_needed = False
            self._reap()
        self._run_due(self.clock())
        self._dispatch()
        self._before_sleep()

    def _sleep_timeout(self):
        """The timeout of a select that may sleep: metrics settle first,
        so the time asleep counts against what the workers are doing."""
        if self.metrics_stale:
            self._settle_metrics()
        return self._timeout()

    def _timeout(self):
        due = [k for k in (self.timers.peek_key(), self.delayed.peek_key(),
                           self.deadlines.peek_key()) if k is not None]
        if not due:
            return None
        return max(0.0, min(due) - self.clock())

    def _run_due(self, now):
        for task in self.delayed.pop_due(now):
            task.delay_entry = None
            self._task_to(task, TaskState.QUEUED)
            self._enqueue(task)
        for task in self.deadlines.pop_due(now):
            task.deadline_entry = None
            if task.state in (TaskState.QUEUED, TaskState.DELAYED):
                self._finish(task, TaskState.EXPIRED, error={
                    "reason": "expired", "type": None, "traceback": None,
                    "message": "deadline passed before the task could run"})
        for fn, arg in self.timers.pop_due(now):
            fn(arg)

    def call_at(self, when, fn, arg=None):
        """Run ``fn(arg)`` at monotonic ``when``; return the entry."""
        return self.timers.push(when, (fn, arg))

    def _before_sleep(self):
        """Write the turn's journal records, then send the dispatches
        (the fsync answers need is _flush_answers')."""
        if self.metrics_stale and self.clock() >= self.settle_after:
            self._settle_metrics()
        journal = self.journal
        if journal is None or not journal.buf:
            self._flush_workers()
        else:
            if journal.write_out():
                # Dispatches go out once their records are written, so a
                # kill -9 costs at most one duplicate per busy worker; they
                # need not wait for the fsync, which the workers' running
                # overlaps. The answers wait for it (_flush_answers).
                self._flush_workers()
                self._arm_timed_sync()
            else:
                self._journal_done(False)
        if journal is not None and self.compactor is None and \
                journal.wants_compaction(self.cfg["journal"].compact_bytes) \
                and self.clock() >= self.compact_after:
            self._start_compaction()
        if self.notifier.sock is not None:
            self._notify_status()
        if self.stopping and not self.workers and not self.done:
            self._finish_shutdown()

    def _flush_answers(self):
        """Commit what the owed answers tell of (group commit: one fsync
        for every turn since the last flush), then send them."""
        self.owed_turns = 0
        journal = self.journal
        if journal is not None and (journal.buf or journal.failed or
                                    journal.sync_wanted or journal.unsynced):
            fresh = journal.fresh
            if not self._journal_done(journal.write_out() and
                                      journal.sync_for_acks()) and fresh:
                # Answers that tell of records not durable yet wait for a
                # commit that works.
                self.held |= self.journal_deps
                self.dirty -= self.journal_deps
        self.journal_deps.clear()
        dirty, self.dirty = self.dirty, set()
        for conn in dirty:
            if conn not in self.held:
                self._flush_conn(conn)

    def _flush_workers(self):
        workers, self.worker_dirty = self.worker_dirty, set()
        for worker in workers:
            self._flush_worker(worker)

    # -- shutdown ------------------------------------------------------------

    def begin_shutdown(self):
        """Stop taking submits; let running tasks finish within stop_grace."""
        if self.stopping:
            return
        self.stopping = True
        self.notifier.send(STOPPING=1, STATUS="stopping")
        grace = self.cfg["workers"].stop_grace
        log.info("shutting down: %d running task(s) get up to %g s",
                 self.running_count, grace)
        self.timers.remove(self.spawn_timer)
        for worker in list(self.workers.values()):
            if worker.state is WorkerState.STARTING:
                self._kill_worker(worker, "shutdown", WorkerState.STOPPING)
            elif worker.state is not WorkerState.STOPPING:
                self.retire(worker)
        self.stop_deadline = self.call_at(self.clock() + grace,
                                          self._stop_now)

    def _stop_now(self, _arg=None):
        """The grace is over: kill what still runs; its tasks re-queue."""
        for worker in list(self.workers.values()):
            if worker.kill_reason is None:
                self._kill_worker(worker, "shutdown", WorkerState.STOPPING)

    def _finish_shutdown(self):
        for tid in list(self.waiters):
            for conn, slot in self.waiters.pop(tid):
                self._answer_parked(conn, slot, {
                    "ok": False, "error": SHUTTING_DOWN,
                    "message": "the daemon shut down before the task ended"})
        self._stop_compactor()
        self._stop_plugins(grace=min(2.0, self.cfg["plugins"].timeout))
        # The last answers go through the same commit as every other: an
        # ack whose record cannot be made durable is never sent.
        self._flush_answers()
        if self.journal is not None and not self.journal.failed:
            self.journal.timed_sync()   # the rest of the records, too
        self.done = True

    def _emergency_stop(self):
        for worker in self.workers.values():
            _signal_pid(worker.pid, signal.SIGKILL)
        self._stop_compactor()
        self._stop_plugins()


###############################################################################
# Client ######################################################################
###############################################################################

#: Task fields ``Client.submit`` takes as keyword options.
_SUBMIT_OPTIONS = TASK_FIELDS - {"handler", "args"}


class Client:
    """A blocking client for one daemon; usable as a context manager.

    Every method raises RequestError (with ``.code``) for an error
    response and Unavailable when no daemon answers.
    """

    def __init__(self, socket_path=None, timeout=None):
        self.socket_path = socket_path or default_socket_path()
        self.timeout = timeout
        self._sock = None
        self._rfile = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Close the connection; the next call opens a new one."""
        if self._sock is not None:
            self._rfile.close()
            self._sock.close()
            self._sock = self._rfile = None

    def _connect(self):
        if self._sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        give_up = None if self.timeout is None else \
            time.monotonic() + self.timeout
        while True:
            try:
                sock.connect(self.socket_path)
                break
            except BlockingIOError:
                # A full listen backlog: a socket with a timeout gets
                # EAGAIN where a blocking one would wait. Wait, then.
                if give_up is not None and time.monotonic() >= give_up:
                    sock.close()
                    raise Unavailable(f"the daemon at {self.socket_path} "
                                      "is not accepting connections") from None
                time.sleep(0.01)
            except OSError as exc:
                sock.close()
                raise Unavailable(f"no lbd daemon is answering at "
                                  f"{self.socket_path} "
                                  f"({exc.strerror or exc})") from None
        self._sock = sock
        self._rfile = sock.makefile("rb", buffering=RECV_SIZE)

    def _read(self):
        try:
            line = self._rfile.readline()
        except OSError as exc:
            self.close()
            raise Unavailable(f"lost the daemon at {self.socket_path}: "
                              f"{exc}") from None
        if not line.endswith(b"\n"):
            self.close()
            raise Unavailable(f"the daemon at {self.socket_path} closed "
                              "the connection")
        return _plain_decode(line.decode("utf-8"))

    def _write(self, data):
        try:
            self._sock.sendall(data)
        except OSError as exc:
            # The daemon may have refused us (forbidden, too many clients)
            # and closed before our request got there: say why it did.
            refusal = _last_words(self._rfile)
            self.close()
            if refusal is not None:
                _checked(refusal)
            raise Unavailable(f"lost the daemon at {self.socket_path}: "
                              f"{exc}") from None

    def request(self, op, **fields):
        """Send one request; return the response or raise RequestError."""
        self._connect()
        self._write(dumps({"op": op, **fields}))
        return _checked(self._read())

    def pipeline(self, requests, batch=512):
        """Send many requests, reading as it goes; return every response.

        Error responses are returned, not raised, one per request.
        """
        self._connect()
        responses = []
        for start in range(0, len(requests), batch):
            chunk = requests[start:start + batch]
            self._write(b"".join(dumps(r) for r in chunk))
            responses.extend(self._read() for _ in chunk)
        return responses

    def submit(self, handler, *args, **options):
        """Submit ``handler(*args, **kwargs)``; return the task id.

        ``options`` are task fields: kwargs, priority, timeout, deadline,
        delay, max_attempts, key, retry_on_error.
        """
        unknown = set(options) - _SUBMIT_OPTIONS
        if unknown:
            raise TypeError(f"unknown submit option {sorted(unknown)[0]!r}")
        task = {"handler": handler, "args": list(args), **options}
        return self.request("submit", task=task)["id"]

    def get(self, task_id):
        """Return the task view."""
        return self.request("get", id=task_id)["task"]

    def wait(self, task_id, timeout=None):
        """Block until the task is terminal; return its view."""
        fields = {"id": task_id}
        if timeout is not None:
            fields["timeout"] = timeout
        return self.request("wait", **fields)["task"]

    def cancel(self, task_id):
        """Cancel a task; return its view (now CANCELLED)."""
        return self.request("cancel", id=task_id)["task"]

    def status(self):
        """Return the daemon's status response."""
        return self.request("status")

    def metrics(self):
        """Return the metrics snapshot."""
        return self.request("metrics")["metrics"]

    def ping(self):
        """Return the daemon's version."""
        return self.request("ping")["version"]

    def shutdown(self):
        """Ask the daemon to shut down gracefully."""
        self.request("shutdown")


def _last_words(rfile):
    """Return a complete response line still buffered on a closed socket."""
    try:
        line = rfile.readline()
        return json.loads(line) if line.endswith(b"\n") else None
    except (OSError, ValueError):
        return None


def _checked(response):
    if not response.get("ok"):
        raise RequestError(response.get("error", "error"),
                           response.get("message", ""))
    return response


###############################################################################
# CLI #########################################################################
###############################################################################


def _json_arg(text):
    """A CLI ARG: JSON when it parses as JSON, else the string itself."""
    try:
        return loads(text)
    except RequestError:
        return text


def _print_json(obj):
    print(json.dumps(obj, indent=2, sort_keys=True))


def cmd_serve(args):
    overrides = {}
    for name, key, value in (
            ("server", "socket", args.socket),
            ("journal", "path", args.journal),
            ("workers", "min", args.min_workers),
            ("workers", "max", args.max_workers)):
        if value is not None:
            overrides[name, key] = value
    if args.handlers is not None:
        overrides["workers", "handlers"] = [
            m.strip() for m in args.handlers.split(",") if m.strip()]
    return Master(load_config(args.config, overrides),
                  config_path=args.config, overrides=overrides).serve()


def _task_options(args):
    options = {}
    if args.kwargs is not None:
        options["kwargs"] = loads(args.kwargs)
    for name in ("priority", "timeout", "deadline", "delay", "max_attempts",
                 "key"):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    return options


def cmd_submit(args, client):
    if args.handler == "-":
        return _submit_stdin(client)
    task_id = client.submit(args.handler, *map(_json_arg, args.args),
                            **_task_options(args))
    if not args.wait:
        print(task_id)
        return 0
    view = client.wait(task_id)
    return _print_outcome(view, args.json)


def _submit_stdin(client):
    requests, status = [], 0
    for number, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        try:
            requests.append({"op": "submit", "task": loads(line)})
        except RequestError as exc:
            print(f"lbd: line {number}: {exc.message}", file=sys.stderr)
            status = EXIT_FAILED
    for response in client.pipeline(requests):
        if response.get("ok"):
            print(response["id"])
        else:
            print(f"lbd: {response.get('error')}: {response.get('message')}",
                  file=sys.stderr)
            status = EXIT_FAILED
    return status


def _print_outcome(view, as_json):
    if as_json:
        _print_json(view)
    elif view["state"] == TaskState.DONE:
        print(json.dumps(view["result"]))
    else:
        error = view.get("error") or {}
        print(f"task {view['id']} {view['state']}: "
              f"{error.get('reason')}: {error.get('message')}",
              file=sys.stderr)
    return 0 if view["state"] == TaskState.DONE else EXIT_FAILED


def cmd_get(args, client):
    _print_json(client.get(args.id))
    return 0


def cmd_wait(args, client):
    return _print_outcome(client.wait(args.id, args.timeout), True)


def cmd_cancel(args, client):
    view = client.cancel(args.id)
    print(f"{view['id']} {view['state']}")
    return 0


def cmd_status(args, client):
    status = client.status()
    if args.json:
        _print_json(status)
        return 0
    queue = status["queue"]
    print(f"lbd {status['version']} pid {status['pid']}: "
          f"{len(status['workers'])} worker(s), target "
          f"{status['target_workers']} (min {status['min_workers']}, max "
          f"{status['max_workers']}); queue: {queue['ready']} ready, "
          f"{queue['delayed']} delayed, {queue['running']} running"
          + ("; SHUTTING DOWN" if status["stopping"] else ""))
    if status["worker_error"]:
        err = status["worker_error"]
        print(f"workers failing to start ({err['failures']} in a row, next "
              f"try in {err['retry_in']} s): {err['message']}")
    print(f"{'WORKER':>6}  {'PID':>8}  {'STATE':<9} {'TASK':<18} {'DONE':>6}")
    for w in status["workers"]:
        print(f"{w['id']:>6}  {w['pid']:>8}  {w['state']:<9} "
              f"{w['task'] or '-':<18} {w['tasks_done']:>6}")
    return 0


def cmd_metrics(args, client):
    metrics = client.metrics()
    if args.json:
        _print_json(metrics)
        return 0
    for section, values in metrics.items():
        if isinstance(values, dict):
            print(f"{section}: " + ", ".join(
                f"{k} {v}" for k, v in values.items()))
        else:
            print(f"{section}: {values}")
    return 0


def _top_lines(status, metrics, width):
    """The lines of one `lbd top` frame, as plain text."""
    queue = status["queue"]
    wait, run = metrics["queue_wait"], metrics["run_time"]
    util = metrics["utilization"]

    def ms(value):
        return "-" if value is None else f"{value * 1000:.1f}ms"

    lines = [
        f"lbd {status['version']}  pid {status['pid']}  workers "
        f"{len(status['workers'])} (target {status['target_workers']}, min "
        f"{status['min_workers']}, max {status['max_workers']})"
        + ("  SHUTTING DOWN" if status["stopping"] else ""),
        f"queue: {queue['ready']} ready, {queue['delayed']} delayed, "
        f"{queue['running']} running; oldest wait "
        f"{metrics['oldest_wait']:.2f}s",
        f"rates: {metrics['arrival_rate']:.1f} in/s, "
        f"{metrics['completion_rate']:.1f} done/s; utilization "
        + ("-" if util is None else f"{util:.0%}"),
        f"queue wait p50 {ms(wait['p50'])} p95 {ms(wait['p95'])} p99 "
        f"{ms(wait['p99'])}; run time p50 {ms(run['p50'])} p95 "
        f"{ms(run['p95'])}",
    ]
    decision = metrics.get("last_decision")
    if decision:
        lines.append(f"scaler: {decision['from']} -> {decision['to']} "
                     f"({decision['source']}): {decision['reason']}")
    if status["worker_error"]:
        lines.append(f"workers failing to start: "
                     f"{status['worker_error']['message']}")
    by_priority = status.get("ready_by_priority") or {}
    if by_priority:
        lines.append("ready by priority: " + ", ".join(
            f"{p}: {n}" for p, n in by_priority.items()))
    lines.append("")
    lines.append(f"{'WORKER':>6} {'PID':>8}  {'STATE':<9} {'TASK':<18} "
                 f"{'RUNNING':>9} {'DONE':>7}")
    for w in status["workers"]:
        running = "-" if w["running_for"] is None else \
            f"{w['running_for']:.1f}s"
        lines.append(f"{w['id']:>6} {w['pid']:>8}  {w['state']:<9} "
                     f"{w['task'] or '-':<18} {running:>9} "
                     f"{w['tasks_done']:>7}")
    return [line[:width] for line in lines]


def cmd_top(args, client):
    if args.once or not sys.stdout.isatty():
        for line in _top_lines(client.status(), client.metrics(), 1000):
            print(line)
        return 0
    import curses   # only here: a terminal is not needed anywhere else
    return curses.wrapper(_top_screen, client, args.interval)


def _top_screen(screen, client, interval):
    import curses
    curses.curs_set(0)
    screen.timeout(int(interval * 1000))
    while True:
        frame = _top_lines(client.status(), client.metrics(),
                           screen.getmaxyx()[1] - 1)
        screen.erase()
        for row, line in enumerate(frame[:screen.getmaxyx()[0] - 1]):
            screen.addstr(row, 0, line)
        screen.addstr(min(len(frame), screen.getmaxyx()[0] - 1), 0,
                      "q: quit")
        screen.refresh()
        if screen.getch() in (ord("q"), ord("Q"), 27):
            return 0


def cmd_ping(args, client):
    deadline = time.monotonic() + (args.wait or 0)
    while True:
        try:
            print(f"lbd {client.ping()} at {client.socket_path}")
            return 0
        except Unavailable:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def cmd_drain(args, client):
    view = client.request("drain", worker=args.worker)["worker"]
    print(f"worker {view['id']} {view['state']}")
    return 0


def cmd_scale(args, client):
    fields = {k: v for k, v in (("min", args.min), ("max", args.max))
              if v is not None}
    response = client.request("scale", **fields)
    print(f"min {response['min_workers']}, max {response['max_workers']}")
    return 0


def cmd_reload(args, client):
    print(client.request("reload")["message"])
    return 0


def cmd_shutdown(args, client):
    client.shutdown()
    print("shutting down")
    return 0


def cmd_journal(args):
    try:
        with open(args.file, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise JournalError(f"cannot read {args.file}: {exc.strerror}"
                           ) from None
    records, bad = survey_journal(data)
    if args.action == "check":
        return _journal_check(args.file, data, records, bad)
    return _journal_repair(args.file, data, records, bad)


def _journal_summary(records):
    states = replay(check_header(records))
    by_state = collections.Counter(s["state"] for s in states.values())
    return f"{len(records)} record(s), {len(states)} task(s)" + "".join(
        f", {n} {state}" for state, n in sorted(by_state.items()))


def _journal_check(path, data, records, bad):
    print(f"{path}: {len(data)} bytes, {_journal_summary(records)}")
    for offset, length in bad:
        last = offset + length >= len(data)
        kind = "torn tail (truncated at the next start)" if last \
            else "corrupt record"
        print(f"  {kind} at byte {offset} ({length} bytes)")
    print("clean" if not bad else f"{len(bad)} damaged record(s): "
          f"'lbd journal repair {path}' keeps every valid record")
    return 0 if not bad else EXIT_FAILED


def _journal_repair(path, data, records, bad):
    if not bad:
        print(f"{path}: clean; nothing to repair")
        return 0
    fd = lock_journal(path)     # refuses while a daemon holds it
    try:
        backup = f"{path}.bak-{time.strftime('%Y%m%d-%H%M%S')}"
        with open(backup, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        temp = f"{path}.repair-{os.getpid()}"
        with open(temp, "wb") as f:
            f.write(b"".join(encode_record(r) for r in records))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
        fsync_dir(path)
    finally:
        os.close(fd)
    print(f"{path}: dropped {len(bad)} damaged record(s), kept "
          f"{len(records)}; the original is in {backup}")
    return 0


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _seconds(text):
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError("must be a number of seconds >= 0")
    return value


def build_parser():
    """Return the argparse parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="lbd", description="A lightweight load balancer for Python "
        "backends: a daemon, and the client commands that talk to it.")
    parser.add_argument("--version", action="version",
                        version=f"lbd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("-c", "--config", metavar="FILE")
    serve.add_argument("--socket", metavar="PATH")
    serve.add_argument("--journal", metavar="FILE")
    serve.add_argument("--handlers", metavar="MODS",
                       help="comma-separated handler modules")
    serve.add_argument("--min-workers", type=_positive_int, metavar="N")
    serve.add_argument("--max-workers", type=_positive_int, metavar="N")
    serve.add_argument("--log-level", default="INFO",
                       choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.set_defaults(func=cmd_serve, client=False)

    def client_cmd(name, func, help):
        p = sub.add_parser(name, help=help)
        p.add_argument("--socket", metavar="PATH",
                       help="daemon socket (default: $LBD_SOCKET, else "
                       "the same default as serve)")
        p.set_defaults(func=func, client=True)
        return p

    p = client_cmd("submit", cmd_submit, "submit a task")
    p.add_argument("handler", metavar="HANDLER",
                   help="module:function, or - to read JSON tasks from stdin")
    p.add_argument("args", nargs="*", metavar="ARG",
                   help="arguments, each JSON when it parses, else a string")
    p.add_argument("--kwargs", metavar="JSON")
    p.add_argument("--priority", type=int)
    p.add_argument("--timeout", type=float)
    p.add_argument("--deadline", type=float)
    p.add_argument("--delay", type=float)
    p.add_argument("--max-attempts", type=int)
    p.add_argument("--key")
    p.add_argument("--wait", action="store_true",
                   help="wait and print the result; exit 1 unless DONE")
    p.add_argument("--json", action="store_true",
                   help="with --wait, print the whole task view")

    p = client_cmd("get", cmd_get, "show a task")
    p.add_argument("id")
    p = client_cmd("wait", cmd_wait, "wait for a task to finish")
    p.add_argument("id")
    p.add_argument("--timeout", type=_seconds, metavar="S")
    p = client_cmd("cancel", cmd_cancel, "cancel a task")
    p.add_argument("id")
    p = client_cmd("status", cmd_status, "show workers and queue")
    p.add_argument("--json", action="store_true")
    p = client_cmd("metrics", cmd_metrics, "show counters and gauges")
    p.add_argument("--json", action="store_true")
    p = client_cmd("top", cmd_top, "a live view of workers, queue and rates")
    p.add_argument("--interval", type=_seconds, default=1.0, metavar="S")
    p.add_argument("--once", action="store_true",
                   help="print one plain frame (the default without a "
                   "terminal)")
    p = client_cmd("ping", cmd_ping, "check that the daemon answers")
    p.add_argument("--wait", type=_seconds, metavar="S",
                   help="keep trying for up to S seconds")
    p = client_cmd("drain", cmd_drain, "retire a worker after its task")
    p.add_argument("worker", type=int)
    p = client_cmd("scale", cmd_scale, "change the pool bounds")
    p.add_argument("--min", type=_positive_int)
    p.add_argument("--max", type=_positive_int)
    client_cmd("reload", cmd_reload, "re-read the config and roll the "
               "workers")
    client_cmd("shutdown", cmd_shutdown, "stop the daemon gracefully")

    journal = sub.add_parser("journal", help="check or repair a journal "
                             "file offline")
    journal.add_argument("action", choices=["check", "repair"])
    journal.add_argument("file")
    journal.set_defaults(func=cmd_journal, client=False)
    return parser


def _alias_module():
    """Make ``import lbd`` in handlers find this very module.

    Run as ``python3 lbd.py`` the code is ``__main__`` (under a profiler,
    not even that), and a handler's ``import lbd`` would load a second
    copy whose current_task() knows nothing. A module object over these
    functions serves: they keep reading this module's globals.
    """
    if "lbd" in sys.modules:
        return
    module = sys.modules.get(__name__)
    if module is None or module.__dict__ is not globals():
        module = type(sys)("lbd")
        module.__dict__.update(globals())
    sys.modules["lbd"] = module


def main(argv=None):
    """Run the ``lbd`` command line; return the exit status."""
    _alias_module()
    args = build_parser().parse_args(argv)
    try:
        if not args.client:
            logging.basicConfig(
                level=getattr(args, "log_level", "WARNING"),
                stream=sys.stderr,
                format="%(asctime)s lbd[%(process)d] %(levelname)s "
                       "%(message)s")
            return args.func(args)
        with Client(args.socket) as client:
            return args.func(args, client)
    except Unavailable as exc:
        print(f"lbd: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except RequestError as exc:
        print(f"lbd: error: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except LbdError as exc:
        print(f"lbd: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
