"""`driftloop data` refuses table names that would leave the data root: one line, exit 2, nothing written; `demo` refuses contradicting options."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli


@pytest.mark.parametrize("args", [["data", "ingest", "digits", "--table", "../x"], ["data", "versions", "../../etc"],
                                  ["data", "show", "a/b"]])
def test_table_names_outside_the_data_root_are_refused(args, home, tmp_path):
    r = run_cli(*args, env={"DRIFTLOOP_HOME": str(home)})
    assert r.returncode == 2, r.stderr[-500:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not allowed" in lines[0] and "letters, digits" in lines[0]
    assert not (home / "x").exists() and not (home.parent / "x").exists()


def test_demo_refuses_quick_with_as_shipped_before_starting_anything(home, tmp_path):
    """`--as-shipped` runs configs/digits.yaml unchanged; `--quick` changes it: together they are refused at once."""
    out = tmp_path / "demo-out"
    r = run_cli("demo", "--quick", "--as-shipped", "--out", str(out), env={"DRIFTLOOP_HOME": str(home)})
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--quick and --as-shipped" in lines[0], r.stderr[-500:]
    assert not out.exists() and not (home / "demo").exists()
