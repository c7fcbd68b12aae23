"""What optimize() did to a model: the modules it replaced and the candidates it left, each with why."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Replacement:
    path: str  # the module's name in the model ("" for the model itself)
    was: str  # class name of the module that was (or, in a dry run, would be) replaced
    now: str  # class name of its replacement
    detail: str


@dataclass(frozen=True)
class LeftAlone:
    path: str
    what: str  # what was found there
    reason: str  # why it keeps running as it did


@dataclass
class OptimizeReport:
    dry_run: bool
    replaced: list[Replacement] = field(default_factory=list)
    left: list[LeftAlone] = field(default_factory=list)

    def __str__(self) -> str:
        verb = "would replace" if self.dry_run else "replaced"
        lines = [f"optimize: {verb} {len(self.replaced)} module(s), left {len(self.left)} candidate(s)"]
        lines += [f"  {verb} {r.path or '<model>'}: {r.was} -> {r.now} ({r.detail})" for r in self.replaced]
        lines += [f"  left {s.path or '<model>'}: {s.what}: {s.reason}" for s in self.left]
        return "\n".join(lines)


def has_hooks(module) -> bool:
    """Whether hooks are registered on the module itself (a replacement would not run them)."""
    return any(
        getattr(module, name, None)
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    )


__all__ = ["LeftAlone", "OptimizeReport", "Replacement", "has_hooks"]
