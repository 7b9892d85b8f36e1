"""Temporary sibling folders for atomic directory writes, and the removal of those a killed writer left.

A writer stages ``target`` in a hidden sibling ``.NAME.tmp-XXXX`` and renames it into place once it is
complete.  A process killed before that leaves the sibling behind (hundreds of megabytes for a model).
Each sibling therefore comes with a marker file ``.NAME.tmp-XXXX.writer``, created before the folder and
removed after it, holding the writer's host, process id and process start time.  A later write to the
same target removes a sibling only when its marker proves the writer is gone: same host, and no process
with that id and start time.  Anything else (no marker, another host, a live writer) is left alone.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

MARKER_SUFFIX = ".writer"
KINDS = ("tmp", "old")  # a new version being written; the previous one moved aside during a swap


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks after boot (Linux ``/proc``); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name before ")" may hold spaces


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def make_sibling(target: Path, kind: str = "tmp") -> Path:
    """A new empty folder ``.NAME.<kind>-XXXX`` beside ``target`` (``kind`` in ``KINDS``), with its marker."""
    fd, marker = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.{kind}-", suffix=MARKER_SUFFIX)
    with os.fdopen(fd, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}, f)
    folder = Path(marker[: -len(MARKER_SUFFIX)])
    folder.mkdir()
    return folder


def release_sibling(folder: Path) -> None:
    """Remove ``folder`` (if still there) and then its marker."""
    shutil.rmtree(folder, ignore_errors=True)
    Path(f"{folder}{MARKER_SUFFIX}").unlink(missing_ok=True)


def _writer_gone(marker: Path) -> bool:
    try:
        writer = json.loads(marker.read_text())
        host, pid, start = writer["host"], int(writer["pid"]), writer["start"]
    except (OSError, ValueError, KeyError, TypeError):
        return False  # unreadable: not provably ours
    if host != socket.gethostname():
        return False  # a process on another machine cannot be checked
    if not _alive(pid):
        return True
    return start is not None and _start_time(pid) not in (None, start)  # the id now names another process


def remove_stale_siblings(target: Path) -> dict[Path, int]:
    """Remove the staging siblings of ``target`` whose writer is provably gone: folder -> bytes freed.

    An ``old`` sibling (the previous target, moved aside during a swap) is kept while ``target`` does not
    exist: it may hold the only copy."""
    removed = {}
    for kind in KINDS:
        if kind == "old" and not target.exists():
            continue
        for marker in sorted(target.parent.glob(f".{glob.escape(target.name)}.{kind}-*{MARKER_SUFFIX}")):
            folder = Path(str(marker)[: -len(MARKER_SUFFIX)])
            if marker.is_file() and not folder.is_symlink() and _writer_gone(marker):
                removed[folder] = _size(folder)
                release_sibling(folder)
    return removed


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
