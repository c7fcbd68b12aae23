"""train --compile: the training step's forward and backward through torch.compile (Inductor, the CPU's
C++ code here), validation and checkpoints on the model itself. Compared with the eager run of the same
seed: dropout off, so both steps compute one function and differ only by Inductor's rounding."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_line_error, make_phantoms, run_cli, train_args

from prostate_kernels.checkpoint import load_checkpoint
from prostate_kernels.data import ConfigError
from prostate_kernels.train import TrainConfig, train
from prostate_kernels.train_state import resume_differences

ITERS = 3


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test compiles anew: no graph of an earlier test's model (dynamo) or its files (Inductor)."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        yield
    torch._dynamo.reset()


def _config(data, out, **settings) -> TrainConfig:
    # val_every 5: metrics.csv gets a row each iteration (val_every // 5), one validation at the end
    return TrainConfig(data=data, out=out, model="tiramisu3d_tiny", patch=(8, 32, 32), batch=2, iters=ITERS,
                       val_every=5, val_cases=1, progress=False, model_kwargs={"dropout": 0.0},
                       **settings)  # fmt: skip


def _losses(run) -> list[float]:
    with open(run / "metrics.csv", newline="") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def test_a_compiled_training_step_trains_as_the_eager_one(tmp_path):
    data = make_phantoms(tmp_path / "data")
    train(_config(data, tmp_path / "eager"))
    logged: list[str] = []
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    train(_config(data, tmp_path / "compiled", compile=True), logged.append)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs_before  # it did compile
    assert any(line.startswith("--compile: the first iteration (compiling the step) took") for line in logged)
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == ITERS
    assert compiled == pytest.approx(eager, rel=1e-5)
    # the checkpoint holds the model's own keys (not torch.compile's wrapper's) and eager's weights up to
    # Adam's amplified rounding: each tensor within 1e-3 of eager's (relative, L2; 2.2e-4 measured), where
    # the 3 steps moved each weight tensor by 4e-3 to 0.23 of its size (median 3e-2)
    weights = {name: load_checkpoint(tmp_path / name / "checkpoint.pt")["state_dict"] for name in
               ("eager", "compiled")}  # fmt: skip
    assert weights["compiled"].keys() == weights["eager"].keys()
    for key, value in weights["eager"].items():
        if value.is_floating_point() and value.norm() > 0:
            assert (weights["compiled"][key] - value).norm() <= 1e-3 * value.norm(), key


def test_compile_beside_cuda_graphs_is_refused_in_one_line(tmp_path):
    result = run_cli(*train_args(tmp_path / "data", tmp_path / "run", 2, "--compile", "--cuda-graphs"))
    assert_one_line_error(result, "--compile and --cuda-graphs: choose one")
    assert not (tmp_path / "run").exists()


def test_a_compiler_failure_is_one_error_naming_compile(tmp_path):
    """Inductor without a working C++ compiler (on the CPU; a GPU's code needs one too, for its launchers)
    ended the run in the compiler's traceback."""
    data = make_phantoms(tmp_path / "data")
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/g++",)}):
        with pytest.raises(ConfigError) as caught:
            train(_config(data, tmp_path / "run", compile=True))
    said = str(caught.value)
    assert said.startswith("--compile: torch.compile could not compile the training step (")
    assert "/nonexistent/g++" in said and said.endswith("train without --compile") and "\n" not in said
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_resuming_with_or_without_compile_is_named_and_older_checkpoints_are_not_compared():
    """Inductor draws nn.Dropout's masks from its own generator: a resumed run that changes --compile
    no longer draws what the unbroken run would."""
    now = TrainConfig(data=Path("d"), out=Path("o"), model="tiramisu3d_tiny", compile=True)
    settings = now.settings()

    def differences(recorded: dict) -> list[str]:
        saved = {"patch": list(settings.patch), "config": {"orientation": now.orientation, **recorded}}
        return resume_differences(saved, now, settings.patch, settings.batch, settings.lr, 1)

    assert differences({"compile": False}) == ["--compile True (was False)"]
    assert differences({"compile": True}) == []
    assert differences({}) == []  # a checkpoint from before --compile records none
