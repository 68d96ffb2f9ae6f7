"""Request parsing and checking: validate_task, loads, dumps, check_fields,
field and seconds_field."""

import json

import pytest

import lbd

DEFAULTS = {"timeout": 300.0, "max_attempts": 3}
NAN, INF = float("nan"), float("inf")


def task(**fields):
    return {"handler": "lbd:echo", **fields}


def bad_request(obj, defaults=DEFAULTS):
    with pytest.raises(lbd.RequestError) as info:
        lbd.validate_task(obj, defaults)
    assert info.value.code == "bad_request" == lbd.BAD_REQUEST
    return info.value.message


# -- validate_task: what comes back --------------------------------------------


def test_defaults_are_filled_in():
    assert lbd.validate_task({"handler": "lbd:echo"}, DEFAULTS) == {
        "handler": "lbd:echo", "args": [], "kwargs": {}, "priority": 0,
        "timeout": 300.0, "max_attempts": 3, "deadline": None,
        "delay": None, "key": None, "retry_on_error": True,
    }


def test_defaults_come_from_the_caller():
    spec = lbd.validate_task({"handler": "m:f"},
                             {"timeout": 2.5, "max_attempts": 9})
    assert spec["timeout"] == 2.5 and spec["max_attempts"] == 9


def test_given_fields_override_defaults():
    obj = {"handler": "pkg.mod:run_it", "args": [1, "a"],
           "kwargs": {"x": None}, "priority": -7, "timeout": 1,
           "max_attempts": 1000, "deadline": 0.5, "delay": 0,
           "key": "k" * lbd.MAX_KEY_LEN, "retry_on_error": False}
    assert lbd.validate_task(obj, DEFAULTS) == obj


def test_input_is_not_modified_and_results_share_no_lists():
    obj = {"handler": "lbd:echo"}
    a = lbd.validate_task(obj, DEFAULTS)
    b = lbd.validate_task(obj, DEFAULTS)
    assert obj == {"handler": "lbd:echo"}
    a["args"].append(1)
    a["kwargs"]["x"] = 1
    assert b["args"] == [] and b["kwargs"] == {}


@pytest.mark.parametrize("name,value", [
    ("priority", lbd.MAX_PRIORITY), ("priority", -lbd.MAX_PRIORITY),
    ("priority", 0),
    ("timeout", 1e-9), ("timeout", lbd.MAX_SECONDS), ("timeout", 5),
    ("max_attempts", 1), ("max_attempts", lbd.MAX_ATTEMPTS),
    ("deadline", 1e-9), ("deadline", lbd.MAX_SECONDS), ("deadline", None),
    ("delay", 0), ("delay", 0.0), ("delay", lbd.MAX_SECONDS),
    ("delay", None),
    ("key", "k"), ("key", "x" * lbd.MAX_KEY_LEN), ("key", "\u00e9\U0001f600"),
    ("key", None),
    ("retry_on_error", True), ("retry_on_error", False),
    ("args", []), ("args", [[{"deep": [1]}]]), ("kwargs", {}),
    ("handler", "a:b"), ("handler", "_m.sub_2:_f9"),
])
def test_boundary_values_are_accepted(name, value):
    assert lbd.validate_task(task(**{name: value}), DEFAULTS)[name] == value


# -- validate_task: what is refused ------------------------------------------


BAD_VALUES = [
    ("handler", None), ("handler", 5), ("handler", True), ("handler", ""),
    ("handler", "nocolon"), ("handler", "mod:"), ("handler", ":fn"),
    ("handler", "1mod:fn"), ("handler", "mod:1fn"), ("handler", "mod:f-n"),
    ("handler", "mod:fn\n"), ("handler", "mod:a.b"), ("handler", "m:f:g"),
    ("handler", ["lbd:echo"]),
    ("args", None), ("args", "x"), ("args", {}), ("args", 5), ("args", (1,)),
    ("kwargs", None), ("kwargs", []), ("kwargs", "x"),
    ("priority", None), ("priority", "1"), ("priority", 1.0),
    ("priority", 1.5), ("priority", True), ("priority", False),
    ("priority", NAN), ("priority", INF),
    ("priority", lbd.MAX_PRIORITY + 1), ("priority", -lbd.MAX_PRIORITY - 1),
    ("timeout", None), ("timeout", "1"), ("timeout", True), ("timeout", 0),
    ("timeout", 0.0), ("timeout", -1), ("timeout", NAN), ("timeout", INF),
    ("timeout", -INF), ("timeout", lbd.MAX_SECONDS * 1.0001),
    ("timeout", [1]),
    ("max_attempts", None), ("max_attempts", "3"), ("max_attempts", 3.0),
    ("max_attempts", True), ("max_attempts", 0), ("max_attempts", -1),
    ("max_attempts", lbd.MAX_ATTEMPTS + 1), ("max_attempts", NAN),
    ("deadline", "1"), ("deadline", True), ("deadline", 0), ("deadline", -1),
    ("deadline", NAN), ("deadline", INF), ("deadline", lbd.MAX_SECONDS + 1),
    ("delay", "1"), ("delay", False), ("delay", -0.001), ("delay", NAN),
    ("delay", INF), ("delay", lbd.MAX_SECONDS + 1),
    ("key", ""), ("key", "x" * (lbd.MAX_KEY_LEN + 1)), ("key", 5),
    ("key", True), ("key", ["k"]),
    ("retry_on_error", None), ("retry_on_error", 1), ("retry_on_error", 0),
    ("retry_on_error", "true"),
]


@pytest.mark.parametrize("name,value", BAD_VALUES,
                         ids=[f"{n}={v!r}"[:40] for n, v in BAD_VALUES])
def test_bad_field_values_are_refused_naming_the_field(name, value):
    message = bad_request(task(**{name: value}))
    assert f"'{name}'" in message


def test_missing_handler_is_refused():
    assert "'handler'" in bad_request({})
    assert "'handler'" in bad_request({"args": [1]})


HUGE = 10 ** 400    # what loads() returns for a 401-digit JSON integer


# Before the fix in _number (compare before any float conversion), these
# raised OverflowError from math.isfinite(): internal_error, not bad_request.
@pytest.mark.parametrize("name", ["priority", "timeout", "max_attempts",
                                  "deadline", "delay"])
def test_huge_integers_are_refused_as_bad_request(name):
    assert lbd.loads(b'{"n": 1' + b"0" * 400 + b"}")["n"] == HUGE
    message = bad_request(task(**{name: HUGE}))
    assert f"'{name}'" in message


@pytest.mark.parametrize("obj", [None, [], ["lbd:echo"], "lbd:echo", 5, True,
                                 1.5])
def test_a_task_that_is_not_an_object_is_refused(obj):
    assert "'task'" in bad_request(obj)


def test_unknown_fields_are_refused_by_name():
    assert "'colour'" in bad_request(task(colour="red"))
    # Checked before anything else, even a missing handler.
    assert "'zzz'" in bad_request({"zzz": 1})
    # Several: the first in sorted order is named.
    assert "'alpha'" in bad_request(task(beta=1, alpha=2))


def test_field_names_are_case_sensitive():
    assert "'Priority'" in bad_request(task(Priority=1))


# -- loads --------------------------------------------------------------------


BAD_JSON = [
    ("nan", "NaN"), ("nan-in-list", "[1, NaN]"), ("inf", "Infinity"),
    ("minus-inf", "-Infinity"), ("inf-in-object", '{"t": Infinity}'),
    ("1e999", "1e999"), ("-1e999", "-1e999"), ("1e400-in-task",
                                               '{"timeout": 1e400}'),
    ("long-float", "1" * 10000 + ".5"),
    ("utf8-ff", b'{"a": "\xff"}'), ("utf8-truncated", b'"\xe2\x82"'),
    ("utf8-surrogate", b'"\xed\xa0\x80"'), ("latin1", b'"caf\xe9"'),
    ("deep-arrays", "[" * 100000), ("deep-arrays-closed",
                                    "[" * 100000 + "]" * 100000),
    ("deep-objects", '{"a":' * 100000),
    ("int-10000-digits", "1" * 10000), ("int-in-object",
                                        '{"n": ' + "9" * 10000 + "}"),
    ("empty", ""), ("empty-bytes", b""), ("truncated", '{"op": "ping"'),
    ("trailing", '{"op": "ping"} x'), ("two-docs", "{} {}"),
    ("single-quotes", "{'op': 'ping'}"), ("bom", "\ufeff{}"),
    ("bom-bytes", b"\xef\xbb\xbf{}"), ("nul", b"\x00"),
    ("bare-word", "ping"), ("trailing-comma", "[1,]"),
]


@pytest.mark.parametrize("data", [d for _, d in BAD_JSON],
                         ids=[i for i, _ in BAD_JSON])
def test_loads_refuses_with_bad_json_and_nothing_else(data):
    # pytest.raises lets any other exception type through: that fails.
    with pytest.raises(lbd.RequestError) as info:
        lbd.loads(data)
    assert info.value.code == "bad_json" == lbd.BAD_JSON
    assert len(info.value.message) <= 200


@pytest.mark.parametrize("data,expected", [
    (b'{"op": "ping", "req": 1}', {"op": "ping", "req": 1}),
    ('{"op": "ping"}', {"op": "ping"}),
    (b'[1, -2.5, "x", null, true, false, {}]',
     [1, -2.5, "x", None, True, False, {}]),
    ('"\\u00e9\\ud83d\\ude00"', "\u00e9\U0001f600"),
    ('"\u00e9"'.encode(), "\u00e9"),
    ('"\\ud800"', "\ud800"),               # a lone surrogate, escaped
    ("1" * 4000, int("1" * 4000)),
    ("1.7976931348623157e308", 1.7976931348623157e308),
    ("-0.0", -0.0), ("5e-324", 5e-324),
    ("[" * 500 + "]" * 500, json.loads("[" * 500 + "]" * 500)),
    (' \t\n{"a":1}\n ', {"a": 1}),
])
def test_loads_accepts_normal_json(data, expected):
    assert lbd.loads(data) == expected


# -- dumps --------------------------------------------------------------------


@pytest.mark.parametrize("obj", [
    {"ok": True},
    {"s": "caf\u00e9 \u2603 \U0001f600"},
    {"lone": "\ud800", "low": "\udfff", "mixed": "a\udc80b"},
    {"nl": "line1\nline2\r\n", "ctl": "\x00\x1f\x7f"},
    ["\u2028\u2029"],
    {"k\u00e9y": [1, 2.5, None, {"deep": "\U0010ffff"}]},
    "",
    [],
])
def test_dumps_is_one_ascii_line(obj):
    out = lbd.dumps(obj)
    assert isinstance(out, bytes)
    out.decode("ascii")                 # raises if any byte is >= 0x80
    assert out.endswith(b"\n")
    assert out.count(b"\n") == 1 and b"\r" not in out
    assert lbd.loads(out) == obj        # and it round-trips


def test_dumps_is_compact():
    assert lbd.dumps({"a": [1, 2], "b": None}) == b'{"a":[1,2],"b":null}\n'


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_dumps_never_emits_non_json_numbers(value):
    with pytest.raises(ValueError):
        lbd.dumps({"x": value})


# -- check_fields, field, seconds_field --------------------------------------


def test_check_fields_allows_listed_fields_and_op_and_req():
    lbd.check_fields({"op": "get", "req": 7, "id": "1"}, ("id",))
    lbd.check_fields({"op": "ping"}, ())
    lbd.check_fields({"op": "wait"}, ("id", "timeout"))   # absent is fine


@pytest.mark.parametrize("request_,allowed,name", [
    ({"op": "get", "id": "1", "bogus": 1}, ("id",), "bogus"),
    ({"op": "ping", "id": "1"}, (), "id"),
    ({"op": "get", "ID": "1"}, ("id",), "ID"),
])
def test_check_fields_refuses_unknown_fields_naming_field_and_op(
        request_, allowed, name):
    with pytest.raises(lbd.RequestError) as info:
        lbd.check_fields(request_, allowed)
    assert info.value.code == "bad_request"
    assert f"'{name}'" in info.value.message
    assert f"'{request_['op']}'" in info.value.message


def test_field_returns_the_value_when_it_has_the_right_kind():
    req = {"op": "get", "id": "42", "n": 3, "x": 2.5, "flag": False}
    assert lbd.field(req, "id", (str,), "a string") == "42"
    assert lbd.field(req, "n", (int,), "an integer") == 3
    assert lbd.field(req, "n", (int, float), "a number") == 3
    assert lbd.field(req, "x", (int, float), "a number") == 2.5
    assert lbd.field(req, "flag", (bool,), "true or false") is False
    assert lbd.field(req, "flag", (bool, int), "a flag") is False


def test_field_required_and_optional():
    with pytest.raises(lbd.RequestError) as info:
        lbd.field({"op": "get"}, "id", (str,), "a string")
    assert info.value.code == "bad_request"
    assert "'id'" in info.value.message and "required" in info.value.message
    assert lbd.field({"op": "get"}, "id", (str,), "a string",
                     required=False) is None


@pytest.mark.parametrize("value,kinds", [
    (5, (str,)), (None, (str,)), (None, (int,)), ("5", (int,)),
    (True, (int,)), (False, (int, float)), (1.5, (int,)), ([], (dict,)),
])
def test_field_refuses_the_wrong_kind_naming_the_field_and_kind(value,
                                                                kinds):
    with pytest.raises(lbd.RequestError) as info:
        lbd.field({"op": "x", "thing": value}, "thing", kinds, "a WIDGET")
    assert info.value.code == "bad_request"
    assert "'thing'" in info.value.message
    assert "a WIDGET" in info.value.message


def test_an_explicit_null_optional_field_is_refused_not_ignored():
    with pytest.raises(lbd.RequestError):
        lbd.field({"op": "x", "id": None}, "id", (str,), "a string",
                  required=False)


@pytest.mark.parametrize("value", [0, 0.0, 1, 2.5, lbd.MAX_SECONDS])
def test_seconds_field_accepts(value):
    assert lbd.seconds_field({"op": "wait", "timeout": value},
                             "timeout") == value


def test_seconds_field_absent_is_none():
    assert lbd.seconds_field({"op": "wait"}, "timeout") is None


@pytest.mark.parametrize("value", [-1, -0.001, lbd.MAX_SECONDS + 1, NAN,
                                   INF, -INF, True, "1", None, 10 ** 400])
def test_seconds_field_refuses(value):
    with pytest.raises(lbd.RequestError) as info:
        lbd.seconds_field({"op": "wait", "timeout": value}, "timeout")
    assert info.value.code == "bad_request"
    assert "'timeout'" in info.value.message


def test_request_error_carries_code_and_message():
    exc = lbd.RequestError("bad_request", "oops")
    assert exc.code == "bad_request" and exc.message == "oops"
    assert str(exc) == "bad_request: oops"
    assert isinstance(exc, lbd.LbdError)
