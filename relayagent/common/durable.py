"""
Durable writes outside the queue files: a file replaced as a whole or not
at all, and a directory entry made to outlive a crash.

The queue files have their own, stricter protocol (``relayagent.spool``:
link into the queue only after the fsyncs); what is here serves the
smaller state files beside them (the MTA-STS policy cache, the TLSRPT
counters) and the directory fsyncs the spool and ``postconf -e`` need.

SYNOPSIS::

    write_atomically(directory, name, data)     # temporary, fsync, rename, fsync of the directory
    fsync_directory(path)

DIAGNOSTICS: ``OSError`` from the system calls; ``write_atomically``
leaves the old file as it was (and no temporary file) when it raises.
Owns no parameters.
"""

from __future__ import annotations

import os


def fsync_directory(path: str) -> None:
    """Flush the directory ``path`` to disk, so that the entries made or
    renamed in it survive a crash."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomically(directory: str, name: str, data: bytes) -> None:
    """``directory/name`` replaced by ``data`` or left as it was: a
    temporary file (mode 0600) written and fsynced, renamed over the old
    one, then the directory fsynced.  The directory is made (0700) when
    missing."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    final = os.path.join(directory, name)
    temporary = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(temporary, final)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    fsync_directory(directory)
