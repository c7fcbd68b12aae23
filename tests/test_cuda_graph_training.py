"""`train --cuda-graphs` on the CPU. The capture itself needs a GPU (the GPU check `cuda graphs` trains
both ways there); here: the refusals, and everything around the capture, through a stand-in for
torch.cuda.make_graphed_callables that runs what the real one runs before it captures (the module's
forward and torch.autograd.grad, warm-ups + 1 times, drawing dropout masks and moving the BatchNorm
statistics) and leaves the forward as it was."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_line_error, make_phantoms, run_cli, train_args
from prostate_kernels.models import build_model

import prostate_kernels.train as training
from prostate_kernels import cuda_graph_training
from prostate_kernels.checkpoint import load_checkpoint
from prostate_kernels.data import ConfigError
from prostate_kernels.train import TrainConfig, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_phantoms(tmp_path_factory.mktemp("data"))


def stand_in(captured: list, moved: list | None = None):
    """make_graphed_callables' passes before its capture, on the CPU; records each module it was given
    and (into `moved`) whether those passes changed the module's buffers and the CPU generator."""

    def make_graphed_callables(module, sample_args, num_warmup_iters=3, allow_unused_input=False, pool=None):
        assert not torch.is_autocast_cache_enabled()  # the real one refuses the cache
        assert module.training
        buffers, rng = [b.clone() for b in module.buffers()], torch.get_rng_state()
        params = tuple(p for p in module.parameters() if p.requires_grad)
        for _ in range(num_warmup_iters + 1):  # the warm-ups, then the captured pass
            out = module(*sample_args)
            torch.autograd.grad(out, params, torch.ones_like(out), allow_unused=allow_unused_input)
        if moved is not None:
            changed = any(not torch.equal(a, b) for a, b in zip(buffers, module.buffers(), strict=True))
            moved.append((changed, not torch.equal(rng, torch.get_rng_state())))
        captured.append(module)
        return module

    return make_graphed_callables


def test_the_flag_is_refused_off_cuda_and_with_torchrun(data, tmp_path):
    assert cuda_graph_training.refusal(torch.device("cpu"), 1) == (
        "--cuda-graphs needs a CUDA device; this run is on cpu"
    )
    assert "this run has 2 (torchrun)" in cuda_graph_training.refusal(torch.device("cuda", 0), 2)
    assert cuda_graph_training.refusal(torch.device("cuda", 0), 1) is None
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        train(TrainConfig(data=data, out=tmp_path / "run", model="tiramisu3d_tiny", cuda_graphs=True))
    assert not (tmp_path / "run").exists()  # refused before anything was written
    result = run_cli(*train_args(data, tmp_path / "cli", 1, "--cuda-graphs"))
    assert_one_line_error(result, "--cuda-graphs needs a CUDA device; this run is on cpu")


def test_the_capture_leaves_buffers_generators_parameters_and_gradients_as_they_were(monkeypatch):
    captured, moved = [], []
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", stand_in(captured, moved))
    torch.manual_seed(0)
    model = build_model("tiramisu3d_tiny")  # BatchNorm and dropout
    sample = torch.randn((2, 1, 8, 32, 32))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    cuda_graph_training.capture_training_step(model, sample, None)
    assert captured == [model]
    assert moved == [(True, True)]  # the passes did move both: restoring them is what is tested
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())
    assert model.training


def _rows(run: Path) -> list[dict]:
    with (run / "metrics.csv").open() as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def test_a_run_through_the_capture_path_trains_exactly_as_the_eager_run(data, tmp_path, monkeypatch, capsys):
    """Same losses, validation Dice, checkpoint and resume as without the flag: the capture's passes
    leave no trace, its first batch is trained on once (not lost, not repeated), and a resumed run
    captures again at its own first batch."""
    settings = dict(model="tiramisu3d_tiny", patch=(8, 32, 32), batch=2, val_every=2, val_cases=1,
                    checkpoint_every=2, progress=False)  # fmt: skip
    train(TrainConfig(data=data, out=tmp_path / "eager", iters=4, **settings))
    captured = []
    monkeypatch.setattr(cuda_graph_training, "refusal", lambda device, world: None)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", stand_in(captured))
    graphed = tmp_path / "graphed"
    train(TrainConfig(data=data, out=graphed, iters=2, cuda_graphs=True, **settings))
    train(TrainConfig(data=data, out=graphed, iters=4, cuda_graphs=True, resume=True, **settings))
    assert len(captured) == 2
    assert capsys.readouterr().out.count("--cuda-graphs: forward and backward captured in") == 2
    assert _rows(graphed) == _rows(tmp_path / "eager") and len(_rows(graphed)) == 4
    eager, ours = (load_checkpoint(p / "checkpoint.pt") for p in (tmp_path / "eager", graphed))
    assert eager["iteration"] == ours["iteration"] == 4
    assert all(torch.equal(v, ours["state_dict"][k]) for k, v in eager["state_dict"].items())
    assert ours["config"]["cuda_graphs"] is True
    # a finished run: nothing left to train, nothing captured
    train(TrainConfig(data=data, out=graphed, iters=4, cuda_graphs=True, resume=True, **settings))
    assert len(captured) == 2


def test_training_keeps_the_autocast_settings_it_had(monkeypatch):
    """The capture's autocast (no cast cache) ends with it."""
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", stand_in([]))
    model = build_model("tiramisu3d_tiny")
    cuda_graph_training.capture_training_step(model, torch.randn((2, 1, 8, 32, 32)), torch.bfloat16)
    assert torch.is_autocast_cache_enabled()
    assert not torch.is_autocast_enabled("cpu")
    assert training.TrainConfig.__dataclass_fields__["cuda_graphs"].default is False


@pytest.mark.parametrize("layer", ["DenseBlock3d", "BNReLUConv3d"])
def test_the_triton_layers_give_their_gradients_to_autograd_grad(layer):
    """make_graphed_callables captures the backward as torch.autograd.grad over the parameters: the
    Triton path's autograd Functions must return every parameter's gradient (none written into .grad
    on the side), equal to what .backward() accumulates (same dropout seed)."""
    from prostate_kernels import use_backend
    from prostate_kernels.nn import BNReLUConv3d, DenseBlock3d

    torch.manual_seed(0)
    module, channels = (
        (DenseBlock3d(8, 4, 2, dropout=0.2), 8) if layer == "DenseBlock3d" else (BNReLUConv3d(6, 4), 6)
    )
    x, params = torch.randn(1, channels, 3, 4, 5), tuple(module.parameters())

    def loss():
        torch.manual_seed(1)  # the dropout masks
        with use_backend("triton"):
            return module(x).float().square().sum()

    grads = torch.autograd.grad(loss(), params)
    assert all(p.grad is None for p in params)
    loss().backward()
    for grad, p in zip(grads, params, strict=True):
        torch.testing.assert_close(grad, p.grad, rtol=1e-4, atol=1e-5)
