"""torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) as
`train` reads it: a value set by hand, or left in a shell by another job, is one line naming it."""

from __future__ import annotations

import pytest
from cli_helpers import make_phantoms, torchrun_environment, train_args

from prostate_kernels.cli import main
from prostate_kernels.data import ConfigError
from prostate_kernels.torchrun_env import ProcessLayout, process_layout

VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def without_torchrun(monkeypatch):
    """Whatever the shell that runs the tests holds, each test starts from none of torchrun's variables."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_one_process_without_torchrun(monkeypatch):
    assert process_layout() == ProcessLayout(world=1, local_rank=0, local_world=1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "zz")  # the other variables mean nothing to one process
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert process_layout() == ProcessLayout(world=1, local_rank=0, local_world=1)


def test_the_layout_torchrun_gives(monkeypatch):
    torchrun_environment(monkeypatch, rank=3, world=4, local_world=2)  # 2 machines of 2 processes
    assert process_layout() == ProcessLayout(world=4, local_rank=1, local_world=2)
    monkeypatch.delenv("LOCAL_RANK")  # a launcher that sets no LOCAL_RANK: its ranks share one machine
    assert process_layout().local_rank == 3


# what changes in the environment torchrun writes for rank 1 of 2 (None: unset), and the error's words
BAD = {
    "world not a number": (
        {"WORLD_SIZE": "two"},
        "WORLD_SIZE is 'two' in the environment: expected a whole number >= 1",
    ),  # fmt: skip
    "world zero": ({"WORLD_SIZE": "0"}, "WORLD_SIZE is '0' in the environment"),
    "world negative": ({"WORLD_SIZE": "-2"}, "WORLD_SIZE is '-2' in the environment"),
    "no rendezvous": (
        {"RANK": None, "MASTER_PORT": None},
        "WORLD_SIZE is 2 in the environment but RANK, MASTER_PORT are not set",
    ),  # fmt: skip
    "empty address": ({"MASTER_ADDR": ""}, "but MASTER_ADDR is not set: start the processes with torchrun"),
    "rank past the world": ({"RANK": "2"}, "RANK is 2 in the environment and WORLD_SIZE 2"),
    "rank negative": ({"RANK": "-1"}, "RANK is '-1' in the environment: expected a whole number >= 0"),
    "local rank not whole": ({"LOCAL_RANK": "1.0"}, "LOCAL_RANK is '1.0' in the environment"),
    "local world zero": ({"LOCAL_WORLD_SIZE": "0"}, "LOCAL_WORLD_SIZE is '0' in the environment"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_variable_torchrun_would_not_write_is_named(monkeypatch, case):
    changes, words = BAD[case]
    torchrun_environment(monkeypatch, rank=1)
    for name, value in changes.items():
        if value is None:
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        process_layout()
    assert words in str(info.value)


@pytest.mark.parametrize("world", ["2", "two"])
def test_train_with_a_stray_world_size_is_refused_in_one_line(monkeypatch, tmp_path, capsys, world):
    """WORLD_SIZE left in a shell, without torchrun: init_process_group's env:// rendezvous ("environment
    variable RANK expected, but not set") or int() ended `train` in a traceback; now one line, before
    anything is written."""
    data = make_phantoms(tmp_path / "data")
    monkeypatch.setenv("WORLD_SIZE", world)
    assert main(train_args(data, tmp_path / "run", 1)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: WORLD_SIZE is {world if world == '2' else repr(world)} in the environment")
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
