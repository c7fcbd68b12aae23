"""Other libraries' 3D DenseNet-BC dense blocks, run by DenseBlock3d's memory-efficient op.

Recognised: a module whose children, in order, are all dense layers of one of two layouts:
  MONAI (monai.networks.nets.densenet._DenseLayer): layer.layers = Sequential(norm1, relu1, conv1, norm2,
      relu2, conv2[, dropout]);
  torchvision-style (torchvision.models.densenet._DenseLayer in 3D): children norm1, relu1, conv1, norm2,
      relu2, conv2 and a float `drop_rate` (F.dropout after conv2);
with layer i reading C0 + i*k channels through BatchNorm3d -> ReLU -> Conv3d 1x1x1 (W channels, no bias)
-> BatchNorm3d -> ReLU -> Conv3d 3x3x3 padding 1 (k channels, no bias), and the block returning the
concatenation of its input and every layer's output (what both libraries' blocks do).

The structure says what each layer computes, not how the block's forward wires them, so every match is
also *probed*: a float64 copy of the block on the CPU (eval mode, random running statistics) against the
adopted copy on one random input; a block whose output differs is left alone, with the error.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prostate_kernels import use_backend
from prostate_kernels.nn.dense import DenseBlock3d, DenseUnit
from prostate_kernels.swap.report import has_hooks

PROBE_TOLERANCE = 1e-9  # relative, float64: the same arithmetic in another order agrees to ~1e-15

_UNIT_NAMES = ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2")


@dataclass(frozen=True)
class DenseBlockMatch:
    in_channels: int  # C0
    growth: int  # k
    bottleneck: int  # W
    dropout: float
    unit_paths: tuple[tuple[str, str], ...]  # (norm, conv) submodule names per unit, 2 per layer, in order

    @property
    def layers(self) -> int:
        return len(self.unit_paths) // 2


def _layer_layout(layer: nn.Module) -> tuple[str, dict[str, Any], object] | None:
    """(prefix of the unit modules' names, those modules by name, dropout: a module, a float or None) of
    a dense layer of either layout; None when `layer` is neither. The modules are typed Any: they are
    matched by their exact classes below, attribute by attribute."""
    children = dict(layer.named_children())
    if list(children) == ["layers"] and isinstance(children["layers"], nn.Sequential):
        inner = dict(children["layers"].named_children())
        names = list(inner)
        if names in (list(_UNIT_NAMES), [*_UNIT_NAMES, "dropout"]):
            return "layers.", inner, inner.get("dropout")
        return None
    if list(children) == list(_UNIT_NAMES):
        return "", children, getattr(layer, "drop_rate", None)
    return None


def _conv_mismatch(conv: nn.Conv3d, kernel: int, label: str) -> str | None:
    expected = dict(kernel_size=(kernel,) * 3, stride=(1, 1, 1), padding=(kernel // 2,) * 3,
                    dilation=(1, 1, 1), groups=1, padding_mode="zeros")  # fmt: skip
    for name, value in expected.items():
        if getattr(conv, name) != value:
            return f"{label} has {name}={getattr(conv, name)!r}, a dense layer's is {value!r}"
    if conv.bias is not None:
        return f"{label} has a bias (DenseNet-BC convolutions have none)"
    return None


def _dropout_rate(dropout: object, label: str) -> float | str:
    """The elementwise dropout probability of a layer, or why it is not one DenseBlock3d can draw."""
    if dropout is None:
        return 0.0
    if isinstance(dropout, (int, float)) and not isinstance(dropout, bool):
        return float(dropout)
    if type(dropout) is nn.Dropout:
        return float(dropout.p)
    if isinstance(dropout, nn.Module) and getattr(dropout, "p", None) == 0:
        return 0.0
    return (
        f"{label} drops out with {type(dropout).__name__} (DenseBlock3d's dropout is elementwise, "
        "nn.Dropout's)"
    )


def match_dense_block(block: nn.Module) -> DenseBlockMatch | str | None:
    """The match, a reason the block cannot be adopted (a string), or None when `block` is not a dense
    block of 3D dense layers at all."""
    children = list(block.named_children())
    found = [_layer_layout(layer) for _, layer in children]
    layouts = [layout for layout in found if layout is not None]
    if not children or len(layouts) < len(found):
        return None
    modules = [layout[1] for layout in layouts]
    if not all(
        type(m["norm1"]) is type(m["norm2"]) is nn.BatchNorm3d
        and type(m["conv1"]) is type(m["conv2"]) is nn.Conv3d
        for m in modules
    ):
        return None  # not 3D BatchNorm dense layers (2D, other norms): nothing of ours applies
    in_channels = modules[0]["conv1"].in_channels
    growth = modules[0]["conv2"].out_channels
    bottleneck = modules[0]["conv1"].out_channels
    rates, paths = set(), []
    for i, ((name, _), (prefix, m, dropout)) in enumerate(zip(children, layouts, strict=True)):
        label = f"layer {name!r}"
        for act in ("relu1", "relu2"):
            if type(m[act]) is not nn.ReLU:
                return f"{label}'s {act} is {type(m[act]).__name__}, not ReLU"
        for conv, kernel in (("conv1", 1), ("conv2", 3)):
            reason = _conv_mismatch(m[conv], kernel, f"{label}'s {conv}")
            if reason:
                return reason
        widths = (m["norm1"].num_features, m["conv1"].in_channels, m["conv1"].out_channels,
                  m["norm2"].num_features, m["conv2"].in_channels, m["conv2"].out_channels)  # fmt: skip
        expected = (in_channels + i * growth,) * 2 + (bottleneck,) * 3 + (growth,)
        if widths != expected:
            return (
                f"{label}'s widths (norm1, conv1 in/out, norm2, conv2 in/out) are {widths}, a dense "
                f"block's layer {i} would have {expected}"
            )
        rate = _dropout_rate(dropout, label)
        if isinstance(rate, str):
            return rate
        rates.add(rate)
        paths += [(f"{name}.{prefix}norm1", f"{name}.{prefix}conv1"),
                  (f"{name}.{prefix}norm2", f"{name}.{prefix}conv2")]  # fmt: skip
    if len(rates) > 1:
        return f"its layers drop out at different rates {sorted(rates)} (DenseBlock3d has one)"
    if not 0.0 <= next(iter(rates)) < 1.0:
        return f"dropout rate {next(iter(rates))} is not in [0, 1)"
    hooked = [name or "the block" for name, m in block.named_modules() if has_hooks(m)]
    if hooked:
        return f"hooks are registered on {hooked[:3]} (the fused block would not run them)"
    tensors = [*block.parameters(), *block.buffers()]
    if len({(t.device, t.dtype) for t in tensors if t.is_floating_point()}) > 1:
        return "its parameters are on several devices or in several dtypes"
    return DenseBlockMatch(in_channels, growth, bottleneck, next(iter(rates)), tuple(paths))


class AdoptedDenseBlock3d(DenseBlock3d):
    """A DenseBlock3d over another library's dense block: the same child modules under the same names
    (the same parameter objects, the same state_dict keys), computed by the memory-efficient block
    (DenseNet-BC layers; output: the input and every layer's features, concatenated)."""

    def __init__(self, block: nn.Module, match: DenseBlockMatch) -> None:
        nn.Module.__init__(self)
        for name, child in block.named_children():
            self.add_module(name, child)
        self.training = block.training
        self.in_channels, self.growth_rate, self.dropout = match.in_channels, match.growth, match.dropout
        self.return_input, self.memory_efficient = True, True
        self.bottleneck_channels = match.bottleneck
        self.out_channels = match.in_channels + match.layers * match.growth
        # the match's unit paths, split once: resolved at every forward by plain dict lookups (get_submodule
        # took 2.3 ms per DenseNet121 forward), so that a submodule replaced after optimize is the one used
        self._unit_names = tuple((tuple(n.split(".")), tuple(c.split("."))) for n, c in match.unit_paths)
        self.adopted_from = f"{type(block).__module__}.{type(block).__qualname__}"

    def _submodule(self, names: tuple[str, ...]) -> Any:
        """The module at that path (matched as a BatchNorm3d or a Conv3d when the block was adopted)."""
        module: Any = self
        for name in names:
            module = module._modules[name]
        return module

    def dense_units(self) -> list[tuple[DenseUnit, ...]]:
        units = [DenseUnit(self._submodule(n), self._submodule(c)) for n, c in self._unit_names]
        return [tuple(units[i : i + 2]) for i in range(0, len(units), 2)]

    def extra_repr(self) -> str:
        return (
            f"adopted_from={self.adopted_from}, in_channels={self.in_channels}, "
            f"growth_rate={self.growth_rate}, bottleneck={self.bottleneck_channels}, dropout={self.dropout}"
        )


def probe_error(block: nn.Module, match: DenseBlockMatch) -> float:
    """Relative max error of the adopted block against `block`'s own forward: float64 copies on the CPU,
    eval mode, random running statistics and affine parameters, one random (2, C0, 3, 4, 5) input."""
    original = copy.deepcopy(block).to(device="cpu", dtype=torch.float64).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in original.modules():
            if isinstance(m, nn.BatchNorm3d):
                c = m.num_features
                for t, value in ((m.running_mean, torch.randn(c, generator=g, dtype=torch.float64)),
                                 (m.running_var, 0.5 + torch.rand(c, generator=g, dtype=torch.float64)),
                                 (m.weight, 0.5 + torch.rand(c, generator=g, dtype=torch.float64)),
                                 (m.bias, torch.randn(c, generator=g, dtype=torch.float64))):  # fmt: skip
                    if t is not None:
                        t.copy_(value)
        adopted = AdoptedDenseBlock3d(original, match)
        x = torch.randn((2, match.in_channels, 3, 4, 5), generator=g, dtype=torch.float64)
        with use_backend("torch"):
            expected, got = original(x), adopted(x)
    if not isinstance(expected, torch.Tensor) or expected.shape != got.shape:
        return float("inf")
    return ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()


__all__ = ["PROBE_TOLERANCE", "AdoptedDenseBlock3d", "DenseBlockMatch", "match_dense_block", "probe_error"]
