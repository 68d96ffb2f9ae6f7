"""The journal, in-process: framing, torn tails, corruption, replay,
recovery through a real lbd.Master, compaction, and the write/fsync seams.

Nothing here forks or starts a daemon: a Master is built on a journal in
tmp_path and driven by calling its methods, as its loop would.
"""

import errno
import json
import math
import os
import zlib

import pytest

import lbd

T = lbd.TaskState
DEFAULTS = {"timeout": 1.0, "max_attempts": 3}
WALL0 = 1_700_000_000.0
HEADER = {"k": "h", "v": lbd.JOURNAL_VERSION}


def spec(**fields):
    return lbd.validate_task({"handler": "lbd:echo", **fields}, DEFAULTS)


def make_task(seq, submitted_at=WALL0, **fields):
    return lbd.Task(seq, spec(**fields), submitted_at)


def frame(records):
    return b"".join(lbd.encode_record(r) for r in records)


def line_offsets(data):
    """Start offset of every line in ``data``."""
    offsets, pos = [], 0
    while pos < len(data):
        offsets.append(pos)
        newline = data.find(b"\n", pos)
        pos = len(data) if newline < 0 else newline + 1
    return offsets


def plain(obj):
    """``obj`` as the journal gives it back (enums become strings)."""
    return json.loads(json.dumps(obj))


def error(reason="exception", message="boom", **extra):
    return {"reason": reason, "type": "RuntimeError", "message": message,
            "traceback": "Traceback (most recent call last):\n  ...\n",
            **extra}


CRASH = {"reason": "crash", "type": None, "traceback": None,
         "message": "worker killed by SIGKILL", "worker": 2,
         "exit_code": None, "signal": "SIGKILL", "max_rss_kb": 9000}
CANCEL = {"reason": "cancelled", "type": None, "traceback": None,
          "message": "cancelled by request"}
EXPIRE = {"reason": "expired", "type": None, "traceback": None,
          "message": "deadline passed before the task could run"}


# == Framing ==================================================================

PAYLOADS = [
    {"k": "s"},
    {"k": "u", "text": "h\u00e9llo \u2603 \U0001d11e \u0000 \t tab",
     "quote": "a \"quoted\" \\ back\\slash", "nl": "line\nbreak\r\n"},
    {"k": "n", "deep": {"a": [1, [2, [3, {"b": [None, True, False]}]]]},
     "empty": [{}, [], ""]},
    {"k": "i", "big": 2 ** 200, "neg": -(2 ** 70), "zero": 0,
     "max": 10 ** 30},
    {"k": "f", "third": 1 / 3, "tiny": 5e-324, "huge": 1.7976931348623157e308,
     "neg0": -0.0, "e": 1e-7, "epoch": WALL0 + 0.123456},
    {"k": "t", "t": make_task(1796000000000001, args=["\u00fc", 2 ** 64],
                              kwargs={"\u00e9": {"x": [1.5]}},
                              priority=-7, deadline=30.0, delay=2.5,
                              key="k\u00ff").state_dict()},
]


@pytest.mark.parametrize("obj", PAYLOADS, ids=lambda o: o["k"])
def test_a_record_round_trips_as_exactly_one_line(obj):
    obj = plain(obj)
    line = lbd.encode_record(obj)
    assert isinstance(line, bytes)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert line.isascii()       # non-ASCII is escaped: no encoding issues
    decoded = lbd.decode_record(line[:-1])
    assert decoded == obj
    for name, value in obj.items():   # types survive: ints stay exact ints
        assert type(decoded[name]) is type(value)
    if "neg0" in obj:
        assert math.copysign(1.0, decoded["neg0"]) == -1.0


@pytest.mark.parametrize("obj", PAYLOADS, ids=lambda o: o["k"])
def test_the_checksum_is_the_crc32_of_the_payload(obj):
    line = lbd.encode_record(plain(obj))[:-1]
    crc, space, payload = line[:8], line[8:9], line[9:]
    assert space == b" "
    assert crc == b"%08x" % zlib.crc32(payload)
    assert json.loads(payload) == plain(obj)


def test_a_value_json_cannot_carry_is_refused_not_written():
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError):
            lbd.encode_record({"k": "d", "r": bad})


def test_decode_rejects_every_kind_of_damage():
    def framed(payload):
        return b"%08x %s" % (zlib.crc32(payload), payload)

    good = lbd.encode_record({"k": "d", "id": 1, "r": 5})[:-1]
    assert lbd.decode_record(good) == {"k": "d", "id": 1, "r": 5}
    bad = [
        b"", b"0" * 10, good[:10],          # too short
        good[:8] + b"_" + good[9:],         # no space after the CRC
        b"zzzzzzzz" + good[8:],             # CRC not hex
        b"%08x" % ((int(good[:8], 16) + 1) % 2 ** 32) + good[8:],
        good[:-1] + b"6",                   # payload changed
        framed(b'{"k": "d", "id": '),       # right CRC, not JSON
        framed(b"[1, 2, 3]"),               # not an object
        framed(b'"a string"'),
        framed(b'{"id": 1}'),               # no kind
        framed(b'{"k": 7}'),                # kind not a string
    ]
    for line in bad:
        assert lbd.decode_record(line) is None, line


# == Torn tails and corruption ================================================


def sample_records():
    """A header and a realistic run of records for three tasks."""
    a = make_task(1796000000000001, args=["x" * 40])
    b = make_task(1796000000000002, delay=5.0, key="kb", priority=3)
    c = make_task(1796000000000003, deadline=60.0, kwargs={"n": 2 ** 70})
    return plain([
        HEADER,
        {"k": "s", "t": a.submit_record()},
        {"k": "s", "t": b.submit_record()},
        {"k": "r", "id": a.seq, "a": 1, "w": 1, "at": WALL0 + 1},
        {"k": "s", "t": c.submit_record()},
        {"k": "f", "id": a.seq, "e": error(), "crash": False,
         "run_at": None},
        {"k": "r", "id": a.seq, "a": 2, "w": 2, "at": WALL0 + 2},
        {"k": "d", "id": a.seq, "r": {"\u00e9": [1, 2]}, "at": WALL0 + 3},
        {"k": "x", "id": c.seq, "st": "CANCELLED", "e": CANCEL,
         "at": WALL0 + 4},
    ])


def test_a_clean_journal_scans_to_its_end():
    records = sample_records()
    data = frame(records)
    assert lbd.scan_journal(data) == (records, len(data), None)


def test_records_are_decoded_as_they_are_reached():
    records = sample_records()
    data = bytearray(frame(records))
    second = line_offsets(bytes(data))[2]
    data[second + 3] ^= 0xFF           # a record with good ones after it
    tail = []
    reading = lbd.iter_journal(bytes(data), tail)
    assert next(reading) == records[0] and next(reading) == records[1]
    with pytest.raises(lbd.JournalCorrupt):
        next(reading)
    assert tail == []                  # no end: it never got there


def test_an_empty_file_has_no_records():
    assert lbd.scan_journal(b"") == ([], 0, None)
    assert lbd.check_header([]) == []
    assert lbd.replay([]) == {}


def test_a_torn_last_record_at_every_byte_offset_is_a_torn_tail():
    records = sample_records()
    data = frame(records)
    last = line_offsets(data)[-1]
    # Keep 0 bytes of the last record (clean), then 1 .. all but its newline.
    assert lbd.scan_journal(data[:last]) == (records[:-1], last, None)
    for cut in range(last + 1, len(data)):
        got, end, torn = lbd.scan_journal(data[:cut])
        assert got == records[:-1], cut
        assert end == last, cut
        assert torn and f"byte {last}" in torn, (cut, torn)
        assert f"({cut - last} bytes)" in torn, (cut, torn)


def test_a_cut_anywhere_keeps_exactly_the_whole_records_before_it():
    records = sample_records()
    data = frame(records)
    starts = line_offsets(data) + [len(data)]
    for cut in range(len(data) + 1):
        whole = sum(1 for s in starts[1:] if s <= cut)
        got, end, torn = lbd.scan_journal(data[:cut])
        assert got == records[:whole], cut
        assert end == starts[whole], cut
        assert (torn is None) == (cut == starts[whole]), cut


def test_a_flipped_byte_before_valid_records_is_corruption_at_its_offset():
    records = sample_records()
    data = frame(records)
    starts = line_offsets(data)
    for index, start in enumerate(starts[:-1]):
        for pos in range(start, starts[index + 1]):
            damaged = bytearray(data)
            damaged[pos] ^= 0x01
            with pytest.raises(lbd.JournalCorrupt) as err:
                lbd.scan_journal(bytes(damaged))
            assert err.value.offset == start, (index, pos)
            assert f"byte {start}" in str(err.value), (index, pos)
            assert isinstance(err.value, lbd.JournalError)


@pytest.mark.parametrize("mask", [0x02, 0x10, 0x20, 0x40, 0x80, 0xff])
def test_damage_is_never_read_back_as_different_records(mask):
    """Whatever a byte becomes, the scan reports it or reads the same data
    (the CRC field's int() parsing tolerates e.g. a leading blank)."""
    records = sample_records()
    data = frame(records)
    starts = line_offsets(data)
    for index, start in enumerate(starts[:-1]):
        for pos in range(start, starts[index + 1]):
            damaged = bytearray(data)
            damaged[pos] ^= mask
            try:
                got, _, torn = lbd.scan_journal(bytes(damaged))
            except lbd.JournalCorrupt as exc:
                assert exc.offset == start, (index, pos, mask)
                continue
            assert got == records and torn is None, (index, pos, mask)


def test_a_flipped_newline_before_the_last_record_is_not_a_torn_tail():
    """Two whole records joined by one damaged newline are corruption: a
    torn write only cuts records short, and truncating would drop both."""
    records = sample_records()
    data = frame(records)
    starts = line_offsets(data)
    damaged = bytearray(data)
    damaged[starts[-1] - 1] ^= 0x01     # "\n" -> "\x0b": two lines merge
    # The last record is still there, whole and valid; a crash cannot
    # produce a newline-terminated line with a valid record inside.
    assert lbd.encode_record(records[-1]) in bytes(damaged)
    with pytest.raises(lbd.JournalCorrupt) as err:
        lbd.scan_journal(bytes(damaged))
    assert err.value.offset == starts[-2]


def test_a_flipped_byte_in_the_last_record_is_a_torn_tail():
    records = sample_records()
    data = frame(records)
    last = line_offsets(data)[-1]
    for pos in range(last, len(data)):
        damaged = bytearray(data)
        damaged[pos] ^= 0x01
        got, end, torn = lbd.scan_journal(bytes(damaged))
        assert got == records[:-1] and end == last, pos
        assert torn and f"byte {last}" in torn, pos


@pytest.mark.parametrize("garbage", [
    b"\0" * 100, b"\0" * 4096 + b"\n", b"garbage without newline",
    b"not a record\n", b"x\ny\nz\n\n", b"\xff\xfe\n\x00",
    b"\n", b"deadbeef {\"k\":\"s\"}\n",
])
def test_trailing_garbage_is_a_torn_tail(garbage):
    records = sample_records()
    data = frame(records)
    got, end, torn = lbd.scan_journal(data + garbage)
    assert got == records and end == len(data)
    assert torn and f"byte {len(data)}" in torn


def test_a_zero_filled_file_is_a_torn_tail_with_no_records():
    assert lbd.scan_journal(b"\0" * 100) == (
        [], 0, "incomplete record at byte 0 (100 bytes)")


def test_survey_finds_every_good_record_around_the_damage():
    records = sample_records()
    data = bytearray(frame(records))
    starts = line_offsets(bytes(data))
    data[starts[3] + 12] ^= 0x01
    data += b"torn"
    got, bad = lbd.survey_journal(bytes(data))
    assert got == records[:3] + records[4:]
    assert [offset for offset, _ in bad] == [starts[3], len(data) - 4]
    assert bad[0][1] == starts[4] - starts[3]


def test_survey_reports_the_length_of_an_incomplete_tail():
    data = frame(sample_records()) + b"torn"
    _, bad = lbd.survey_journal(data)
    assert bad == [(len(data) - 4, 4)]      # no newline counted


def test_journal_check_reports_the_torn_tail_it_finds(tmp_path, capsys):
    path = tmp_path / "j"
    path.write_bytes(frame(sample_records()) + b"torn")
    assert lbd.main(["journal", "check", str(path)]) == lbd.EXIT_FAILED
    out = capsys.readouterr().out
    assert f"torn tail (truncated at the next start) at byte " \
        f"{path.stat().st_size - 4} (4 bytes)" in out
    path.write_bytes(frame(sample_records()))
    assert lbd.main(["journal", "check", str(path)]) == 0
    assert "clean" in capsys.readouterr().out


# == The header ===============================================================


def test_check_header_returns_the_records_after_it():
    records = sample_records()
    assert lbd.check_header(records) == records[1:]
    assert lbd.check_header([HEADER]) == []


@pytest.mark.parametrize("version", range(0, lbd.JOURNAL_VERSION + 1))
def test_an_older_or_equal_version_is_read(version):
    body = [{"k": "s", "t": plain(make_task(1).submit_record())}]
    assert lbd.check_header([{"k": "h", "v": version}] + body) == body


@pytest.mark.parametrize("records", [
    [{"k": "s", "t": {}}],                       # header missing
    [{"k": "h"}],                                # no version
    [{"k": "h", "v": "1"}],                      # version not an int
    [{"k": "x", "v": 1}, HEADER],                # header not first
], ids=["missing", "no-version", "string-version", "not-first"])
def test_a_journal_without_a_header_is_refused(records):
    with pytest.raises(lbd.JournalError, match="not an lbd journal"):
        lbd.check_header(records)


def test_a_newer_journal_version_is_refused_naming_both():
    newer = lbd.JOURNAL_VERSION + 1
    with pytest.raises(lbd.JournalError) as err:
        lbd.check_header([{"k": "h", "v": newer}])
    assert f"version {newer}" in str(err.value)
    assert str(lbd.JOURNAL_VERSION) in str(err.value)


# == Replay ===================================================================

A = 1796000000000101


def submit(task):
    """The submit record as the daemon writes it (journal version 2)."""
    fields = task.submit_record()
    return {"k": "S", "t": [fields[name] for name in lbd.Task.SUBMIT_FIELDS]}


def submit_v1(task):
    """The submit record as journal version 1 wrote it."""
    return {"k": "s", "t": task.submit_record()}


def test_a_version_1_submit_record_replays_like_the_compact_one():
    tasks = [make_task(A), make_task(A + 1, priority=-3, key="k1",
                                     deadline=30.0, delay=60.0),
             make_task(A + 2, args=[1, "two"], kwargs={"x": [None]})]
    for task in tasks:
        assert replayed([submit_v1(task)]) == replayed([submit(task)])
    # The two kinds may share a journal: an old file the new daemon
    # appended to.
    mixed = replayed([submit_v1(tasks[0]), submit(tasks[1]),
                      {"k": "r", "id": A, "a": 1, "w": 1, "at": WALL0}])
    assert mixed[A]["state"] == "RUNNING" and mixed[A + 1]["key"] == "k1"


def test_a_version_1_snapshot_record_replays_like_the_compact_one():
    task = make_task(A, args=[1], key="k", deadline=30.0)
    task.state, task.attempts, task.crashes = lbd.TaskState.DONE, 2, 1
    task.errors, task.result = [error()], {"r": [1.5]}
    task.started_at, task.finished_at, task.worker = WALL0 + 1, WALL0 + 2, 3
    v1 = replayed([{"k": "t", "t": task.state_dict()}])
    v2 = replayed([{"k": "T", "t": task.state_values()}])
    assert v1 == v2 == {A: plain(task.state_dict())}


def test_the_daemon_writes_the_compact_submit_record():
    task = make_task(A, args=[1], key="k")
    assert lbd.decode_record(lbd.frame_json(task.submit_json())[:-1]) == \
        json.loads(json.dumps(submit(task)))


def start(seq, attempt, worker=1, at=WALL0 + 1):
    return {"k": "r", "id": seq, "a": attempt, "w": worker, "at": at}


def done(seq, result, at=WALL0 + 5):
    return {"k": "d", "id": seq, "r": result, "at": at}


def fail(seq, err, run_at=None, crash=False):
    return {"k": "f", "id": seq, "e": err, "crash": crash, "run_at": run_at}


def end(seq, state, err, at=WALL0 + 6, last=None, crashes=None):
    record = {"k": "x", "id": seq, "st": state, "e": err, "at": at}
    if last is not None:
        record["le"] = last
        record["crash"] = crashes
    return record


def replayed(records):
    """Replay records the way the daemon reads them: framed and scanned."""
    data = frame(plain([HEADER] + records))
    got, _, torn = lbd.scan_journal(data)
    assert torn is None
    return lbd.replay(lbd.check_header(got))


def expect(task, **progress):
    """The state dict of ``task`` after its submit, updated by progress."""
    state = plain(task.state_dict())
    state.update(state="DELAYED" if task.run_at else "QUEUED")
    state.update(plain(progress))
    return state


def test_submit_start_done():
    task = make_task(A, args=[1])
    states = replayed([submit(task), start(A, 1, worker=4),
                       done(A, {"r": [1]})])
    assert states == {A: expect(task, state="DONE", attempts=1,
                                worker=4, started_at=WALL0 + 1,
                                finished_at=WALL0 + 5, result={"r": [1]})}
    lbd.Task.from_state(states[A])      # a whole, usable state


def test_each_prefix_of_a_run_replays_to_its_own_state():
    task = make_task(A)
    records = [submit(task), start(A, 1), done(A, 7)]
    assert replayed(records[:1])[A]["state"] == "QUEUED"
    assert replayed(records[:2])[A]["state"] == "RUNNING"
    assert replayed(records[:3])[A]["state"] == "DONE"


def test_a_failed_attempt_retried_at_once_then_done():
    task = make_task(A)
    e1 = error(message="first")
    states = replayed([submit(task), start(A, 1, worker=1),
                       fail(A, e1), start(A, 2, worker=2, at=WALL0 + 2),
                       done(A, "ok")])
    assert states[A] == expect(task, state="DONE", attempts=2, worker=2,
                               started_at=WALL0 + 2, errors=[e1],
                               error=None, result="ok",
                               finished_at=WALL0 + 5)
    # Before the second start it was back in the ready queue.
    states = replayed([submit(task), start(A, 1), fail(A, e1)])
    assert states[A]["state"] == "QUEUED"
    assert states[A]["error"] == e1 and states[A]["run_at"] is None


def test_a_failed_attempt_with_a_run_at_is_delayed_until_then():
    task = make_task(A)
    states = replayed([submit(task), start(A, 1),
                       fail(A, CRASH, run_at=WALL0 + 30, crash=True)])
    assert states[A] == expect(task, state="DELAYED", attempts=1,
                               worker=1, started_at=WALL0 + 1,
                               errors=[CRASH], error=CRASH, crashes=1,
                               run_at=WALL0 + 30)


def test_a_retry_at_once_keeps_the_original_delay():
    task = make_task(A, delay=10.0)
    states = replayed([submit(task), start(A, 1), fail(A, error())])
    assert states[A]["state"] == "QUEUED"
    assert states[A]["run_at"] == WALL0 + 10.0


def test_out_of_attempts_is_dead_with_the_last_error():
    task = make_task(A, max_attempts=1)
    e = error(message="last")
    states = replayed([submit(task), start(A, 1),
                       end(A, "DEAD", e, last=e, crashes=0)])
    assert states[A] == expect(task, state="DEAD", attempts=1, worker=1,
                               started_at=WALL0 + 1, errors=[e], error=e,
                               finished_at=WALL0 + 6)


def test_poison_is_dead_with_every_crash_counted():
    task = make_task(A)
    poison = dict(CRASH, reason="poison", message="quarantined")
    states = replayed([
        submit(task), start(A, 1), fail(A, CRASH, crash=True),
        start(A, 2, worker=3, at=WALL0 + 2),
        end(A, "DEAD", poison, last=CRASH, crashes=2)])
    assert states[A] == expect(task, state="DEAD", attempts=2, worker=3,
                               started_at=WALL0 + 2, crashes=2,
                               errors=[CRASH, CRASH], error=poison,
                               finished_at=WALL0 + 6)


def test_a_queued_task_cancelled():
    task = make_task(A, key="kc")
    states = replayed([submit(task), end(A, "CANCELLED", CANCEL)])
    assert states[A] == expect(task, state="CANCELLED", error=CANCEL,
                               finished_at=WALL0 + 6)
    assert states[A]["attempts"] == 0 and states[A]["errors"] == []


def test_a_running_task_cancelled():
    task = make_task(A)
    states = replayed([submit(task), start(A, 1),
                       end(A, "CANCELLED", CANCEL)])
    assert states[A]["state"] == "CANCELLED" and states[A]["attempts"] == 1
    assert states[A]["errors"] == [] and states[A]["crashes"] == 0


def test_a_delayed_task_expired():
    task = make_task(A, delay=60.0, deadline=30.0)
    assert replayed([submit(task)])[A]["state"] == "DELAYED"
    states = replayed([submit(task), end(A, "EXPIRED", EXPIRE)])
    assert states[A] == expect(task, state="EXPIRED", error=EXPIRE,
                               finished_at=WALL0 + 6)
    assert states[A]["deadline_at"] == WALL0 + 30.0
    assert states[A]["run_at"] == WALL0 + 60.0


def test_requeued_at_shutdown_the_attempt_does_not_count():
    task = make_task(A)
    states = replayed([submit(task), start(A, 1), {"k": "q", "id": A}])
    assert states[A]["state"] == "QUEUED" and states[A]["attempts"] == 0
    e1 = error()
    states = replayed([submit(task), start(A, 1), fail(A, e1),
                       start(A, 2), {"k": "q", "id": A},
                       start(A, 2, worker=5), done(A, 1)])
    assert states[A]["state"] == "DONE" and states[A]["attempts"] == 2
    assert states[A]["errors"] == [e1]


def test_a_snapshot_then_later_records():
    task = make_task(A, key="ks", deadline=100.0)
    e1 = error()
    task.state, task.attempts, task.errors, task.error = \
        T.QUEUED, 1, [e1], e1
    task.started_at, task.worker = WALL0 + 1, 1
    snap = {"k": "t", "t": task.state_dict()}
    assert replayed([snap])[A] == plain(task.state_dict())
    states = replayed([snap, start(A, 2, worker=2, at=WALL0 + 9),
                       done(A, "fine")])
    assert states[A] == dict(plain(task.state_dict()), state="DONE",
                             attempts=2, worker=2, started_at=WALL0 + 9,
                             error=None, result="fine",
                             finished_at=WALL0 + 5)
    # A snapshot replaces whatever came before it for that task.
    old = make_task(A)
    assert replayed([submit(old), start(A, 1), snap])[A] == \
        plain(task.state_dict())


def test_records_for_an_unknown_task_are_ignored():
    task = make_task(A)
    gone = A + 1                    # dropped by an earlier compaction
    states = replayed([start(gone, 1), submit(task), fail(gone, error()),
                       done(gone, 1), end(gone, "DEAD", error()),
                       {"k": "q", "id": gone}])
    assert list(states) == [A]
    assert states[A] == expect(task)


def test_an_unknown_record_kind_is_an_error():
    task = make_task(A)
    with pytest.raises(lbd.JournalError, match="unknown journal record"):
        replayed([submit(task), {"k": "z", "id": A}])


@pytest.mark.parametrize("bad", [
    {"k": "r", "id": A, "w": 1, "at": WALL0},               # no attempt
    {"k": "f", "id": A, "e": None, "crash": False},         # no run_at
    {"k": "x", "id": A, "e": None, "at": WALL0},            # no state
    {"k": "s", "t": {"seq": A}},                            # no fields
    {"k": "S", "t": [A + 1]},                               # too few
    {"k": "S", "t": {"seq": A + 1}},                        # not a list
    {"k": "T", "t": [A + 1, "lbd:echo"]},                   # too few
])
def test_a_malformed_record_is_a_journal_error_not_a_crash(bad):
    with pytest.raises(lbd.JournalError, match="malformed"):
        replayed([submit(make_task(A)), bad])


def test_replay_orders_tasks_by_sequence():
    seqs = [A + 30, A + 10, A + 20, A + 5]
    records = [submit(make_task(s)) for s in seqs]
    snapshot = make_task(A + 1)
    snapshot.state = lbd.TaskState.QUEUED
    records.append({"k": "t", "t": snapshot.state_dict()})
    states = replayed(records)
    assert list(states) == sorted(seqs + [A + 1])
    assert all(states[s]["seq"] == s for s in states)


def test_replay_keeps_a_journal_in_order_as_it_is():
    records = [submit(make_task(A + i)) for i in range(5)]
    assert list(lbd.replay_tasks(records)) == [A + i for i in range(5)]


# == Replay matches the Master it came from ===================================


class FakeClock:
    def __init__(self, now, tick=0.0):
        self.now = now
        self.tick = tick

    def __call__(self):
        self.now += self.tick
        return self.now


@pytest.fixture
def masters(tmp_path):
    """make(path, config, clock, wall) -> a Master that replayed ``path``."""
    made = []

    def make(path=None, config=None, clock=None, wall=None):
        config = dict(config or {})
        config["journal"] = {"path": str(path or tmp_path / "j"),
                             **config.get("journal", {})}
        m = lbd.Master(lbd.build_config(config),
                       clock=clock or FakeClock(5000.0),
                       wall=wall or FakeClock(WALL0))
        made.append(m)
        try:
            m._recover()
        except BaseException:
            if m.journal.fd >= 0:        # a refused journal stays locked
                os.close(m.journal.fd)
                m.journal.fd = -1
            m.selector.close()
            made.remove(m)
            raise
        return m

    yield make
    for m in made:
        close(m)


def close(m):
    """What the Master does when it stops: flush, fsync, close."""
    if m.journal is not None and m.journal.fd >= 0:
        m.journal.close()
    m.selector.close()


def fake_worker(wid):
    worker = lbd.Worker(wid, 0, None, 0.0)     # no socket: sends are dropped
    lbd.transition(lbd.WORKER_TRANSITIONS, worker, lbd.WorkerState.STARTING)
    lbd.transition(lbd.WORKER_TRANSITIONS, worker, lbd.WorkerState.IDLE)
    return worker


def dispatch(m, task, wid=1):
    """Start ``task`` on a fresh fake worker, as _dispatch would: popped
    off the ready queue (the tasks ahead of it go back in line)."""
    ahead = []
    while (top := m.ready.pop()) is not task:
        assert top is not None, f"task {task.id} is not ready"
        ahead.append(top)
    for other in ahead:
        m.ready.push_task(other)
    worker = fake_worker(wid)
    m._start_attempt(worker, task)
    return worker


def result(m, worker, task, value):
    m._worker_result(worker, {"t": "ok", "id": task.id,
                              "a": task.attempts, "r": value})


def failure(m, worker, task, err):
    m._worker_result(worker, {"t": "err", "id": task.id,
                              "a": task.attempts, "e": err})


def crash(m, worker, task, reason=None):
    info = {"exit_code": None, "signal": "SIGKILL", "max_rss_kb": 1}
    worker.kill_reason = reason
    m._settle_orphan(task, worker, reason, info)


def journal_states(path):
    with open(path, "rb") as f:
        data = f.read()
    records, _, torn = lbd.scan_journal(data)
    assert torn is None
    return lbd.replay(lbd.check_header(records))


def live_states(m):
    return {t.seq: plain(t.state_dict()) for t in m.tasks.values()}


def run_every_transition(m):
    """Drive tasks through every transition the Master journals."""
    clock, wall = m.clock, m.wall

    def later(seconds=1.0):
        clock.now += seconds
        wall.now += seconds

    new = [m.new_task(spec(args=[i], **fields)) for i, fields in enumerate([
        {},                                          # 0 done
        {"key": "k1"},                               # 1 fail, retry, done
        {"max_attempts": 1},                         # 2 dead
        {"priority": 5},                             # 3 crash x2: poison
        {"delay": 30.0, "deadline": 10.0},           # 4 delayed, expires
        {"deadline": 500.0},                         # 5 cancelled queued
        {},                                          # 6 cancelled running
        {},                                          # 7 requeued (shutdown)
        {"retry_on_error": False},                   # 8 dead at once
        {"delay": 2.0},                              # 9 delayed, then done
        {},                                          # 10 backoff retry
        {"deadline": 18.0},                          # 11 fails past deadline
        {"priority": -2},                            # 12 left running
        {"key": "k13", "delay": 100.0},              # 13 stays delayed
        {"key": "k14"},                              # 14 stays queued
    ])]
    later()
    w = dispatch(m, new[0])
    later()
    result(m, w, new[0], {"n": [0, "\u00e9"]})

    w = dispatch(m, new[1])
    failure(m, w, new[1], error(message="once"))        # backoff 0: at once
    later()
    w = dispatch(m, new[1], 2)
    result(m, w, new[1], 1)

    w = dispatch(m, new[2])
    failure(m, w, new[2], error(message="only try"))

    for wid in (3, 4):
        w = dispatch(m, new[3], wid)
        crash(m, w, new[3])

    later(11.0)                       # past task 4's deadline
    m._run_due(clock())

    m.op_cancel(None, {"op": "cancel", "id": new[5].id}, None)
    dispatch(m, new[6])
    m.op_cancel(None, {"op": "cancel", "id": new[6].id}, None)

    w = dispatch(m, new[7])
    crash(m, w, new[7], reason="shutdown")

    w = dispatch(m, new[8])
    failure(m, w, new[8], error(message="no retry"))

    later(2.0)
    m._run_due(clock())               # task 9 is due now
    w = dispatch(m, new[9])
    result(m, w, new[9], "late")

    w = dispatch(m, new[10])
    m.cfg["tasks"].retry_backoff = 5.0
    failure(m, w, new[10], error(message="backoff"))
    m.cfg["tasks"].retry_backoff = 0.0

    w = dispatch(m, new[11])
    later(5.0)
    failure(m, w, new[11], error(message="too late"))

    dispatch(m, new[12])
    return new


def test_replay_rebuilds_exactly_the_state_the_master_had(masters, tmp_path):
    m = masters(config={"tasks": {"retry_backoff": 0.0, "max_crashes": 2}})
    tasks = run_every_transition(m)
    states = [t.state for t in tasks]
    assert states == [T.DONE, T.DONE, T.DEAD, T.DEAD, T.EXPIRED,
                      T.CANCELLED, T.CANCELLED, T.QUEUED, T.DEAD, T.DONE,
                      T.DELAYED, T.EXPIRED, T.RUNNING, T.DELAYED, T.QUEUED]
    assert tasks[3].error["reason"] == "poison"
    assert tasks[7].attempts == 0           # the shutdown did not count
    assert m.journal.flush()
    assert journal_states(tmp_path / "j") == live_states(m)


def test_a_backoff_retry_keeps_its_run_at_across_a_restart(masters,
                                                           tmp_path):
    m = masters(wall=FakeClock(WALL0, tick=0.001))   # time moves on
    task = m.new_task(spec())
    w = dispatch(m, task)
    failure(m, w, task, error())
    assert task.state is T.DELAYED
    assert m.journal.flush()
    assert journal_states(tmp_path / "j")[task.seq]["run_at"] == \
        task.run_at


# == Recovery through a real Master ===========================================


def submit_mix(m):
    """Tasks of every live kind, one wall/monotonic second apart."""
    fields = [
        {"args": ["a"]},
        {"args": ["b"], "priority": 5},
        {"args": ["c"], "key": "kc"},
        {"args": ["d"], "priority": 5, "deadline": 100.0},
        {"args": ["e"], "delay": 30.0, "key": "ke"},
        {"args": ["f"], "delay": 60.0, "deadline": 600.0, "priority": -1},
        {"args": ["\u00fc\u2603", {"big": 2 ** 80}], "priority": -3,
         "kwargs": {"x": 1.25}},
        {"args": ["h"], "priority": 5, "key": "kh", "timeout": 9.5,
         "max_attempts": 7, "retry_on_error": False},
        {"args": ["i"]},
    ]
    tasks = []
    for f in fields:
        tasks.append(m.new_task(spec(**f)))
        m.clock.now += 1.0
        m.wall.now += 1.0
    return tasks


def drain(queue):
    out = []
    while (task := queue.pop()) is not None:
        out.append(task.id)
    return out


def test_a_second_master_restores_every_task(masters, tmp_path):
    m1 = masters()
    tasks = submit_mix(m1)
    finished = m1.new_task(spec(key="kdone"))
    result(m1, dispatch(m1, finished), finished, "r")
    views = {t.id: plain(t.view()) for t in m1.tasks.values()}
    assert m1.journal.flush()
    close(m1)

    # Another boot: its monotonic clock starts elsewhere, the wall moved on.
    wall2 = WALL0 + 20.0
    m2 = masters(clock=FakeClock(123.0), wall=FakeClock(wall2))
    assert {t.id: plain(t.view()) for t in m2.tasks.values()} == views
    for tid, task in m2.tasks.items():
        assert task.state == views[tid]["state"]
        assert isinstance(task.state, T)
    order1 = drain(m1.ready)
    order2 = drain(m2.ready)
    assert order2 == order1
    assert order1 == [tasks[i].id for i in (1, 3, 7, 0, 2, 8, 6)]
    delayed = {t.id for t in tasks if t.run_at is not None}
    assert {t.id for t in m2.tasks.values() if t.state is T.DELAYED} == \
        delayed
    for tid in delayed:
        task = m2.tasks[tid]
        assert task.delay_entry is not None
        assert task.delay_entry[0] == pytest.approx(
            123.0 + task.run_at - wall2)
    for task in (tasks[3], tasks[5]):
        restored = m2.tasks[task.id]
        assert restored.expires == pytest.approx(
            123.0 + task.deadline_at - wall2)
        assert restored.deadline_entry is not None
    for key, task in (("kc", tasks[2]), ("ke", tasks[4]), ("kh", tasks[7]),
                      ("kdone", finished)):
        assert m2.find_duplicate(key) is m2.tasks[task.id], key
    assert m2.find_duplicate("nope") is None
    again = m2.op_submit(None, {"op": "submit", "task": {
        "handler": "lbd:echo", "key": "kc"}}, None)
    assert again == {"ok": True, "id": tasks[2].id, "duplicate": True}
    # New ids never reuse a recovered one.
    fresh = m2.new_task(spec())
    assert fresh.seq > max(t.seq for t in tasks + [finished])


def test_ids_are_not_reused_after_the_clock_steps_back(masters, tmp_path,
                                                       monkeypatch):
    m1 = masters()
    old = [m1.new_task(spec()) for _ in range(3)]
    close(m1)
    # The next boot's clock is an hour behind (an NTP step, a bad RTC).
    behind = old[0].seq * 1000 - 3600 * 10 ** 9
    monkeypatch.setattr(lbd.time, "time_ns", lambda: behind)
    m2 = masters()
    monkeypatch.undo()
    fresh = m2.new_task(spec())
    assert fresh.seq > max(t.seq for t in old)
    assert fresh.id not in {t.id for t in old}


def test_a_restart_with_nothing_new_changes_nothing(masters, tmp_path):
    m1 = masters()
    submit_mix(m1)
    close(m1)
    m2 = masters()
    views = {t.id: plain(t.view()) for t in m2.tasks.values()}
    size = os.path.getsize(tmp_path / "j")
    close(m2)
    m3 = masters()
    assert {t.id: plain(t.view()) for t in m3.tasks.values()} == views
    assert os.path.getsize(tmp_path / "j") == size


def test_a_task_left_running_comes_back_queued_with_the_attempt_counted(
        masters, tmp_path):
    m1 = masters()
    task = m1.new_task(spec(args=[1], deadline=1000.0))
    close(m1)
    with open(tmp_path / "j", "ab") as f:      # the daemon died mid-attempt
        f.write(lbd.encode_record(start(task.seq, 1, worker=7)))

    m2 = masters()
    back = m2.tasks[task.id]
    assert back.state is T.QUEUED
    assert back.attempts == 1
    assert [e["reason"] for e in back.errors] == ["interrupted"]
    assert back.error == back.errors[0]
    assert back.error["worker"] == 7
    assert "attempt 1" in back.error["message"]
    assert m2.running_count == 0
    assert m2.ready.pop() is back
    assert back.deadline_entry is not None       # its deadline still holds
    close(m2)

    # The decision was journaled: a third boot does not count it again.
    m3 = masters()
    again = m3.tasks[task.id]
    assert again.state is T.QUEUED and again.attempts == 1
    assert len(again.errors) == 1


def test_a_task_left_running_on_its_last_attempt_comes_back_dead(
        masters, tmp_path):
    m1 = masters(config={"tasks": {"retry_backoff": 0.0}})
    task = m1.new_task(spec(max_attempts=2, key="klast"))
    w = dispatch(m1, task)
    failure(m1, w, task, error(message="first"))
    assert task.state is T.QUEUED
    dispatch(m1, task, 2)                # attempt 2 of 2 is running...
    close(m1)                            # ...when the daemon dies

    m2 = masters()
    back = m2.tasks[task.id]
    assert back.state is T.DEAD
    assert back.attempts == 2
    assert [e["reason"] for e in back.errors] == ["exception", "interrupted"]
    assert back.error["reason"] == "interrupted"
    assert back.finished_at is not None
    assert m2.running_count == 0 and len(m2.ready) == 0
    assert m2.find_duplicate("klast") is back
    close(m2)
    assert masters().tasks[task.id].state is T.DEAD


def test_a_task_left_running_past_its_deadline_comes_back_expired(
        masters, tmp_path):
    m1 = masters()
    task = m1.new_task(spec(deadline=5.0))
    dispatch(m1, task)
    close(m1)
    m2 = masters(wall=FakeClock(WALL0 + 60.0))
    back = m2.tasks[task.id]
    assert back.state is T.EXPIRED
    assert back.errors[-1]["reason"] == "interrupted"


def test_the_journal_is_locked_while_a_master_has_it(masters, tmp_path):
    path = str(tmp_path / "j")
    m1 = masters()
    with pytest.raises(lbd.JournalError) as err:
        lbd.lock_journal(path)
    assert f"pid {os.getpid()}" in str(err.value)
    assert path in str(err.value)
    with pytest.raises(lbd.JournalError, match=f"pid {os.getpid()}"):
        masters()
    close(m1)
    fd = lbd.lock_journal(path)         # free again once it is closed
    os.close(fd)


def test_opening_truncates_a_torn_tail_and_appends_after_it(masters,
                                                            tmp_path):
    path = tmp_path / "j"
    m1 = masters()
    task = m1.new_task(spec())
    close(m1)
    good = path.read_bytes()
    with open(path, "ab") as f:
        f.write(lbd.encode_record(done(task.seq, 1))[:-5])
    m2 = masters()
    assert path.read_bytes() == good
    assert m2.tasks[task.id].state is T.QUEUED
    result(m2, dispatch(m2, m2.tasks[task.id]), m2.tasks[task.id], "ok")
    close(m2)
    assert masters().tasks[task.id].state is T.DONE


def test_a_corrupt_journal_refuses_to_open_naming_the_offset(masters,
                                                             tmp_path):
    path = tmp_path / "j"
    m1 = masters()
    submit_mix(m1)
    close(m1)
    data = bytearray(path.read_bytes())
    third = line_offsets(bytes(data))[2]
    data[third + 30] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(lbd.JournalCorrupt) as err:
        masters()
    assert err.value.offset == third
    assert f"byte {third}" in str(err.value)
    assert "lbd journal check" in str(err.value)
    assert path.read_bytes() == bytes(data)      # nothing was truncated


def test_a_newer_journal_refuses_to_open(masters, tmp_path):
    path = tmp_path / "j"
    path.write_bytes(lbd.encode_record({"k": "h", "v": 99}))
    with pytest.raises(lbd.JournalError, match="version 99"):
        masters()


# == Compaction, in-process ===================================================


def test_a_snapshot_installed_replays_to_the_same_state(masters, tmp_path):
    path = tmp_path / "j"
    m1 = masters(config={"tasks": {"retry_backoff": 0.0}})
    run_every_transition(m1)
    assert m1.journal.flush()
    before = path.stat().st_size
    journal = m1.journal
    journal.since_fork = bytearray()
    journal.write_snapshot(4242, list(m1.tasks.values()))
    # Records written while the "child" runs go to both files.
    later = m1.new_task(spec(args=["after the fork"]))
    result(m1, dispatch(m1, m1.tasks[later.id]), later, "x")
    assert journal.flush()
    journal.install_snapshot(4242)
    assert not os.path.exists(f"{path}.compact-4242")
    records, _, torn = lbd.scan_journal(path.read_bytes())
    assert torn is None and records[0] == HEADER
    kinds = [r["k"] for r in records[1:]]
    snapshots = len(m1.tasks) - 1
    assert kinds[:snapshots] == ["T"] * snapshots      # one per task...
    assert kinds[snapshots:] == ["S", "r", "d"]        # ...then the rest
    assert path.stat().st_size < before * 2
    assert journal.size == journal.base_size == path.stat().st_size
    assert journal_states(path) == live_states(m1)
    # The installed file is the journal now: later records land in it.
    last = m1.new_task(spec(args=["after the install"]))
    assert journal.flush()
    assert journal_states(path) == live_states(m1)
    views = {t.id: plain(t.view()) for t in m1.tasks.values()}
    running = [t.id for t in m1.tasks.values() if t.state is T.RUNNING]
    assert len(running) == 1
    close(m1)
    m2 = masters()
    assert last.id in m2.tasks
    back = m2.tasks[running[0]]          # it was running: interrupted
    assert back.state is T.QUEUED and back.attempts == 1
    assert back.error["reason"] == "interrupted"
    del views[running[0]]
    assert {t.id: plain(t.view()) for t in m2.tasks.values()
            if t.id != back.id} == views


def test_a_snapshot_never_installed_is_ignored_and_removed(masters,
                                                           tmp_path):
    path = tmp_path / "j"
    m1 = masters()
    submit_mix(m1)
    assert m1.journal.flush()
    m1.journal.since_fork = bytearray()
    m1.journal.write_snapshot(4343, list(m1.tasks.values())[:2])
    added = m1.new_task(spec(args=["not in the snapshot"]))
    views = {t.id: plain(t.view()) for t in m1.tasks.values()}
    close(m1)                            # "killed" before the install
    assert os.path.exists(f"{path}.compact-4343")
    m2 = masters()
    assert not os.path.exists(f"{path}.compact-4343")
    assert added.id in m2.tasks
    assert {t.id: plain(t.view()) for t in m2.tasks.values()} == views


def test_a_failed_directory_fsync_after_the_swap_loses_nothing(
        masters, tmp_path, monkeypatch):
    path = str(tmp_path / "j")
    m1 = masters()
    submit_mix(m1)
    assert m1.journal.flush()
    journal = m1.journal
    journal.since_fork = bytearray()
    journal.write_snapshot(4444, list(m1.tasks.values()))
    failures = []

    def eio(_path):
        failures.append(_path)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(lbd, "fsync_dir", eio)
    try:
        journal.install_snapshot(4444)
    except OSError:
        journal.abandon_snapshot(4444)  # what _compaction_done does
    assert failures
    # Whatever file the journal is now, this daemon still holds its lock.
    with pytest.raises(lbd.JournalError, match=f"pid {os.getpid()}"):
        lbd.lock_journal(path)
    monkeypatch.undo()
    acked = m1.new_task(spec(args=["acknowledged after the failure"]))
    assert m1.journal.flush()            # the daemon acks the submit now
    assert m1.journal.failed is None
    assert acked.seq in journal_states(path)
    views = {t.id: plain(t.view()) for t in m1.tasks.values()}
    close(m1)
    assert {t.id: plain(t.view()) for t in masters().tasks.values()} == \
        views


# == Journal.flush: failing writes and fsyncs =================================


@pytest.fixture
def journals(tmp_path):
    made = []

    def make(mode="submits", name="j"):
        journal = lbd.Journal(str(tmp_path / name), mode, 0.02)
        assert list(journal.open()) == []
        made.append(journal)
        return journal

    yield make
    for journal in made:
        if journal.fd >= 0:
            os.close(journal.fd)


def some_records(n, start_at=0):
    return [{"k": "r", "id": A + i, "a": 1, "w": i % 3,
             "at": WALL0 + i, "pad": "\u00e9" * (i % 7)}
            for i in range(start_at, start_at + n)]


def file_of(journal):
    with open(journal.path, "rb") as f:
        return f.read()


def test_a_full_disk_keeps_the_buffer_until_a_write_works(journals,
                                                          monkeypatch):
    journal = journals()
    assert journal.flush()
    first = some_records(3)
    for r in first:
        journal.append(r, sync=True)
    calls = []
    real = lbd._write

    def full(fd, data):
        calls.append(len(data))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lbd, "_write", full)
    assert journal.flush() is False
    assert journal.failed == "No space left on device"
    assert bytes(journal.buf) == frame(first)
    assert file_of(journal) == frame([HEADER])
    second = some_records(2, 3)
    for r in second:                 # more records while it fails
        journal.append(r)
    assert journal.flush() is False
    assert calls and journal.failed
    monkeypatch.setattr(lbd, "_write", real)
    assert journal.flush() is True
    assert journal.failed is None and not journal.buf
    assert file_of(journal) == frame([HEADER] + first + second)
    assert journal.size == len(file_of(journal))
    assert journal.flush() is True   # nothing more, nothing written twice
    assert file_of(journal) == frame([HEADER] + first + second)


@pytest.mark.parametrize("fail_after", [False, True],
                         ids=["then-ok", "then-enospc"])
def test_a_partial_write_loses_and_repeats_nothing(journals, monkeypatch,
                                                   fail_after):
    journal = journals()
    assert journal.flush()
    records = some_records(20)
    for r in records:
        journal.append(r)
    real = lbd._write
    calls = []

    def partial(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real(fd, bytes(data[:len(data) // 2]))
        if fail_after:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(lbd, "_write", partial)
    ok = journal.flush()
    assert ok is (not fail_after)
    assert len(calls) == 2 and calls[1] == calls[0] - calls[0] // 2
    if fail_after:
        assert journal.failed and len(journal.buf) == calls[1]
        monkeypatch.setattr(lbd, "_write", real)
        assert journal.flush() is True
    assert journal.failed is None
    assert file_of(journal) == frame([HEADER] + records)
    assert journal.size == len(file_of(journal))


@pytest.mark.parametrize("mode", ["always", "submits"])
def test_a_failed_fsync_is_retried_and_nothing_is_written_twice(
        journals, monkeypatch, mode):
    journal = journals(mode)
    assert journal.flush()
    records = some_records(5)
    for r in records:
        journal.append(r, sync=True)
    calls = []

    def eio(fd):
        calls.append(fd)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(lbd, "_fsync", eio)
    assert journal.flush() is False
    assert journal.failed == "Input/output error"
    assert len(calls) == 1
    monkeypatch.setattr(lbd, "_fsync", lambda fd: calls.append(fd))
    assert journal.flush() is True       # nothing new: it fsyncs again
    assert len(calls) == 2
    assert journal.failed is None and not journal.unsynced
    assert file_of(journal) == frame([HEADER] + records)


def test_a_master_refuses_submits_while_the_journal_fails(masters,
                                                          monkeypatch):
    m = masters()
    m.new_task(spec())

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lbd, "_write", full)
    assert m._flush_journal() is False
    with pytest.raises(lbd.RequestError) as err:
        m.op_submit(None, {"op": "submit", "task": {"handler": "lbd:echo"}},
                    None)
    assert err.value.code == lbd.JOURNAL_ERROR
    assert "No space left" in err.value.message
    monkeypatch.undo()
    assert m._flush_journal() is True
    assert json.loads(lbd.encode_response(m.op_submit(None, {
        "op": "submit", "task": {"handler": "lbd:echo"}}, None)))["ok"]


# == fsync policy and group commit ============================================


@pytest.fixture
def counted(monkeypatch):
    """Count _write and _fsync calls; both still do the real thing."""
    counts = {"write": 0, "fsync": 0}
    real_write, real_fsync = lbd._write, lbd._fsync

    def write(fd, data):
        counts["write"] += 1
        return real_write(fd, data)

    def fsync(fd):
        counts["fsync"] += 1
        return real_fsync(fd)

    monkeypatch.setattr(lbd, "_write", write)
    monkeypatch.setattr(lbd, "_fsync", fsync)
    return counts


def fsyncs_for(journal, counts, records, sync=False):
    before = counts["fsync"]
    for r in records:
        journal.append(r, sync=sync)
    assert journal.flush()
    return counts["fsync"] - before


def test_always_fsyncs_once_per_flush_that_wrote(journals, counted):
    journal = journals("always")
    assert fsyncs_for(journal, counted, []) == 1         # the header
    assert fsyncs_for(journal, counted, some_records(1)) == 1
    assert fsyncs_for(journal, counted, some_records(200)) == 1
    assert fsyncs_for(journal, counted, []) == 0         # nothing written
    assert fsyncs_for(journal, counted, some_records(3), sync=True) == 1
    assert not journal.needs_timed_sync()
    # Written but not flushed for an answer (the loop writes every turn
    # and fsyncs when answers go out): the interval timer covers it.
    journal.append(some_records(1)[0])
    assert journal.write_out() and journal.needs_timed_sync()
    assert journal.timed_sync() and not journal.needs_timed_sync()


def test_submits_fsyncs_only_for_a_sync_record(journals, counted):
    journal = journals("submits")
    assert fsyncs_for(journal, counted, []) == 1         # the header syncs
    assert fsyncs_for(journal, counted, some_records(50)) == 0
    assert journal.needs_timed_sync()
    assert journal.timed_sync() and counted["fsync"] == 2
    assert not journal.needs_timed_sync()
    # One sync record among many: still one fsync for the whole flush.
    journal.append(some_records(1)[0], sync=True)
    assert fsyncs_for(journal, counted, some_records(99)) == 1
    assert not journal.needs_timed_sync()
    # The next flush without a sync record does not fsync again.
    assert fsyncs_for(journal, counted, some_records(2)) == 0
    assert journal.needs_timed_sync()


def test_never_never_fsyncs(journals, counted):
    journal = journals("never")
    assert fsyncs_for(journal, counted, []) == 0
    assert fsyncs_for(journal, counted, some_records(10), sync=True) == 0
    assert fsyncs_for(journal, counted, some_records(10)) == 0
    assert not journal.needs_timed_sync()
    assert counted["fsync"] == 0


def test_interval_fsyncs_only_on_its_timer(journals, counted):
    journal = journals("interval")
    assert fsyncs_for(journal, counted, [], sync=True) == 0
    assert fsyncs_for(journal, counted, some_records(10), sync=True) == 0
    assert journal.needs_timed_sync()
    assert journal.timed_sync()
    assert counted["fsync"] == 1 and not journal.needs_timed_sync()
    assert journal.timed_sync() and counted["fsync"] == 1   # nothing new


@pytest.mark.parametrize("mode", lbd.FSYNC_MODES)
def test_group_commit_one_write_per_flush(journals, counted, mode):
    journal = journals(mode)
    assert journal.flush()
    writes = counted["write"]
    for i, r in enumerate(some_records(500)):
        journal.append(r, sync=(i % 10 == 0))
    assert journal.flush()
    assert counted["write"] == writes + 1
    assert counted["fsync"] <= 2      # the header's and this flush's, at most


def test_close_writes_and_fsyncs_what_is_buffered(journals, counted):
    journal = journals("never")
    records = some_records(4)
    for r in records:
        journal.append(r)
    journal.close()
    assert journal.fd == -1
    with open(journal.path, "rb") as f:
        assert f.read() == frame([HEADER] + records)
    assert counted["fsync"] == 1


# == The oldest wait the scaling policy sees ==================================


def test_oldest_wait_follows_the_oldest_task_still_queued(masters, tmp_path):
    m = masters(path=tmp_path / "ow", config={
        "journal": {"fsync": "never"}, "tasks": {"retry_backoff": 0.0}})
    clock = m.clock
    assert m.oldest_wait(clock.now) == 0.0
    first = m.new_task(spec())
    clock.now += 2.0
    second = m.new_task(spec())
    clock.now += 3.0
    assert m.oldest_wait(clock.now) == 5.0
    # The first runs, fails and comes back at once: its old place no
    # longer counts, and the second is the oldest until it runs too.
    worker = dispatch(m, first)
    assert m.oldest_wait(clock.now) == 3.0
    clock.now += 1.0
    failure(m, worker, first, error())
    assert first.state is lbd.TaskState.QUEUED
    assert m.oldest_wait(clock.now) == 4.0
    clock.now += 1.0
    dispatch(m, second)
    assert m.oldest_wait(clock.now) == 1.0
    dispatch(m, first)
    assert m.oldest_wait(clock.now) == 0.0 and not m.ready_fifo


# == A version-1 journal ======================================================


def test_a_version_1_journal_gets_version_1_records_until_compaction(
        masters, tmp_path):
    # The lbd that wrote it reads every version-1 record kind and skips
    # what it does not know: so nothing of version 2 may land in its file
    # until a compaction rewrites it under a version-2 header.
    path = tmp_path / "v1"
    old = make_task(A)
    path.write_bytes(frame([{"k": "h", "v": 1}, submit_v1(old)]))
    m = masters(path=path, config={"journal": {"fsync": "never"}})
    assert list(m.tasks) == [old.id]
    new = m.new_task(spec(args=["new"]))
    result(m, dispatch(m, new), new, "done")
    assert m.journal.flush()
    records, _, torn = lbd.scan_journal(path.read_bytes())
    assert torn is None and records[0] == {"k": "h", "v": 1}
    assert [r["k"] for r in records[1:]] == ["s", "s", "r", "d"]
    assert journal_states(path) == live_states(m)
    journal = m.journal
    journal.since_fork = bytearray()
    journal.write_snapshot(4243, list(m.tasks.values()))
    journal.install_snapshot(4243)
    m.new_task(spec(args=["after"]))
    assert journal.flush()
    records, _, _ = lbd.scan_journal(path.read_bytes())
    assert records[0] == HEADER
    assert [r["k"] for r in records[1:]] == ["T", "T", "S"]
    assert journal_states(path) == live_states(m)
