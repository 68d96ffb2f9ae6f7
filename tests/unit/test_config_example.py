"""config.example.toml documents every key, with the code's own default."""

import tomllib

import lbd
from conftest import ROOT


def test_example_config_lists_every_key_with_its_default():
    with open(ROOT / "config.example.toml", "rb") as f:
        example = tomllib.load(f)
    assert set(example) == set(lbd.CONFIG_SCHEMA)
    for section, keys in lbd.CONFIG_SCHEMA.items():
        assert set(example[section]) == set(keys), section
        for key, (default, _kind, _doc) in keys.items():
            assert example[section][key] == default, f"{section}.{key}"


def test_example_config_loads_as_is():
    cfg = lbd.load_config(str(ROOT / "config.example.toml"))
    assert cfg["tasks"].max_attempts == lbd.CONFIG_SCHEMA["tasks"][
        "max_attempts"][0]


def test_every_key_is_explained_in_the_example():
    lines = (ROOT / "config.example.toml").read_text().splitlines()
    for number, line in enumerate(lines):
        if " = " in line and not line.startswith("#"):
            assert lines[number - 1].startswith("# "), line
