"""The hot path's hand-built JSON must say exactly what the encoder says.

Submit records, task views, dispatch messages and responses are built from
templates for speed; every one is checked here against the generic encoder
on tasks whose fields take every shape they can.
"""

import itertools
import json
import random

import pytest

import lbd

WALL = 1733330000.123456


def task_variants():
    """Tasks whose fields take None, ints, floats, odd strings, nesting."""
    args_choices = [[], [1, "x"], [{"a": [1.5, None, True]}], ["\u00ff\n\"q"]]
    kwargs_choices = [{}, {"k": "v"}, {"\u2603": {"nested": [1, 2]}}]
    rand = random.Random(7)
    for seq, (args, kwargs, key, deadline, delay) in enumerate(
            itertools.product(args_choices, kwargs_choices,
                              [None, "key", "k\u00e9y\t\"x\""],
                              [None, 5, 2.5], [None, 0.25]), start=1):
        spec = {"handler": "pkg.mod:fn_1", "args": args, "kwargs": kwargs,
                "priority": rand.randint(-100, 100),
                "timeout": rand.choice([300, 0.5, 1e-3, 86400.0]),
                "max_attempts": rand.randint(1, 10), "key": key,
                "retry_on_error": rand.random() < 0.5,
                "deadline": deadline, "delay": delay}
        task = lbd.Task(1733330000000000 + seq, spec, WALL + seq / 7)
        yield task


def progressed(task, step):
    """``task`` as it looks at several points of its life."""
    task.state = lbd.TaskState.QUEUED
    if step >= 1:
        task.state = lbd.TaskState.RUNNING
        task.attempts, task.worker = 1, 3
        task.started_at = WALL + 1.25
    if step >= 2:
        task.errors = [{"reason": "exception", "type": "ValueError",
                        "message": "bad \u00e9", "traceback": "tb\n"}]
        task.error = task.errors[-1]
        task.crashes = 1
    if step >= 3:
        task.state = lbd.TaskState.DONE
        task.finished_at = WALL + 2.5
        task.result = {"out": [1, 2.0, "\u00ff", None, False]}
    return task


def test_a_submit_record_built_by_template_equals_the_encoded_record():
    for task in task_variants():
        fields = task.submit_record()
        expected = json.loads(lbd.dumps({"k": "S", "t": [
            fields[name] for name in lbd.Task.SUBMIT_FIELDS]}))
        assert json.loads(task.submit_json()) == expected
        # The journal frames it like any other record.
        assert lbd.decode_record(lbd.frame_json(task.submit_json())[:-1]) \
            == expected


@pytest.mark.parametrize("step", range(4))
def test_a_task_view_built_by_template_equals_the_encoded_view(step):
    for task in task_variants():
        task = progressed(task, step)
        text = task.view_json()
        text.encode("ascii")   # the wire is ASCII
        assert json.loads(text) == json.loads(lbd.dumps(task.view()))


def test_a_response_line_echoes_req_whatever_its_shape():
    for req in (lbd.NO_REQ, None, 7, "r\u00e9q", {"a": [1]}):
        for response in ('{"ok":true,"id":"5","duplicate":false',
                         {"ok": True, "id": "5", "duplicate": False}):
            line = lbd.encode_response(
                dict(response) if isinstance(response, dict) else response,
                req)
            assert line.endswith(b"\n") and line.count(b"\n") == 1
            expected = {"ok": True, "id": "5", "duplicate": False}
            if req is not lbd.NO_REQ:
                expected["req"] = req
            assert json.loads(line) == expected


def test_an_unencodable_response_becomes_an_internal_error_line():
    line = lbd.encode_response({"ok": True, "x": object()})
    answer = json.loads(line)
    assert answer["ok"] is False and answer["error"] == lbd.INTERNAL


def test_a_worker_result_line_built_by_template_equals_the_encoded_one():
    for result in (None, [], {"a": [1, 2.5, "\u00ff"]}, "x\n\"y", 3, True):
        reply = {"t": "ok", "id": "1733330000000001", "a": 2, "r": result}
        line = (lbd._OK_JSON % (reply["id"], reply["a"],
                                lbd._dumps_str(result))).encode("ascii")
        assert json.loads(line) == reply and line.endswith(b"}\n")


@pytest.mark.parametrize("step", range(4))
def test_a_task_rebuilt_from_its_state_has_every_slot(step):
    for task in task_variants():
        task = progressed(task, step)
        back = lbd.Task.from_state(json.loads(lbd.dumps(task.state_dict())))
        for name in lbd.Task.__slots__:
            assert hasattr(back, name), name
        assert json.loads(back.view_json()) == json.loads(task.view_json())


def test_a_task_rebuilt_from_its_submit_record_has_every_slot():
    for task in task_variants():
        record = lbd.decode_record(lbd.frame_json(task.submit_json())[:-1])
        back = lbd.Task.from_submit(record["t"])
        for name in lbd.Task.__slots__:
            assert hasattr(back, name), name
        task.state = lbd.TaskState.DELAYED if task.run_at is not None and \
            task.run_at > task.submitted_at else lbd.TaskState.QUEUED
        assert json.loads(back.view_json()) == json.loads(task.view_json())
