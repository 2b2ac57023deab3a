"""Outputs appear whole or not at all: the one implementation every tool writes through.

* :func:`atomic_output_dir`: a directory output (a checkpoint, an HF folder) is
  written into a temporary sibling ``.NAME.tmp-HOST-PID-XXXXXXXX`` and renamed into
  place at the end, so a crash never leaves a directory that ``--load`` would take
  as complete; an existing output is only replaced with ``force``.
* :func:`atomic_output_files`: several files that are only right together (an
  indexed dataset's ``PREFIX.bin`` / ``.idx`` / ``.json``) are written into a
  temporary sibling directory and replace their old versions together (order
  below), or not at all.
* :func:`atomic_text_file` / :func:`write_text_atomic`: one small file (a ``--json``
  report, a plot, the tracker); :func:`atomic_binary_file` the same for bytes (a
  safetensors file, :mod:`ders_megatron.io.safetensors_writer`).

Temporaries carry the host and process id, so the next run into the same parent
removes those of killed runs (:func:`clear_stale_temporaries`: same host, process
gone) and names, with the command to remove them, any it cannot judge.

A write that fails because the disk is full ends in :class:`DiskFullError`
("disk full writing X"), whichever library was writing (``io/errors.py``), and
leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from ders_megatron.io.errors import CheckpointError, DiskFullError, causes, is_disk_full

# .NAME.tmp-HOST-PID-RANDOM (tempfile.mkdtemp's 8 characters); .old- for an output being replaced
_OURS = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>.+)-(?P<pid>\d+)-(?P<rand>[a-z0-9_]{8})$")
# what earlier versions left: .NAME.tmp-XXXXXXXX (mkdtemp) and .NAME.old-PID
_EARLIER = re.compile(r"^\..+\.(tmp-[a-z0-9_]{8}|old-\d+)$")
# torch's zip writer reports a failed write without the errno (inline_container.cc)
_TORCH_WRITE_FAILED = ("PytorchStreamWriter failed writing", "file write failed")
_LOW_SPACE_BYTES = 64 * 2**20


def _host() -> str:
    return socket.gethostname().replace("/", "_") or "host"


def temp_prefix(name: str, kind: str = "tmp") -> str:
    """``.NAME.tmp-HOST-PID-``: the prefix of this process's temporaries for ``name``."""
    return f".{name}.{kind}-{_host()}-{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clear_stale_temporaries(parent) -> list[Path]:
    """Remove the temporaries that killed runs left in ``parent`` (ours, this host, their
    process gone); print the command to remove those it cannot judge (another host's,
    or an earlier version's). Returns the removed paths."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    removed, unjudged = [], []
    for entry in sorted(parent.iterdir()):
        if not entry.name.startswith("."):
            continue
        match = _OURS.match(entry.name)
        if match and match["host"] == _host():
            if not _process_alive(int(match["pid"])):
                _remove(entry)
                removed.append(entry)
        elif match or _EARLIER.match(entry.name):
            unjudged.append(entry)
    for path in removed:
        print(f"removed {path}: the temporary output of a run that was killed", file=sys.stderr)
    if unjudged:
        names = " ".join(f"'{p}'" for p in unjudged)
        print(f"note: {len(unjudged)} temporary output(s) of interrupted runs (another host's, or an earlier "
              f"version's) in {parent}; if no run is writing them: rm -rf {names}", file=sys.stderr)
    return removed


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def write_failure(err: BaseException, path, where=None) -> DiskFullError | None:
    """The error to raise for a failed write of ``path`` (named ``where`` if given):
    :class:`DiskFullError` when the disk is full (the OS's errno, safetensors' wrapped
    one, or torch's errno-less zip writer failure with the disk nearly full), else None
    (re-raise ``err`` as it is)."""
    path = Path(path)
    free = _free_bytes(path.parent if path.parent.exists() else Path("."))
    torch_write = any(any(text in str(e) for text in _TORCH_WRITE_FAILED) for e in causes(err))
    if is_disk_full(err) or (torch_write and free is not None and free < _LOW_SPACE_BYTES):
        left = f" ({free / 2**20:.0f} MiB left there)" if free is not None else ""
        return DiskFullError(f"disk full writing {where or path}{left}: free space (or write elsewhere) and rerun; "
                             "nothing was written")
    return None


def _fail(err: BaseException, path, tmp: Path, where=None):
    """Clean up ``tmp`` and raise the error for a failed write of ``path``."""
    failure = write_failure(err, path, where)  # before the cleanup frees the space
    _remove(tmp)
    if failure is not None:
        raise failure from err
    raise err


@contextlib.contextmanager
def atomic_output_dir(path, force: bool = False):
    """Yield a temporary directory that becomes ``path`` only if the block succeeds.

    An existing ``path`` is an error unless ``force``; then it is replaced only
    after the new output is complete. On failure nothing is left behind.
    """
    path = Path(path)
    if path.exists() and not force:
        raise CheckpointError(f"{path} exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_stale_temporaries(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path.name), dir=path.parent))
    try:
        yield tmp
        _install_dir(tmp, path)
    except BaseException as err:
        _fail(err, path, tmp)


def _install_dir(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.replace(tmp, path)
        return
    old = path.with_name(temp_prefix(path.name, "old") + secrets.token_hex(4))  # a file or a directory
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    _remove(old)


@contextlib.contextmanager
def atomic_output_files(paths):
    """Yield temporary paths, one per file of ``paths`` (all in one directory); when the
    block succeeds they replace ``paths`` together, else nothing changes.

    Order: the old files are moved aside last-listed first and the new ones moved in
    last-listed last, so list last the file that makes the set usable (an indexed
    dataset's ``.idx``): even a kill between two renames never pairs an old file with
    a new one; a prefix is then only missing its last file, which its reader names.
    """
    paths = [Path(p) for p in paths]
    parent = paths[0].parent
    if any(p.parent != parent for p in paths):
        raise ValueError(f"atomic_output_files: {paths} are not in one directory")
    parent.mkdir(parents=True, exist_ok=True)
    clear_stale_temporaries(parent)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(paths[0].name), dir=parent))
    staged = [tmp / p.name for p in paths]
    try:
        yield staged
        _install_files(staged, paths, tmp)
    except BaseException as err:
        _fail(err, paths[0], tmp, f"{parent}/{{{','.join(p.name for p in paths)}}}")
    _remove(tmp)


def _install_files(staged: list[Path], paths: list[Path], tmp: Path) -> None:
    missing = [str(s.name) for s in staged if not s.is_file()]
    if missing:
        raise CheckpointError(f"{paths[0].parent}: {', '.join(missing)} was not written; nothing replaced")
    aside = tmp / ".replaced"
    aside.mkdir()
    moved, installed = [], []
    try:
        for dest in reversed(paths):
            if dest.exists() or dest.is_symlink():
                os.replace(dest, aside / dest.name)
                moved.append(dest)
        for src, dest in zip(staged, paths):
            os.replace(src, dest)
            installed.append(dest)
    except BaseException:
        for dest in installed:
            os.replace(dest, tmp / dest.name)
        for dest in moved:
            os.replace(aside / dest.name, dest)
        raise


def temp_sibling(path) -> Path:
    """A fresh temporary sibling of ``path`` (``.NAME.tmp-HOST-PID-XXXXXXXX``), named so that
    :func:`clear_stale_temporaries` removes it once this process is gone."""
    path = Path(path)
    return path.with_name(temp_prefix(path.name) + secrets.token_hex(4))


@contextlib.contextmanager
def _atomic_file(path, mode: str, fsync: bool):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)  # the umask's permissions
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        _fail(err, path, tmp)


@contextlib.contextmanager
def atomic_text_file(path, fsync: bool = False):
    """A text file opened for writing that replaces ``path`` when the block succeeds (a
    temporary sibling renamed over it): readers see the old file or the new one, never
    a part; on failure nothing changes. ``fsync`` flushes it to disk before the rename
    (a tracker that must survive a power cut)."""
    with _atomic_file(path, "x", fsync) as f:
        yield f


@contextlib.contextmanager
def atomic_binary_file(path, fsync: bool = False):
    """:func:`atomic_text_file` for bytes (a file opened ``"xb"``)."""
    with _atomic_file(path, "xb", fsync) as f:
        yield f


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`atomic_text_file`."""
    with atomic_text_file(path) as f:
        f.write(text)
