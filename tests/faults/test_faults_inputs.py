"""Hostile inputs the other suites do not cover: file names that are not UTF-8 (bytes such
as ``b'caf\\xe9.jpg'`` on Linux) and files too large to read into memory.

Arrow strings must be UTF-8, so before the fix one such name crashed the listing and with it
the whole run.  Now each is listed under a readable ``\\xNN`` form, rejected at the ``path``
stage with its reason (never read), and recorded in the ledger so the next run skips it.  The
Ray ingest tests (``test_faults_ingest.py``) put the same names in every dump they kill and
resume, and check that all good rows around them land.
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pytest
from conftest import tables
from fault_checks import PLAN_REJECTS, make_fault_dump, printable

from flows.config import clip_spec
from tasks.ingest.discover import list_dump


def _non_utf8(dump: Path) -> set[str]:
    return {printable(os.path.realpath(p)) for p in dump.rglob("*")
            if p.is_file() and printable(str(p)) != str(p)}


def test_listing_survives_and_flags_non_utf8_names(tmp_path):
    dump = make_fault_dump(tmp_path / "dump", 3)
    listing = pl.from_arrow(list_dump(str(dump)))
    flagged = listing.filter(pl.col("escape").is_not_null())
    assert set(flagged["source_uri"]) == _non_utf8(dump) and flagged.height == PLAN_REJECTS
    assert set(flagged["source_uri"]) == {os.path.realpath(dump) + "/caf\\xe9.jpg",
                                         os.path.realpath(dump) + "/d\\xe9j\\xe0/vu.jpg"}
    assert all("not valid UTF-8" in e for e in flagged["escape"])
    assert listing.filter(pl.col("escape").is_null()).height == 3 + 2  # + copy, truncated


def test_non_utf8_names_are_rejected_once_with_a_reason(tmp_path, settings):
    """Planning (no image bytes read, no Ray) records them; planning again adds nothing."""
    from tasks.ingest import run as ingest
    from tasks.models.clip import model_shape

    dump = make_fault_dump(tmp_path / "dump", 3)
    spec = clip_spec(settings)
    dim = model_shape(spec)[0]
    for attempt in range(2):
        plan = tmp_path / f"plan{attempt}.parquet"
        counts = ingest.prepare(str(dump), settings.db, spec, dim, f"run{attempt}", plan)
        assert counts.seen == 5 + PLAN_REJECTS and counts.todo == 5
        # the first plan rejects them; the second finds them in the ledger, unchanged
        assert counts.rejected == ({} if attempt else {"path": PLAN_REJECTS})
        assert counts.unchanged == (PLAN_REJECTS if attempt else 0)
        assert not set(pl.read_parquet(plan)["source_uri"]) & _non_utf8(dump)
    t = tables(settings.db)
    rejects = t["rejects"].filter(pl.col("stage") == "path")
    assert set(rejects["source_uri"]) == _non_utf8(dump) and rejects.height == PLAN_REJECTS
    assert set(rejects["run_id"]) == {"run0"}  # the second plan did not rewrite them
    assert all("not valid UTF-8" in e for e in rejects["error"])
    ledger = t["files"].filter(pl.col("source_uri").is_in(list(_non_utf8(dump))))
    assert ledger["status"].to_list() == ["rejected"] * PLAN_REJECTS
    assert ledger["image_id"].null_count() == PLAN_REJECTS


def test_oversized_files_are_rejected_without_reading_them_whole(tmp_path):
    """A file over the size limit is refused after reading limit + 1 bytes (the 1 GiB sparse
    file is never pulled into memory); a file at the limit is read normally."""
    from tasks.io.images import MAX_FILE_BYTES, Rejected, read_bytes

    assert 2 * MAX_FILE_BYTES > 10_000

    data = tmp_path / "ok.jpg"
    data.write_bytes(b"x" * 1000)
    assert read_bytes(str(data), max_bytes=1000) == b"x" * 1000
    with pytest.raises(Rejected) as small:
        read_bytes(str(data), max_bytes=999)
    assert small.value.stage == "decode" and "file too large" in small.value.error
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as f:
        f.truncate(2 * MAX_FILE_BYTES)  # sparse: no disk used
    with pytest.raises(Rejected, match="over the limit of 10,000 bytes"):
        read_bytes(str(huge), max_bytes=10_000)
