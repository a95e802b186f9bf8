"""Processes by identity: a pid plus its start time names one process for its whole life (a pid alone may be
reused), so a recorded process tree can be checked and stopped later without touching anyone else's process."""

from __future__ import annotations

import ctypes
import json
import os
import signal
from pathlib import Path

PR_SET_PDEATHSIG = 1


def _stat(pid: int | str) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on: the command name before it may hold spaces; None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None when it is gone."""
    fields = _stat(pid)
    return None if fields is None else int(fields[19])


def process_age(pid: int | str = "self") -> float:
    """Seconds since the process started (/proc's clock-tick resolution)."""
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - int(_stat(pid)[19]) / os.sysconf("SC_CLK_TCK")


def proc_identity(pid: int) -> str:
    """'pid:start': names one process for its whole life (a pid alone may be reused)."""
    return f"{pid}:{proc_start(pid)}"


def is_alive(identity: str) -> bool:
    pid, start = identity.split(":")
    return start != "None" and str(proc_start(int(pid))) == start


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(entry.name)) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def record_tree(path: Path, root: int) -> None:
    """Every descendant of `root` with its start time and command (atomic write)."""
    tree = {}
    for pid in descendants(root):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if (start := proc_start(pid)) is not None:
            tree[str(pid)] = {"start": start, "cmd": cmd[:300]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(tree), encoding="utf-8")
    os.replace(tmp, path)


def stop_leftovers(path: Path) -> list[str]:
    """Kill what is still alive of a previous coordinator's recorded tree; -> 'cmd (pid N)' of each."""
    try:
        tree = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return []
    stopped = []
    for pid, p in tree.items():
        if proc_start(int(pid)) == p["start"]:
            try:
                os.kill(int(pid), signal.SIGKILL)
                stopped.append(f"{p['cmd'].split(' ')[0].rsplit('/', 1)[-1]} (pid {pid})")
            except ProcessLookupError:
                pass
    path.unlink(missing_ok=True)
    return stopped


def die_with_parent() -> None:
    """A Popen preexec_fn: the child gets SIGTERM when the process that started it dies (Linux)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
