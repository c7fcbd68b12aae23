"""predict --continue: an interrupted prediction goes on where it stopped, never redoing a finished case."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, make_phantoms, run_cli, snapshot, train_args

from prostate_kernels.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(a checkpoint, a directory of 3 phantoms to predict)."""
    root = tmp_path_factory.mktemp("continue")
    data = make_phantoms(root / "phantoms")
    assert main(train_args(data, root / "run", 2)) == 0
    return root / "run" / "checkpoint.pt", data


def _predict(checkpoint: Path, inputs: Path, out: Path, *extra: str) -> int:
    return main(["predict", "--checkpoint", str(checkpoint), "--input", str(inputs), "--output", str(out),
                 "--no-tta", "--no-progress", *extra])  # fmt: skip


def test_continue_predicts_only_the_cases_left_and_leaves_the_others_untouched(trained, tmp_path, capsys):
    checkpoint, data = trained
    out = tmp_path / "out"
    assert _predict(checkpoint, data, out) == 0
    whole_run = snapshot(out)
    for left in ("Case01_segmentation.mhd", "Case01_segmentation.raw"):  # killed before Case01 was written
        (out / left).unlink()
    kept = snapshot(out)
    capsys.readouterr()
    assert _predict(checkpoint, data, out, "--continue") == 0
    printed = capsys.readouterr().out
    assert "--continue: 2 of 3 case(s) already predicted in" in printed
    assert "Case01.mhd: " in printed and "Case00.mhd: " not in printed and "Case02.mhd: " not in printed
    after = snapshot(out)
    assert {name: after[name] for name in kept} == kept  # the finished cases' files are the same bytes
    assert after == whole_run  # Case01 as the uninterrupted run wrote it (the CPU repeats itself)


def test_a_case_with_only_some_of_its_files_is_predicted_again(trained, tmp_path, capsys):
    """An earlier run without --save-probabilities (or killed between a case's two writes): --continue
    --save-probabilities predicts every case again, replacing its segmentation."""
    checkpoint, data = trained
    out = tmp_path / "out"
    assert _predict(checkpoint, data, out) == 0
    capsys.readouterr()
    assert _predict(checkpoint, data, out, "--continue", "--save-probabilities") == 0
    printed = capsys.readouterr().out
    assert "already predicted" not in printed and printed.count("voxels segmented") == 3
    assert all((out / f"Case0{i}_probabilities.mhd").exists() for i in range(3))
    capsys.readouterr()
    assert _predict(checkpoint, data, out, "--continue", "--save-probabilities") == 0
    printed = capsys.readouterr().out
    assert "--continue: 3 of 3 case(s) already predicted" in printed and "voxels segmented" not in printed


def test_continue_never_takes_reference_masks_for_predictions_nor_goes_with_overwrite(trained, tmp_path):
    """--output the dataset itself: its CaseNN_segmentation files are the references, which exist; they
    are refused as targets, not skipped as finished cases."""
    checkpoint, data = trained
    before = snapshot(data)
    result = run_cli("predict", "--checkpoint", checkpoint, "--input", data, "--output", data, "--continue")
    assert_one_line_error(result, "is an input image or a reference mask: predict never writes over it")
    assert snapshot(data) == before
    result = run_cli("predict", "--checkpoint", checkpoint, "--input", data, "--output", tmp_path / "o",
                     "--continue", "--overwrite")  # fmt: skip
    assert_one_line_error(result, "--continue keeps the files of an earlier prediction and --overwrite")
    assert not (tmp_path / "o").exists()


def test_continue_with_other_settings_is_refused_before_anything_is_written(trained, tmp_path):
    """A finished case predicted with --overlap 0.5 is not taken for one of an --overlap 0.25 run (nnU-Net's
    --continue_prediction cannot tell): the directory would hold two settings' predictions under one name."""
    checkpoint, data = trained
    out = tmp_path / "out"
    assert _predict(checkpoint, data, out) == 0
    (out / "Case01_segmentation.mhd").unlink()
    before = snapshot(out)
    result = run_cli("predict", "--checkpoint", checkpoint, "--input", data, "--output", out, "--no-tta",
                     "--no-progress", "--continue", "--overlap", "0.25")  # fmt: skip
    assert_one_line_error(result, "--continue: Case00_segmentation.mhd and 1 more in",
                          "were predicted with other settings (overlap 0.5 -> 0.25): continue with the same "
                          "checkpoints")  # fmt: skip
    assert snapshot(out) == before


def test_a_finished_case_without_a_record_is_predicted_again(trained, tmp_path, capsys):
    """Files of an earlier version of the library (or of a run killed between a case's files and the
    record) say nothing of their settings: --continue predicts them again rather than trust them."""
    checkpoint, data = trained
    out = tmp_path / "out"
    assert _predict(checkpoint, data, out) == 0
    whole_run = snapshot(out)
    record = out / ".prostate-kernels-prediction.json"
    record.unlink()
    capsys.readouterr()
    assert _predict(checkpoint, data, out, "--continue") == 0
    printed = capsys.readouterr().out
    assert "--continue: 3 finished case(s) in" in printed and "have no record" in printed
    assert printed.count("voxels segmented") == 3 and "already predicted" not in printed
    assert snapshot(out) == whole_run  # the same files, and the record written again


def test_a_damaged_record_is_refused_in_one_line(trained, tmp_path):
    checkpoint, data = trained
    out = tmp_path / "out"
    out.mkdir()
    (out / ".prostate-kernels-prediction.json").write_text('{"format": 1, "cases": {"a": "b"}}')
    before = snapshot(out)
    result = run_cli("predict", "--checkpoint", checkpoint, "--input", data, "--output", out, "--no-progress")
    assert_one_line_error(result, ".prostate-kernels-prediction.json: is not a prediction record of "
                          "prostate_kernels 1 (move it away to predict here)")  # fmt: skip
    assert snapshot(out) == before


def test_the_record_names_the_checkpoints_by_content(tmp_path):
    """Another checkpoint under the same path (a retrained fold) is another setting."""
    from prostate_kernels.prediction_record import PredictionRecord, prediction_settings

    checkpoint = tmp_path / "fold0.pt"
    checkpoint.write_bytes(b"first training")
    first = prediction_settings([checkpoint], None, 0.5, "gaussian", True, False, [None])
    checkpoint.write_bytes(b"second training")
    second = prediction_settings([checkpoint], None, 0.5, "gaussian", True, False, [None])
    assert first.digest != second.digest
    assert first.window == "patch" and first.channels == ("single",)
    record = PredictionRecord(tmp_path)
    record.add("Case00_segmentation.nii.gz", first)
    record.add("Case01_segmentation.nii.gz", second)
    reread = PredictionRecord(tmp_path)
    assert reread.digest_of("Case00_segmentation.nii.gz") == first.digest
    assert reread.digest_of("Case02_segmentation.nii.gz") is None
    (changed,) = reread.differences("Case00_segmentation.nii.gz", second)
    assert changed.startswith("checkpoints (sha256) ['") and "-> ['" in changed
    reread.add("Case00_segmentation.nii.gz", second)  # the first settings no longer used: dropped
    assert list(PredictionRecord(tmp_path).settings) == [second.digest]


def test_evaluate_warns_when_the_predictions_come_from_different_settings(trained, tmp_path, capsys):
    """Case01 predicted again with --overwrite and another --overlap: the directory's means are no one
    run's, which evaluate says (once the record of each case tells); a directory of one run says nothing."""
    checkpoint, data = trained
    out = tmp_path / "out"
    assert _predict(checkpoint, data, out) == 0
    evaluate = ["evaluate", "--pred", str(out), "--ref", str(data), "--out", str(tmp_path / "ev")]
    capsys.readouterr()
    assert main(evaluate) == 0
    assert "warning" not in capsys.readouterr().out
    assert _predict(checkpoint, data / "Case01.mhd", out, "--overwrite", "--overlap", "0.25") == 0
    capsys.readouterr()
    assert main([*evaluate, "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert (
        f"warning: 1 of the 3 recorded predictions in {out} were written with other checkpoints or settings "
        "than Case00_segmentation.mhd (Case01_segmentation.mhd: overlap 0.5 -> 0.25): the means mix them"
    ) in printed


def test_two_runs_into_one_directory_keep_each_others_entries(tmp_path):
    """Each run rewrote the record from what it had read when it started, dropping the other run's cases
    (two GPUs predicting halves of a test set into one --output): --continue then predicted them again."""
    import threading

    from prostate_kernels.prediction_record import PredictionRecord, prediction_settings

    checkpoint = tmp_path / "fold0.pt"
    checkpoint.write_bytes(b"weights")
    settings = prediction_settings([checkpoint], None, 0.5, "gaussian", True, False, [None])
    first, second = PredictionRecord(tmp_path), PredictionRecord(tmp_path)  # both read an empty record
    first.add("Case00_segmentation.mhd", settings)
    second.add("Case01_segmentation.mhd", settings)
    assert set(PredictionRecord(tmp_path).cases) == {"Case00_segmentation.mhd", "Case01_segmentation.mhd"}

    def predict_run(run: int) -> None:  # each thread a run of its own, adding its cases one by one
        record = PredictionRecord(tmp_path)
        for case in range(40):
            record.add(f"Run{run}Case{case:02d}_segmentation.mhd", settings)

    runs = [threading.Thread(target=predict_run, args=(run,)) for run in range(3)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert len(PredictionRecord(tmp_path).cases) == 2 + 3 * 40


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_case_another_run_wrote_meanwhile_is_left_as_it_is(
    trained, tmp_path, monkeypatch, capsys, hard_links
):
    """Two predicts of the same cases into one --output both found the files missing, then each replaced
    the other's (both with status 0). Now a file that appears after the check fails its case, unchanged;
    where the file system has no hard links (link() refused), by a check just before the rename."""
    import errno
    import os

    from prostate_kernels import pipeline

    checkpoint, data = trained
    out = tmp_path / "out"
    theirs = {
        out / "Case01_segmentation.mhd": b"another run's header",
        out / "Case01_segmentation.raw": b"voxels",
    }
    check_targets = pipeline._check_targets

    def another_run_writes_case01_meanwhile(*args, **kwargs):
        check_targets(*args, **kwargs)  # nothing there yet
        out.mkdir(exist_ok=True)
        for path, content in theirs.items():
            path.write_bytes(content)

    monkeypatch.setattr(pipeline, "_check_targets", another_run_writes_case01_meanwhile)
    if not hard_links:

        def no_link(*_):
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_link)
    assert _predict(checkpoint, data, out) == 2
    said = capsys.readouterr()
    assert "Case01_segmentation.raw: exists already: another run wrote it meanwhile" in said.err + said.out
    assert all(path.read_bytes() == content for path, content in theirs.items())
    assert (out / "Case00_segmentation.mhd").exists() and (out / "Case02_segmentation.mhd").exists()
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]  # no staging left behind
