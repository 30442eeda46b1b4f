"""`driftloop data` refuses table names that would leave the data root: one line, exit 2, nothing written."""

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
