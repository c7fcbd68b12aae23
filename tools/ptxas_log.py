"""What ptxas says about a kernel: registers, spill bytes (the `-v` log Triton's compiler can print)."""

from __future__ import annotations

import re
from dataclasses import dataclass

# ptxas info    : Used 168 registers, used 1 barriers, 40 bytes spill stores, 40 bytes spill loads
_USED = re.compile(r"Used (\d+) registers")
_SPILL_STORES = re.compile(r"(\d+) bytes spill stores")
_SPILL_LOADS = re.compile(r"(\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


@dataclass(frozen=True)
class PtxasReport:
    registers: int
    spill_stores: int  # bytes per thread
    spill_loads: int
    stack_frame: int

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def parse_ptxas_log(log: str) -> PtxasReport:
    """The numbers of a ptxas -v log for one kernel; ValueError when the log has no "Used N registers"."""
    used = _USED.findall(log)
    if not used:
        raise ValueError(f"no 'Used N registers' line in the ptxas log: {log.strip()[:300]!r}")

    def total(pattern: re.Pattern) -> int:
        return sum(int(v) for v in pattern.findall(log))

    return PtxasReport(max(int(v) for v in used), total(_SPILL_STORES), total(_SPILL_LOADS), total(_STACK))
