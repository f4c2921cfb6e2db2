"""Validated, write-once private copies of adapters: the worker loads exactly what the front end checked.

vLLM's worker (re)reads an adapter directory whenever it loads it: at a request's first step, and
again after evicting it from its CPU cache (``--max-cpu-loras``). A file replaced after the front
end's check (an atomic rename to a NaN or truncated ``adapter_model.safetensors``) would then meet
the worker, where any exception kills the engine. So the front end copies the adapter's two files
once per file version into a private directory (``GEMMA4_BRIDGE_SNAPSHOT_DIR`` or the temp dir,
mode 0700, named after this process; removed at exit, and by the next process if this one was
killed), validates the *copy* with every check the worker makes, and hands the worker the copy's
path. The copy is private, written once and never changed, so whatever the worker reads later
(first load, reload after eviction) is byte for byte what was validated, so the worker checks
its structure again (it needs the plan) but not its values (:func:`is_validated_copy`). The kernel
copies the bytes (``copy_file_range``; a 760 MB adapter cost ~0.9 s of SHA-256 alone). Copy and
check run once per file version even when several threads ask at once (one lock per version);
the API server runs them off its event loop (``hooks._validated_path_off_loop``).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import itertools
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from gemma4_bridge.adapter_io import CONFIG_NAME, PICKLE_NAMES, SAFETENSORS_NAME
from gemma4_bridge.converters.safetensors_stream import FileRange, copy_range
from gemma4_bridge.errors import BridgeError

SNAPSHOT_ENV = "GEMMA4_BRIDGE_SNAPSHOT_DIR"
_PREFIX = "gemma4-bridge-adapters-"
_WEIGHT_NAMES = (SAFETENSORS_NAME, *PICKLE_NAMES)

# (adapter dir, file identities) -> the validated snapshot, or the refusal; one entry per version.
_VERDICTS: dict[tuple[object, ...], Path | BridgeError] = {}
_ROOT: list[Path] = []
_SERIAL = itertools.count()  # names the snapshots of this process's private directory
_LOCK = threading.Lock()  # guards _ROOT and _VERSION_LOCKS
_VERSION_LOCKS: dict[tuple[object, ...], threading.Lock] = {}  # one per file version: one copy + check, however many ask


def snapshot_root() -> Path:
    """This process's private snapshot directory (created on first use, removed at exit)."""
    with _LOCK:
        if not _ROOT:
            parent = _snapshot_parent()
            parent.mkdir(parents=True, exist_ok=True)
            _remove_stale(parent)
            root = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=parent))
            atexit.register(shutil.rmtree, root, True)
            _hold_against_age_cleaning(root)
            _ROOT.append(root)
        return _ROOT[0]


def _hold_against_age_cleaning(root: Path) -> None:
    """Keep ``root`` flock()ed for the life of the process: systemd-tmpfiles' age-based cleaning of /tmp
    (10 days on Fedora/RHEL) skips a directory it cannot lock, and the worker may reload an evicted
    adapter from a snapshot weeks after it was made, inside a model step, where a missing file would
    stop the engine. The descriptor is left open on purpose (closed with the process)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)  # a file system without flock: nothing to hold


def _snapshot_parent() -> Path:
    return Path(os.environ.get(SNAPSHOT_ENV) or tempfile.gettempdir())


def is_snapshot(path: str | os.PathLike[str]) -> bool:
    """A validated snapshot of this process (not a ``.staging-`` directory still being checked)."""
    p = Path(path)
    return bool(_ROOT) and p.parent == _ROOT[0] and p.name.isdigit()


def is_validated_copy(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a snapshot some front end of this user validated (any process: the worker
    runs in another one than the API server). Such a copy is renamed into place only after every
    check passed and lies in a directory only this user can write (mode 0700), so its values need
    no second check; anything else (a staging directory, a foreign or loosened root) does."""
    p = Path(path)
    root = p.parent
    if not (p.name.isdigit() and root.name.startswith(_PREFIX)):
        return False
    try:
        st = root.lstat()
        same_parent = root.parent.resolve() == _snapshot_parent().resolve()
    except OSError:
        return False
    return same_parent and stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700


def _remove_stale(parent: Path) -> None:
    """Snapshot directories of processes that died without cleaning up (SIGKILL)."""
    for entry in parent.glob(f"{_PREFIX}*"):
        pid = entry.name[len(_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(entry, ignore_errors=True)


def file_version(adapter_dir: str | os.PathLike[str]) -> tuple[object, ...]:
    """Identity of the adapter's files: inode, size, mtime and ctime of each (a rename or rewrite changes it)."""
    root = Path(adapter_dir)
    out: list[object] = [os.path.abspath(root)]
    for name in (CONFIG_NAME, *_WEIGHT_NAMES):
        try:
            st = (root / name).stat()
        except OSError:
            continue
        out.append((name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


def validated_snapshot(adapter_dir: str | os.PathLike[str], validate: Callable[[Path], None]) -> Path:
    """The snapshot of ``adapter_dir`` that ``validate`` accepted (copied and checked once per file version).

    ``validate`` runs on the copy; a :class:`BridgeError` it raises is re-raised (and remembered for
    this file version) with the copy's path replaced by the user's directory. Thread-safe: callers
    asking for the same file version at once wait for one copy and check."""
    key = file_version(adapter_dir)
    with _LOCK:
        version_lock = _VERSION_LOCKS.setdefault(key, threading.Lock())
    with version_lock:
        return _snapshot_once(key, Path(adapter_dir), validate)


def cached(adapter_dir: str | os.PathLike[str]) -> Path | None:
    """The validated snapshot of ``adapter_dir``'s current file version, if already made (no work)."""
    verdict = _VERDICTS.get(file_version(adapter_dir))
    return verdict if isinstance(verdict, Path) and verdict.is_dir() else None


def _snapshot_once(key: tuple[object, ...], adapter_dir: Path, validate: Callable[[Path], None]) -> Path:
    verdict = _VERDICTS.get(key)
    if isinstance(verdict, BridgeError):
        raise verdict
    if verdict is not None and verdict.is_dir():
        return verdict
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=snapshot_root()))
    try:
        _copy(adapter_dir, staging)
        validate(staging)
    except BridgeError as err:
        shutil.rmtree(staging, ignore_errors=True)
        renamed = _renamed(err, staging, adapter_dir)
        _VERDICTS[key] = renamed
        raise renamed from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    final = snapshot_root() / f"{next(_SERIAL):06d}"
    staging.rename(final)
    _VERDICTS[key] = final
    return final


def _copy(src: Path, dst: Path) -> None:
    """Copy the config and the weights file PEFT wrote (inside the kernel where it can)."""
    for name in (CONFIG_NAME, *_WEIGHT_NAMES):
        try:
            source = open(src / name, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise BridgeError(f"{src / name}: cannot be read ({exc}).", fix="check the file's permissions") from exc
        with source, open(dst / name, "wb") as out:
            try:
                copy_range(out, FileRange(source.fileno(), 0, os.fstat(source.fileno()).st_size))
            except (OSError, ValueError) as exc:
                raise BridgeError(f"{src / name}: could not be copied for validation ({exc}).",
                                  fix="the file changed or shrank while it was read; load the adapter again") from exc
        if name != CONFIG_NAME:
            break  # the weights file the readers pick: the first that exists


def _renamed(err: BridgeError, staging: Path, user_dir: Path) -> BridgeError:
    swap = lambda text: text.replace(str(staging), str(user_dir))  # noqa: E731
    renamed = BridgeError(swap(err.message), fix=swap(err.fix) if err.fix else None)
    with contextlib.suppress(AttributeError):
        renamed.exit_code = err.exit_code
    return renamed
