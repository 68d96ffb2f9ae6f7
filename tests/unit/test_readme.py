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
