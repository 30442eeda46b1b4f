"""Signed request ids: what /feedback can decide about an id without any lookup."""

from __future__ import annotations

import os
import threading

import pytest

from driftloop import ids
from driftloop.serving.validation import MAX_ID_CHARS, InvalidInput

KEY = b"s" * 32
NOW = 1_760_000_000.0


def test_an_issued_id_verifies_with_its_version_time_and_rows():
    rid = ids.issue(KEY, 7, 1, now=NOW)
    v = ids.verify(KEY, rid, now=NOW + 5)
    assert (v.request_id, v.version, v.rows, v.row) == (rid, 7, 1, None)
    assert abs(v.issued_at - NOW) < 0.001
    assert len(rid) <= 80 and all(c.isalnum() or c == "." for c in rid)  # compact and URL-safe


def test_every_row_of_a_batch_verifies_and_nothing_else_does():
    """Defect 1: the row ids of a batch are labellable; the row count is signed, so the index is checked."""
    rid = ids.issue(KEY, 2, 3, now=NOW)
    rows = ids.row_ids(rid, 3)
    assert rows == [f"{rid}-0", f"{rid}-1", f"{rid}-2"]
    assert [ids.verify(KEY, r, now=NOW).row for r in rows] == [0, 1, 2]
    with pytest.raises(InvalidInput, match="does not exist in a batch of 3 rows"):
        ids.verify(KEY, f"{rid}-3", now=NOW)
    with pytest.raises(InvalidInput, match="label each row by its id"):
        ids.verify(KEY, rid, now=NOW)
    single = ids.issue(KEY, 2, 1, now=NOW)
    with pytest.raises(InvalidInput, match="one-row request has no row index"):
        ids.verify(KEY, f"{single}-0", now=NOW)
    assert len(f"{ids.issue(KEY, 999_999_999, 256, now=NOW * 3)}-255") <= MAX_ID_CHARS


def test_forged_ids_are_refused_with_422():
    """Defect 3: a well-formed id not signed with the application's key never reaches a lookup."""
    rid = ids.issue(KEY, 1, 1, now=NOW)
    version, ts, rows, rand, mac = rid.split(".")
    forgeries = [ids.issue(b"x" * 32, 1, 1, now=NOW),  # another key
                 f"2.{ts}.{rows}.{rand}.{mac}",  # another version
                 f"{version}.{ts}.2.{rand}.{mac}-1",  # a row count raised to reach more rows
                 f"{version}.{ts}.{rows}.{rand}.{'0' * 32}",
                 "0123456789abcdef" * 2, "", "x" * 300, None]
    for bad in forgeries:
        with pytest.raises(InvalidInput) as err:
            ids.verify(KEY, bad, now=NOW)
        assert err.value.status == 422 and "not an id issued by /predict" in str(err.value)


def test_expired_ids_are_refused_with_410_and_future_ones_with_422():
    rid = ids.issue(KEY, 1, 1, now=NOW)
    assert ids.verify(KEY, rid, now=NOW + 29 * 86400).version == 1
    with pytest.raises(InvalidInput) as err:
        ids.verify(KEY, rid, now=NOW + 31 * 86400)
    assert err.value.status == 410 and "expired" in str(err.value) and "30 days" in str(err.value)
    with pytest.raises(InvalidInput) as err:
        ids.verify(KEY, rid, now=NOW + 11, max_age=10)
    assert err.value.status == 410
    with pytest.raises(InvalidInput, match="in the future"):
        ids.verify(KEY, ids.issue(KEY, 1, 1, now=NOW + 3600), now=NOW)


def test_max_age_from_the_environment(monkeypatch):
    monkeypatch.setenv(ids.ID_MAX_AGE_ENV, "60")
    assert ids.max_age_s() == 60
    monkeypatch.setenv(ids.ID_MAX_AGE_ENV, "nonsense")
    assert ids.max_age_s() == ids.DEFAULT_MAX_AGE_S


def test_the_app_key_is_created_once_and_shared_by_concurrent_replicas(tmp_path, monkeypatch):
    monkeypatch.delenv(ids.ID_SECRET_ENV, raising=False)
    keys: list[bytes] = []
    barrier = threading.Barrier(8)

    def replica():
        barrier.wait()
        keys.append(ids.app_secret(tmp_path / "state", "digits"))

    threads = [threading.Thread(target=replica) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1 and len(keys[0]) >= 32
    key_file = tmp_path / "state" / "ids-digits.key"
    assert key_file.is_file() and oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["ids-digits.key"]  # no temp files left
    assert ids.app_secret(tmp_path / "state", "other") != keys[0]  # one key per application
    assert ids.app_secret(tmp_path / "state", "../evil") and not (tmp_path / "evil.key").exists()


def test_the_key_from_the_environment_wins(tmp_path, monkeypatch):
    monkeypatch.setenv(ids.ID_SECRET_ENV, "from-the-environment-" + "z" * 16)
    assert ids.app_secret(tmp_path, "digits") == os.environ[ids.ID_SECRET_ENV].encode()
    assert not any(tmp_path.iterdir())


def test_a_truncated_key_file_is_an_error_not_a_weak_key(tmp_path, monkeypatch):
    monkeypatch.delenv(ids.ID_SECRET_ENV, raising=False)
    (tmp_path / "ids-digits.key").write_text("short")
    with pytest.raises(RuntimeError, match="too short"):
        ids.app_secret(tmp_path, "digits")
