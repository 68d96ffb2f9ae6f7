"""Configuration: lbd.build_config and lbd.load_config."""

import os

import pytest

import lbd

SCHEMA_KEYS = [(s, k) for s, keys in lbd.CONFIG_SCHEMA.items() for k in keys]


def config_error(data):
    with pytest.raises(lbd.ConfigError) as info:
        lbd.build_config(data)
    return str(info.value)


def write(tmp_path, text, name="lbd.toml"):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


# -- defaults -----------------------------------------------------------------


def test_empty_config_gives_the_schema_defaults():
    cfg = lbd.build_config({})
    assert set(cfg) == set(lbd.CONFIG_SCHEMA)
    for section, key in SCHEMA_KEYS:
        default, kind, _ = lbd.CONFIG_SCHEMA[section][key]
        value = getattr(cfg[section], key)
        assert type(value) is kind, (section, key)
        if (section, key) == ("workers", "max"):
            # 0 means "the number of CPUs, at least min".
            assert value == max(cfg["workers"].min, os.cpu_count() or 1)
        else:
            assert value == default, (section, key)


def test_some_documented_defaults():
    cfg = lbd.build_config({})
    assert cfg["workers"].min == 2
    assert cfg["tasks"].timeout == 300.0
    assert cfg["tasks"].max_attempts == 3
    assert cfg["tasks"].dedupe_window == 3600.0
    assert cfg["server"].socket_mode == 0o600
    assert cfg["workers"].handlers == []


def test_empty_sections_are_allowed():
    assert vars(lbd.build_config({s: {} for s in lbd.CONFIG_SCHEMA})[
        "tasks"]) == vars(lbd.build_config({})["tasks"])


def test_given_values_are_used_and_the_rest_default():
    cfg = lbd.build_config({"workers": {"min": 3, "max": 5,
                                        "handlers": ["a.b", "_c"]},
                            "tasks": {"aging_rate": 0.25}})
    assert (cfg["workers"].min, cfg["workers"].max) == (3, 5)
    assert cfg["workers"].handlers == ["a.b", "_c"]
    assert cfg["tasks"].aging_rate == 0.25
    assert cfg["tasks"].timeout == 300.0


def test_configs_do_not_share_state():
    a = lbd.build_config({"workers": {"min": 4, "max": 4}})
    b = lbd.build_config({})
    assert a["workers"].min == 4 and b["workers"].min == 2


# -- unknown names ------------------------------------------------------------


def test_unknown_section_is_refused_by_name():
    assert "bogus" in config_error({"bogus": {}})
    assert "bogus" in config_error({"tasks": {}, "bogus": {"x": 1}})


@pytest.mark.parametrize("section", list(lbd.CONFIG_SCHEMA))
def test_unknown_key_is_refused_naming_section_and_key(section):
    assert f"{section}.nope" in config_error({section: {"nope": 1}})


def test_key_in_the_wrong_section_is_refused():
    assert "server.timeout" in config_error({"server": {"timeout": 5.0}})


@pytest.mark.parametrize("table", [5, "x", [1], None])
def test_a_section_that_is_not_a_table_is_refused(table):
    assert "[tasks]" in config_error({"tasks": table})


@pytest.mark.parametrize("data", [None, [], "x"])
def test_a_config_that_is_not_a_table_is_refused(data):
    config_error(data)


# -- types --------------------------------------------------------------------


WRONG = {
    int: [True, False, "1", 1.0, 1.5, [1], None],
    float: [True, False, "1.0", "1", [1.0], None],
    str: [1, True, ["x"], None],
    list: ["mod", ("mod",), {"a": "b"}, [1], ["ok", 2], [None], None],
    dict: ["x", 1, ["a"], None],
    lbd.IntList: ["1", 1, ["1"], [True], [1.5], None],
}

WRONG_CASES = [pytest.param(s, k, v, id=f"{s}.{k}={v!r}")
               for s, k in SCHEMA_KEYS
               for v in WRONG[lbd.CONFIG_SCHEMA[s][k][1]]]


@pytest.mark.parametrize("section,key,value", WRONG_CASES)
def test_wrong_type_is_refused_naming_section_and_key(section, key, value):
    assert f"{section}.{key}" in config_error({section: {key: value}})


FLOAT_KEYS = [(s, k) for s, k in SCHEMA_KEYS
              if lbd.CONFIG_SCHEMA[s][k][1] is float]
INT_KEYS = [(s, k) for s, k in SCHEMA_KEYS
            if lbd.CONFIG_SCHEMA[s][k][1] is int]


@pytest.mark.parametrize("section,key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"),
                                   float("-inf")])
def test_non_finite_floats_are_refused(section, key, value):
    assert f"{section}.{key}" in config_error({section: {key: value}})


@pytest.mark.parametrize("section,key", FLOAT_KEYS)
def test_ints_are_accepted_for_floats(section, key):
    given = 1 if key == "target_utilization" else 50   # a share: <= 1
    data = {section: {key: given}}
    if key == "heartbeat_interval":
        data[section]["heartbeat_timeout"] = 100
    if key == "interval":
        data[section]["window"] = 100
    value = getattr(lbd.build_config(data)[section], key)
    assert value == float(given) and type(value) is float


def test_floats_are_not_accepted_for_ints():
    assert "workers.min" in config_error({"workers": {"min": 2.0}})


# -- bounds -------------------------------------------------------------------


BOUNDS = sorted(lbd._CONFIG_MINIMUM.items())


@pytest.mark.parametrize("where,bound", BOUNDS,
                         ids=[f"{s}.{k}" for (s, k), _ in BOUNDS])
def test_values_below_the_minimum_are_refused(where, bound):
    section, key = where
    low, strict = bound
    assert f"{section}.{key}" in config_error({section: {key: low - 1}})
    if strict:
        assert f"{section}.{key}" in config_error({section: {key: low}})
    else:
        data = {section: {key: low}}
        if (section, key) == ("workers", "min"):
            data[section]["max"] = 1
        value = getattr(lbd.build_config(data)[section], key)
        if (section, key) == ("workers", "max"):
            assert value >= 1      # 0 is "auto", resolved at load time
        else:
            assert value == low


def test_bounds_the_brief_names():
    assert "workers.min" in config_error({"workers": {"min": 0}})
    assert "workers.min" in config_error({"workers": {"min": -1}})
    assert "tasks.timeout" in config_error({"tasks": {"timeout": 0}})
    assert "tasks.max_attempts" in config_error(
        {"tasks": {"max_attempts": 0}})


def test_max_below_min_is_refused():
    message = config_error({"workers": {"min": 4, "max": 3}})
    assert "workers.max" in message and "workers.min" in message
    cfg = lbd.build_config({"workers": {"min": 4, "max": 4}})
    assert cfg["workers"].max == 4


def test_max_zero_means_cpu_count_but_never_below_min():
    cfg = lbd.build_config({"workers": {"min": 1000, "max": 0}})
    assert cfg["workers"].max == 1000
    cfg = lbd.build_config({"workers": {"min": 1, "max": 0}})
    assert cfg["workers"].max == (os.cpu_count() or 1)


@pytest.mark.parametrize("interval,timeout", [(1.0, 1.0), (2.0, 1.5),
                                              (10, 10.0), (5, 1)])
def test_heartbeat_timeout_must_exceed_the_interval(interval, timeout):
    message = config_error({"workers": {"heartbeat_interval": interval,
                                        "heartbeat_timeout": timeout}})
    assert "heartbeat_timeout" in message
    assert "heartbeat_interval" in message


def test_heartbeat_timeout_just_above_the_interval_is_fine():
    cfg = lbd.build_config({"workers": {"heartbeat_interval": 1.0,
                                        "heartbeat_timeout": 1.001}})
    assert cfg["workers"].heartbeat_timeout == 1.001


def test_a_short_timeout_with_the_default_interval_is_refused():
    # The default interval is 1 s: a timeout of 0.5 s alone is refused.
    assert "heartbeat" in config_error(
        {"workers": {"heartbeat_timeout": 0.5}})


@pytest.mark.parametrize("module", ["bad-mod", "", "1mod", "a b", "mod:f",
                                    "a/b", "mod\n"])
def test_handlers_must_be_module_names(module):
    assert "workers.handlers" in config_error(
        {"workers": {"handlers": ["good", module]}})


def test_source_name_appears_in_errors():
    with pytest.raises(lbd.ConfigError) as info:
        lbd.build_config({"workers": {"min": 0}}, source="my.toml")
    assert "my.toml" in str(info.value)


# -- load_config --------------------------------------------------------------


def test_load_config_without_a_path_gives_defaults():
    assert vars(lbd.load_config()["tasks"]) == vars(
        lbd.build_config({})["tasks"])


def test_load_config_reads_a_toml_file(tmp_path):
    path = write(tmp_path, """
[server]
socket = "/tmp/x.sock"
socket_mode = 0o660

[workers]
min = 3
max = 6
handlers = ["pkg.mod", "other"]
kill_grace = 1

[tasks]
timeout = 12.5
""")
    cfg = lbd.load_config(path)
    assert cfg["server"].socket == "/tmp/x.sock"
    assert cfg["server"].socket_mode == 0o660
    assert (cfg["workers"].min, cfg["workers"].max) == (3, 6)
    assert cfg["workers"].handlers == ["pkg.mod", "other"]
    assert cfg["workers"].kill_grace == 1.0
    assert type(cfg["workers"].kill_grace) is float
    assert cfg["tasks"].timeout == 12.5


def test_overrides_win_over_the_file(tmp_path):
    path = write(tmp_path, "[workers]\nmin = 3\nmax = 6\n")
    cfg = lbd.load_config(path, {("workers", "min"): 5,
                                 ("journal", "path"): "/tmp/j"})
    assert cfg["workers"].min == 5 and cfg["workers"].max == 6
    assert cfg["journal"].path == "/tmp/j"


def test_overrides_are_checked_too():
    with pytest.raises(lbd.ConfigError) as info:
        lbd.load_config(None, {("workers", "min"): 0})
    assert "workers.min" in str(info.value)


def test_missing_file_is_a_config_error(tmp_path):
    path = str(tmp_path / "absent.toml")
    with pytest.raises(lbd.ConfigError) as info:
        lbd.load_config(path)
    assert path in str(info.value)


def test_a_directory_is_a_config_error(tmp_path):
    with pytest.raises(lbd.ConfigError):
        lbd.load_config(str(tmp_path))


@pytest.mark.parametrize("text", [
    "[workers\nmin = 1\n",
    "[workers]\nmin = \n",
    "[workers]\nmin = 1\nmin = 2\n",
    "[workers]\nhandlers = [\"a\",\n",
    "not toml at all",
    "[workers]\nmin = 1 2\n",
    "a = " + "[" * 50,
])
def test_invalid_toml_is_a_config_error_naming_the_file(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(lbd.ConfigError) as info:
        lbd.load_config(path)
    assert path in str(info.value)


@pytest.mark.parametrize("text,where", [
    ("[workers]\nminn = 1\n", "workers.minn"),
    ("[tasks]\ntimeout = \"fast\"\n", "tasks.timeout"),
    ("[workers]\nmin = true\n", "workers.min"),
    ("[tasks]\ntimeout = inf\n", "tasks.timeout"),
    ("[tasks]\ntimeout = nan\n", "tasks.timeout"),
    ("[tasks]\ntimeout = 1e999\n", "tasks.timeout"),
    ("[tasks]\ntimeout = 0\n", "tasks.timeout"),
    ("[server]\nsocket = 5\n", "server.socket"),
    ("[workers]\nhandlers = \"mod\"\n", "workers.handlers"),
    ("[workers]\nhandlers = [1]\n", "workers.handlers"),
    ("[tasks.timeout]\nx = 1\n", "tasks"),
    ("[[tasks]]\ntimeout = 1\n", "tasks"),
])
def test_well_formed_toml_with_bad_values_names_file_and_key(tmp_path, text,
                                                             where):
    path = write(tmp_path, text)
    with pytest.raises(lbd.ConfigError) as info:
        lbd.load_config(path)
    assert path in str(info.value)
    assert where in str(info.value)


# Each of these once escaped load_config as UnicodeDecodeError, ValueError,
# RecursionError or OverflowError, so `lbd serve -c` died with a traceback.
@pytest.mark.parametrize("body", [
    pytest.param(b"# caf\xe9\n[workers]\nmin = 2\n", id="latin1-comment"),
    pytest.param(b"[server]\nsocket = \"\xff\"\n", id="invalid-utf8-string"),
    pytest.param(b"[tasks]\nmax_attempts = " + b"1" * 5000 + b"\n",
                 id="int-5000-digits"),
    pytest.param(b"[workers]\nhandlers = " + b"[" * 5000 + b"\n",
                 id="deep-arrays"),
    pytest.param(b"[tasks]\ntimeout = 1" + b"0" * 400 + b"\n",
                 id="int-too-big-for-float"),
])
def test_unreadable_toml_is_a_config_error_not_a_traceback(tmp_path, body):
    path = write(tmp_path, body)
    try:
        lbd.load_config(path)
    except lbd.ConfigError as exc:
        assert path in str(exc)
        return
    except Exception as exc:    # reported briefly: a RecursionError's
        failure = f"{type(exc).__name__}: {exc}"[:200]  # traceback is slow
    else:
        failure = "accepted"
    pytest.fail(f"load_config raised {failure}, not ConfigError",
                pytrace=False)


def test_huge_int_for_a_float_key_is_a_config_error():
    # float(10 ** 400) raises OverflowError: it must become a ConfigError.
    assert "tasks.timeout" in config_error({"tasks": {"timeout": 10 ** 400}})


@pytest.mark.parametrize("mode", ["submits", "always", "interval", "never"])
def test_journal_fsync_modes_are_accepted(mode):
    assert lbd.build_config({"journal": {"fsync": mode}})[
        "journal"].fsync == mode


@pytest.mark.parametrize("mode", ["", "Always", "sometimes", "none"])
def test_unknown_journal_fsync_mode_is_refused(mode):
    assert "journal.fsync" in config_error({"journal": {"fsync": mode}})


def test_config_error_is_an_lbd_error():
    assert issubclass(lbd.ConfigError, lbd.LbdError)
