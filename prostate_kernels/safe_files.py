"""Where commands write: never over a file they did not create in this run, one writer per run directory.

Every command that writes (phantoms, train, predict, evaluate, export, demo) goes through these helpers,
so the rule "a command never overwrites what it did not create" (DESIGN.md section 9) lives in one place:
- `output_directory`: a directory to write into (created if missing); a DataError for a file in its
  place or a directory that cannot be created.
- `created_directory`: output_directory for a block; what it created is removed again when the block
  ends (failed or not) without having written anything into it.
- `require_empty_directory`: for commands that create a whole dataset or run tree at once.
- `refuse_existing`: the files a command is about to write must not exist yet.
- `atomic_write`: a file written whole or not at all (temporary file, fsync, rename), so a killed or
  failed write never leaves a truncated checkpoint, CSV or picture where the old one was.
- `place`: the last step of such a write; unless told to replace, it never puts a file where one has
  appeared since `refuse_existing` looked (another run writing the same file at the same time).
- `temporary_path` / `remove_dead_temporaries`: where such writes stage (`.NAME.tmp-PID@HOST`, or
  `.NAME.tmp-PID-THREAD@HOST` from a thread other than the main one), and the sweep of what writes
  killed half way left there; `staging_errors_named`: an error about a staging file names the file the
  user asked for.
- `locked_directory`: a short exclusive lock (flock) on a directory while a file that several runs share
  (predict's record) is read, changed and written again.
- `RunLock`: an exclusive lock file (pid and host) on a training run directory; a lock left by a dead
  process on this host is taken over with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

from prostate_kernels.data.errors import DataError

LOCK_NAME = ".prostate-kernels.lock"


def output_directory(path: str | Path, flag: str) -> Path:
    """`path` as an existing directory (created with its parents when missing)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(path, f"{flag} is an existing file, expected a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(path, f"cannot create the {flag} directory ({exc.strerror})") from None
    return path


@contextlib.contextmanager
def created_directory(path: str | Path, flag: str) -> Iterator[Path]:
    """output_directory(path) for the block that writes into it. When the block ends, by an exception or
    not, the directories this call created (`path` and its missing parents) are removed again while they
    are empty, so a command that wrote nothing (train with no usable case, a predict whose every case
    failed) leaves nothing behind; a directory that existed before, or holds anything, is left as it is."""
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    output_directory(path, flag)
    try:
        yield path
    finally:
        for directory in missing:
            try:
                directory.rmdir()  # only ever removes an empty directory
            except OSError:
                break  # not empty (or gone): it and its parents stay


def require_empty_directory(path: str | Path, flag: str) -> Path:
    """`path` as a new or empty directory; DataError if it holds anything (nothing is overwritten)."""
    path = Path(path)
    if path.is_dir() and any(path.iterdir()):
        raise DataError(path, f"{flag} is not empty: this command writes only into a new or empty directory")
    return output_directory(path, flag)


def refuse_existing(paths: Iterable[Path], hint: str) -> None:
    """DataError naming the existing files among `paths` (up to three of them)."""
    existing = [str(p) for p in paths if p.exists()]
    if not existing:
        return
    others = ""
    if len(existing) > 1:
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        others = f" (so do {', '.join(existing[1:3])}{more})"
    raise DataError(existing[0], f"exists already{others}; {hint}")


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", replace: bool = True, **open_kwargs) -> Iterator[IO]:
    """An open file whose content replaces `path` only when the block ends without an exception.

    Written to temporary_path(path), synced to disk, then renamed over `path`: readers see the old file
    or the new one, never a part of it. replace=False: `path` must not exist when the file is placed
    (`place`), else a DataError and `path` is left as it is.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with staging_errors_named(path):
            with open(tmp, mode, **open_kwargs) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            place(tmp, path, replace)
    finally:
        # only left behind if the write failed. A read-only file system refuses even the unlink of a file
        # that is not there (EROFS), which must not replace the error that ended the write: evaluate and
        # export named their staging file (".NAME.tmp-PID@HOST: Read-only file system") instead of NAME.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


# link() refused by the file system (FAT, some network and FUSE file systems have no hard links)
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS}


def place(staged: Path, path: Path, replace: bool = True) -> None:
    """Moves the finished file `staged` to `path` (same directory). replace: os.replace. Otherwise only
    where `path` does not exist at that moment: a hard link, which fails if it does, then the staged
    name removed, so that two runs that both found `path` missing never replace each other's file (two
    predicts of one case into one --output each wrote it and both said status 0; the second now fails
    that case). Where the file system has no hard links, an existence check just before the rename."""
    if replace:
        os.replace(staged, path)
        return
    try:
        os.link(staged, path)
    except FileExistsError:
        pass
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        if not path.exists():
            os.replace(staged, path)
            return
    else:
        os.unlink(staged)
        return
    # `path` exists. Raised here, outside the except clauses: a FileExistsError under the DataError would
    # be taken by staging_errors_named for the error (about the staging file, renamed to `path`)
    raise DataError(path, "exists already: another run wrote it meanwhile; it was left as it is")


def place_together(staged: list[Path], directory: Path, replace: bool = True) -> None:
    """place()s the finished files `staged` (in this order) into `directory` under their names, whole or
    not at all: where one cannot be placed (replace=False and it exists), those placed before it are
    removed again, if they are still the files placed (same inode), and its DataError raised. A MetaImage
    header refused after its voxel file left that voxel file behind, beside another run's header."""
    placed: list[tuple[Path, int]] = []  # (file, inode) this call put in place
    try:
        for file in staged:
            target = directory / file.name
            place(file, target, replace)
            placed.append((target, target.stat().st_ino))
    except BaseException:
        for target, inode in placed:
            with contextlib.suppress(OSError):  # the error that stopped the placing is the one to report
                if target.stat().st_ino == inode:
                    target.unlink()
        raise


# A write that fails with one of these and no file name (a full disk under a file object's write) failed
# on the file being written.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


@contextlib.contextmanager
def staging_errors_named(path: Path) -> Iterator[None]:
    """Re-raises an OSError about `path`'s staging file or directory (temporary_path), or a file in it, as
    one about `path`, the file the user named: export's "--out /proc/x.pt2" failed as
    "/proc/.x.pt2.tmp-5292@vm: No such file or directory". So is a write error that names no file (a
    full disk), also where another exception hides it: torch.save's zip writer, closing after a failed
    write, raised "RuntimeError: ... unexpected pos 281856 vs 281748" over the "No space left on device"."""
    try:
        yield
    except DataError:
        raise  # names its file already
    except Exception as exc:
        failure = _os_error_in(exc)
        if failure is None:
            raise
        if failure.filename is None:
            if failure.errno not in _WRITE_ERRNOS:
                raise
        elif temporary_path(path).name not in Path(os.fsdecode(failure.filename)).parts:
            raise
        raise type(failure)(failure.errno, failure.strerror, str(path)) from None


def _os_error_in(exc: BaseException) -> OSError | None:
    """exc if it is an OSError, else the first OSError among the exceptions it was raised while handling
    (its __context__ chain, a few deep), else None."""
    for _ in range(4):
        if isinstance(exc, OSError):
            return exc
        if exc.__context__ is None:
            return None
        exc = exc.__context__
    return None


@contextlib.contextmanager
def locked_directory(directory: Path) -> Iterator[None]:
    """An exclusive advisory lock on `directory` itself, held while the block runs, waited for if another
    process (or thread) holds it: flock on the directory's descriptor, so no lock file is left behind, and
    every open of it is a lock of its own. Unlocked where there is no flock (Windows) or the file system
    refuses it (ENOLCK, EOPNOTSUPP: some NFS). RunLock, by contrast, refuses a second run outright."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError:  # a file system without locks
            pass
        yield
    finally:
        os.close(descriptor)  # releases the lock


def companions(path: Path) -> list[Path]:
    """The files SimpleITK writes for `path`: a MetaImage header writes its voxel file beside it."""
    if path.name.lower().endswith(".mhd"):
        return [path, path.with_suffix(".raw"), path.with_suffix(".zraw")]
    return [path]


def temporary_path(path: Path) -> Path:
    """`.NAME.tmp-PID@HOST` beside `path`: where this thread stages a write of `path` (a file, or a
    directory of the files SimpleITK writes), to be renamed into place. The pid and host name tell
    `remove_dead_temporaries` whether its writer is still running. A thread other than the main one adds
    its own id (`.NAME.tmp-PID-THREAD@HOST`): two threads saving the same file (a background checkpoint
    writer beside the training loop) would otherwise write into one staging file, and one of them rename
    the other's half-written content into place."""
    writer = str(os.getpid())
    if threading.current_thread() is not threading.main_thread():
        writer += f"-{threading.get_ident()}"
    return path.with_name(f".{path.name}.tmp-{writer}@{socket.gethostname()}")


def remove_dead_temporaries(directory: Path, report: Callable[[str], None] = print) -> list[Path]:
    """Deletes the temporaries (temporary_path) in `directory` whose writer was a process on this host
    that is no longer running: writes killed half way. A running writer's, another host's (its pid
    means nothing here) and names not of that pattern are left alone. Each removal is reported (one
    line); returns what it removed."""
    removed = []
    for tmp in sorted(Path(directory).glob(".*.tmp-*@*")):
        writer, _, host = tmp.name.rpartition(".tmp-")[2].partition("@")
        pid = writer.partition("-")[0]  # PID, or PID-THREAD
        if not _gone_from_this_host(pid, host):
            continue
        with contextlib.suppress(OSError):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
            removed.append(tmp)
            report(f"removed {tmp}, left by a write that was killed (process {pid})")
    return removed


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Deletes the temporary files (`.NAME.tmp-*`, this version's and older ones') of checkpoint writes
    killed half way, whichever process or host wrote them: call it while holding the directory's
    RunLock, when no other writer is alive. Returns what it removed."""
    removed = []
    for tmp in directory.glob(".*.tmp-*"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed


class RunLock:
    """Exclusive lock on a run directory: the file LOCK_NAME created with O_EXCL, holding "pid host".

    Held: DataError naming the holder. Left by a process that is no longer running on this host: taken
    over with a warning. Released (the file removed) on exit if it is still ours.
    """

    def __init__(self, directory: Path, warn: Callable[[str], None] | None = None) -> None:
        self.path = Path(directory) / LOCK_NAME
        self.me = f"{os.getpid()} {socket.gethostname()}"
        self.warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))

    def __enter__(self) -> RunLock:
        for _ in range(2):  # a second try after taking over a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as exc:
                reason = f"cannot write into the run directory ({exc.strerror})"
                raise DataError(self.path.parent, reason) from None
            with os.fdopen(fd, "w") as f:
                f.write(self.me + "\n")
            return self
        raise DataError(self.path.parent, "could not take the run directory's lock")

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(OSError):
            if self.path.read_text().strip() == self.me:
                self.path.unlink()

    def _take_over_if_stale(self) -> None:
        for _ in range(40):  # a lock just created is empty until its holder writes "pid host" into it
            try:
                holder = self.path.read_text().split()
            except FileNotFoundError:
                return  # released meanwhile: try again
            if holder:
                break
            time.sleep(0.05)
        pid = int(holder[0]) if holder and holder[0].isdigit() else None
        host = holder[1] if len(holder) > 1 else None
        if _gone_from_this_host(holder[0] if holder else "", host):
            self.warn(f"{self.path}: taking over the lock of process {pid}, which is no longer running")
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return
        who = f"process {pid} on {host}" if pid is not None else "another process"
        raise DataError(self.path.parent, f"run directory is in use by {who} (lock file {self.path.name}; "
                                          "delete it if that process is gone)")  # fmt: skip


def _gone_from_this_host(pid: str, host: str | None) -> bool:
    """Whether the writer named by `pid` (as written in a lock or a temporary's name) and `host` was a
    process of this host that is no longer running. Another host's pid means nothing here: False."""
    return host == socket.gethostname() and pid.isdigit() and not _running(int(pid))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
