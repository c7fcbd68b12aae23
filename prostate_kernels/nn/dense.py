"""The dense layer (BN -> ReLU -> Conv3d) and the dense block of FC-DenseNet / Tiramisu 3D."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple, cast

import torch
import torch.distributed as dist
from torch import nn

from prostate_kernels import functional, reference
from prostate_kernels.devices import memory_bytes
from prostate_kernels.nn.arguments import check_count, check_input, check_probability
from prostate_kernels.ops.bn_relu_conv3d import check_batch_norm_settings
from prostate_kernels.ops.conv_geometry import conv_geometry, triple
from prostate_kernels.ops.dense_block import UnitParams, UnitSpec, dense_block
from prostate_kernels.ops.seeded_dropout import draw_seeds, dropout_scale
from prostate_kernels.ops.sync_batch_norm import sync_group

__all__ = [
    "BNReLUConv3d",
    "BatchNormStep",
    "BottleneckDenseLayer3d",
    "DenseBlock3d",
    "DenseUnit",
    "apply_bn_relu_conv",
    "batch_norm_step",
    "batch_norm_steps",
    "fusion_mismatch",
]


@dataclass(frozen=True)
class BatchNormStep:
    """What one forward of a BatchNorm does with statistics (see batch_norm_step)."""

    running_mean: torch.Tensor | None  # updated in place when batch_stats (None: not tracked)
    running_var: torch.Tensor | None
    batch_stats: bool  # normalise with the batch's own statistics (else with the running ones)
    momentum: float


def batch_norm_step(norm: nn.BatchNorm3d) -> BatchNormStep:
    """The running-statistics bookkeeping of nn.BatchNorm3d.forward, step for step: increments
    num_batches_tracked in training and says which statistics this forward uses and updates."""
    return batch_norm_steps([norm])[0]


def batch_norm_steps(norms: list[nn.BatchNorm3d]) -> list[BatchNormStep]:
    """batch_norm_step of each of `norms`, their num_batches_tracked incremented by one foreach op (a dense
    block's units at once: on a GPU each torch op costs host time; a module listed twice counts twice, as
    two forwards of it would)."""
    counters = [counter for counter in map(_counter, norms) if counter is not None]
    if len({id(c) for c in counters}) == len(counters):
        if counters:
            torch._foreach_add_(counters, 1)
    else:  # a repeated tensor in one foreach op could lose an increment on a GPU: one op each
        for counter in counters:
            counter.add_(1)
    return [_step_of(norm) for norm in norms]


def _counter(norm: nn.BatchNorm3d) -> torch.Tensor | None:
    """norm's num_batches_tracked when this forward of norm counts a step in it (as nn.BatchNorm3d's
    does), else None."""
    return norm.num_batches_tracked if norm.training and norm.track_running_stats else None


def _step_of(norm: nn.BatchNorm3d) -> BatchNormStep:
    """The BatchNormStep of norm, its num_batches_tracked already counted for this forward."""
    momentum = 0.0 if norm.momentum is None else norm.momentum
    if norm.momentum is None and (counter := _counter(norm)) is not None:
        momentum = 1.0 / float(counter)
    use_running = not norm.training or norm.track_running_stats
    return BatchNormStep(
        running_mean=norm.running_mean if use_running else None,
        running_var=norm.running_var if use_running else None,
        batch_stats=norm.training or (norm.running_mean is None and norm.running_var is None),
        momentum=momentum,
    )


def apply_bn_relu_conv(norm: nn.BatchNorm3d, conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """conv(relu(norm(x))) as one fused op, with norm's and conv's parameters and settings and
    nn.BatchNorm3d's bookkeeping (running statistics, num_batches_tracked); an nn.SyncBatchNorm norm
    (torch.nn.SyncBatchNorm.convert_sync_batchnorm) takes its batch statistics over its process group."""
    return _fused_unit(norm, conv, x, batch_norm_step(norm))


def _fused_unit(norm: nn.BatchNorm3d, conv: nn.Conv3d, x: torch.Tensor, bn: BatchNormStep) -> torch.Tensor:
    """apply_bn_relu_conv with this forward's bookkeeping `bn` already counted."""
    return functional.bn_relu_conv3d(
        x, conv.weight, conv.bias, norm.weight, norm.bias, bn.running_mean, bn.running_var,
        training=bn.batch_stats, momentum=bn.momentum, eps=norm.eps, stride=conv.stride,
        padding=conv.padding, dilation=conv.dilation, process_group=sync_group(norm),
    )  # fmt: skip


def _one_group(
    groups: list[dist.ProcessGroup | None], steps: list[BatchNormStep]
) -> dist.ProcessGroup | None:
    """The process group that every unit normalising with batch statistics synchronises over (sync_group
    of each unit's norm, in order with their steps), else None (none does, or they differ)."""
    used = [g for g, step in zip(groups, steps, strict=True) if step.batch_stats]
    if not used or any(g is None or g is not used[0] for g in used):
        return None
    return used[0]


def fusion_mismatch(norm: nn.BatchNorm3d, conv: nn.Conv3d) -> str | None:
    """Why the fused op cannot compute conv(relu(norm(x))) with these modules' settings (None: it can)."""
    if conv.groups != 1:
        return f"grouped Conv3d (groups={conv.groups}) is not supported"
    if conv.padding_mode != "zeros":
        return f"Conv3d padding_mode {conv.padding_mode!r} is not supported (only 'zeros')"
    if norm.num_features != conv.in_channels:
        return f"BatchNorm3d has {norm.num_features} features but Conv3d takes {conv.in_channels}"
    return None


class DenseUnit(NamedTuple):
    """One BatchNorm3d -> ReLU -> Conv3d of a dense layer, as the modules that hold its parameters."""

    norm: nn.BatchNorm3d
    conv: nn.Conv3d


class BNReLUConv3d(nn.Module):
    """BatchNorm3d -> ReLU -> Conv3d as one fused op; a drop-in for

        nn.Sequential(OrderedDict(norm=nn.BatchNorm3d(in_channels), relu=nn.ReLU(inplace=True),
                                  conv=nn.Conv3d(in_channels, out_channels, kernel_size, ...)))

    with the same state_dict keys (norm.*, conv.*), so weights load both ways. BatchNorm semantics are
    those of nn.BatchNorm3d (momentum=None is a cumulative average; num_batches_tracked counts steps).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int] = 3,
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] | str = 1,
        dilation: int | tuple[int, int, int] = 1,
        bias: bool = False,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
    ) -> None:
        super().__init__()
        in_channels = check_count("BNReLUConv3d", "in_channels", in_channels)
        out_channels = check_count("BNReLUConv3d", "out_channels", out_channels)
        kernel = triple(kernel_size, "BNReLUConv3d: kernel_size", positive=True)
        # refused here, not at the first forward (torch's Conv3d and BatchNorm3d take them and fail later)
        check_batch_norm_settings("BNReLUConv3d", eps, momentum, cumulative=True)
        try:
            conv_geometry(kernel, stride, padding, dilation)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"BNReLUConv3d: {exc}") from None
        self.norm = nn.BatchNorm3d(in_channels, eps=eps, momentum=momentum)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride, padding, dilation, bias=bias)

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_bn_relu_conv(self.norm, self.conv, x)

    def batch_norm_step(self) -> BatchNormStep:
        """batch_norm_step(self.norm): this forward's running-statistics bookkeeping."""
        return batch_norm_step(self.norm)

    def units(self) -> tuple[DenseUnit, ...]:
        """As a dense layer: one unit."""
        return (DenseUnit(self.norm, self.conv),)

    @classmethod
    def from_sequential(cls, sequential: nn.Sequential) -> BNReLUConv3d:
        """The fused equivalent of an existing Sequential(BatchNorm3d, ReLU, Conv3d), with its weights,
        buffers, settings, device, dtype and train/eval mode (the Sequential is left untouched)."""
        modules = list(sequential.children())
        if len(modules) != 3 or not (
            isinstance(modules[0], nn.BatchNorm3d)
            and isinstance(modules[1], nn.ReLU)
            and isinstance(modules[2], nn.Conv3d)
        ):
            found = [type(m).__name__ for m in modules]
            raise ValueError(f"from_sequential expects (BatchNorm3d, ReLU, Conv3d), got {found}")
        norm, conv = modules[0], modules[2]
        reason = fusion_mismatch(norm, conv)
        if reason:
            raise ValueError(f"from_sequential: {reason}")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.norm = copy.deepcopy(norm)
        fused.relu = nn.ReLU(inplace=True)
        fused.conv = copy.deepcopy(conv)
        fused.train(sequential.training)
        return fused


class BottleneckDenseLayer3d(nn.Module):
    """A DenseNet-BC layer: BN -> ReLU -> conv 1x1x1 (bottleneck channels) -> BN -> ReLU -> conv 3x3x3
    (growth_rate), as two BNReLUConv3d: `bottleneck` and `conv`."""

    def __init__(self, in_channels: int, bottleneck: int, growth_rate: int) -> None:
        super().__init__()
        self.bottleneck = BNReLUConv3d(in_channels, bottleneck, kernel_size=1, padding=0)
        self.conv = BNReLUConv3d(bottleneck, growth_rate, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bottleneck(x))

    def units(self) -> tuple[DenseUnit, ...]:
        return (*self.bottleneck.units(), *self.conv.units())


DenseLayer = BNReLUConv3d | BottleneckDenseLayer3d  # the layers of a DenseBlock3d


def _check_fits_memory(in_channels: int, growth_rate: int, num_layers: int, bn_size: int) -> None:
    """ValueError naming the arguments when the block's conv weights and BatchNorm values alone, in the
    default dtype, exceed the memory of the default device: each layer would be small enough to allocate,
    so building them would run for hours instead of failing in torch's allocator as one large layer does.
    """
    # layer i reads w_i = in_channels + i * growth_rate channels: sum_i w_i in closed form
    widths = num_layers * in_channels + growth_rate * num_layers * (num_layers - 1) // 2
    bottleneck = bn_size * growth_rate
    # per input channel: BatchNorm's weight, bias, running mean and var, and the first conv's weights
    if bottleneck:  # conv 1x1x1 to W channels, then BN(W) and conv 3x3x3 (W -> growth_rate)
        values = widths * (4 + bottleneck) + num_layers * bottleneck * (4 + 27 * growth_rate)
    else:
        values = widths * (4 + 27 * growth_rate)
    device, dtype = torch.get_default_device(), torch.get_default_dtype()
    total = memory_bytes(device)
    need = values * dtype.itemsize
    if total is not None and need > total:
        raise ValueError(
            f"DenseBlock3d: num_layers {num_layers} (in_channels {in_channels}, growth_rate {growth_rate}, "
            f"bn_size {bn_size}) makes {values:.3g} weights and BatchNorm values, {need / 2**30:.3g} GiB in "
            f"{dtype}: more than the {total / 2**30:.3g} GiB of memory of {device}"
        )
    host = memory_bytes(torch.device("cpu"))
    modules = num_layers * LAYER_HOST_BYTES
    if host is not None and modules > host:  # the meta device has no memory to check weights against
        raise ValueError(
            f"DenseBlock3d: num_layers {num_layers} are {num_layers} Python modules, at least "
            f"{modules / 2**30:.3g} GiB of host memory (on any device, meta included): more than this "
            f"host's {host / 2**30:.3g} GiB"
        )


# A lower bound on the host (Python heap) bytes of one dense layer's module objects, whatever device
# holds its tensors: tracemalloc measured 11.4 KB per layer (23.9 KB with a bottleneck) on Python 3.11.
LAYER_HOST_BYTES = 4096


class DenseBlock3d(nn.Module):
    """Dense block: each layer reads the concatenation of the block input and every earlier layer's
    features and adds growth_rate new ones (after dropout).

    bn_size=0: FC-DenseNet / Tiramisu layers, BN -> ReLU -> conv 3x3x3 (layers.<i>: BNReLUConv3d).
    bn_size>0: DenseNet-BC layers, BN -> ReLU -> conv 1x1x1 (bn_size * growth_rate channels) -> BN ->
    ReLU -> conv 3x3x3 (layers.<i>: BottleneckDenseLayer3d), as in DenseNet-121/169/201.

    Output: that whole concatenation (return_input=True, the down path of Tiramisu; DenseNet) or only the
    new features (return_input=False, the up path); `out_channels` says how many channels.

    memory_efficient=True keeps one shared buffer instead of concatenating at every layer, computes each
    channel's batch statistics once, and saves nothing per layer for backward (a BC layer's bottleneck
    output is recomputed; see ops/dense_block.py); memory_efficient=False is the naive torch.cat block
    (the reference and the benchmark baseline). Both have the same state_dict and, given the same torch
    seed, the same dropout masks.

    After torch.nn.SyncBatchNorm.convert_sync_batchnorm, in training under torch.distributed, both take
    their batch statistics over the units' process group (the shared buffer kept; units that do not all
    share one group: a warning, and the block runs layer by layer).
    """

    def __init__(
        self,
        in_channels: int,
        growth_rate: int = 16,
        num_layers: int = 4,
        dropout: float = 0.2,
        return_input: bool = True,
        memory_efficient: bool = True,
        bn_size: int = 0,
    ) -> None:
        super().__init__()
        in_channels = check_count("DenseBlock3d", "in_channels", in_channels)
        growth_rate = check_count("DenseBlock3d", "growth_rate", growth_rate)
        num_layers = check_count("DenseBlock3d", "num_layers", num_layers)
        bn_size = check_count("DenseBlock3d", "bn_size", bn_size, least=0)
        dropout = check_probability("DenseBlock3d", "dropout", dropout)
        self.in_channels, self.growth_rate, self.dropout = in_channels, growth_rate, dropout
        self.return_input, self.memory_efficient = return_input, memory_efficient
        self.bottleneck_channels = bn_size * growth_rate  # W, 0: plain layers
        _check_fits_memory(in_channels, growth_rate, num_layers, bn_size)
        widths = [in_channels + i * growth_rate for i in range(num_layers)]
        layers: Iterator[nn.Module]
        if bn_size:
            layers = (BottleneckDenseLayer3d(c, self.bottleneck_channels, growth_rate) for c in widths)
        else:
            layers = (BNReLUConv3d(c, growth_rate) for c in widths)
        self.layers = nn.ModuleList(layers)
        new = num_layers * growth_rate
        self.out_channels = in_channels + new if return_input else new

    def dense_units(self) -> list[tuple[DenseUnit, ...]]:
        """Per layer, its units in order (one: plain; two: bottleneck then 3x3x3). A subclass that keeps
        its layers' modules elsewhere (optimize's adopted blocks) overrides this."""
        return [cast(DenseLayer, layer).units() for layer in self.layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = self.dense_units()
        check_input("DenseBlock3d", x, self.in_channels, layers[0][0].conv.weight, self.training)
        flat = iter(batch_norm_steps([unit.norm for units in layers for unit in units]))
        steps = [tuple(next(flat) for _ in units) for units in layers]
        p = self.dropout if self.training else 0.0
        # on x's device: no host draw or copy in the step (CUDA graphs replay device draws afresh)
        seeds = draw_seeds(len(layers), x.device) if p > 0 else None
        # nn.SyncBatchNorm units (convert_sync_batchnorm) that synchronise: the shared-buffer engine takes
        # the statistics over their group when every unit with batch statistics shares one group
        groups = [sync_group(unit.norm) for units in layers for unit in units]
        synced = any(g is not None for g in groups)
        group = _one_group(groups, [s for unit_steps in steps for s in unit_steps])
        if synced and group is None and self.memory_efficient:
            warnings.warn(
                "DenseBlock3d: its BatchNorms synchronise over different process groups, or only some of them"
                " do; the memory-efficient engine takes one group for the whole block, so this block runs"
                " layer by layer (torch.cat, the fused layer per unit, each unit's statistics): the naive"
                " block's memory",
                stacklevel=2,
            )
        # An empty batch takes the naive path, as nn.BatchNorm3d does: an empty output, statistics untouched;
        # a synchronised block's does not: every process of the group makes the same collectives.
        if self.memory_efficient and (group is not None if synced else x.shape[0] > 0):
            if seeds is None:  # the op takes a seed tensor always; unread when p == 0
                seeds = torch.zeros(len(layers), dtype=torch.int64, device=x.device)
            out = self._efficient(x, layers, steps, seeds, p, group)  # the whole buffer: input + new features
            return out if self.return_input else out[:, self.in_channels :]
        # no seed tensor when p == 0: an exported (eval) program would keep an unused one made on the
        # device it was traced on
        return self._naive(x, layers, steps, seeds, p)  # already without the input unless return_input

    def _efficient(
        self,
        x: torch.Tensor,
        layers: list[tuple[DenseUnit, ...]],
        steps: list[tuple[BatchNormStep, ...]],
        seeds: torch.Tensor,
        p: float,
        group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        pairs = [
            (u, s) for units, ss in zip(layers, steps, strict=True) for u, s in zip(units, ss, strict=True)
        ]
        params = [
            UnitParams(u.conv.weight, u.norm.weight, u.norm.bias, s.running_mean, s.running_var)
            for u, s in pairs
        ]
        specs = [
            UnitSpec(s.batch_stats, s.momentum, u.norm.eps, s.running_mean is not None) for u, s in pairs
        ]
        return dense_block(
            x, self.growth_rate, params, specs, p, seeds, self.bottleneck_channels, process_group=group
        )

    def _naive(
        self,
        x: torch.Tensor,
        layers: list[tuple[DenseUnit, ...]],
        steps: list[tuple[BatchNormStep, ...]],
        seeds: torch.Tensor | None,
        p: float,
    ) -> torch.Tensor:
        """torch.cat at every layer, eager BN -> ReLU -> conv per unit, the same seeded dropout masks (a
        unit whose nn.SyncBatchNorm synchronises: the fused layer's op, which takes the group's
        statistics)."""
        features = [x]
        for layer, (units, unit_steps) in enumerate(zip(layers, steps, strict=True)):
            y = torch.cat(features, dim=1)
            for (norm, conv), step in zip(units, unit_steps, strict=True):
                if sync_group(norm) is not None:
                    y = _fused_unit(norm, conv, y, step)
                    continue
                y = reference.bn_relu_conv3d(
                    y, conv.weight, conv.bias, norm.weight, norm.bias, step.running_mean, step.running_var,
                    step.batch_stats, step.momentum, norm.eps, conv.stride, conv.padding, conv.dilation,
                )  # fmt: skip
            if p > 0:
                assert seeds is not None  # drawn by forward whenever p > 0
                y = (y * dropout_scale(seeds, layer, tuple(y.shape), p, y.device)).to(y.dtype)
            features.append(y)
        return torch.cat(features if self.return_input else features[1:], dim=1)
