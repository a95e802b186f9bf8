"""The coordinator's process lifecycle: one coordinator per run folder, its whole process tree dies with it, and a
run whose coordinator vanished is shown as killed, not running.

- A lock file (`flock`, held while the process lives; the kernel drops it when the process dies, SIGKILL
  included) makes a second `m3fm-server run` on the same out_dir refuse to start.
- The SuperLink gets SIGTERM when its parent dies (PR_SET_PDEATHSIG). Flower starts its executor
  (flower-superexec) and each flwr-serverapp in sessions of their own, so a signal to our process group does not
  reach them; their own parent monitors usually end them, and the ServerApp also watches the coordinator itself
  (`watch_coordinator`). As a last guard the coordinator writes its process tree (pid, start time, command) to
  `processes.json` while it runs, and the next coordinator on the folder kills whatever of that tree is still
  alive before it starts a SuperLink, checked by start time so a reused pid is never touched.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
from pathlib import Path

from transport.processes import is_alive

# A ServerApp output line that starts with this is for the operator: the coordinator repeats it on its console.
# (Flower keeps the ServerApp's output at the SuperLink; the coordinator streams it into serverapp.log.)
OPERATOR_NOTE = "m3fm note: "


class OperatorNotes:
    """The operator's lines of a growing serverapp.log, each once, without the OPERATOR_NOTE prefix."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = Path(path), 0, b""

    def new(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")  # a line still being written waits
        return [line[len(OPERATOR_NOTE):] for line in (raw.decode(errors="replace").strip() for raw in lines)
                if line.startswith(OPERATOR_NOTE)]


class CoordinatorBusy(RuntimeError):
    pass


class CoordinatorLock:
    """An exclusive flock on PATH for this process's life; the file says who holds it."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        for _ in range(20):  # a coordinator that is just exiting still holds it for a moment
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.1)
        else:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CoordinatorBusy(f"another coordinator is running on {self.path.parent.parent} ({holder}); stop it "
                                  "first (Ctrl-C or SIGTERM to its `m3fm-server run`), then --resume") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def watch_coordinator(identity: str, every_s: float = 1.0) -> None:
    """In the ServerApp: end this process as soon as the coordinator that submitted the run is gone, so no
    ServerApp outlives it to talk to a later SuperLink."""
    def watch() -> None:
        while is_alive(identity):
            time.sleep(every_s)
        os._exit(70)

    threading.Thread(target=watch, name="coordinator-watch", daemon=True).start()
