"""The README's claims that can be checked against the code."""

import re

import lbd
from conftest import ROOT

README = (ROOT / "README.md").read_text()


def table_between(marker):
    match = re.search(rf"<!-- {marker} -->\n(.*?)<!-- /{marker} -->",
                      README, re.S)
    assert match, f"README has no {marker} table"
    rows = {}
    for line in match.group(1).splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        source = None if cells[0] == "(new)" else cells[0]
        targets = set() if cells[1].startswith("—") else {
            t.strip() for t in cells[1].split(",")}
        rows[source] = targets
    return rows


def as_names(table):
    return {(None if k is None else k.value): {s.value for s in v}
            for k, v in table.items()}


def test_readme_worker_table_is_the_code_table():
    assert table_between("worker-transitions") == as_names(
        lbd.WORKER_TRANSITIONS)


def test_readme_task_table_is_the_code_table():
    assert table_between("task-transitions") == as_names(
        lbd.TASK_TRANSITIONS)


def test_readme_quick_start_is_two_commands_and_ci_runs_the_second():
    block = re.search(r"## Quick start.*?```sh\n(.*?)```", README, re.S)
    commands = [c for c in block.group(1).splitlines() if c.strip()]
    assert len(commands) == 2
    assert "lbd.py serve" in commands[0] and "submit" in commands[0]
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = commands[1].split("&&")[-1].strip()
    assert test_command in ci


def toml_literal(key, value):
    """A default as config.example.toml writes it."""
    if key == "socket_mode":
        return f"0o{value:o}"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, dict)):
        assert not value, "a non-empty default needs writing out here"
        return "[]" if isinstance(value, list) else "{}"
    return repr(value)


def config_reference():
    """The README's configuration table, as the code's schema gives it."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for section, keys in lbd.CONFIG_SCHEMA.items():
        for key, (default, _kind, doc) in keys.items():
            lines.append(f"| `{section}.{key}` | "
                         f"`{toml_literal(key, default)}` | "
                         f"{doc.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def test_readme_config_reference_is_the_code_schema():
    match = re.search(r"<!-- config -->\n(.*?)<!-- /config -->", README,
                      re.S)
    assert match, "README has no config table"
    assert match.group(1) == config_reference()


def test_readme_metrics_table_names_every_snapshot_field():
    match = re.search(r"<!-- metrics -->\n(.*?)<!-- /metrics -->", README,
                      re.S)
    assert match, "README has no metrics table"
    rows = match.group(1).splitlines()[2:]
    named = set()
    for row in rows:
        named |= set(re.findall(r"`(\w+)`", row.split("|")[1]))
    master = lbd.Master(lbd.build_config({"journal": {"path": "none"}}))
    try:
        assert named == set(master.snapshot())
    finally:
        master.selector.close()
    counters_row = next(r for r in rows if r.startswith("| `counters`"))
    assert set(re.findall(r"\b[a-z_]+\b", counters_row.split("|")[2])) >= \
        set(lbd.COUNTERS)
    exporter = (ROOT / "plugins" / "prometheus.py").read_text()
    for name in re.findall(r"`(lbd_\w+)", match.group(1)):
        assert f'"{name}"' in exporter, name
