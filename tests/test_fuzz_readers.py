"""tools/fuzz_readers.py: damaged headers and checkpoints are read or refused with a DataError, never a
traceback or a crash (each variant in a forked process). A few seeded variants per kind; the tool's own
runs go to thousands (its docstring)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
fuzz_readers = pytest.importorskip("fuzz_readers")  # tools/ is not part of an installed package


@pytest.mark.parametrize("kind", ["nifti", "metaimage", "nrrd", "checkpoint", "dicom"])
def test_damaged_files_are_read_or_refused_never_a_traceback_or_a_crash(kind, tmp_path):
    counts = fuzz_readers.fuzz(kind, 60, seed=7, keep=tmp_path / "bugs")
    assert sum(counts.values()) == 60
    assert not [outcome for outcome in counts if outcome.endswith("(bug)")], (
        counts,
        sorted(tmp_path.glob("bugs/*")),
    )
    assert counts["refused (DataError)"] > 0  # the variants are damaged enough to be refused


def test_the_fuzzer_finds_the_metaimage_crash_it_was_written_for(tmp_path, monkeypatch):
    """Without the NDims check, a MetaImage NDims of -1 ended the reading process with SIGSEGV: the tool
    must see that as a bug (the crash in a child, not in this test run)."""
    from prostate_kernels.data import io

    monkeypatch.setattr(io, "check_metaimage_header", lambda path: None)
    good = fuzz_readers._volume(tmp_path / "good.mhd").read_text()
    (tmp_path / "v.mhd").write_text(good.replace("NDims = 3", "NDims = -1"))
    outcome = fuzz_readers.outcome_of_a_read("metaimage", tmp_path / "v.mhd")
    assert outcome.startswith("signal ") and outcome.endswith("(bug)"), outcome  # SIGSEGV here
