"""train asked to stop (Ctrl-C, SIGTERM) ends its iteration, writes checkpoint.pt at it and exits with
128 + the signal, and --resume goes on as the unbroken run; a second signal stops at once
(prostate_kernels/stop_requests.py). Before, the iterations since the last periodic checkpoint were lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import cli_helpers
import pytest
import torch
from cli_helpers import torchrun, train_args

from prostate_kernels.checkpoint import load_checkpoint
from prostate_kernels.cli import main
from prostate_kernels.data.sampling import PatchSampler
from prostate_kernels.stop_requests import StopRequests, TrainingInterrupted
from prostate_kernels.train import TrainConfig, train


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return cli_helpers.make_phantoms(tmp_path_factory.mktemp("phantoms"))


@pytest.fixture(scope="module")
def unbroken(phantoms, tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("unbroken")
    assert main(train_args(phantoms, run, 6, val_every=3)) == 0
    return load_checkpoint(run / "checkpoint.pt")["state_dict"]


@pytest.fixture
def interactive_sigint():
    """SIGINT as in a terminal (Python's KeyboardInterrupt), whatever this process was started with: a job
    that a script starts with `&` ignores SIGINT, and an ignored signal stays ignored under StopRequests."""
    earlier = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, earlier)


def signal_while_drawing(monkeypatch, iteration: int, *signals: signal.Signals) -> None:
    """This process sends itself `signals` while it draws the batch of iteration `iteration` (--workers 0:
    the batches are drawn in this process, just before their iteration)."""
    draw = PatchSampler.draw

    def signalling(self, index):
        if index + 1 == iteration:  # draw(i) makes the batch of iteration i + 1
            for sig in signals:
                os.kill(os.getpid(), sig)
        return draw(self, index)

    monkeypatch.setattr(PatchSampler, "draw", signalling)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ends_the_iteration_with_its_checkpoint_and_resume_goes_on_exactly(
    phantoms, unbroken, tmp_path, monkeypatch, capfd, sig, interactive_sigint
):
    """Asked to stop during iteration 2 of 6 (checkpoints at 3 and 6): before, Ctrl-C ended the run with
    no checkpoint at all and SIGTERM killed it; now checkpoint.pt holds iteration 2, and resuming from it
    ends with the unbroken run's weights."""
    handlers_before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    draw = PatchSampler.draw
    signal_while_drawing(monkeypatch, 2, sig)
    assert main(train_args(phantoms, tmp_path, 6, val_every=3)) == 128 + sig
    err = capfd.readouterr().err
    assert f"{sig.name}: finishing this iteration, then writing the checkpoint" in err, err
    assert f"asked to stop ({sig.name}): stopped after iteration 2, and checkpoint.pt holds it" in err, err
    assert load_checkpoint(tmp_path / "checkpoint.pt")["iteration"] == 2
    assert {s: signal.getsignal(s) for s in handlers_before} == handlers_before  # put back
    monkeypatch.setattr(PatchSampler, "draw", draw)
    assert main(train_args(phantoms, tmp_path, 6, "--resume", val_every=3)) == 0
    resumed = load_checkpoint(tmp_path / "checkpoint.pt")["state_dict"]
    assert resumed.keys() == unbroken.keys() and all(torch.equal(resumed[k], unbroken[k]) for k in unbroken)


def test_a_second_signal_stops_at_once(phantoms, tmp_path, monkeypatch, capfd, interactive_sigint):
    """The first Ctrl-C asks; the second (here at once) is Ctrl-C as before: no checkpoint is written."""
    signal_while_drawing(monkeypatch, 2, signal.SIGINT, signal.SIGINT)
    assert main(train_args(phantoms, tmp_path, 6, val_every=3)) == 130
    err = capfd.readouterr().err
    assert "SIGINT: finishing this iteration" in err and err.rstrip().endswith("interrupted"), err
    assert not (tmp_path / "checkpoint.pt").exists()  # the first periodic one comes at iteration 3


def test_an_except_exception_around_train_does_not_swallow_the_stop(phantoms, tmp_path, monkeypatch):
    """TrainingInterrupted is a SystemExit (as KeyboardInterrupt is no Exception): a caller's generic
    handler (bench/gpu_checks.py reports any Exception of a check as a row and runs on) lets it through,
    and left uncaught it ends the process with status 128 + the signal."""
    signal_while_drawing(monkeypatch, 2, signal.SIGTERM)
    config = TrainConfig(data=phantoms, out=tmp_path / "run", model="tiramisu3d_tiny", patch=(8, 32, 32),
                         batch=2, iters=6, val_cases=1, val_every=3, progress=False)  # fmt: skip
    with pytest.raises(TrainingInterrupted) as stopped:
        try:
            train(config, log=lambda *a: None)
        except Exception as exc:  # noqa: BLE001 - what such a caller does
            pytest.fail(f"caught as an Exception: {exc!r}")
    assert stopped.value.code == 128 + signal.SIGTERM and stopped.value.iteration == 2


def test_an_ignored_signal_stays_ignored(monkeypatch):
    """A job started with `&` by a script ignores SIGINT (so does Python in it): StopRequests must not
    give it a handler, which would make a Ctrl-C meant for the shell stop the training."""
    earlier = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopRequests() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stop._asked  # SIGTERM's is taken as before
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum is None
    finally:
        signal.signal(signal.SIGINT, earlier)


def test_outside_the_main_thread_nothing_is_asked():
    """signal.signal refuses any other thread: the signals keep their handlers there."""
    before, seen = signal.getsignal(signal.SIGINT), []

    def in_a_thread():
        with StopRequests() as stop:
            seen.append((stop.signum, signal.getsignal(signal.SIGINT)))

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert seen == [(None, before)]


def test_leaving_does_not_wait_for_forked_children():
    """A process forked while StopRequests is held (a DataLoader worker) holds a copy of the watcher's pipe:
    leaving waited for the pipe's end, which came only when every such child had exited. The loop's
    DataLoader iterator is dropped before the block ends, but --cuda-graphs keeps it (and its workers)
    in a chain that outlives an error in the loop. Here a child that sleeps must not keep the block from
    ending (an alarm ends a wait that hangs: 10 s, then TimeoutError, on the code before)."""
    import multiprocessing

    def timed_out(signum, frame):
        raise TimeoutError("StopRequests.__exit__ waited for the forked child")

    earlier = signal.signal(signal.SIGALRM, timed_out)
    child = None
    try:
        signal.alarm(10)
        with StopRequests():
            child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
            child.start()
        signal.alarm(0)
        assert child.is_alive()  # it still holds its copy of the pipe
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, earlier)
        if child is not None:
            child.kill()  # (it has the block's handlers: SIGTERM would only ask it)
            child.join()


def test_the_dataloader_workers_are_forked_before_the_watcher_thread(phantoms, tmp_path):
    """A fork of a process with threads may deadlock its child (Python 3.12 warns "This process is
    multi-threaded, use of fork() may lead to deadlocks in the child"), and the child copies the
    watcher's pipe: the loader's workers start before StopRequests' thread does."""
    threads_at_fork, recording = [], [True]
    os.register_at_fork(  # (a callback cannot be unregistered: it records while the flag is set)
        before=lambda: recording[0] and threads_at_fork.append([t.name for t in threading.enumerate()])
    )
    try:
        assert main(train_args(phantoms, tmp_path, 2, "--workers", "1", val_every=2)) == 0
    finally:
        recording[0] = False
    assert threads_at_fork, "the loader forked no worker"
    assert not any("stop-requests" in names for names in threads_at_fork), threads_at_fork


def wait_for_rows(metrics: Path, rows: int, process: subprocess.Popen, timeout: float = 240) -> None:
    """Until metrics.csv holds `rows` rows (the training loop runs, its handlers set)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) > rows:
            return
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"no {rows} rows in {metrics} (status {process.poll()}): {process.communicate()[1][-3000:]}")


def stopped_iteration(said: str) -> int:
    """N of the first "stopped after iteration N," in `said` (the stop's line, or a whole stderr)."""
    return int(said.split("stopped after iteration ")[1].split(",")[0])


def test_sigterm_to_the_process_group_with_dataloader_workers(phantoms, tmp_path):
    """A cluster's SIGTERM reaches every process of the job, the DataLoader's workers too: a worker killed
    by it would end the main process's next batch in an error. The workers ignore it; the main process
    writes its checkpoint after the iteration it is in and exits 143. Before, the run was killed (status
    -15) with no checkpoint before iteration 20."""
    run = tmp_path / "run"
    args = train_args(phantoms, run, 200, "--workers", "1", val_every=20)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "prostate_kernels", *args], cwd=tmp_path, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_rows(run / "metrics.csv", 1, process)
        os.killpg(process.pid, signal.SIGTERM)
        _, err = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "asked to stop (SIGTERM): stopped after iteration" in err, err[-3000:]
    stopped = stopped_iteration(err)
    assert 0 < stopped < 200 and load_checkpoint(run / "checkpoint.pt")["iteration"] == stopped


def test_sigterm_to_torchrun_stops_every_rank_after_the_same_iteration(phantoms, tmp_path):
    """torchrun's agent passes its SIGTERM on to each worker's process group: every rank stops after the
    same iteration (the decision is part of the collective that checks the loss), rank 0 writes the
    checkpoint, and each says so in one line. Before, the workers died with no checkpoint."""
    run = tmp_path / "run"
    args = train_args(phantoms, run, 200, "--workers", "1", val_every=20)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        torchrun(2, "-m", "prostate_kernels", *args), cwd=tmp_path, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_rows(run / "metrics.csv", 1, process)
        process.send_signal(signal.SIGTERM)  # to the agent alone
        _, err = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    lines = [line for line in err.splitlines() if line.startswith("asked to stop (SIGTERM)")]
    assert len(lines) == 2 and lines[0] == lines[1], err[-3000:]
    # the one traceback is the agent's own: it ends its run on the signal by raising SignalException
    assert err.count("Traceback") == err.count("SignalException: Process") <= 1, err[-3000:]
    stopped = stopped_iteration(lines[0])
    assert 0 < stopped < 200 and load_checkpoint(run / "checkpoint.pt")["iteration"] == stopped


BLOCKED_IN_ONE_CALL = """
    import datetime, os, signal, sys, threading
    import torch.distributed as dist
    import prostate_kernels.stop_requests as stop_requests
    import prostate_kernels.train as training
    from prostate_kernels.cli import main

    stop_requests.ANSWER_WITHIN_S = 2.0
    store = dist.TCPStore("127.0.0.1", 0, 1, True)

    def loss_blocked_at_iteration_2(name, loss_function=training.loss_function):
        loss, calls = loss_function(name), []

        def blocked(logits, target):
            calls.append(1)
            if len(calls) == 2:  # a SIGTERM comes while this thread waits in C++ (as on a dead peer)
                threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
                store.wait(["a key nobody sets"], datetime.timedelta(seconds=90))
            return loss(logits, target)
        return blocked

    training.loss_function = loss_blocked_at_iteration_2
    sys.exit(main(sys.argv[1:]))
"""


def test_a_process_blocked_in_one_call_still_ends_on_sigterm(phantoms, tmp_path):
    """Python runs a handler only between bytecodes: a main thread blocked in one C++ call (here a
    TCPStore wait, as a collective whose peer died) never answered, and SIGTERM, which killed it before,
    did nothing. The watcher thread ends it once ANSWER_WITHIN_S (2 s here) have passed, status 143."""
    script = tmp_path / "blocked.py"
    script.write_text(textwrap.dedent(BLOCKED_IN_ONE_CALL))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(script), *train_args(phantoms, tmp_path / "run", 6, val_every=3)],
        cwd=tmp_path, env=env, text=True, capture_output=True, timeout=240,
    )  # fmt: skip
    took = time.monotonic() - start
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert "SIGTERM: the training did not answer within 2 s" in result.stderr, result.stderr[-3000:]
    assert took < 60, took  # the store's wait lasts 90 s
