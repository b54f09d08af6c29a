"""Publishing files and directories atomically: a reader sees the old version or the new one, never half of one.

    write_text(path, text)             a temp file beside `path`, fsync, os.replace, fsync of the directory
    with staging_dir(final) as tmp:    fill `tmp` (FINAL.tmp-HOST-PID, beside final); a clean exit fsyncs it and
        ...                            renames it onto `final` (an older `final` is moved aside first, then removed);
                                       an exception removes it
    remove_dead_leftovers(final)       the staging directories of writers on this host that died (kill -9)

The token store, the checkpoint files and the exported model all publish through here. Names carry the writer's
host and pid, so leftovers of a dead writer are recognised (and removed) by the next writer on that host, while a
live writer elsewhere on a shared file system is left alone.
"""

import contextlib
import os
import shutil
import socket
import tempfile

TMP, OLD = ".tmp-", ".old-"  # FINAL.tmp-HOST-PID: being written; FINAL.old-HOST-PID: the version being replaced


def owner_tag() -> str:
    """HOST-PID of this process, as staging names carry it."""
    return f"{socket.gethostname()}-{os.getpid()}"


def fsync_dir(path: str) -> None:
    """Make the entries of a directory (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsync every file under `path`, then every directory (deepest first): what a crash must not lose."""
    for folder, _, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


def write_text(path: str, text: str) -> None:
    """Replace `path` with `text` atomically and durably."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(folder)


@contextlib.contextmanager
def staging_dir(final: str, durable: bool = True):
    """Yield an empty directory beside `final`; on a clean exit it becomes `final` (see the module docstring)."""
    final = os.path.abspath(final)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    remove_dead_leftovers(final)
    tmp = f"{final}{TMP}{owner_tag()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if durable:
            fsync_tree(tmp)
        publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: str, final: str) -> None:
    """Rename the finished directory `tmp` onto `final`: the old `final` is moved aside first and removed last."""
    old = f"{final}{OLD}{owner_tag()}"
    if os.path.lexists(final):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(os.path.dirname(final))
    shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_dead_leftovers(final: str) -> list:
    """Delete FINAL.tmp-HOST-PID and FINAL.old-HOST-PID of this host's dead writers; returns what was removed."""
    parent, name = os.path.split(os.path.abspath(final))
    host, removed = socket.gethostname(), []
    for entry in os.listdir(parent) if os.path.isdir(parent) else ():
        for kind in (TMP, OLD):
            prefix = f"{name}{kind}{host}-"
            pid = entry[len(prefix):]
            if entry.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
                removed.append(entry)
    return removed
