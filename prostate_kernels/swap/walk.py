"""optimize(model): walk any nn.Module and swap in the library's layers where they compute the same."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from prostate_kernels.nn.dense import BNReLUConv3d, DenseBlock3d
from prostate_kernels.nn.separable import DepthwiseConv3d, SeparableConv3d
from prostate_kernels.swap import depthwise, runs
from prostate_kernels.swap.dense_blocks import (
    PROBE_TOLERANCE,
    AdoptedDenseBlock3d,
    DenseBlockMatch,
    match_dense_block,
    probe_error,
)
from prostate_kernels.swap.fused_sequential import FusedSequential, chained, overrides_forward
from prostate_kernels.swap.report import LeftAlone, OptimizeReport, Replacement, has_hooks

# Already the library's: left as they are, not entered.
_OURS = (BNReLUConv3d, DenseBlock3d, DepthwiseConv3d, SeparableConv3d)


def optimize(model: nn.Module, dry_run: bool = False) -> tuple[nn.Module, OptimizeReport]:
    """Swap the library's layers into `model` wherever the computation is the same, in place:

    - a 3D DenseNet-BC dense block (MONAI's DenseNet121/169/201/264 with spatial_dims=3, or torchvision's
      layout in 3D) -> AdoptedDenseBlock3d: the memory-efficient block (one shared buffer, statistics
      computed once, nothing kept per layer); checked by a float64 probe before it is swapped;
    - BatchNorm3d -> ReLU -> Conv3d, consecutive in an nn.Sequential (nested plain Sequentials, such as
      MONAI's ADN and Convolution blocks, opened up) -> one fused op (FusedSequential);
    - Conv3d(groups == in == out channels) -> DepthwiseConv3d.

    Every replacement holds the original modules' own Parameters and buffers under the same names: the
    state_dict keeps its keys (loads both ways) and an optimizer built before keeps working. Returns the
    model (a new object only where the model itself was replaced) and a report of what was replaced and
    what was left, with why; dry_run=True changes nothing and reports what would be done. Forward hooks
    registered on a module stop a replacement of it (they would no longer run).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize expects an nn.Module, got {type(model).__name__}")
    report = OptimizeReport(dry_run=dry_run)
    return _visit(model, "", report, dry_run), report


def _visit(module: nn.Module, path: str, report: OptimizeReport, dry_run: bool) -> nn.Module:
    """The module to use in place of `module`: itself (children possibly replaced) or its replacement."""
    if isinstance(module, _OURS):
        return module
    kind = type(module).__name__

    match = match_dense_block(module)
    if isinstance(match, DenseBlockMatch):
        replaced = _adopt_dense_block(module, match, path, kind, report, dry_run)
        if replaced is not None:
            return replaced
    elif isinstance(match, str):
        report.left.append(LeftAlone(path, f"{kind} (dense block)", match))

    if depthwise.is_depthwise(module):
        reason = depthwise.unsupported(module)
        if reason:
            report.left.append(LeftAlone(path, "depthwise Conv3d", reason))
            return module
        report.replaced.append(Replacement(path, kind, "DepthwiseConv3d", f"{module.in_channels} channels"))
        return module if dry_run else depthwise.as_depthwise(module)

    target = _fuse_sequential(module, path, kind, report, dry_run)
    visited: dict[int, nn.Module] = {}  # a child held under several names: visited once, replaced at each
    for name, child in list(target._modules.items()):
        if child is None:
            continue
        if id(child) not in visited:
            visited[id(child)] = _visit(child, f"{path}.{name}" if path else name, report, dry_run)
        if visited[id(child)] is not child:
            setattr(target, name, visited[id(child)])
    return target


def _adopt_dense_block(module, match, path, kind, report, dry_run) -> nn.Module | None:
    try:
        error = probe_error(module, match)
    except Exception as exc:  # the block's own forward failed on the probe: not ours to judge
        report.left.append(LeftAlone(path, f"{kind} (dense block)", f"the probe failed: {exc!r:.200}"))
        return None
    if not error <= PROBE_TOLERANCE:
        report.left.append(LeftAlone(
            path, f"{kind} (dense block)",
            f"its forward differs from a dense block's on the probe (relative error {error:.2e})",
        ))  # fmt: skip
        return None
    detail = (
        f"{match.layers} DenseNet-BC layers, {match.in_channels} in, growth {match.growth}, "
        f"bottleneck {match.bottleneck}, dropout {match.dropout}; probe error {error:.1e}"
    )
    report.replaced.append(Replacement(path, kind, "AdoptedDenseBlock3d", detail))
    return module if dry_run else AdoptedDenseBlock3d(module, match)


def _fuse_sequential(module, path, kind, report, dry_run) -> nn.Module:
    """A FusedSequential over module's children if it is an nn.Sequential applying them in order with a
    run (swap/runs.py) among the modules it applies (chained(): nested plain Sequentials opened up) that
    is not inside one child (a run inside one child is that child's: it is fused and reported there);
    the BatchNorm3d -> ReLU -> Conv3d runs it cannot fuse (and runs among a non-Sequential's children)
    are reported."""
    if isinstance(module, FusedSequential):  # an earlier optimize's
        return module
    sequential = isinstance(module, nn.Sequential) and not overrides_forward(module)
    # every entry, in order: named_children() lists a module held under two names once, and a
    # Sequential built from it would silently skip the second application
    entries = [(name, child) for name, child in module._modules.items() if child is not None]
    applied = chained(module) if sequential else entries
    names, children = [name for name, _ in applied], [child for _, child in applied]

    def where(i: int) -> str:
        return f"{path}.{names[i]}" if path else names[i]

    def across_children(start: int, length: int) -> bool:
        return len({name.split(".")[0] for name in names[start : start + length]}) > 1

    triples = [
        i for i in range(len(children) - 2) if runs.is_triple(*children[i : i + 3]) and across_children(i, 3)
    ]
    if not sequential:
        for i in triples:
            report.left.append(LeftAlone(
                where(i), "BatchNorm3d -> ReLU -> Conv3d",
                f"children of {kind}, whose forward is not known to apply them one after the other",
            ))  # fmt: skip
        return module
    for i in triples:
        reason = runs.unsupported(*runs.as_triple(children[i : i + 3]))
        if reason:
            report.left.append(LeftAlone(where(i), "BatchNorm3d -> ReLU -> Conv3d", reason))
    found = [run for run in runs.find_runs(children) if across_children(run.start, run.length)]
    if not found:
        return module
    if has_hooks(module):
        report.left.append(
            LeftAlone(path, kind, "hooks are registered on it (a replacement would not run them)")
        )
        return module
    detail = "; ".join(
        f"({', '.join(names[r.start : r.start + r.length])}) "
        + ("fused" if r.kind == "bn_relu_conv" else "separable: one kernel in CUDA inference")
        for r in found
    )
    report.replaced.append(Replacement(path, kind, "FusedSequential", detail))
    if dry_run:
        return module
    fused = FusedSequential(OrderedDict(entries))
    fused.training = module.training
    return fused


__all__ = ["optimize"]
