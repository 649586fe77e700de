"""Crash-safe file writes: a save interrupted at any moment (an exception, Ctrl-C, SIGKILL, a full
disk) leaves the previous file at the path whole.

:func:`write_atomically` writes the new bytes to a temporary file in the target's folder, syncs it to
disk and renames it over the target (a rename within one folder replaces the name in one step). The
temporary file is named ``.{target name}.{pid}.{random hex}.peft-ops-tmp`` so that a later write to the
same target can recognise, and remove, the one a killed process left behind.

What the written file keeps of the one it replaces: its permission bits (a file made group-readable
stays so); a new file gets ``0o666`` less the umask, as ``open(path, "w")`` would. Not kept: the
owner and group (the writer's own apply), extended attributes, and hard links (other names of the old
file keep the old content). A symlink at the path stays a link: its final target is replaced. A file
the writer may not write to (``chmod a-w``) is refused, as a plain write would refuse it, although the
rename itself would succeed.

A temporary file is judged stale when no process of its pid runs on this machine. Processes of another
machine (a shared network folder) or of another pid namespace (containers sharing a folder) can't be
seen: there, a save may remove another writer's temporary file, and that writer's save then fails with
an error (the file at the path is never damaged). On Windows stale files are left (no safe way to probe
a pid).

This module is the bottom layer of peft_ops: it imports nothing from the package.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat

__all__ = ["write_atomically", "remove_stale_temps", "temp_path", "TEMP_SUFFIX", "open_regular"]

TEMP_SUFFIX = ".peft-ops-tmp"
_RANDOM_HEX_DIGITS = 16


def open_regular(path: str | os.PathLike):
    """``path`` opened for binary reading if it is a regular file, else None (a directory, device, pipe or
    socket: a FIFO would block the open, a device never ends). OSErrors of the open itself propagate."""
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")


def write_atomically(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` (bytes or any bytes-like object) to ``path`` so that the file previously there is
    replaced whole or not at all; returns the path of the file written (the final target of a symlink
    at ``path``, else ``path`` made absolute).

    Before writing, temporary files that killed processes left for the same target are removed; those
    of live processes are left alone, so several processes may write the same path at once (the last
    rename wins, and the file is always one writer's complete data). On failure the temporary file is
    removed and the error re-raised; an ``OSError`` keeps its type and errno and its message names
    ``path`` (and the link's target, if it is a link)."""
    shown = os.fspath(path)
    if isinstance(shown, bytes):
        shown = os.fsdecode(shown)
    target = os.path.realpath(shown)
    try:
        _check_target(target)
        remove_stale_temps(target)
        _write_and_replace(target, data)
    except OSError as e:
        raise type(e)(e.errno, _described(e, shown, target)) from None  # the temp file is no concern of the caller
    _sync_folder(os.path.dirname(target))
    return target


def temp_path(target: str, pid: int, token: str) -> str:
    """The temporary file a process ``pid`` writes before renaming it onto ``target``."""
    folder, name = os.path.split(target)
    return os.path.join(folder, f".{name}.{pid}.{token}{TEMP_SUFFIX}")


def remove_stale_temps(target: str) -> None:
    """Remove the temporary files of ``target`` whose writing process is gone (killed mid-write). Best
    effort: a folder that can't be listed, or a file another process removed first, is no error."""
    folder, name = os.path.split(target)
    # the name, then exactly "<pid>.<hex>": another target's temps (say of "a.1" for "a") don't match
    pattern = re.compile(rf"\.{re.escape(name)}\.(\d+)\.[0-9a-f]{{{_RANDOM_HEX_DIGITS}}}{re.escape(TEMP_SUFFIX)}")
    try:
        entries = os.listdir(folder or ".")
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry)
        if match and not _pid_alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, entry))


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine. A reused pid reads as alive: its temp is kept,
    never removed wrongly."""
    if os.name != "posix":
        return True  # Windows' os.kill(pid, 0) would terminate the process, not probe it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _check_target(target: str) -> None:
    if os.path.isdir(target):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
    if os.path.exists(target) and not os.access(target, os.W_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))


def _write_and_replace(target: str, data: bytes) -> None:
    existing_mode = _permission_bits(target)
    temp = temp_path(target, os.getpid(), secrets.token_hex(_RANDOM_HEX_DIGITS // 2))
    # O_EXCL: never write into a file someone else made; 0o666: the umask decides a new file's mode
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(temp, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if existing_mode is not None:
                os.chmod(temp, existing_mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the data must be on disk before the rename makes it the file
        os.replace(temp, target)
    except BaseException:  # KeyboardInterrupt included: no temp may outlive a failed write
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _permission_bits(target: str) -> int | None:
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        return None


def _sync_folder(folder: str) -> None:
    """Make the rename itself durable. Best effort: some systems can't open or sync a directory."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _described(error: OSError, shown: str, target: str) -> str:
    """The error's reason, what could not be written, and why where it is clear."""
    folder = os.path.dirname(target)
    where = repr(shown) if target == os.path.abspath(shown) else f"{shown!r} (which resolves to {target!r})"
    if error.errno == errno.EISDIR:
        reason = "it is a directory; give the path of a file"
    elif not os.path.isdir(folder):
        reason = f"{folder!r} is not a folder" if os.path.exists(folder) else f"the folder {folder!r} does not exist"
    elif os.path.exists(target) and not os.access(target, os.W_OK):
        reason = "the file is read-only"
    elif not os.access(folder, os.W_OK):
        reason = f"the folder {folder!r} is not writable"
    else:
        reason = "the previous file, if any, is unchanged"
    return f"{error.strerror or error}: cannot write {where}: {reason}"
