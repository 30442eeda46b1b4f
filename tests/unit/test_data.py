import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from driftloop.config import load_spec
from driftloop.data import examples, tables
from driftloop.data.ingest import ingest_frame
from driftloop.data.validation import ValidationFailed
from tests.conftest import ROOT, run_cli


@pytest.fixture(scope="module")
def spec():
    return load_spec(ROOT / "configs/digits.yaml")


def test_versions_time_travel_and_stable_digest(tmp_path, spec):
    uri = str(tmp_path / "digits")
    first = examples.builtin("digits").reference.iloc[:100]
    assert ingest_frame(first, uri, spec.dataset, "test") == 0
    d0 = tables.digest(uri, 0)
    second = first.copy()
    second["pixel_0"] = 5.0
    assert ingest_frame(second, uri, spec.dataset, "test") == 1
    back = tables.read(uri, 0)
    pd.testing.assert_frame_equal(back, first.reset_index(drop=True), check_dtype=False)
    assert len(tables.read(uri)) == 200
    assert tables.digest(uri, 0) == d0 != tables.digest(uri, 1)
    assert tables.data_version(uri).as_dict()["rows"] == 200
    with pytest.raises(tables.TableError, match="no version 7"):
        tables.read(uri, 7)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda df: df.drop(columns=["pixel_5"]), "missing column(s): pixel_5"),
        (lambda df: df.assign(pixel_3=np.where(df.index == 4, np.nan, df["pixel_3"])), "feature 'pixel_3' has 1 missing value(s), first at row 4 (the spec's `missing` policy for it is refuse)"),
        (lambda df: df.assign(pixel_3=np.inf), "feature 'pixel_3' has 20 inf value(s)"),
        (lambda df: df.assign(digit=np.where(df.index == 0, 11, df["digit"])), "label 'digit' has value(s) outside"),
        (lambda df: df.assign(pixel_9="x"), "feature 'pixel_9' is not numeric"),
        (lambda df: df.iloc[:3], "row count 3 outside [10, 5000000]"),
    ],
)
def test_failing_batch_appends_nothing(tmp_path, spec, mutate, expected):
    uri = str(tmp_path / "digits")
    base = examples.builtin("digits").reference.iloc[:20]
    ingest_frame(base, uri, spec.dataset, "test")
    with pytest.raises(ValidationFailed) as err:
        ingest_frame(mutate(base.copy()), uri, spec.dataset, "test")
    assert expected in str(err.value)
    assert [v["version"] for v in tables.versions(uri)] == [0]


def _append_worker(uri: str, seed: int, n: int) -> None:
    spec = load_spec(ROOT / "configs/digits.yaml")
    df = examples.builtin("digits").reference.sample(n=20, random_state=seed)
    for _ in range(n):
        ingest_frame(df, uri, spec.dataset, f"proc-{seed}")


def test_concurrent_appends_from_two_processes_all_land(tmp_path, spec):
    uri = str(tmp_path / "digits")
    ingest_frame(examples.builtin("digits").reference.iloc[:20], uri, spec.dataset, "seed")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_worker, args=(uri, s, 5)) for s in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    vs = tables.versions(uri)
    assert [v["version"] for v in vs] == list(range(11))
    assert vs[-1]["rows"] == 20 * 11
    assert sorted(v["source"] for v in vs).count("proc-1") == 5


def test_cli_ingest_twice_then_time_travel(home):
    r0 = run_cli("data", "ingest", "digits", "--table", "digits")
    r1 = run_cli("data", "ingest", "digits", "--table", "digits")
    assert (r0.returncode, r1.returncode) == (0, 0), r0.stderr + r1.stderr
    assert r0.stdout.strip() == "digits: version 0" and r1.stdout.strip() == "digits: version 1"
    listing = run_cli("data", "versions", "digits")
    lines = listing.stdout.strip().splitlines()[1:]
    assert [ln.split()[0] for ln in lines] == ["0", "1"]
    assert all("sha256:" in ln for ln in lines)
    show = run_cli("data", "show", "digits", "--version", "0")
    assert "version 0: 1300 rows" in show.stdout


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda df: df.drop(columns=["pixel_7"]), "missing column(s): pixel_7"),
        (lambda df: df.assign(pixel_2=np.nan), "feature 'pixel_2' has"),
        (lambda df: df.assign(digit=42), "label 'digit' has value(s) outside"),
    ],
)
def test_cli_rejects_bad_csv_with_one_line(home, tmp_path, mutate, expected):
    assert run_cli("data", "ingest", "digits", "--table", "digits").returncode == 0
    path = tmp_path / "batch.csv"
    mutate(examples.builtin("digits").pool.iloc[:50].copy()).to_csv(path, index=False)
    r = run_cli("data", "ingest", str(path), "--table", "digits")
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0]
    versions = run_cli("data", "versions", "digits").stdout.strip().splitlines()[1:]
    assert len(versions) == 1


def test_cli_unknown_source_and_table(home):
    r = run_cli("data", "ingest", "nowhere.csv", "--table", "digits")
    assert r.returncode == 2 and "no such file" in r.stderr
    r = run_cli("data", "versions", "nothing")
    assert r.returncode == 2 and "no Delta table" in r.stderr
    r = run_cli("data", "ingest", "nowhere.csv", "--table", "nosuch")  # no configs/nosuch.yaml: say what to pass
    assert r.returncode == 2 and r.stderr.strip() == "error: no spec for table 'nosuch': pass --spec configs/<name>.yaml", r.stderr


def test_cli_unknown_model_is_one_line(home):
    for args in (("rollback", "nosuch"), ("status", "nosuch"), ("models", "nosuch")):
        r = run_cli(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-800:]
        assert len(r.stderr.strip().splitlines()) == 1 and "nosuch" in r.stderr


def _without_root_override():
    """Run a child without CAP_DAC_OVERRIDE/CAP_FOWNER so file modes bind even when tests run as root."""
    import ctypes

    if os.geteuid() != 0:
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def drop():
        for cap in (1, 3):  # CAP_DAC_OVERRIDE, CAP_FOWNER
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    return drop


def test_read_only_table_fails_ingest_cleanly_with_no_partial_version(home):
    """The table's directory is read-only: ingest exits 2 with one line naming the table and the cause;
    the table keeps its versions and gains no file."""
    import subprocess
    import sys

    assert run_cli("data", "ingest", "digits", "--table", "digits").returncode == 0
    table = home / "tables" / "digits"
    before = sorted(p.relative_to(table) for p in table.rglob("*"))
    for p in [table, *table.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        r = subprocess.run([str(Path(sys.executable).with_name("driftloop")), "data", "ingest", "digits", "--table", "digits"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300, env=os.environ.copy(),
                           preexec_fn=_without_root_override())
        after = sorted(p.relative_to(table) for p in table.rglob("*"))
    finally:
        for p in [table, *table.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)
    print("read-only ingest:", r.returncode, r.stderr.strip())
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stderr[-1500:]
    assert err[0].startswith("error: ") and "digits" in err[0] and "ermission denied" in err[0]
    assert after == before
    versions = run_cli("data", "versions", "digits").stdout.strip().splitlines()[1:]
    assert [ln.split()[0] for ln in versions] == ["0"]


def test_a_training_window_is_the_newest_rows_in_append_order(tmp_path, spec):
    """Delta's scan returns files newest first; a retrain's "newest N rows" must still be the newest appended."""
    from driftloop.train import load_splits

    uri = str(tmp_path / "digits")
    ref = examples.builtin("digits").reference
    for i in range(4):
        batch = ref.iloc[i * 100 : (i + 1) * 100].copy()
        batch["pixel_0"] = float(i)  # which batch a row came from
        ingest_frame(batch, uri, spec.dataset, f"batch {i}")
    assert tables.read(uri, ordered=True)["pixel_0"].tolist() == [0.0] * 100 + [1.0] * 100 + [2.0] * 100 + [3.0] * 100
    s = load_splits(spec, tables.data_version(uri), tail_rows=150)
    seen = np.concatenate([s.x_train[:, 0], s.x_val[:, 0], s.x_test[:, 0]])
    assert len(seen) == 150 and sorted(set(seen)) == [2.0, 3.0] and (seen == 3.0).sum() == 100


def test_string_class_labels_are_kept_as_names(tmp_path, spec):
    """A spec whose classes are names: the table keeps them as strings; a name outside them refuses the batch."""
    from driftloop.config import parse_spec

    d = spec.model_dump(mode="json")
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    d["dataset"]["classes"] = names
    named = parse_spec(d)
    assert named.dataset.string_labels and named.dataset.label_value(np.str_("two")) == "two"
    frame = examples.builtin("digits").reference.iloc[:50].copy()
    frame["digit"] = np.array(names)[frame["digit"]]
    uri = str(tmp_path / "named")
    ingest_frame(frame, uri, named.dataset, "test")
    back = tables.read(uri)
    assert back["digit"].tolist() == frame["digit"].tolist() and back["digit"].map(type).eq(str).all()
    bad = frame.assign(digit=np.where(frame.index == frame.index[0], "eleven", frame["digit"]))
    with pytest.raises(ValidationFailed, match=r"label 'digit' has value\(s\) outside .*'eleven'"):
        ingest_frame(bad, uri, named.dataset, "test")
    assert len(tables.read(uri)) == 50
