"""The CLI end to end on tiny phantoms: train, resume, predict, evaluate; DDP; bad input; the real case."""

from __future__ import annotations

import csv
import os
import socket
import textwrap
from pathlib import Path

import cli_helpers
import numpy as np
import pytest
import torch
from cli_helpers import SHAPE, run_cli, run_torchrun

from prostate_kernels.checkpoint import load_checkpoint, save_checkpoint
from prostate_kernels.cli import main
from prostate_kernels.data import Volume, read_volume, write_volume
from prostate_kernels.plots import plot_overlay
from prostate_kernels.safe_files import LOCK_NAME

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "hipmri-case018-week7"


def train_args(data: Path, out: Path, iters: int, *extra: str) -> list[str]:
    """The pipeline's runs: validated every 3 iterations, with the paper's loss."""
    return cli_helpers.train_args(data, out, iters, "--loss", "bce+dice", *extra, val_every=3)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    assert main(["phantoms", "--out", str(out), "--n", "4", "--shape", *SHAPE]) == 0
    return out


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    assert main(train_args(phantoms, run, 6, "--checkpoint-every", "3")) == 0
    return run


def test_training_writes_checkpoints_metrics_and_curve(trained):
    state = load_checkpoint(trained / "checkpoint.pt")
    assert state["model"] == "tiramisu3d_tiny" and state["iteration"] == 6 and state["patch"] == [8, 32, 32]
    rows = list(csv.DictReader((trained / "metrics.csv").open()))
    assert [r["iteration"] for r in rows if r["val_dice"]] == ["3", "6"]
    assert (trained / "training_curve.png").stat().st_size > 1000 and (trained / "best.pt").exists()


def test_resume_gives_the_weights_of_an_uninterrupted_run(phantoms, trained, tmp_path):
    assert main(train_args(phantoms, tmp_path, 3)) == 0  # "killed" after its checkpoint at iteration 3
    assert main(train_args(phantoms, tmp_path, 6, "--resume")) == 0
    resumed = load_checkpoint(tmp_path / "checkpoint.pt")["state_dict"]
    unbroken = load_checkpoint(trained / "checkpoint.pt")["state_dict"]
    assert resumed.keys() == unbroken.keys()
    assert all(torch.equal(resumed[k], unbroken[k]) for k in resumed)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [int(r["iteration"]) for r in rows] == sorted({int(r["iteration"]) for r in rows})  # no duplicates


def test_predict_and_evaluate(phantoms, trained, tmp_path, capsys):
    out = tmp_path / "pred"
    args = ["predict", "--checkpoint", str(trained / "checkpoint.pt"), "--input", str(phantoms), "--output",
            str(out), "--save-probabilities", "--largest-component", "--tta"]  # fmt: skip
    assert main(args) == 0
    image, mask = read_volume(phantoms / "Case01.mhd"), read_volume(out / "Case01_segmentation.mhd")
    assert mask.array.shape == image.array.shape and mask.spacing == pytest.approx(image.spacing)
    assert set(np.unique(mask.array)) <= {0, 1}
    prob = read_volume(out / "Case01_probabilities.mhd").array
    assert prob.dtype == np.float32 and 0 <= prob.min() and prob.max() <= 1
    assert main(["evaluate", "--pred", str(out), "--ref", str(phantoms), "--out", str(tmp_path / "ev")]) == 0
    rows = list(csv.DictReader((tmp_path / "ev" / "evaluation.csv").open()))
    assert [r["case"] for r in rows] == ["Case00", "Case01", "Case02", "Case03"]
    assert {"dice", "hd95_mm", "abd_mm", "rvd_percent", "apex_dice", "base_dice"} <= set(rows[0])
    assert (tmp_path / "ev" / "Case02_overlay.png").exists()
    assert "mean" in capsys.readouterr().out


def head_and_tail(stderr: str, head: int = 4000, tail: int = 2000) -> str:
    """torchrun's stderr for an assertion message: a rank's own message (the ranks write to the launcher's
    stderr) stands before the launcher's summary of the failure, which fills the last 2000 characters."""
    if len(stderr) <= head + tail:
        return stderr
    return f"{stderr[:head]}\n[... {len(stderr) - head - tail} characters ...]\n{stderr[-tail:]}"


@pytest.mark.parametrize("layout", ["ncdhw", "channels_last"])
def test_ddp_with_two_gloo_processes(phantoms, tmp_path, layout):
    # one thread per process (torchrun's default): PyTorch's CPU conv3d then returns NCDHW-strided
    # gradients for channels-last 1x1x1 weights, which keep_grads_in_param_strides restrides for DDP.
    # PYTHONFAULTHANDLER: a rank killed by a signal shows its Python stacks in the failure's message
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    extra = ["--channels-last"] if layout == "channels_last" else []
    result = run_torchrun(
        2, "-m", "prostate_kernels", *train_args(phantoms, tmp_path, 2, *extra), env=env, cwd=tmp_path
    )
    assert result.returncode == 0, head_and_tail(result.stderr)
    assert "Grad strides do not match bucket view strides" not in result.stderr
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["iteration"] == 2 and len(state["rng"]["ranks"]) == 2
    assert not torch.equal(state["rng"]["ranks"][0]["cpu"], state["rng"]["ranks"][1]["cpu"])


THREADS_AFTER_MAIN = """
    import os, sys, time
    import torch.distributed as dist
    from prostate_kernels.cli import main

    def threads():
        return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))

    alive, init_process_group = [], dist.init_process_group

    def joined(*args, **kwargs):  # the control: a live group's threads, as this torch names them
        init_process_group(*args, **kwargs)
        for _ in range(100):  # a new thread names itself once it runs
            alive[:] = threads()
            if any("gloo" in name for name in alive):
                break
            time.sleep(0.1)

    dist.init_process_group = joined
    status = main(sys.argv[1:])
    left = threads()
    # one write of one line: the two processes share the pipe, and print's two writes once interleaved
    os.write(2, f"rank {os.environ['RANK']} status {status} threads {left} alive {alive}\\n".encode())
"""


# ending: (train's extra arguments, status of main, whether the group was joined)
ENDINGS = {
    "trained": ([], 0, True),
    "earlier_run": ([], 2, True),  # --out holds a run's metrics.csv: refused at once, in the group
    "locked": ([], 2, True),  # a training running in --out holds its lock: rank 0 refused, in the group
    "refused": (["--sync-batchnorm"], 2, False),  # refused on the CPU before the group is joined
}


def run_directory_before(ending: str, run: Path) -> dict[str, bytes]:
    """--out as the ending finds it: an earlier run's metrics.csv, or the lock of a training alive in it
    (this test's process, on this host); the files that `train` must leave as they were."""
    if ending in ("earlier_run", "locked"):
        run.mkdir()
    if ending == "earlier_run":
        (run / "metrics.csv").write_text("iteration,loss\n")
    if ending == "locked":
        (run / LOCK_NAME).write_text(f"{os.getpid()} {socket.gethostname()}\n")
    return cli_helpers.snapshot(run) if run.exists() else {}


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the threads from Linux's /proc")
@pytest.mark.parametrize("ending", list(ENDINGS))
def test_train_under_torchrun_leaves_no_process_group_behind(phantoms, tmp_path, ending):
    """When `train` returns, on success or on an error, its process group is gone and with it Gloo's
    threads (pt_gloo_runloop, gloo_tcp_loop). A group still alive is torn down at interpreter exit, where a
    Gloo thread that needs the GIL aborts the process (the likely cause of a rank's "terminate called
    without an active exception" in one CI run of test_ddp_with_two_gloo_processes). Two ways kept it:
    DDP's first use imports torch.distributed.nn.functional, whose defaults (group=group.WORLD) hold the
    group for good; an error skipped destroy_process_group. The threads just after init_process_group
    are the control: they must hold "gloo" (a torch that renamed its threads would otherwise pass unseen).
    A refusal of the arguments comes before the group is joined; an error just after joining (an earlier
    run in --out) comes after a barrier. Either way both processes report it: once, the other process's
    init ended in "Connection closed by peer" when one failed and left at once. A lock held in --out
    refuses rank 0 alone, which tells the others: they met its exit at DDP's first collective before (a
    Gloo traceback). A refused run leaves --out's files as they were."""
    extra, want_status, joins = ENDINGS[ending]
    script = tmp_path / "threads_after_main.py"
    script.write_text(textwrap.dedent(THREADS_AFTER_MAIN))
    before = run_directory_before(ending, tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = run_torchrun(
        2, str(script), *train_args(phantoms, tmp_path / "run", 1, *extra), env=env, cwd=tmp_path
    )
    reports = [line for line in result.stderr.splitlines() if line.startswith("rank ")]
    assert len(reports) == 2 and "Traceback" not in result.stderr, head_and_tail(result.stderr)
    for line in reports:
        left, alive = line.split(" alive ")
        assert f"status {want_status}" in left and "gloo" not in left, reports
        assert ("gloo" in alive) if joins else alive == "[]", reports
    if want_status != 0:  # refused: --out as it was (the refused case's never existed)
        run = tmp_path / "run"
        assert (cli_helpers.snapshot(run) if run.exists() else {}) == before


RANK_0_FAILS = """
    import errno, os, sys
    import torch
    import prostate_kernels.train as training
    from prostate_kernels.cli import main

    def full_disk(state, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    if os.environ["RANK"] == "0":
        setattr(training, os.environ["FAILS"], {"save_checkpoint": full_disk, "validate": out_of_memory}[
            os.environ["FAILS"]])
    status = main(sys.argv[1:])
    os.write(2, f"rank {os.environ['RANK']} status {status}\\n".encode())
"""

# what fails on rank 0 alone: (the function of train.py, the line rank 0 prints, the other rank's)
RANK_0_FAILURES = {
    "save_checkpoint": (
        "checkpoint.pt: No space left on device",
        "error: rank 0 stopped (OSError: [Errno 28] No space left on device",
    ),
    "validate": (
        "error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)",
        "error: rank 0 stopped (OutOfMemoryError: CUDA out of memory",
    ),
}


@pytest.mark.parametrize("fails", list(RANK_0_FAILURES))
def test_a_failure_of_rank_0s_own_work_stops_every_rank_in_one_line(phantoms, tmp_path, fails):
    """Rank 0 alone validates and writes metrics.csv and the checkpoints. When that failed (a full disk,
    the GPU's memory), rank 0 said so in one line and left the group, and the other rank met its exit at
    its next collective: a Gloo "Connection closed by peer" traceback. Now every rank stops with a line."""
    script = tmp_path / "rank_0_fails.py"
    script.write_text(textwrap.dedent(RANK_0_FAILS))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAILS": fails}
    args = train_args(phantoms, tmp_path / "run", 3)  # validates at 3
    result = run_torchrun(2, str(script), *args, env=env, cwd=tmp_path)
    reports = sorted(line for line in result.stderr.splitlines() if line.startswith("rank "))
    assert reports == ["rank 0 status 2", "rank 1 status 2"], head_and_tail(result.stderr)
    assert "Traceback" not in result.stderr, head_and_tail(result.stderr)
    own, other = RANK_0_FAILURES[fails]
    assert own in result.stderr and other in result.stderr, head_and_tail(result.stderr)


RANK_1_FAILS = """
    import os, sys
    import torch
    import prostate_kernels.train as training
    from prostate_kernels.cli import main

    class OutOfMemoryInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    def loss_failing_at_iteration_2(name, loss_function=training.loss_function):
        loss, calls = loss_function(name), []

        def failing(logits, target):
            calls.append(1)
            if len(calls) == 2 and os.environ["FAILS"] == "forward":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            if len(calls) == 2:
                logits = OutOfMemoryInBackward.apply(logits)
            return loss(logits, target)
        return failing

    if os.environ["RANK"] == "1":
        training.loss_function = loss_failing_at_iteration_2
    status = main(sys.argv[1:])
    os.write(2, f"rank {os.environ['RANK']} status {status}\\n".encode())
"""


@pytest.mark.parametrize("fails", ["forward", "backward"])
def test_a_failure_of_another_rank_stops_rank_0_in_one_line(phantoms, tmp_path, fails):
    """Rank 1 runs out of memory alone at iteration 2 (in its forward, or in its backward, where DDP's
    all_reduce is under way). Rank 0 met its exit at its next collective: a Gloo "Connection closed by
    peer" traceback that hid the cause (rank 1's line, printed just before). Now rank 0 says in one line
    that another process left the group and stopped it, and both return 2."""
    script = tmp_path / "rank_1_fails.py"
    script.write_text(textwrap.dedent(RANK_1_FAILS))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAILS": fails}
    result = run_torchrun(2, str(script), *train_args(phantoms, tmp_path / "run", 3), env=env, cwd=tmp_path)
    reports = sorted(line for line in result.stderr.splitlines() if line.startswith("rank "))
    assert reports == ["rank 0 status 2", "rank 1 status 2"], head_and_tail(result.stderr)
    assert "Traceback" not in result.stderr, head_and_tail(result.stderr)
    assert "error: out of memory (CUDA out of memory. Tried to allocate" in result.stderr
    want = "error: another process of this training left the process group (Gloo: Connection "
    assert want in result.stderr, head_and_tail(result.stderr)


def test_more_processes_per_node_than_gpus_is_refused_in_one_line(phantoms, tmp_path, monkeypatch, capsys):
    """A process of torchrun --nproc-per-node 2 on a machine with one GPU (LOCAL_RANK 1): set_device(1)
    ended in "invalid device ordinal" (a traceback); now one line, before the group is joined (here CUDA
    is claimed by patching torch.cuda: the refusal comes before any CUDA call)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail(f"set_device({device})"))
    cli_helpers.torchrun_environment(monkeypatch, rank=1)
    assert main(train_args(phantoms, tmp_path / "run", 1)) == 2
    err = capsys.readouterr().err
    assert "LOCAL_RANK 1, and this machine has 1 CUDA device(s)" in err and "--nproc-per-node" in err, err
    assert not (tmp_path / "run").exists()


def test_sync_batchnorm_is_refused_under_torchrun_on_the_cpu(phantoms, tmp_path):
    """DDP refuses nn.SyncBatchNorm layers on the CPU ("SyncBatchNorm layers only work with GPU modules",
    a traceback from every rank once the model was built): refused in one line before anything is
    written."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = train_args(phantoms, tmp_path / "run", 1, "--sync-batchnorm")
    result = run_torchrun(2, "-m", "prostate_kernels", *args, env=env, cwd=tmp_path)
    ranks = result.stderr.split("torch/distributed/elastic")[0]  # before the launcher's report of the exit
    want = "error: --sync-batchnorm needs CUDA devices; this run is on cpu"
    assert ranks.count(want) == 2 and "Traceback" not in ranks, head_and_tail(result.stderr)
    assert result.returncode != 0 and "exitcode: 2" in result.stderr  # the one-line user error's status
    assert not (tmp_path / "run").exists()


def test_sync_batchnorm_in_one_process_says_it_changes_nothing(phantoms, tmp_path, capsys):
    assert main(train_args(phantoms, tmp_path / "run", 1, "--sync-batchnorm")) == 0
    assert "--sync-batchnorm: one process" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["config"]["sync_batchnorm"] is True


# ------------------------------------------------------------------------------------ bad input


def test_predict_shows_a_bar_over_each_cases_windows_unless_told_not_to(phantoms, trained, tmp_path, capsys):
    """A case of many windows (a real volume at a high overlap) took minutes with no sign of progress."""
    base = [
        "predict",
        "--checkpoint",
        str(trained / "checkpoint.pt"),
        "--input",
        str(phantoms / "Case00.mhd"),
    ]
    assert main([*base, "--output", str(tmp_path / "bar")]) == 0
    err = capsys.readouterr().err
    assert "sliding window: 100%" in err and "win" in err, err
    assert main([*base, "--output", str(tmp_path / "quiet"), "--no-progress"]) == 0
    assert "sliding window" not in capsys.readouterr().err


def test_a_2d_network_shows_a_bar_over_the_slices(capsys):
    from prostate_kernels.predict import predict_probabilities

    model = torch.nn.Conv2d(3, 1, 1)  # 3 slices as channels -> one logit per voxel
    image = np.random.default_rng(0).standard_normal((5, 12, 12)).astype(np.float32)
    quiet = predict_probabilities(model, image, (1, 8, 8), slices=3)
    shown = predict_probabilities(model, image, (1, 8, 8), slices=3, progress=True)
    err = capsys.readouterr().err
    assert "slices: 100%" in err and "5/5" in err, err
    assert np.array_equal(quiet, shown)


class _Pick(torch.nn.Module):
    """A "network" whose logit is its input channel `index`: shows which voxel reached which channel."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.index : self.index + 1]


@pytest.mark.parametrize("tta", [False, True])
def test_predict_feeds_a_multi_channel_image_in_the_samplers_channel_order(tta):
    """(C, D, H, W) images: a 3-D network sees channel c as input channel c; a 2-D one on k-slice stacks
    sees channel c's slice z - k//2 + j as input channel c * k + j (PatchSampler's order), edge slices
    repeated."""
    from prostate_kernels.predict import predict_probabilities

    image = np.random.default_rng(0).standard_normal((2, 5, 12, 12)).astype(np.float32)
    expit = 1 / (1 + np.exp(-image.astype(np.float64)))
    for c in (0, 1):
        prob = predict_probabilities(_Pick(c), image, (4, 8, 8), tta=tta)
        np.testing.assert_allclose(prob, expit[c], atol=1e-6)
    prob = predict_probabilities(_Pick(1 * 3 + 2), image, (3, 8, 8), slices=3, tta=tta)  # channel 1, z + 1
    above = np.concatenate([expit[1, 1:], expit[1, -1:]])  # the last slice's z + 1 is itself
    np.testing.assert_allclose(prob, above, atol=1e-6)
    prob = predict_probabilities(_Pick(0), image, (3, 8, 8), slices=3, tta=tta)  # channel 0, z - 1
    np.testing.assert_allclose(prob, np.concatenate([expit[0, :1], expit[0, :-1]]), atol=1e-6)


def test_user_errors_are_one_line_with_status_2(tmp_path, phantoms, trained):
    result = run_cli("train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {tmp_path / 'nowhere'}: not a directory"
    not_ours = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, not_ours)
    result = run_cli(
        "predict", "--checkpoint", str(not_ours), "--input", str(phantoms), "--output", str(tmp_path)
    )
    assert result.returncode == 2 and "not a prostate_kernels checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
    state = load_checkpoint(trained / "checkpoint.pt")
    save_checkpoint({**state, "model": "unet3d"}, tmp_path / "wrong_model.pt")
    result = run_cli("predict", "--checkpoint", str(tmp_path / "wrong_model.pt"), "--input", str(phantoms),
                     "--output", str(tmp_path))  # fmt: skip
    assert result.returncode == 2 and "weights do not fit model 'unet3d'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = run_cli("phantoms", "--out", str(tmp_path), "--n", "0")
    assert result.returncode == 2 and "argument --n: 0 must be >= 1" in result.stderr


def test_a_bad_case_does_not_stop_the_others(phantoms, trained, tmp_path):
    data = tmp_path / "mixed"
    data.mkdir()
    for name in ("Case00.mhd", "Case00.raw"):
        (data / name).write_bytes((phantoms / name).read_bytes())
    (data / "Case01.mhd").write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_NOPE\n"
    )
    result = run_cli("predict", "--checkpoint", str(trained / "checkpoint.pt"), "--input", str(data),
                     "--output", str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 2 and "Case01.mhd: cannot read image" in result.stderr
    assert (tmp_path / "out" / "Case00_segmentation.mhd").exists()
    # evaluation: a prediction whose grid differs from its reference is reported, the others scored
    ref = read_volume(phantoms / "Case00_segmentation.mhd")
    write_volume(ref.like(ref.array), tmp_path / "ev" / "Case00_segmentation.mhd")
    cropped = Volume(ref.array[:, :16], ref.spacing, ref.origin, ref.direction)
    write_volume(cropped, tmp_path / "ev" / "Case01_segmentation.mhd")
    result = run_cli("evaluate", "--pred", str(tmp_path / "ev"), "--ref", str(phantoms))
    assert result.returncode == 2 and "Case01_segmentation.mhd: size" in result.stderr
    assert f"differs from reference {phantoms / 'Case01_segmentation.mhd'} size" in result.stderr
    assert "Case00" in result.stdout


def test_constant_image_and_empty_mask_in_training_data_are_skipped_with_a_message(
    phantoms, tmp_path, capsys
):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        for ext in (".mhd", ".raw", "_segmentation.mhd", "_segmentation.raw"):
            (data / f"Case0{i}{ext}").write_bytes((phantoms / f"Case0{i}{ext}").read_bytes())
    image = read_volume(data / "Case02.mhd")
    write_volume(image.like(np.full_like(image.array, 5)), data / "Case02.mhd")
    assert main(train_args(data, tmp_path / "run", 1)) == 0
    assert "Case02.mhd: image has constant intensity 5" in capsys.readouterr().out


def test_predict_refuses_a_mask_file_given_as_its_input(phantoms, trained, tmp_path):
    """It segmented the mask into an empty one, status 0. The --output directory it created (with a
    missing parent) is removed again, as nothing was written there; an existing one is kept."""
    mask = phantoms / "Case00_segmentation.mhd"
    for output in (tmp_path / "new" / "pred", tmp_path):
        result = run_cli("predict", "--checkpoint", str(trained / "checkpoint.pt"), "--input", str(mask),
                         "--output", str(output))  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert f"{mask}: holds only 2 different values (0, 1): a label mask" in result.stderr
    assert not (tmp_path / "new").exists() and tmp_path.is_dir()


def test_predict_given_a_directory_of_masks_says_they_are_masks(phantoms, tmp_path):
    """A predictions directory passed as --input said 'no images found' beside its .mhd files."""
    from prostate_kernels.data.errors import DataError
    from prostate_kernels.pipeline import list_images

    masks = tmp_path / "predictions"
    masks.mkdir()
    for name in ("Case00_segmentation.mhd", "Case00_segmentation.raw"):
        (masks / name).write_bytes((phantoms / name).read_bytes())
    with pytest.raises(DataError, match=r"no images .* found; its 1 \*_segmentation file\(s\) are masks"):
        list_images(masks)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no images \(.*\) found$"):
        list_images(tmp_path / "empty")


def _decathlon_prostate(phantoms: Path, out: Path) -> Path:
    """The Decathlon's prostate layout from the phantoms: imagesTr/caseN.nii.gz 4-D (channel 0 the
    phantom, channel 1 its negative: another z-scored input), labelsTr/caseN.nii.gz the gland as two zones
    (1 and 2, split along its columns)."""
    import SimpleITK as sitk

    from prostate_kernels.data.io import to_sitk

    (out / "imagesTr").mkdir(parents=True)
    for i in range(4):
        image = read_volume(phantoms / f"Case0{i}.mhd")
        base = to_sitk(image, np.float32)
        sitk.WriteImage(sitk.JoinSeries([base, base * -1.0]), str(out / "imagesTr" / f"case{i}.nii.gz"))
        mask = read_volume(phantoms / f"Case0{i}_segmentation.mhd")
        zones = mask.array.astype(np.uint8)
        zones[..., : zones.shape[2] // 2] *= 2
        write_volume(mask.like(zones), out / "labelsTr" / f"case{i}.nii.gz")
    return out


def test_a_decathlon_prostate_dataset_trains_predicts_and_scores_on_its_channel_and_zones(
    phantoms, tmp_path, capsys
):
    """4-D images (T2, ADC) and masks of two zones: every case was skipped as 'a 4-D one', and --label
    took one zone. train --channel / --label 1 2, predict on the checkpoint's channel, evaluate --label 1 2
    (overlays from imagesTr/, the first channel)."""
    data = _decathlon_prostate(phantoms, tmp_path / "decathlon")
    assert main(train_args(data, tmp_path / "no-channel", 1)) == 2
    assert "holds 2 channels (a 4-D image of size (32, 32, 8, 2)): pass --channel" in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(train_args(data, run, 2, "--channel", "1", "--label", "1", "2")) == 0
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["channel"] == [1] and state["label"] == [1, 2]
    predicted = {}
    for channel in ((), ("--channel", "0")):
        out = tmp_path / f"pred{len(channel)}"
        args = ["predict", "--checkpoint", str(run / "checkpoint.pt"), "--input", str(data / "imagesTr"),
                "--output", str(out), "--no-tta", "--no-progress", "--save-probabilities",
                *channel]  # fmt: skip
        assert main(args) == 0
        segmentation, image = (
            read_volume(out / "case0_segmentation.nii.gz"),
            read_volume(phantoms / "Case00.mhd"),
        )
        assert segmentation.array.shape == image.array.shape
        assert segmentation.spacing == pytest.approx(image.spacing)
        predicted[channel] = read_volume(out / "case0_probabilities.nii.gz").array
    assert not np.allclose(predicted[()], predicted[("--channel", "0")])  # the checkpoint's channel, 1
    main(["evaluate", "--pred", str(tmp_path / "pred0"), "--ref", str(data), "--label", "1", "2",
          "--out", str(tmp_path / "ev")])  # fmt: skip
    with (tmp_path / "ev" / "evaluation.csv").open() as f:
        assert [row["case"] for row in csv.DictReader(f)] == ["case0", "case1", "case2", "case3"]
    assert sorted(p.name for p in (tmp_path / "ev").glob("*_overlay.png"))[0] == "case0_overlay.png"


def test_a_network_trains_and_predicts_on_several_channels_of_each_image(phantoms, tmp_path, capsys):
    """train --channel 0 1: the network takes both channels (T2 and ADC) as its input channels, the
    checkpoint keeps them, predict reads them in that order (--channel 1 0 swaps them: other
    probabilities); another count of channels is refused naming the checkpoint's."""
    data = _decathlon_prostate(phantoms, tmp_path / "decathlon")
    run = tmp_path / "run"
    assert main(train_args(data, run, 2, "--channel", "0", "1", "--label", "1", "2")) == 0
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["channel"] == [0, 1] and state["model_kwargs"]["in_channels"] == 2
    first_conv = next(v for k, v in state["state_dict"].items() if k.endswith("weight") and v.dim() == 5)
    assert first_conv.shape[1] == 2
    case0 = data / "imagesTr" / "case0.nii.gz"
    args = ["predict", "--checkpoint", str(run / "checkpoint.pt"), "--input", str(case0), "--no-tta",
            "--no-progress", "--save-probabilities"]  # fmt: skip
    predicted = {}
    for channel in ((), ("--channel", "1", "0")):
        out = tmp_path / f"pred{len(channel)}"
        assert main([*args, "--output", str(out), *channel]) == 0
        predicted[channel] = read_volume(out / "case0_probabilities.nii.gz")
    image = read_volume(phantoms / "Case00.mhd")
    assert predicted[()].array.shape == image.array.shape
    assert predicted[()].spacing == pytest.approx(image.spacing)
    assert not np.allclose(predicted[()].array, predicted[("--channel", "1", "0")].array)
    capsys.readouterr()
    assert main([*args, "--output", str(tmp_path / "one"), "--channel", "0"]) == 2
    said = capsys.readouterr().err
    assert (
        "--channel 0 names 1 channel(s), but" in said and "was trained on 2 (--channel 0 1): name 2" in said
    )
    assert not (tmp_path / "one").exists()
    assert main([*args, "--output", str(tmp_path / "twice"), "--channel", "0", "0"]) == 2
    assert "--channel 0 0 names channel 0 more than once" in capsys.readouterr().err
    assert main(train_args(data, tmp_path / "twice", 2, "--channel", "1", "1", "--label", "1")) == 2
    assert "--channel 1 1 names channel 1 more than once" in capsys.readouterr().err


def test_a_checkpoint_recording_one_int_channel_predicts_that_channel(phantoms, tmp_path):
    """Checkpoints before several channels recorded --channel as one int: predict reads that channel."""
    data = _decathlon_prostate(phantoms, tmp_path / "decathlon")
    run = tmp_path / "run"
    assert main(train_args(data, run, 1, "--channel", "1", "--label", "1", "2", "--val-cases", "0")) == 0
    state = load_checkpoint(run / "checkpoint.pt")
    state["channel"], state["config"]["channel"] = 1, 1
    save_checkpoint(state, tmp_path / "old.pt")
    probabilities = []
    for checkpoint in (run / "checkpoint.pt", tmp_path / "old.pt"):
        out = tmp_path / checkpoint.stem
        case1 = data / "imagesTr" / "case1.nii.gz"
        assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(case1), "--output", str(out),
                     "--no-tta", "--no-progress", "--save-probabilities"]) == 0  # fmt: skip
        probabilities.append(read_volume(out / "case1_probabilities.nii.gz").array)
    assert np.array_equal(*probabilities)


def test_predict_segments_dicom_series_given_as_a_directory_or_a_directory_of_them(
    phantoms, trained, tmp_path
):
    """A scanner's export (one directory of slices per series) was 'no images found'."""
    from cli_helpers import write_dicom_series

    exam = tmp_path / "exam"
    for i in range(2):
        write_dicom_series(
            phantoms / f"Case0{i}.mhd", exam / f"series{i}", f"1.2.826.0.1.3680043.2.1125.9.{i}"
        )
    checkpoint = str(trained / "checkpoint.pt")
    args = ["predict", "--checkpoint", checkpoint, "--no-tta", "--no-progress", "--save-probabilities"]
    assert main([*args, "--input", str(exam / "series1"), "--output", str(tmp_path / "one")]) == 0
    assert main([*args, "--input", str(exam), "--output", str(tmp_path / "both")]) == 0
    assert sorted(p.name for p in (tmp_path / "both").iterdir()) == [
        ".prostate-kernels-prediction.json",  # which settings predicted each case (predict --continue)
        "series0_probabilities.nii.gz", "series0_segmentation.nii.gz",
        "series1_probabilities.nii.gz", "series1_segmentation.nii.gz",
    ]  # fmt: skip
    image = read_volume(phantoms / "Case01.mhd")
    for out in ("one", "both"):
        segmentation = read_volume(tmp_path / out / "series1_segmentation.nii.gz")
        assert segmentation.array.shape == image.array.shape
        assert segmentation.spacing == pytest.approx(image.spacing, rel=1e-5)
        assert segmentation.origin == pytest.approx(image.origin, abs=1e-4)
    # the phantom's int16 voxels and geometry, exported losslessly: the probabilities of the file itself
    assert main([*args, "--input", str(phantoms / "Case01.mhd"), "--output", str(tmp_path / "file")]) == 0
    from_file = read_volume(tmp_path / "file" / "Case01_probabilities.mhd").array
    from_series = read_volume(tmp_path / "one" / "series1_probabilities.nii.gz").array
    assert np.abs(from_file - from_series).max() < 1e-6, np.abs(from_file - from_series).max()


def test_predict_deterministic_segments_under_deterministic_mode(phantoms, trained, tmp_path, monkeypatch):
    """predict --deterministic: every case's probabilities are computed under torch's deterministic mode
    (untimed kernel tiles, windows summed in batch order on a GPU), restored afterwards; the same masks as
    without it (on this CPU every run repeats anyway)."""
    from prostate_kernels import pipeline

    seen, real = [], pipeline._model_probabilities

    def spy(*args):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real(*args)

    monkeypatch.setattr(pipeline, "_model_probabilities", spy)
    base = ["predict", "--checkpoint", str(trained / "checkpoint.pt"), "--input", str(phantoms), "--no-tta"]
    assert main([*base, "--output", str(tmp_path / "plain")]) == 0
    assert main([*base, "--output", str(tmp_path / "deterministic"), "--deterministic"]) == 0
    assert seen == [False] * 4 + [True] * 4 and not torch.are_deterministic_algorithms_enabled()
    for case in ("Case00", "Case03"):
        plain = read_volume(tmp_path / "plain" / f"{case}_segmentation.mhd").array
        again = read_volume(tmp_path / "deterministic" / f"{case}_segmentation.mhd").array
        assert np.array_equal(plain, again)


# ------------------------------------------------------------------------------------- real case


@pytest.mark.skipif(not REAL.is_dir(), reason=f"the real case is not present at {REAL}")
def test_real_case_prediction_keeps_geometry_and_evaluates_label_5(trained, tmp_path):
    image_path = REAL / "Case_018_Week7_LFOV.nii.gz"
    out = tmp_path / "pred"
    args = ["predict", "--checkpoint", str(trained / "checkpoint.pt"), "--input", str(image_path),
            "--output", str(out), "--overlap", "0"]  # fmt: skip
    assert main(args) == 0
    image, pred = read_volume(image_path), read_volume(out / "Case_018_Week7_LFOV_segmentation.nii.gz")
    assert pred.array.shape == image.array.shape == (128, 256, 256)
    for name in ("spacing", "origin", "direction"):
        assert np.allclose(getattr(pred, name), getattr(image, name), atol=1e-5), name
    prediction = out / "Case_018_Week7_LFOV_segmentation.nii.gz"
    reference = REAL / "Case_018_Week7_SEMANTIC_LFOV.nii.gz"
    args = [
        "evaluate",
        "--pred",
        str(prediction),
        "--ref",
        str(reference),
        "--label",
        "5",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    rows = list(csv.DictReader((tmp_path / "evaluation.csv").open()))
    assert len(rows) == 1 and 0.0 <= float(rows[0]["dice"]) <= 1.0


def test_a_failed_checkpoint_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = save_checkpoint({"iteration": 1, "weights": torch.ones(3)}, tmp_path / "checkpoint.pt")

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"iteration": 2, "weights": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left over


def test_a_failed_picture_write_leaves_the_earlier_picture_intact(tmp_path, monkeypatch):
    """Overlays and training curves go through safe_files.atomic_write, as checkpoints and CSVs do."""
    from matplotlib.figure import Figure

    image = np.random.default_rng(0).random((4, 16, 16))
    mask = np.zeros((4, 16, 16), np.uint8)
    mask[1:3, 4:12, 4:12] = 1
    path = plot_overlay(image, mask, mask, tmp_path / "Case00_overlay.png")
    before = path.read_bytes()

    def dies_half_way(self, f, **kwargs):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        plot_overlay(image, mask, mask, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["Case00_overlay.png"]


def test_a_write_that_cannot_start_names_the_file_asked_for_not_its_staging_file(tmp_path):
    """export --out /proc/x.pt2 said "/proc/.x.pt2.tmp-5292@vm: No such file or directory"."""
    from prostate_kernels.safe_files import atomic_write

    path = tmp_path / "missing" / "x.json"
    with pytest.raises(FileNotFoundError) as info, atomic_write(path) as f:
        f.write("{}")
    assert info.value.filename == str(path) and info.value.strerror == "No such file or directory"
    with pytest.raises(OSError, match="disk full") as info, atomic_write(tmp_path / "y.json") as f:
        raise OSError("disk full")  # an error of the block's own is left as it is
    assert info.value.filename is None and list(tmp_path.iterdir()) == []


def test_threads_writing_one_file_each_stage_their_own_write(tmp_path):
    """Threads of one process staged a write of the same file in one temporary file (named by the pid
    alone): each truncated what another was writing, one renamed another's half-written content into
    place, and the others failed to find their staging file."""
    import threading

    from prostate_kernels.safe_files import atomic_write

    path = tmp_path / "checkpoint.json"
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def save(writer: int) -> None:
        start.wait()
        try:
            for _ in range(40):
                with atomic_write(path) as f:
                    for _ in range(8):
                        f.write(str(writer) * 512)
                        f.flush()
        except Exception as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(writer,)) for writer in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    content = path.read_text()
    assert content in {str(writer) * 4096 for writer in range(4)}, content[:20]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.json"]


def test_the_sweep_of_dead_writes_reads_a_threads_staging_name(tmp_path):
    """A staging file named by a thread (PID-THREAD) is removed once its process is gone, and kept while
    it runs."""
    import socket
    import threading

    from cli_helpers import dead_pid

    from prostate_kernels.safe_files import remove_dead_temporaries, temporary_path

    gone = dead_pid()
    named: list[Path] = []
    thread = threading.Thread(target=lambda: named.append(temporary_path(tmp_path / "x.pt")))
    thread.start()
    thread.join()
    alive = named[0]
    assert alive.name == f".x.pt.tmp-{os.getpid()}-{thread.ident}@{socket.gethostname()}"
    dead = tmp_path / f".x.pt.tmp-{gone}-{thread.ident}@{socket.gethostname()}"
    for staging in (alive, dead):
        staging.write_text("half a checkpoint")
    assert remove_dead_temporaries(tmp_path, report=lambda line: None) == [dead]
    assert alive.exists()


def test_several_checkpoints_average_their_probabilities(phantoms, trained, tmp_path):
    state = load_checkpoint(trained / "checkpoint.pt")
    other = {k: (v * 0.8 if v.is_floating_point() else v) for k, v in state["state_dict"].items()}
    save_checkpoint({**state, "state_dict": other}, tmp_path / "other.pt")
    case = phantoms / "Case01.mhd"
    outs = {}
    for name, checkpoints in (("a", [trained / "checkpoint.pt"]), ("b", [tmp_path / "other.pt"]),
                              ("ab", [trained / "checkpoint.pt", tmp_path / "other.pt"])):  # fmt: skip
        args = ["predict", "--checkpoint", *map(str, checkpoints), "--input", str(case),
                "--output", str(tmp_path / name), "--save-probabilities"]  # fmt: skip
        assert main(args) == 0
        outs[name] = read_volume(tmp_path / name / "Case01_probabilities.mhd").array
    assert not np.allclose(outs["a"], outs["b"])
    assert np.allclose(outs["ab"], (outs["a"] + outs["b"]) / 2, atol=1e-6)


def test_poly_schedule_and_augmentation_resume_exactly_and_decay_to_zero(phantoms, tmp_path, monkeypatch):
    """A 6-iteration run killed after its checkpoint at iteration 3 and resumed ends with the weights of an
    uninterrupted one (poly's horizon is the run's --iters; augmentation is a function of the iteration)."""
    from prostate_kernels.data.sampling import PatchSampler

    extra = ("--schedule", "poly", "--augment")
    assert main(train_args(phantoms, tmp_path / "a", 6, *extra)) == 0
    draw = PatchSampler.draw

    def killed_after_iteration_3(self, iteration):
        if iteration == 3:  # the batch of iteration 4: the checkpoint of iteration 3 is written
            raise KeyboardInterrupt
        return draw(self, iteration)

    monkeypatch.setattr(PatchSampler, "draw", killed_after_iteration_3)
    assert main(train_args(phantoms, tmp_path / "b", 6, *extra)) != 0
    monkeypatch.setattr(PatchSampler, "draw", draw)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["iteration"] == 3
    assert main(train_args(phantoms, tmp_path / "b", 6, *extra, "--resume")) == 0
    unbroken = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["state_dict"]
    resumed = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["state_dict"]
    assert all(torch.equal(resumed[k], unbroken[k]) for k in unbroken)
    lrs = {
        int(r["iteration"]): float(r["lr"]) for r in csv.DictReader((tmp_path / "a" / "metrics.csv").open())
    }
    assert lrs[6] == 0.0 and lrs[3] > 0.0  # (1 - it/iters)^0.9 reaches 0 at the last iteration
    config = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["config"]
    assert config["schedule"] == "poly" and config["augment"] is True


def test_unknown_schedule_is_one_line_error(phantoms, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(train_args(phantoms, tmp_path / "run", 2, "--schedule", "cosine"))
    assert exit_info.value.code == 2 and "--schedule" in capsys.readouterr().err
