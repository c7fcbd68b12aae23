"""The benchmarks' baselines compute what ours computes: a ratio against another function means nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_dense_block  # noqa: E402

from prostate_kernels import use_backend  # noqa: E402


def test_the_dense_block_benchmarks_variants_are_one_block():
    """ours, naive (torch.cat) and checkpoint (efficient_densenet's recipe) from the same weights: the same
    output and input gradient in float64 (dropout 0: the checkpoint variant draws torch's masks, not ours)."""
    variants = bench_dense_block.variants(8, 2, True, "cpu", torch.float64)
    for module in variants.values():
        block = module.block if isinstance(module, bench_dense_block.CheckpointedBlock) else module
        block.dropout = 0.0
    x = torch.randn((1, 8, 4, 5, 6), dtype=torch.float64, requires_grad=True)
    gy = torch.randn((1, 8 + 2 * 16, 4, 5, 6), dtype=torch.float64)
    results = {}
    with use_backend("torch"):
        for name, module in variants.items():
            y = module(x)
            y.backward(gy)
            results[name] = (y.detach(), x.grad)
            x.grad = None
    y_ours, grad_ours = results.pop("ours")
    for name, (y, grad) in results.items():
        torch.testing.assert_close(y, y_ours, rtol=1e-12, atol=1e-12, msg=name)
        torch.testing.assert_close(grad, grad_ours, rtol=1e-12, atol=1e-12, msg=name)


def test_the_model_benchmarks_variants_are_one_network():
    """bench_models.variant: ours, plain PyTorch (eager), and each through torch.compile (Inductor), built
    from the same weights, compute the same network (eval mode: no dropout draws); ours_compile is ours,
    compiled."""
    import bench_models

    from prostate_kernels.nn import DenseBlock3d

    x = torch.randn((1, 1, 8, 16, 16), generator=torch.Generator().manual_seed(0))
    outputs = {}
    with torch._inductor.config.patch(force_disable_caches=True), torch.no_grad():
        for kind in ("ours", "eager", "compile", "ours_compile"):
            model, backend = bench_models.variant("tiramisu3d_tiny", kind, "cpu")
            blocks = [m for m in model.modules() if isinstance(m, DenseBlock3d)]
            assert blocks and all(b.memory_efficient == kind.startswith("ours") for b in blocks), kind
            assert isinstance(model, torch._dynamo.eval_frame.OptimizedModule) == kind.endswith("compile")
            with use_backend(backend):
                outputs[kind] = model.eval()(x)
    for kind, y in outputs.items():
        torch.testing.assert_close(y, outputs["ours"], rtol=1e-4, atol=1e-4, msg=kind)
