"""Training that goes wrong stops cleanly and keeps its last good checkpoint (items 11-12 of the
reliability issue)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from cli_helpers import copy_dataset, make_phantoms, run_cli, torchrun_environment, train_args

import prostate_kernels.train as training
import prostate_kernels.train_config as train_config
from prostate_kernels.checkpoint import load_checkpoint, save_checkpoint
from prostate_kernels.data import DataError
from prostate_kernels.metrics_log import MetricsLog
from prostate_kernels.safe_files import LOCK_NAME
from prostate_kernels.train import TrainConfig, train
from prostate_kernels.train_state import resume_differences


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_phantoms(tmp_path_factory.mktemp("data"))


def config(data: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(model="tiramisu3d_tiny", patch=(8, 32, 32), batch=2, iters=4, val_every=2, val_cases=1,
                    checkpoint_every=1, progress=False)  # fmt: skip
    return TrainConfig(data=data, out=out, **{**settings, **overrides})


def test_a_non_finite_loss_stops_training_and_keeps_the_last_finite_checkpoint(data, tmp_path, monkeypatch):
    real_loss = training.loss_function

    def nan_from_the_third_call(name):
        loss_fn, calls = real_loss(name), []

        def loss(logits, y):
            calls.append(1)
            value = loss_fn(logits, y)
            return value * float("nan") if len(calls) >= 3 else value

        return loss

    monkeypatch.setattr(training, "loss_function", nan_from_the_third_call)
    with pytest.raises(DataError, match=r"loss is nan at iteration 3: training stopped") as caught:
        train(config(data, tmp_path / "run"))
    assert "keeps the last checkpoint" in str(caught.value)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert all(torch.isfinite(v).all() for v in best["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # the lock went with the run


def test_nan_at_the_first_iteration_says_that_no_checkpoint_exists(data, tmp_path, monkeypatch):
    monkeypatch.setattr(training, "loss_function", lambda name: lambda logits, y: logits.sum() * float("nan"))
    with pytest.raises(DataError, match=r"iteration 1: .*no checkpoint was written"):
        train(config(data, tmp_path / "run"))


def test_non_finite_weights_are_never_saved(tmp_path):
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(DataError, match=r"weights became non-finite at iteration 7 \(weight, 1 tensors\)"):
        training._check_finite_weights(model, 7, tmp_path / "checkpoint.pt")


def test_no_validation_cases_trains_without_validation_or_best(data, tmp_path):
    run = tmp_path / "run"
    args = train_args(data, run, 2)
    args[args.index("--val-cases") + 1] = "0"
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no held-out cases (--val-cases 0)" in result.stdout
    assert "Mean of empty slice" not in result.stderr and "Warning" not in result.stderr
    assert (run / "checkpoint.pt").exists() and not (run / "best.pt").exists()
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == 2


def test_resuming_with_other_settings_names_them_and_a_finished_run_says_so(data, tmp_path, capsys):
    run = tmp_path / "run"
    train(config(data, run, iters=2))
    capsys.readouterr()
    train(config(data, run, iters=2, resume=True))
    said = capsys.readouterr().out
    assert "resumed from" in said and "differ" not in said  # the same settings: nothing to warn about
    assert "is at iteration 2, --iters is 2: nothing left to train" in said
    train(config(data, run, iters=3, resume=True, patch=(4, 16, 16), lr=1e-3, loss="dice", augment=False))
    said = capsys.readouterr().out
    assert "settings that differ from the checkpoint's" in said
    for fragment in ("--patch (4, 16, 16) (was (8, 32, 32))", "--lr 0.001 (was 0.002)",
                     "--loss dice (was bce+dice)", "--augment False (was True)"):  # fmt: skip
        assert fragment in said, (fragment, said)
    assert "--batch" not in said and "--seed" not in said
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == 3
    train(config(data, run, iters=4, resume=True, patch=(4, 16, 16), lr=1e-3, loss="dice", augment=False,
                 spacing=(3.0, 1.0, 1.0)))  # fmt: skip
    said = capsys.readouterr().out
    assert "--spacing (3.0, 1.0, 1.0) (was None)" in said and "--patch" not in said
    assert "nproc" not in said
    state = load_checkpoint(run / "checkpoint.pt")  # as if two torchrun processes had written it
    state["rng"]["ranks"].append(state["rng"]["ranks"][0])
    save_checkpoint(state, run / "checkpoint.pt")
    train(config(data, run, iters=5, resume=True, patch=(4, 16, 16), lr=1e-3, loss="dice", augment=False,
                 spacing=(3.0, 1.0, 1.0)))  # fmt: skip
    assert "--nproc-per-node 1 (was 2)" in capsys.readouterr().out


def test_resume_takes_an_older_checkpoints_single_label_for_that_label_and_names_a_new_channel():
    """Checkpoints before --label and --channel took several stored one int: resuming with that label
    or channel is no change."""
    now = TrainConfig(data=Path("d"), out=Path("o"), model="tiramisu3d_tiny", label=(5,), channel=1)
    settings = now.settings()
    # (orientation recorded: a checkpoint without it differs in that too, test_orientation.py)
    saved = {"patch": list(settings.patch), "config": {"label": 5, "channel": None, "orientation": "LPS"}}

    def differences():
        return resume_differences(saved, now, settings.patch, settings.batch, settings.lr, 1)

    assert differences() == ["--channel (1,) (was None)"]
    now.label, now.channel = (5, 6), None
    assert differences() == ["--label (5, 6) (was (5,))"]
    saved["config"]["channel"] = 1  # checkpoints before several channels stored one int
    now.label, now.channel = (5,), (1,)
    assert differences() == []
    now.channel = (1, 0)
    assert differences() == ["--channel (1, 0) (was (1,))"]


def test_deterministic_trains_under_deterministic_algorithms_then_restores_the_settings(
    data, tmp_path, capsys, monkeypatch
):
    """--deterministic: the run trains under torch.use_deterministic_algorithms(True, warn_only=True) with
    cuDNN's benchmark off (the library's autotuners then take untimed tiles), the settings before it come
    back afterwards, the checkpoint records it, and resuming without it is named."""
    seen, real = [], training._train

    def spy(*args, **kwargs):
        flags = (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        )
        seen.append((*flags, torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "_train", spy)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    run = tmp_path / "run"
    train(config(data, run, iters=2, deterministic=True))
    assert seen == [(True, True, False, ":4096:8")]
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert "deterministic algorithms on" in capsys.readouterr().out
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    assert load_checkpoint(run / "checkpoint.pt")["config"]["deterministic"] is True
    train(config(data, run, iters=3, resume=True))
    assert "--deterministic False (was True)" in capsys.readouterr().out
    assert seen[-1] == (False, False, True, None)


def test_the_deterministic_flag_reaches_the_run(data, tmp_path):
    run = tmp_path / "run"
    result = run_cli(*train_args(data, run, 1, "--deterministic"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "deterministic algorithms on" in result.stdout
    assert load_checkpoint(run / "checkpoint.pt")["config"]["deterministic"] is True


def test_a_batch_whose_largest_tensor_exceeds_memory_is_refused_before_anything_is_written(data, tmp_path):
    """--batch 100000 was ended by the host's out-of-memory killer with no message."""
    from prostate_kernels.train import ConfigError

    with pytest.raises(ConfigError) as info:
        train(config(data, tmp_path / "run", batch=10**5))
    message = str(info.value)
    assert "--batch 100000 with --patch 8x32x32: one training step of tiramisu3d_tiny makes a" in message
    assert "GiB of memory of cpu" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "model, patch", [("tiramisu3d_tiny", (8, 32, 32)), ("deeplabv3plus_2d", (13, 32, 32))]
)
def test_the_batch_check_refuses_exactly_past_its_bounds(data, tmp_path, monkeypatch, model, patch):
    """On the CPU the check passes at the step's simulated peak and refuses one byte below it; on a GPU
    (whose fused kernels keep less) only the largest tensor counts. 2-D networks take their slices as
    channels."""
    from prostate_kernels.models import build_model

    from prostate_kernels.memory_bound import step_memory
    from prostate_kernels.train import ConfigError, check_batch_fits

    slices = 13 if model == "deeplabv3plus_2d" else 0
    run = config(data, tmp_path / "run", model=model, patch=patch, batch=3, amp="off")
    with torch.device("meta"):
        net = build_model(model, **({"in_channels": slices} if slices else {})).train()
    shape = (3, slices, *patch[1:]) if slices else (3, 1, *patch)
    step = step_memory(net, torch.empty(shape, device="meta"))
    assert step.largest_tensor >= 3 * patch[-2] * patch[-1] * 4  # at least one feature map of the batch
    assert step.peak > 2 * step.largest_tensor  # the forward keeps many maps for the backward
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(train_config, "memory_bytes", lambda device: step.peak)
    check_batch_fits(run, cpu)
    monkeypatch.setattr(train_config, "memory_bytes", lambda device: step.peak - 1)
    with pytest.raises(ConfigError, match=f"one training step of {model} \\(forward and backward\\) holds"):
        check_batch_fits(run, cpu)
    check_batch_fits(run, gpu)
    monkeypatch.setattr(train_config, "memory_bytes", lambda device: step.largest_tensor)
    check_batch_fits(run, gpu)
    monkeypatch.setattr(train_config, "memory_bytes", lambda device: step.largest_tensor - 1)
    with pytest.raises(ConfigError, match="at most 2 patches fit that bound"):
        check_batch_fits(run, gpu)
    monkeypatch.setattr(train_config, "memory_bytes", lambda device: None)
    check_batch_fits(run, cpu)
    # torchrun's processes on one machine share its memory: 2 need twice the step
    torchrun_environment(monkeypatch, rank=0)
    monkeypatch.setattr(train_config, "memory_bytes", lambda device: 2 * step.peak)
    check_batch_fits(run, cpu)
    monkeypatch.setattr(train_config, "memory_bytes", lambda device: 2 * step.peak - 1)
    with pytest.raises(ConfigError, match=f"the training steps of {model} .* of the 2 processes on this "):
        check_batch_fits(run, cpu)
    check_batch_fits(run, gpu)  # one GPU each


def test_a_batch_the_cpu_cannot_hold_for_its_backward_is_refused_before_anything_is_written(
    data, tmp_path, monkeypatch
):
    """--batch 64 --patch 8 256 256: no tensor of tiny Tiramisu's forward passes 4 GiB, but the step holds
    about 34 GiB at once; on the 24 GiB CI machine the out-of-memory killer ended it (status 137) and
    left its metrics.csv. Memory set here to 24 GiB, whatever this machine has."""
    from prostate_kernels.train import ConfigError

    monkeypatch.setattr(train_config, "memory_bytes", lambda device: 24 * 2**30)
    with pytest.raises(ConfigError) as info:
        train(config(data, tmp_path / "run", batch=64, patch=(8, 256, 256)))
    message = str(info.value)
    assert "--batch 64 with --patch 8x256x256: one training step of tiramisu3d_tiny (forward and " in message
    assert "more than the 24 GiB of memory of cpu; at most" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["triton", "torch"])
def test_the_step_memory_simulates_the_pytorch_path_on_any_backend(name):
    """Under set_backend("triton") the batch check's simulated step failed: "Cannot copy out of meta
    tensor" under the interpreter, "Triton runs on the CPU only through its interpreter" on a GPU."""
    from prostate_kernels.models import build_model

    from prostate_kernels import use_backend
    from prostate_kernels.memory_bound import step_memory

    def simulated_step():
        torch.manual_seed(0)
        with torch.device("meta"):
            model = build_model("tiramisu3d_tiny").train()
        return step_memory(model, torch.empty((2, 1, 16, 32, 32), device="meta"))

    with use_backend(name):
        step = simulated_step()
    assert step == simulated_step()  # the "auto" backend's, the PyTorch path on meta tensors


def test_the_step_memory_counts_allocations_until_freed_not_views():
    from prostate_kernels.memory_bound import step_memory

    class TemporariesAndViews(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(1, 4, 3, padding=1, bias=False)

        def forward(self, x):
            with torch.no_grad():
                for _ in range(10):  # each temporary dies when the next one replaces it
                    t = x * 2
                del t
            y = self.conv(x)  # (2, 4, 5, 6, 7) float32: the largest allocation
            y.relu_()  # in place: no allocation
            return y[:, :1].expand(2, 1000, 5, 6, 7)  # views, far larger than their storage

    with torch.device("meta"):
        model = TemporariesAndViews()
    x = torch.empty(2, 1, 5, 6, 7, device="meta")
    step = step_memory(model, x)
    volume = 2 * 5 * 6 * 7 * 4  # one channel of the batch, float32
    assert step.largest_tensor == 4 * volume
    weight = 4 * 27 * 4
    # alive at once in the backward: weight, x, y (saved by relu_), the slice's gradient and relu's (4
    # channels each), a 1-channel gradient: never the ten temporaries (at most two at once) nor the 1000
    # channels of the views
    assert weight + volume + 3 * 4 * volume <= step.peak <= weight + 3 * volume + 3 * 4 * volume
    with pytest.raises(ValueError, match="must be on the meta device"):
        step_memory(torch.nn.Conv3d(1, 4, 3), x)


@pytest.mark.parametrize(
    "damage, said",
    [
        (
            b"iteration,loss,lr,val_dice,seconds\n1,0.5,1e-3,,1.0\n\nx,1,2,3,4\n",
            "line 4 is not a row of 5 values starting with an iteration number",
        ),
        (
            b"iteration,loss,lr,val_dice,seconds\n1,0.5\n",
            "line 2 is not a row of 5 values starting with an iteration number",
        ),
        (
            b"iteration,loss,lr,val_dice,seconds\n1,0.5,1,1,1,1\n",
            "line 2 is not a row of 5 values starting with an iteration number",
        ),
        (b"iteration,loss,lr,val_dice,seconds\n1,0.5,1e-3,,1.0\n\xff\xfe\n", "not UTF-8 text (byte 51)"),
        (b"my notes\n", "header ['my notes'] is not ['iteration', 'loss', 'lr', 'val_dice', 'seconds']"),
    ],
)
def test_resume_refuses_a_damaged_metrics_csv_and_leaves_it_as_it_was(data, tmp_path, damage, said):
    """A row it could not parse ended resume in a ValueError or UnicodeDecodeError traceback; a file
    with another header was silently rewritten empty."""
    run = tmp_path / "run"
    train(config(data, run, iters=2))
    (run / "metrics.csv").write_bytes(damage)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(DataError) as info:
        train(config(data, run, iters=4, resume=True))
    assert (
        str(info.value)
        == f"{run / 'metrics.csv'}: {said}: move it away to resume (the run then starts a new one)"
    )
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


@pytest.mark.parametrize(
    "rows",
    [
        "1,0.5,1e-3,,1.0\n\n2,0.4,1e-3,0.5,1.0\n3,0.3,1e-3,,1.0\n",  # a blank line
        # a kill or a full disk in the middle of an append left a last line without its newline: the row of
        # an iteration after the checkpoint (a row is written before its iteration's checkpoint); resume
        # said the file was damaged and to move it away
        "1,0.5,1e-3,,1.0\n2,0.4,1e-3,0.5,1.0\n3,0.3,1e",
    ],
    ids=["blank line", "last append cut short"],
)
def test_resume_keeps_the_rows_up_to_the_checkpoint_and_redoes_the_rest(data, tmp_path, rows):
    run = tmp_path / "run"
    train(config(data, run, iters=2))
    header = "iteration,loss,lr,val_dice,seconds\n"
    (run / "metrics.csv").write_text(header + rows)
    train(config(data, run, iters=3, resume=True))
    lines = (run / "metrics.csv").read_text().splitlines()
    assert lines[:3] == [header.strip(), "1,0.5,1e-3,,1.0", "2,0.4,1e-3,0.5,1.0"]
    assert len(lines) == 4 and lines[3].startswith("3,")  # row 3 is redone
    assert lines[3] not in rows.splitlines()


def test_a_metrics_row_that_cannot_be_appended_is_not_half_written(tmp_path, monkeypatch):
    """On a full disk the append's error named no file, and a part of the row could stay behind."""
    path = tmp_path / "metrics.csv"
    log = MetricsLog(path, 0)
    log.write(1, 0.5, 1e-3, None, 1.0)
    before = path.read_bytes()
    real_open = Path.open

    class FullAfterSixBytes:
        def __init__(self, file):
            self.file = file

        def __enter__(self):
            return self

        def write(self, text):
            self.file.write(text[:6])
            self.file.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __exit__(self, *exc):
            self.file.close()

    def full_on_append(self, mode="r", **kwargs):
        opened = real_open(self, mode, **kwargs)
        return FullAfterSixBytes(opened) if mode == "a" else opened

    monkeypatch.setattr(Path, "open", full_on_append)
    with pytest.raises(OSError) as raised:
        log.write(2, 0.4, 1e-3, 0.5, 1.0)
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(path))
    assert path.read_bytes() == before


def test_a_run_that_fails_before_writing_leaves_no_directory_it_created(data, tmp_path):
    """train --data with no usable case left its new --out (and the parents it made) behind, empty."""
    unusable = copy_dataset(data, tmp_path / "unusable")
    with pytest.raises(DataError, match="0 usable cases"):
        train(config(unusable, tmp_path / "new" / "nested" / "run", label=7))  # no mask holds label 7
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(DataError, match="0 usable cases"):
        train(config(unusable, existing / "run", label=7))
    assert existing.is_dir() and not any(existing.iterdir())  # the parent it found is kept
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(DataError, match="0 usable cases"):
        train(config(unusable, kept, label=7))
    assert kept.is_dir()  # a directory that was there before stays, even empty


def test_a_run_that_fails_after_writing_keeps_its_directory(data, tmp_path, monkeypatch):
    run = tmp_path / "run"

    def fail_after_the_first_checkpoint(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    real_save = training.save_checkpoint
    monkeypatch.setattr(training, "save_checkpoint", fail_after_the_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train(config(data, run, iters=4))
    assert (run / "checkpoint.pt").is_file()


@pytest.mark.parametrize(
    "damage, said",
    [
        (
            {"optimizer": 3},
            "its optimizer state cannot be restored (AttributeError: 'int' object has no attribute",
        ),
        ({"optimizer": {}}, "its optimizer state cannot be restored (KeyError: 'param_groups')"),
        ({"scheduler": 3}, "its scheduler state cannot be restored (AttributeError: "),
        ({"rng": [1, 2]}, "its rng state cannot be restored (TypeError: "),
        ({"rng": None}, "its rng state cannot be restored (TypeError: "),
        ({"iteration": "x"}, "iteration 'x' is not an int >= 0"),
        ({"iteration": -5}, "iteration -5 is not an int >= 0"),
        ({"best_val_dice": None}, "best_val_dice None is not a number"),
        ({"state_dict": [1]}, "its weights are of type 'list', not a dict of tensors"),
    ],
)
def test_resume_names_the_part_of_a_damaged_checkpoint_it_cannot_restore(data, tmp_path, damage, said):
    """Each ended resume in a KeyError, TypeError, AttributeError or ValueError traceback."""
    run = tmp_path / "run"
    train(config(data, run, iters=2))
    save_checkpoint({**load_checkpoint(run / "checkpoint.pt"), **damage}, run / "checkpoint.pt")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(DataError) as info:
        train(config(data, run, iters=4, resume=True))
    assert str(info.value).startswith(f"{run / 'checkpoint.pt'}: malformed checkpoint: {said}"), str(
        info.value
    )
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing written


def test_resume_refuses_a_checkpoint_without_its_rng_state(data, tmp_path):
    run = tmp_path / "run"
    train(config(data, run, iters=2))
    state = load_checkpoint(run / "checkpoint.pt")
    del state["rng"]
    save_checkpoint(state, run / "checkpoint.pt")
    with pytest.raises(DataError, match="malformed checkpoint: it lacks the rng state"):
        train(config(data, run, iters=4, resume=True))
