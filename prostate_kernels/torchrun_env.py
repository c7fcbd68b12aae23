"""The layout of a training's processes, as torchrun writes it into each process's environment (WORLD_SIZE,
RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), read and checked in one place.

A value set by hand, or left in a shell by another job, is a one-line ConfigError naming the variable and
its value; before, int() or init_process_group's env:// rendezvous ended the run in a traceback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from prostate_kernels.data import ConfigError

# what init_process_group's env:// rendezvous reads besides WORLD_SIZE; torchrun sets them all
RENDEZVOUS = ("RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class ProcessLayout:
    world: int = 1  # processes in the run (WORLD_SIZE); 1 without torchrun
    local_rank: int = 0  # this process's index on its machine (LOCAL_RANK, else RANK): its GPU
    local_world: int = 1  # processes on this machine (LOCAL_WORLD_SIZE): they share its memory


def process_layout() -> ProcessLayout:
    """This process's place in the run. Without WORLD_SIZE (or with 1) one process alone, whatever else
    is set; with more, the variables that torchrun sets must be there and consistent."""
    world = _integer("WORLD_SIZE", "1", minimum=1)
    if world == 1:
        return ProcessLayout()
    missing = [name for name in RENDEZVOUS if not os.environ.get(name)]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE is {world} in the environment but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set: start the processes with torchrun (it sets "
            "them all), or unset WORLD_SIZE to train in one process"
        )
    rank = _integer("RANK", None, minimum=0)
    if rank >= world:
        raise ConfigError(
            f"RANK is {rank} in the environment and WORLD_SIZE {world}: expected a rank below it"
        )
    return ProcessLayout(
        world=world,
        local_rank=_integer("LOCAL_RANK", str(rank), minimum=0),
        local_world=_integer("LOCAL_WORLD_SIZE", "1", minimum=1),
    )


def _integer(name: str, default: str | None, minimum: int) -> int:
    """The environment variable `name` as an integer >= minimum (`default` when unset or empty)."""
    text = os.environ.get(name) or default
    try:
        value = int(text or "")
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ConfigError(f"{name} is {text!r} in the environment: expected a whole number >= {minimum}")
    return value
