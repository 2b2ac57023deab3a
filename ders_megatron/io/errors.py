"""How the tools fail: the error classes they raise and the one line they print.

Every tool ends a failure a user can act on (bad flags, a damaged or hostile input,
a full disk) the same way (README "Bad input"): one line ``PROG: error: WHAT`` on
stderr naming the file and the problem, exit status 2, no traceback unless
``--debug``. :func:`report_failure` is that line; :func:`user_failures` the
exception types it covers. Raw errors from torch, safetensors or the OS are named
here once (:func:`failure_line`), so a message never depends on which library
tripped first; errors a caller can say more about (which output was being
written, which line of which file) are turned into :class:`CheckpointError` /
:class:`InputFileError` where that is known (``io/atomic.py``, ``training/data.py``).

It lives below :mod:`ders_megatron.io.safe_load` and :mod:`ders_megatron.io.atomic`,
which raise these errors. Torch-free: it names torch's and safetensors' exception classes only when those
modules are already loaded (``param_report`` imports no torch).
"""

from __future__ import annotations

import errno
import sys
import traceback

# errno values and the texts libraries wrap them in (safetensors: Rust's io::Error
# Debug form "Os { code: 28, kind: StorageFull, .. }"), all "the disk is full".
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXTS = ("No space left on device", "kind: StorageFull", "Disk quota exceeded", "kind: QuotaExceeded")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or not what the caller needs."""


class InputFileError(ValueError):
    """An input file the tool reads (text, token ids, weights) is unreadable or empty;
    the message names the file and where in it."""


class DiskFullError(CheckpointError):
    """Writing an output ran out of disk space; nothing was left behind."""


class NonFiniteError(CheckpointError):
    """A tensor about to be written holds NaN or Inf; nothing was written."""


def user_failures() -> tuple[type[BaseException], ...]:
    """The exception types a tool reports with :func:`report_failure` (exit 2).

    Our own errors are ``ValueError`` s; the rest are what damaged inputs and full
    disks raise in the libraries underneath: ``OSError``, ``EOFError`` (a truncated
    pickle), torch.distributed.checkpoint's ``CheckpointException`` (a
    ``BaseException`` wrapping each rank's failure) and safetensors' ``SafetensorError``
    where those modules are loaded. A bug (``TypeError``, ``AttributeError`` ...) is
    not among them: it keeps its traceback.
    """
    types: list[type[BaseException]] = [ValueError, KeyError, OSError, EOFError]
    dcp = sys.modules.get("torch.distributed.checkpoint.api")
    if dcp is not None:
        types.append(dcp.CheckpointException)
    st = sys.modules.get("safetensors")
    if st is not None and hasattr(st, "SafetensorError"):
        types.append(st.SafetensorError)
    return tuple(types)


def causes(err: BaseException):
    """``err``, what it wraps (``CheckpointException.failures``), its causes and contexts."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [e.__cause__, e.__context__]


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or anything it wraps) is the OS saying the disk is full."""
    for e in causes(err):
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(e) for text in DISK_FULL_TEXTS):
            return True
    return False


def first_line(err: BaseException) -> str:
    """``Type: first line`` of a foreign exception (torch's own carry whole tracebacks)."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    text = lines[0].strip() if lines else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def failure_line(err: BaseException) -> str:
    """What went wrong, for the user: our errors' own message; for a raw library
    error, the file it names and its first line."""
    if isinstance(err, KeyError) and err.args and isinstance(err.args[0], str):
        return err.args[0]
    if isinstance(err, ValueError) and type(err).__module__.startswith("ders_megatron"):
        return str(err)  # ours: it already names the file and the problem
    if type(err).__name__ == "CheckpointException":
        inner = next((e for e in causes(err) if e is not err and type(e).__name__ != "CheckpointException"), None)
        return failure_line(inner) if inner is not None else first_line(err)
    if is_disk_full(err):
        where = getattr(err, "filename", None)
        return f"disk full{f' writing {where}' if where else ''}: free space (or write elsewhere) and rerun"
    if isinstance(err, UnicodeDecodeError):
        return f"undecodable text at byte {err.start} ({err.reason}); the input is not {err.encoding}"
    if isinstance(err, OSError):
        if err.strerror is None:  # raised with a message of ours
            return str(err)
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    if isinstance(err, EOFError):
        return f"a file ended early ({first_line(err)}): a truncated copy? re-copy it"
    if isinstance(err, ValueError) and type(err) is ValueError:
        return str(err)
    return first_line(err)


def report_failure(prog: str, err: BaseException, debug: bool = False) -> int:
    """Print ``PROG: error: ...`` (after the traceback with ``debug``); returns 2, the
    tools' exit status for bad input."""
    if debug:
        traceback.print_exception(err, file=sys.stderr)
    print(f"{prog}: error: {failure_line(err)}", file=sys.stderr, flush=True)
    return 2
