"""Writing outputs so that no kill, signal or full disk leaves a half-made or missing one.

Every command that writes (``convert``, ``merge``, ``export-gguf``, ``train.save_adapter``) writes
into a hidden sibling ``.OUT.tmp-<pid>-<random>`` (a directory, or a file for single-file outputs)
and renames it into place only when complete:

- SIGTERM and SIGHUP behave like Ctrl-C (:func:`interrupt_on_signals`, installed by the CLI): the
  temporary directory is removed and the command says so; the commit (the renames) is never cut
  in half, a signal that arrives during it is acted on right after.
- ``kill -9`` cannot be caught, so each run first removes what earlier runs of *dead* processes
  left next to the same output (their ``<pid>`` is gone and no one holds the temp's ``flock``);
  a live process's temp is never touched.
- ``--force`` swaps the new directory with the old one in one ``renameat2(RENAME_EXCHANGE)`` on
  Linux, so OUT is never missing; where the kernel or file system lacks it, the old directory is
  moved aside to ``.OUT.old-<pid>`` first, and a run killed between the two renames has OUT
  restored from it by the next run.
- Directories are created ``0o777 & ~umask`` and files ``0o666 & ~umask``, as PEFT's
  ``save_pretrained`` does (``mkdtemp`` would make them 0700, unreadable to a server running as
  another user).
- File-system errors (disk full, read-only or unwritable parent, a parent that is a file) become a
  one-paragraph :class:`BridgeError`, after the temporary directory is removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from gemma4_bridge.errors import BridgeError

log = logging.getLogger("gemma4_bridge.output")

INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
TEST_PAUSE_ENV = "GEMMA4_BRIDGE_TEST_PAUSE_AT"  # see _test_pause


class Interrupted(KeyboardInterrupt):
    """A SIGINT/SIGTERM/SIGHUP turned into an exception (so ``finally`` blocks clean up).

    ``completed`` is the output that was already in place when the signal was acted on (the signal
    came during its commit), else None.
    """

    def __init__(self, signum: int, completed: Path | None = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.completed = completed


_deferring = 0  # > 0 while a commit or a cleanup runs: signals wait for its end
_pending: list[int] = []


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _deferring:
        _pending.append(signum)
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """Raise :class:`Interrupted` in the main thread on SIGINT, SIGTERM and SIGHUP (CLI commands).

    A signal that is ignored stays ignored (``nohup`` ignores SIGHUP, a shell's background job
    SIGINT); from another thread nothing is installed (Python allows handlers in the main thread only).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in INTERRUPT_SIGNALS}
    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, _on_signal)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        _pending.clear()


@contextlib.contextmanager
def _signals_deferred(completed: Path | None = None) -> Iterator[None]:
    """Run a block that must not be cut in half by a signal; act on one that came, after it."""
    global _deferring
    _deferring += 1
    ok = False
    try:
        yield
        ok = True
    finally:
        _deferring -= 1
        if not _deferring and _pending:
            signum = _pending[0]
            _pending.clear()
            if ok:  # else the block's own exception is on its way out
                raise Interrupted(signum, completed)


def _test_pause(point: str) -> None:
    """Test hook for the kill-safety tests: with ``GEMMA4_BRIDGE_TEST_PAUSE_AT=<point>`` the process
    says ``paused at <point>`` on stderr and waits (up to 60 s) to be killed at that point.
    Points: ``created`` (empty temp dir), ``written`` (complete temp dir, before the commit),
    ``exchanged`` (new OUT in place, old one not yet removed), ``moved-aside`` (no RENAME_EXCHANGE:
    old OUT renamed away, new one not yet in place)."""
    if os.environ.get(TEST_PAUSE_ENV) != point:
        return
    print(f"gemma4-bridge: paused at {point}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _pending:  # a deferred signal ends the pause
        time.sleep(0.02)


# -- the output directory --------------------------------------------------------------------
def check_output(target: Path, *, force: bool) -> None:
    """Before any work: clear what killed runs left next to ``target``, refuse an existing one without ``force``."""
    sweep_leftovers(target.parent, target.name)
    if os.path.lexists(target) and not force:
        raise _exists(target)


def _exists(target: Path) -> BridgeError:
    return BridgeError(f"{target}: already exists.", fix="choose another output path or pass --force to replace it")


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield an empty temp directory next to ``out``; on success it becomes ``out``, on any error
    or signal it is removed. See the module docstring for what survives which kill."""
    with _atomic_output(Path(out), force=force, directory=True) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_output_file(out: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """The same for a single-file output: yield an empty temp file next to ``out`` (mode
    0o666 & ~umask) to write by path; on success it replaces ``out`` in one rename."""
    with _atomic_output(Path(out), force=force, directory=False) as tmp:
        yield tmp


@contextlib.contextmanager
def _atomic_output(target: Path, *, force: bool, directory: bool) -> Iterator[Path]:
    check_output(target, force=force)
    with _os_errors(target, None):
        target.parent.mkdir(parents=True, exist_ok=True)
    tmp, lock = _make_temp(target.parent, target.name, directory=directory)
    committed = False
    try:
        _test_pause("created")
        yield tmp
        _test_pause("written")
        with _signals_deferred(completed=target):
            committed = _commit(tmp, target, force=force)
    except BaseException as exc:
        if not committed:
            with _signals_deferred():
                _remove(tmp)
        if isinstance(exc, OSError):  # after the cleanup, so the message can say what is free now
            raise _write_error(exc, target, tmp) from exc
        raise
    finally:
        os.close(lock)


@contextlib.contextmanager
def staged_files(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp directory inside the existing ``out_dir``; on success every file written there
    replaces its namesake in ``out_dir`` (each atomically), on error it is removed. For writers that
    add files to a directory holding other things (a training run's output dir)."""
    root = Path(out_dir)
    sweep_leftovers(root, "gemma4-bridge")
    tmp, lock = _make_temp(root, "gemma4-bridge", directory=True)
    try:
        yield tmp
        with _signals_deferred(completed=root):
            for item in sorted(tmp.iterdir()):
                os.replace(item, root / item.name)
    except OSError as exc:
        raise _write_error(exc, root, tmp) from exc
    finally:
        with _signals_deferred():
            _remove(tmp)
        os.close(lock)


def _make_temp(parent: Path, name: str, *, directory: bool) -> tuple[Path, int]:
    """``.NAME.tmp-<pid>-<random>`` in ``parent`` (a directory, or an empty file), created with the
    umask's modes (0o777 / 0o666 & ~umask, as any program's outputs), and locked by this process."""
    while True:
        tmp = parent / f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            if directory:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o666))
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise _write_error(exc, parent / name, None) from exc
    lock = _lock(tmp, blocking=True)
    assert lock is not None, tmp
    return tmp, lock


def _lock(path: Path, *, blocking: bool) -> int | None:
    """An open descriptor holding an exclusive ``flock`` on ``path`` (a directory or a file;
    released when the process dies, even by ``kill -9``); None if another process holds it
    (non-blocking) or it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd


# -- commit ------------------------------------------------------------------------------------
def _commit(tmp: Path, target: Path, *, force: bool) -> bool:
    """Put ``tmp`` at ``target``; with ``force`` an existing ``target`` is swapped out and removed.
    Returns True (the output is in place)."""
    if not force or not os.path.lexists(target):
        # RENAME_NOREPLACE: an OUT created by someone else since the check is never replaced.
        try:
            done = _renameat2(tmp, target, _RENAME_NOREPLACE)
        except FileExistsError:
            raise _exists(target) from None
        if not done:
            if os.path.lexists(target):
                raise _exists(target)
            os.rename(tmp, target)
        return True
    if _renameat2(tmp, target, _RENAME_EXCHANGE):
        _test_pause("exchanged")
        _remove(tmp)  # now the old output
        return True
    # No atomic exchange here: move the old one aside first. A kill -9 between the two renames
    # leaves OUT missing and .OUT.old-<pid> present; the next run puts it back (sweep_leftovers).
    log.debug("%s: renameat2(RENAME_EXCHANGE) unsupported here; replacing in two renames", target)
    backup = target.with_name(f".{target.name}.old-{os.getpid()}")
    lock = _lock(target, blocking=False)
    try:
        os.rename(target, backup)
        _test_pause("moved-aside")
        try:
            os.rename(tmp, target)
        except OSError:
            os.rename(backup, target)  # put the old one back: OUT is never left missing by an error
            raise
        _remove(backup)
    finally:
        if lock is not None:
            os.close(lock)
    return True


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # linux/fs.h
_AT_FDCWD = -100
_RENAMEAT2: list[Callable[..., int] | None] = []


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2(src, dst, flags)`` (glibc >= 2.28) through ctypes. False where the kernel,
    libc or file system does not support it, so the caller falls back; other failures raise."""
    if not _RENAMEAT2:
        fn = None
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                fn = ctypes.CDLL(None, use_errno=True).renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
        _RENAMEAT2.append(fn)
    fn = _RENAMEAT2[0]
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# -- leftovers of killed runs -------------------------------------------------------------------
def sweep_leftovers(parent: Path, name: str) -> None:
    """Remove ``.NAME.tmp-<pid>-*`` and ``.NAME.old-<pid>`` in ``parent`` left by dead processes
    (``kill -9``, power loss); an ``.old`` one is put back as NAME if NAME is missing."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.(tmp|old)-(\d+)(-[0-9a-f]+)?$")
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or _alive(int(m.group(2))):
            continue
        path = Path(entry.path)
        lock = _lock(path, blocking=False)
        if lock is None and os.path.lexists(path) and not path.is_symlink():
            continue  # held by a live process (another PID namespace or host): not ours to touch
        try:
            target = parent / name
            if m.group(1) == "old" and not os.path.lexists(target):
                os.rename(path, target)
                log.warning("%s: restored from %s (a run replacing it was killed)", target, entry.name)
            else:
                _remove(path)
                log.info("removed %s, left by an interrupted run (process %s is gone)", path, m.group(2))
        except OSError as exc:
            log.debug("could not remove %s: %s", path, exc)
        finally:
            if lock is not None:
                os.close(lock)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


# -- file-system errors -----------------------------------------------------------------------
@contextlib.contextmanager
def _os_errors(target: Path, tmp: Path | None) -> Iterator[None]:
    """Turn an OSError of the writing side into the one-paragraph error (the caller cleans up)."""
    try:
        yield
    except OSError as exc:
        raise _write_error(exc, target, tmp) from exc


def _write_error(exc: OSError, target: Path, tmp: Path | None) -> BridgeError:
    """The one-paragraph error for an OSError met while creating ``target`` (temp dir ``tmp``),
    naming the file as the user will know it: OUT/..., not the temp path."""
    where = Path(exc.filename) if exc.filename else None
    if where is None:  # write() failures carry no file name
        what = "the output"
    elif tmp is not None and (where == tmp or tmp in where.parents):
        what = str(target / where.relative_to(tmp))
    elif where.parent == target.parent and where.name.startswith(f".{target.name}."):
        what = str(target.parent)  # creating our temp sibling failed: that directory is the problem
    elif where == target or target in where.parents or where in target.parents:
        what = str(where)
    else:  # not the output side (e.g. a base model file merge copies): name that file
        return BridgeError(f"{where}: {exc.strerror or exc}.", fix="check that the file exists and is readable")
    removed = " The partial output was removed." if tmp is not None else ""
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(target.parent)
        return BridgeError(
            f"{target}: no space left on the device while writing {what}{removed}"
            f"{f' {free / 2**20:.1f} MiB are free now.' if free is not None else ''}",
            fix="free space on that file system, or write the output to another one (-o)",
        )
    if code == errno.EROFS:
        return BridgeError(f"{target}: the file system is read-only ({what}).{removed}", fix="write the output to a writable location (-o)")
    if code in (errno.EACCES, errno.EPERM):
        return BridgeError(
            f"{what}: permission denied ({exc.strerror}) while creating the output {target}.{removed}",
            fix="write the output to a directory you can write to (-o), or fix that directory's permissions",
        )
    if code in (errno.EEXIST, errno.ENOTDIR) and tmp is None:
        blocker = next((p for p in [target.parent, *target.parent.parents] if p.exists() and not p.is_dir()), target.parent)
        return BridgeError(
            f"{target}: cannot create the output, because {blocker} is a file, not a directory.",
            fix="choose an output path whose parent directories are directories (-o)",
        )
    return BridgeError(
        f"{target}: could not write the output ({exc.strerror or exc}: {what}).{removed}",
        fix="check the output path, its permissions and the disk",
    )


def _free_bytes(path: Path) -> int | None:
    for p in [path, *path.parents]:
        with contextlib.suppress(OSError):
            return shutil.disk_usage(p).free
    return None
