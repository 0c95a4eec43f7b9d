"""
What a queue file must be before the spool reads or writes it, and the
opening that checks it (Postfix: global/mail_open_ok.c and its callers
in qmgr_active.c, showq.c and postsuper.c).

A queue directory may hold anything under any name: a FIFO, a socket, a
directory, a symbolic link, a hard link to a file elsewhere, a file of
another user's.  The daemon often runs as root, so following a link or
blocking on a FIFO would let whoever can make a name in the spool stop
the queue or have root write outside it.  The rules, per case, and
where relayagent departs from Postfix:

=======================================  ==================================
what the directory entry is              what happens
=======================================  ==================================
a name that is not a queue id            left alone, one warning
                                         (Postfix's qmgr_move warns, its
                                         scans skip it silently)
a FIFO, socket, device or directory      left alone, one warning: never
                                         opened (Postfix: "not a regular
                                         file", left to the administrator)
a symbolic link (to a queue file, to     left alone, one warning; the link
/etc/passwd, dangling)                   is never followed (Postfix: lstat,
                                         "not a regular file")
any of the above found only after the    moved to ``corrupt/`` (the
queue manager claimed it into active/    directory entry is renamed, so a
(it replaced a file meanwhile)           link moves, never its target)
a hard link: the file has another name   moved to ``corrupt/``, never
(outside the spool, say)                 written.  Postfix delivers it
                                         with a warning (refusing would let
                                         users of its world-writable
                                         maildrop stop mail); we have no
                                         such directory, and writing the
                                         done marks would write into the
                                         other name's file
a second name in ``tmp/`` with the same  our own enqueue between its
inode                                    ``link`` and ``unlink`` (or one
                                         that died there): the tmp name is
                                         unlinked and the message goes on
owned by another uid than its queue      moved to ``corrupt/`` (Postfix
directory                                does not look)
writable by group or others              moved to ``corrupt/``: someone
                                         changed its mode, maybe its data
zero length, truncated anywhere, a bit   moved to ``corrupt/`` (the reader's
flipped anywhere                         checks, ``queuefile.py``)
cannot be opened (EACCES, EMFILE, EIO)   not the file's fault (Postfix
                                         treats it as a system problem):
                                         the queue manager defers it
=======================================  ==================================

"Left alone, one warning" is ``Spool(on_stray=...)``: the spool reports
each stray entry once, and again only after it was gone for a whole scan
of its directory.  Nothing in this module logs.

SYNOPSIS::

    from relayagent.spool.safeopen import open_log, open_queue_file, reopen

    fd, info = open_queue_file(path, queue_id, writable=True, owner=uid,
                               twin=tmp_path)   # NotAQueueFile, OSError
    fd = reopen(path, queue_id, os.O_RDWR, identity=(info.st_dev, info.st_ino))
    fd = open_log(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

Every open is ``O_NOFOLLOW | O_NONBLOCK`` after an ``lstat`` that must say
"regular file": a link is never followed and a FIFO never blocks, even
when the entry is swapped between the ``lstat`` and the ``open``; the
``fstat`` of the descriptor is what the checks above judge.  A reopen
(each update of an idle ``QueueFile``) must find the same inode.

DIAGNOSTICS: ``NotAQueueFile`` (a ``CorruptQueueFile``: the queue
manager moves it to ``corrupt/``) with a reason naming what is wrong;
``FileNotFoundError`` when the name is gone; other ``OSError`` for
trouble that is not the file's.

Owns no parameters.
"""

from __future__ import annotations

import errno
import os
import stat

from relayagent.spool.errors import NotAQueueFile

# Flags of every open of a queue file or log: never follow a link, never
# wait for a FIFO's other end, never leak into a child process.
SAFE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

# Errors of open(2) that say what the entry is, not that the system is in
# trouble: a link (O_NOFOLLOW), a directory (O_RDWR), a socket or a
# device without a driver.
_TYPE_ERRORS = {errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENODEV}

# Mode bits we never set (files are created 0600): a file that has them
# was changed by someone else.
_FOREIGN_MODE = stat.S_IWGRP | stat.S_IWOTH


def describe(mode: int) -> str | None:
    """What a file of this mode is, when it is not a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a regular file"


def entry_problem(entry: os.DirEntry[str]) -> str | None:
    """Why a directory entry with a queue-id name is not a queue file, or
    None when it is a regular file (or gone).  Costs nothing for the
    common regular file: the directory's own type field answers."""
    try:
        if entry.is_file(follow_symlinks=False):
            return None
        if entry.is_symlink():
            return "not a regular file: a symbolic link"
        if entry.is_dir(follow_symlinks=False):
            return "not a regular file: a directory"
        kind = describe(entry.stat(follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return None
    return f"not a regular file: {kind}" if kind else None


def _judge(queue_id: str, info: os.stat_result, owner: int | None, path: str) -> None:
    """The checks of an lstat or fstat result that need no other file."""
    kind = describe(info.st_mode)
    if kind is not None:
        raise NotAQueueFile(queue_id, f"not a regular file: {kind}")
    if owner is not None and info.st_uid != owner:
        where = os.path.dirname(path)
        raise NotAQueueFile(
            queue_id, f"owned by uid {info.st_uid}, not by the owner of {where} (uid {owner})"
        )
    if info.st_mode & _FOREIGN_MODE:
        raise NotAQueueFile(
            queue_id, f"mode {stat.S_IMODE(info.st_mode):04o}: writable by others than its owner"
        )


def _same_inode(path: str, info: os.stat_result) -> bool:
    try:
        other = os.lstat(path)
    except OSError:
        return False
    return (other.st_dev, other.st_ino) == (info.st_dev, info.st_ino)


def _open_error(queue_id: str, path: str, error: OSError) -> Exception:
    """What an error of open(2) means: a NotAQueueFile when it tells the
    kind of the entry (swapped in after the lstat), else the error."""
    if error.errno not in _TYPE_ERRORS:
        return error
    try:
        kind = describe(os.lstat(path).st_mode)
    except FileNotFoundError as gone:
        return gone
    except OSError:
        kind = None
    return NotAQueueFile(queue_id, f"not a regular file: {kind or error.strerror}")


def open_queue_file(
    path: str,
    queue_id: str,
    *,
    writable: bool,
    owner: int | None = None,
    twin: str | None = None,
) -> tuple[int, os.stat_result]:
    """Open a queue file and check it is one of ours (module docstring);
    return the descriptor (blocking, close-on-exec) and its fstat.

    ``owner``: the uid the file must have (its queue directory's), None
    for any.  ``twin``: the file's name in ``tmp/``, a second link that
    our own enqueue makes for a moment; when it is the same inode it is
    unlinked (``writable``: we are the queue manager or postsuper
    finishing what the writer was about to do) or tolerated (read-only:
    ``mailq`` changes nothing).
    """
    # lstat first: a FIFO, device or link is refused without being
    # opened at all (opening a device can have effects of its own).
    _judge(queue_id, os.lstat(path), owner, path)
    try:
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | SAFE_FLAGS)
    except OSError as error:
        raise _open_error(queue_id, path, error) from None
    try:
        # What the descriptor is, not what the name was: the entry may
        # have been swapped since the lstat.
        info = os.fstat(fd)
        _judge(queue_id, info, owner, path)
        links = info.st_nlink
        if links > 1 and twin is not None:
            twin_is_ours = _same_inode(twin, info)
            if twin_is_ours and not writable:
                links -= 1  # mailq changes nothing
            else:
                if twin_is_ours:
                    try:
                        os.unlink(twin)
                    except FileNotFoundError:
                        pass  # the writer unlinked it first
                # Counted again: after our unlink, or because the writer
                # may have unlinked its tmp name since our fstat.
                info = os.fstat(fd)
                links = info.st_nlink
        if links == 0:
            raise FileNotFoundError(errno.ENOENT, "removed while being opened", path)
        if links != 1:
            raise NotAQueueFile(
                queue_id, f"has {links} hard links: another name, maybe outside the spool, shares it"
            )
        # O_NONBLOCK means nothing for a regular file on Linux; cleared all
        # the same so the descriptor is what a plain open would give
        # (other systems apply it to files with mandatory locks).
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def reopen(path: str, queue_id: str, flags: int, identity: tuple[int, int]) -> int:
    """Open a queue file again by its name (an idle ``QueueFile`` holds
    no descriptor) and check it is still the file first opened:
    ``identity`` is its (st_dev, st_ino).  A file replaced meanwhile is
    never read or written: ``NotAQueueFile``."""
    try:
        fd = os.open(path, flags | SAFE_FLAGS)
    except OSError as error:
        raise _open_error(queue_id, path, error) from None
    try:
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) != identity or not stat.S_ISREG(info.st_mode):
            raise NotAQueueFile(queue_id, "replaced by another file while queued")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_log(path: str, flags: int, mode: int = 0o600) -> int:
    """Open a defer or bounce log without following a link or blocking on
    a FIFO; a log that is not a regular file raises ``OSError``
    (``EINVAL``, naming what it is) and is neither read nor written."""
    fd = os.open(path, flags | SAFE_FLAGS, mode)
    try:
        kind = describe(os.fstat(fd).st_mode)
        if kind is not None:
            raise OSError(errno.EINVAL, f"not a regular file: {kind}", path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
