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
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """The training stopped on request after `iteration`, with checkpoint.pt written at it. signum: the
    signal this process got (None: another process of the group got it); the CLI exits with 128 + it."""

    def __init__(self, iteration: int, signum: int | None, checkpoint: str) -> None:
        self.iteration, self.signum = iteration, signum
        asked = (
            f"asked to stop ({signal.Signals(signum).name})"
            if signum
            else "another process was asked to stop"
        )
        super().__init__(
            f"{asked}: stopped after iteration {iteration}, and {checkpoint} holds it "
            "(`train ... --resume` with the same --out goes on from there)"
        )


class StopRequests:
    """While held (`with StopRequests() as stop:`), SIGINT and SIGTERM set `stop.signum` (the first signal's
    number) instead of ending the process; the first one puts the earlier handlers back, so a second one
    acts as before. Outside the main thread, where Python lets no one set a handler, it asks nothing
    (`signum` stays None) and the signals act as before."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._earlier: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._earlier = {sig: signal.signal(sig, self._asked) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._restore()

    def _asked(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
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
