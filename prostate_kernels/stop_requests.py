"""A training asked to stop (Ctrl-C, SIGTERM) ends its iteration, writes its checkpoint and leaves.

Before, Ctrl-C ended `train` at once ("interrupted") and SIGTERM (a cluster's preemption, `kill`,
torchrun passing its own signal on) killed it: the iterations since the last periodic checkpoint were lost,
up to --checkpoint-every of them. Now, while StopRequests is held (the training loop), the first SIGINT or
SIGTERM only asks the run to stop: the loop finishes the iteration it is in, writes checkpoint.pt at it and
raises TrainingInterrupted, from which `--resume` goes on exactly as an unbroken run would (the same as
from a periodic checkpoint). A second signal stops at once, as before (the handlers that were there before
are put back at the first).

Under torchrun every process takes part in the decision (train.py folds it into the per-iteration
collective that checks the loss), so all of them stop after the same iteration, whichever got the signal.
torchrun's agent sends its signal to each worker's process group, DataLoader workers included, and kills
what is left after 30 s: the DataLoader workers ignore both signals (ignore_stop_signals), since their
death would end the main process's next batch in an error (they still leave when their parent does).

Python runs a signal's handler in the main thread between two bytecodes, so a main thread blocked in one
long C++ call would never answer: a collective whose peer died (NCCL waits for it for good), a device
sync behind it. SIGTERM killed such a process; held, it would ignore every signal but SIGKILL. So a
watcher thread hears each signal as it comes (signal.set_wakeup_fd, written by Python's C-level handler
at once) and, when the handler has not run within ANSWER_WITHIN_S, ends the process at once
(os._exit(128 + signal)), as the signal did before; what was written stays (the checkpoints are atomic, a
dead process's lock is taken over).
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_LEAVE = 0  # the byte that ends the watcher (no signal has number 0)
ANSWER_WITHIN_S = 10.0  # the main thread's handler runs within this after a signal, or the process ends


class TrainingInterrupted(SystemExit):
    """The training stopped on request after `iteration`, with checkpoint.pt written at it. signum: the
    signal this process got (None: another process of the group got it). A SystemExit, as a signal's end
    is (Lightning's SIGTERMException is one too): an `except Exception` around train() (a benchmark's
    per-check handler) does not swallow it and run on, and left uncaught it ends the process with its
    code, 128 + the signal (143 when another process got it), as the CLI does after printing it."""

    def __init__(self, iteration: int, signum: int | None, checkpoint: str) -> None:
        self.iteration, self.signum = iteration, signum
        self.status = 128 + (signum or signal.SIGTERM)  # SystemExit's code
        super().__init__(self.status)
        asked = (
            f"asked to stop ({signal.Signals(signum).name})"
            if signum
            else "another process was asked to stop"
        )
        self.message = (
            f"{asked}: stopped after iteration {iteration}, and {checkpoint} holds it "
            "(`train ... --resume` with the same --out goes on from there)"
        )

    def __str__(self) -> str:
        return self.message


class StopRequests:
    """While held (`with StopRequests() as stop:`), SIGINT and SIGTERM set `stop.signum` (the first signal's
    number) instead of ending the process; the first one puts the earlier handlers back, so a second one
    acts as before. A signal that the process ignores stays ignored (SIGINT in a job that a script started
    with `&`, `nohup`'s...). Outside the main thread, where Python lets no one set a handler, it asks
    nothing (`signum` stays None) and the signals act as before."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._earlier: dict[int, object] = {}
        self._answered = threading.Event()  # set by the handler: the main thread runs Python code
        self._watcher: threading.Thread | None = None
        self._pipe: tuple[int, int] = (-1, -1)  # (read, write): the signals' numbers, a byte each
        self._earlier_wakeup_fd = -1

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is not threading.main_thread():
            return self
        read, write = self._pipe = os.pipe()
        os.set_blocking(write, False)  # set_wakeup_fd's condition: a signal never waits on it
        self._earlier_wakeup_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._earlier = {
            sig: signal.signal(sig, self._asked)
            for sig in STOP_SIGNALS
            if signal.getsignal(sig) is not signal.SIG_IGN  # an ignored signal stays ignored
        }
        self._watcher = threading.Thread(target=self._watch, args=(read,), name="stop-requests", daemon=True)
        self._watcher.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._restore()
        if self._watcher is not None:
            self._answered.set()  # the main thread runs Python again: a signal still pending is handled
            signal.set_wakeup_fd(self._earlier_wakeup_fd)
            # a byte, not the pipe's end: a child forked while the block is held keeps a copy of the
            # write end, so the end would come only with that child (train forks its DataLoader's
            # workers before the block; another fork in it may still happen)
            os.write(self._pipe[1], bytes([_LEAVE]))
            self._watcher.join()
            os.close(self._pipe[1])
            os.close(self._pipe[0])
            self._watcher = None

    def _watch(self, read: int) -> None:
        """The watcher thread: at the first stop signal, waits ANSWER_WITHIN_S for the main thread's
        handler and ends the process when it has not run. Other signals' bytes (SIGCHLD, for the
        DataLoader's handler) pass."""
        while (data := os.read(read, 64)) and _LEAVE not in data:
            signum = next((sig for sig in data if sig in STOP_SIGNALS), None)
            if signum is None:
                continue
            if not self._answered.wait(ANSWER_WITHIN_S):
                name = signal.Signals(signum).name
                os.write(2, f"\n{name}: the training did not answer within {ANSWER_WITHIN_S:g} s (blocked in "
                         "one call: a collective whose peer stopped, a device): stopped at once; the "
                         "checkpoints written so far stay\n".encode())  # fmt: skip
                os._exit(128 + signum)
            return  # answered: the handlers that were there before act on any later signal

    def _asked(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        self._answered.set()
        self._restore()
        # os.write: a print here could land inside a print of the interrupted code (a reentrant write)
        os.write(2, f"\n{signal.Signals(signum).name}: finishing this iteration, then writing the "
                 "checkpoint (a second signal stops at once)\n".encode())  # fmt: skip

    def _restore(self) -> None:
        for sig, handler in self._earlier.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]  # what signal.signal returned
        self._earlier = {}


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker's start (worker_init_fn): SIGINT and SIGTERM sent to the whole process group
    (Ctrl-C in a terminal, torchrun's agent) leave it running, for the main process to stop in order."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
