"""Running the installed `prostate-kernels` console script the way a user does, and tiny datasets for it;
running a probe script of tests/ in a fresh process without the Triton interpreter; a call that must not
wait on a named pipe."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from prostate_kernels.cli import main

TESTS = Path(__file__).resolve().parent
SHAPE = ("8", "32", "32")
PATCH = ["--patch", "8", "32", "32"]

sys.path.insert(0, str(TESTS.parent / "tools"))  # tools/ is not part of an installed package
# its DICOM series serve the tests too (named here for them: an explicit re-export)
from fuzz_readers import write_dicom_series as write_dicom_series  # noqa: E402


def console_script() -> list[str]:
    """The installed console script beside this Python (a venv's bin/), else `python -m prostate_kernels`."""
    script = Path(sys.executable).parent / "prostate-kernels"
    if script.is_file():
        return [str(script)]
    found = shutil.which("prostate-kernels")
    return [found] if found else [sys.executable, "-m", "prostate_kernels"]


def torchrun(nproc: int, *args: str) -> list[str]:
    """`torchrun --standalone --nproc-per-node nproc args...` run by this Python. Standalone: the launcher's
    rendezvous takes a free port, where torch 2.11's default binds 29500, so two launches at once (tests on
    parallel pytest workers) never meet."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            *args]  # fmt: skip


def run_torchrun(
    nproc: int, *args: str, env: dict, cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess:
    """torchrun(nproc, *args) run to its end, its output captured. Past `timeout` the launcher is asked to
    stop (SIGTERM: it stops its workers, then exits) before TimeoutExpired is raised; subprocess.run's
    SIGKILL ended the launcher alone, and a hung worker (each runs in a session of its own) lived on after
    the test (seen with a deadlocked rank)."""
    with subprocess.Popen(torchrun(nproc, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env, cwd=cwd) as launcher:  # fmt: skip
        try:
            out, err = launcher.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            launcher.terminate()
            try:
                launcher.communicate(timeout=60)
            finally:
                launcher.kill()
            raise
    return subprocess.CompletedProcess(launcher.args, launcher.returncode, out, err)


def torchrun_environment(monkeypatch, rank: int, world: int = 2, local_world: int = 2) -> None:
    """This process's environment as torchrun writes it for process `rank` of `world`, `local_world` of
    them on this machine (nothing is joined: the variables alone)."""
    variables = {"WORLD_SIZE": world, "RANK": rank, "LOCAL_RANK": rank % local_world,
                 "LOCAL_WORLD_SIZE": local_world, "MASTER_ADDR": "localhost",
                 "MASTER_PORT": 29500}  # fmt: skip
    for name, value in variables.items():
        monkeypatch.setenv(name, str(value))


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The command run outside the source tree (the installed package is what runs)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*console_script(), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=TESTS, env=env)  # fmt: skip


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2, no traceback, one line on stderr holding every fragment; returns that line."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def train_args(data: Path, out: Path, iters: int, *extra: str, val_every: int = 2) -> list[str]:
    """`train` of the tiny Tiramisu 3D on a tiny dataset, one held-out case, no progress bar."""
    return ["train", "--data", str(data), "--out", str(out), "--model", "tiramisu3d_tiny", *PATCH,
            "--batch", "2", "--iters", str(iters), "--val-every", str(val_every), "--val-cases", "1",
            "--no-progress", *extra]  # fmt: skip


def make_phantoms(out: Path, n: int = 3) -> Path:
    assert main(["phantoms", "--out", str(out), "--n", str(n), "--shape", *SHAPE]) == 0
    return out


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes (to show that nothing was changed)."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


class FullDisk(io.FileIO):
    """A file on a disk with `room` bytes left: a write past them fails as the kernel's does (ENOSPC, no
    file name), also under a file object's write as torch's zip writers make them."""

    room = 4096

    def write(self, data) -> int:
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def full_disk_open(file, mode: str = "r", **kwargs) -> FullDisk:
    """`open` for safe_files (monkeypatched in as its module global): every atomic write stages into a
    FullDisk file."""
    return FullDisk(file, mode.replace("b", ""))


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def copy_dataset(source: Path, target: Path) -> Path:
    """A copy of a flat dataset directory (to damage one case without touching the shared fixture)."""
    target.mkdir(parents=True)
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def run_probe(name: str) -> dict:
    """The JSON last printed by tests/<name> run in a fresh process without TRITON_INTERPRET: Triton's
    real compiler only runs there (a process that interpreted kernels cannot compile any)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(TESTS / name)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_script(directory: Path, source: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`source` (dedented) run as a script of its own in `directory`, which it gets as sys.argv[1]: for
    reads that crashed the process (a signal then fails the test instead of ending the test run)."""
    script = directory / "script.py"
    script.write_text(textwrap.dedent(source))
    return subprocess.run([sys.executable, str(script), str(directory)], capture_output=True, text=True,
                          timeout=timeout, cwd=directory)  # fmt: skip


def run_without_waiting_on(fifo: Path, call):
    """call()'s result, or its exception raised here, with call run in a thread: if it is still running
    after `seconds` (a read waiting on the named pipe `fifo` for a writer), the pipe is opened for writing
    and closed so that the read ends, and the test fails instead of hanging the test run for good."""
    seconds = 30
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except BaseException as exc:  # raised again in the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a reader is waiting: this open succeeds
        thread.join(seconds)
        pytest.fail(f"the call waited on the named pipe {fifo} for {seconds} s instead of refusing it")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
