"""What every entry point (training, the scripts, the converter) does at its boundary, written once.

- `check_ranges`: flags checked by range against a table (`FLAG_RANGES` in each script), before any work.
- `run_cli`: a mistake the user can fix ends the command with ONE line on stderr that names the input and what to
  do, and a non-zero exit; `EXTREMA_DEBUG=1` shows the traceback instead.
- `prepare_output_dir`: the output folder is created and written to at the start, not found unwritable at the end.
- `fsync_tree`: files and folders flushed to disk before a rename makes them visible (checkpoints).
"""

import argparse
import errno
import math
import os
import shutil
import sys
import uuid
from pathlib import Path


class UsageError(ValueError):
    """A mistake in the command line or the data that the user can fix; printed without a traceback."""


class Interrupted(Exception):
    """A run stopped by a signal (SIGTERM before a preemption, Ctrl-C) after saving its state; the message says how to
    resume. `exit_code`: 128 + the signal's number, as a shell reports a process killed by it."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose errors (an unknown flag, a value of the wrong type) are one line too: "error: <what>
    (see <prog> --help)" with exit status 2, not the whole usage first."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------------------------------------------
# Ranges of numeric flags: (test, phrase). A flag that is None (not given) is always valid; a list is checked item by
# item; a float must also be finite.

AT_LEAST_0 = (lambda value: value >= 0, "at least 0")
AT_LEAST_1 = (lambda value: value >= 1, "at least 1")
POSITIVE = (lambda value: value > 0, "greater than 0")
FRACTION = (lambda value: 0 <= value < 1, "in [0, 1)")
UNIT_INTERVAL = (lambda value: 0 <= value <= 1, "in [0, 1]")
OPEN_UNIT = (lambda value: 0 < value <= 1, "in (0, 1]")
SEED = (lambda value: 0 <= value < 2**32, "in [0, 2**32)")  # numpy's seeds


def check_value(flag: str, value, valid=None, phrase: str = ""):
    """Raise a `UsageError` naming `flag` when `value` (a number or a list of numbers) is not finite or not `valid`."""
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(item, float) and not math.isfinite(item):
            raise UsageError(f"{flag} must be a finite number, got {item}.")
        if valid is not None and not valid(item):
            raise UsageError(f"{flag} must be {phrase}, got {item}.")


def check_ranges(args, ranges: dict, floats_finite: bool = True):
    """Check every flag of `ranges` ({dest: (test, phrase)}) in `args` (a Namespace or dict), and every other float
    flag for finiteness; returns `args`. The first flag out of range raises a `UsageError` that names it."""
    values = args if isinstance(args, dict) else vars(args)
    for name, (valid, phrase) in ranges.items():
        if values.get(name) is not None:
            check_value(f"--{name}", values[name], valid, phrase)
    if floats_finite:
        for name, value in values.items():
            if isinstance(value, float) or (isinstance(value, list) and value and isinstance(value[0], float)):
                check_value(f"--{name}", value)
    return args


def check_finite(what: str, values: dict):
    """Refuse non-finite numbers in `values` (a results dict, nested dicts / lists included) before they are written:
    a NaN accuracy or loss is not a result."""

    def bad(value):
        if isinstance(value, float):
            return not math.isfinite(value)
        if isinstance(value, dict):
            return any(bad(item) for item in value.values())
        if isinstance(value, (list, tuple)):
            return any(bad(item) for item in value)
        return False

    names = [name for name, value in values.items() if bad(value)]
    if names:
        raise UsageError(
            f"{what}: {', '.join(names)} not finite (NaN or infinite weights, features or loss); nothing was "
            "written. Check the model's weights and lower the learning rate."
        )


# ----------------------------------------------------------------------------------------------------------------
# Files: the output folder, and data that must reach the disk


def describe_os_error(error: OSError, path=None) -> str:
    """One line for an OSError a user can act on: a full disk, a missing permission, a read-only file system."""
    where = error.filename or path or "the output folder"
    if error.errno == errno.ENOSPC:
        return f"no space left on {where}; free some space or write to another disk (--output_dir)."
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {where}; choose a folder you can write to (--output_dir)."
    if error.errno == errno.EROFS:
        return f"{where} is on a read-only file system; choose another --output_dir."
    return f"{where}: {error.strerror or error}."


USER_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT}
# How libraries that wrap the OS error report a full disk: torch's zip writer ("unexpected pos"), safetensors (Rust)
DISK_FULL_HINTS = ("No space left", "unexpected pos", "StorageFull", "code: 28", "file write failed")


def write_error_message(error: Exception, path) -> str | None:
    """One line for a failed write to `path` that the user can act on (a full disk, a missing permission), else
    None. A full disk is recognised from the error, or from the disk having less than 1% or 64 MiB free."""
    if isinstance(error, OSError) and error.errno in USER_ERRNOS:
        return describe_os_error(error, path)
    text = str(error)
    try:
        usage = shutil.disk_usage(Path(path).parent if not Path(path).exists() else path)
        nearly_full = usage.free < max(64 * 2**20, usage.total // 100)
    except OSError:
        nearly_full = False
    if nearly_full or any(hint in text for hint in DISK_FULL_HINTS):
        return describe_os_error(OSError(errno.ENOSPC, "No space left on device", str(path)))
    return None


def prepare_output_dir(path, flag: str = "--output_dir") -> Path:
    """Create `path` and write (and remove) a probe file in it, so that a folder that cannot be written stops the run
    at its start; returns the folder."""
    folder = Path(path)
    probe = folder / f".write-probe-{uuid.uuid4().hex}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as file:
            file.write(b"probe")
            file.flush()
            os.fsync(file.fileno())
        probe.unlink()
    except FileExistsError as error:
        raise UsageError(f"{flag} {folder} exists and is not a folder; choose another path.") from error
    except NotADirectoryError as error:
        raise UsageError(f"{flag} {folder}: a part of the path is a file, not a folder; choose another path.") from error
    except OSError as error:
        raise UsageError(f"{flag} {folder} cannot be written: {describe_os_error(error, folder)}") from error
    return folder


def fsync_tree(folder):
    """fsync every file under `folder` and every folder (itself included), so that a rename after it publishes data
    that is on the disk: after a power loss the renamed folder is complete, not a set of empty files."""
    folder = Path(folder)
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as file:
                os.fsync(file.fileno())
        fsync_dir(root)


def fsync_dir(folder):
    """fsync a folder's entry list (a rename or new file in it); not possible on every OS (Windows): skipped there."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# ----------------------------------------------------------------------------------------------------------------
# Running an entry point


def debug_enabled() -> bool:
    return os.environ.get("EXTREMA_DEBUG", "") not in ("", "0")


def run_cli(main, argv=None):
    """Run `main(argv)`; a user error (`UsageError`, a non-finite loss, a full disk, a missing permission, Ctrl-C)
    ends it with one line on stderr and a non-zero exit. With EXTREMA_DEBUG=1 the traceback is shown instead."""
    if debug_enabled():
        return main(argv)
    try:
        return main(argv)
    except (UsageError, FloatingPointError) as error:
        sys.exit(f"error: {error}")
    except Interrupted as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); nothing more was written.", file=sys.stderr)
        sys.exit(130)
    except OSError as error:
        if error.errno in USER_ERRNOS:
            sys.exit(f"error: {describe_os_error(error)}")
        raise
    except Exception as error:  # libraries that wrap a full disk in their own errors (torch, safetensors)
        if any(hint in str(error) for hint in DISK_FULL_HINTS):
            sys.exit(f"error: no space left on the device ({type(error).__name__}: {str(error).splitlines()[0]}).")
        raise
