"""bench/host_cost.py's count of the torch ops that would launch a GPU kernel: views (read from the op
schemas) and allocations are not counted, copies and arithmetic are."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
if not BENCH.is_dir():
    pytest.skip(f"bench/ is not beside the tests ({BENCH})", allow_module_level=True)
sys.path.insert(0, str(BENCH))


def test_views_come_from_the_op_schemas():
    import host_cost

    views = ["narrow", "unflatten", "reshape", "contiguous", "to", "permute", "select", "slice", "unbind",
             "split", "chunk", "expand", "detach", "alias", "view", "t"]  # fmt: skip
    work = ["add_", "mul_", "copy_", "clone", "cat", "sum", "conv3d", "flip", "index_select", "item",
            "empty", "no_such_op"]  # fmt: skip
    assert [v for v in views if not host_cost._is_view("aten::" + v)] == []
    assert [w for w in work if host_cost._is_view("aten::" + w)] == []


def test_plain_needs_a_model(capsys):
    import host_cost

    with pytest.raises(SystemExit):
        host_cost.main(["--plain"])
    assert "--plain measures a network: give --model NAME" in capsys.readouterr().err
