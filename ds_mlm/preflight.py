"""Checks made before a run writes anything: directories that can take files, and disk space for what will come.

A job that runs for days should fail in its first second, not when its first checkpoint is due. Root passes every
permission bit, so writability is tested by writing (a probe file, then removed), which also catches read-only
mounts (EROFS). Space is checked against an estimate of the first write the run must be able to make; what cannot
be estimated (a disk filled by someone else later) is caught where the write happens (checkpoint.py, ds_mlm.data),
and the half-written files are never presented as complete.
"""

import errno
import os
import shutil
import tempfile

from ds_mlm.errors import UserError

MiB = 1 << 20


def _human(n: int) -> str:
    return f"{n / MiB:,.1f} MiB" if n < (1 << 30) else f"{n / (1 << 30):,.2f} GiB"


def writable_dir(path: str, flag: str) -> str:
    """Create `path` if needed and prove a file can be written in it; a UserError naming `flag` otherwise."""
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{flag} {path} exists but is not a directory: give a directory path") from None
    except OSError as e:
        raise UserError(f"cannot create {flag} {path}: {e.strerror}; give a writable directory") from None
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".ds-mlm-probe-")
        try:
            os.write(fd, b"x")  # an empty file can be created on a full disk; a byte cannot
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        why = "the disk is full" if e.errno == errno.ENOSPC else e.strerror
        raise UserError(f"{flag} {path} is not writable ({why}): give a writable directory with free space") from None
    return path


def free_space(path: str, need: int, flag: str, what: str) -> None:
    """A UserError when the file system of `path` has less than `need` bytes free."""
    free = shutil.disk_usage(path).free
    if free < need:
        raise UserError(f"{flag} {path} has {_human(free)} free but {what} needs about {_human(need)}: free some "
                        f"space or give {flag} on a larger disk")


def checkpoint_bytes(num_params: int, mixed_precision: bool) -> int:
    """About what one checkpoint of a model with AdamW takes: fp32 weights (or masters) and two Adam moments, plus the
    16-bit module copy under mixed precision; the final export adds fp32 weights once more."""
    per_param = 4 + 8 + (2 if mixed_precision else 0)
    return num_params * per_param + num_params * 4
