"""`m3fm-client start` keeps its SuperNode healthy, judged by what the SuperNode logs, not only by its exit.

The policy (README, "Running a site"):
- Certificate and key files are parsed before anything starts (privacy/certs.py); a bad one stops the command
  with exit 2, naming the file.
- The SuperNode runs as transport/supernode.py, which exits when its main thread dies, so a dead connection
  never hides behind a live process.
- It exits before it ever reached the SuperLink: a configuration problem (certificate, refused key, address);
  reported with the reason from its log, not restarted, exit 1.
- It exits after it had been connected: reported and restarted, at most `restarts` times (backoff 2, 4, ... 30 s);
  then exit 1. When Flower gave up reconnecting by itself (`--max-retries`), that is final: exit 1.
- It has not reached the SuperLink for `offline_limit` seconds (Flower logs every failed attempt and the first
  success after them): reported once per outage with the last error, and again when it reconnects; Flower keeps
  retrying meanwhile, so a coordinator that comes back finds its sites.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ANSI = re.compile(r"\x1b\[[0-9;]*m")
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)(: .*)?$")  # a traceback's last line


@dataclass
class SuperNodeLog:
    """What a SuperNode's log says about its connection, read incrementally from where it was at start."""
    path: Path
    offset: int = 0
    connected: bool = False
    ever_connected: bool = False
    offline_since: float | None = None  # time.monotonic() of the first failed attempt of this outage
    last_error: str = ""
    gave_up: bool = False
    _partial: str = ""
    _exit_code_line: bool = field(default=False, repr=False)

    @classmethod
    def from_end(cls, path: Path) -> "SuperNodeLog":
        return cls(path, path.stat().st_size if path.exists() else 0)

    def poll(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        text = self._partial + data.decode(errors="replace")
        *lines, self._partial = text.split("\n")
        for line in lines:
            self.feed(ANSI.sub("", line).strip(), now)

    def feed(self, line: str, now: float) -> None:
        if "SuperNode ID:" in line or "Connection successful after" in line or line.endswith("successfully"):
            self.connected, self.ever_connected, self.offline_since = True, True, None
        elif "Connection attempt failed" in line:
            self.connected = False
            self.offline_since = self.offline_since or now
            self.last_error = self.last_error or line.split(":", 1)[-1].strip()
        elif "Giving up reconnection" in line:
            self.gave_up, self.last_error = True, line.split(":", 1)[-1].strip()
        elif self._exit_code_line and line:
            self.last_error = f"{self.last_error}: {line}"
            self._exit_code_line = False
        elif m := re.search(r"Exit Code: (\d+)", line):
            self.last_error, self._exit_code_line = f"Flower exit code {m.group(1)}", True
        elif EXCEPTION_LINE.match(line) and not line.startswith(("INFO", "WARNING", "DEBUG")):
            self.last_error = line

    def offline_for(self, now: float | None = None) -> float:
        return 0.0 if self.offline_since is None else (time.monotonic() if now is None else now) - self.offline_since


def supervise(start: Callable[[], object], log_path: Path, superlink: str, offline_limit: float, restarts: int,
              say: Callable[[str], None], stopping: dict, stop: Callable[[object], int | None],
              poll_s: float = 0.5) -> int:
    """Run and watch the SuperNode (start() -> a Popen) until `stopping` is set or it fails for good; -> exit code
    for `m3fm-client start` (0 stopped on request, 1 failed)."""
    restarted = 0
    while True:
        watch = SuperNodeLog.from_end(log_path)
        node = start()
        started, reported = time.monotonic(), False
        while node.poll() is None and not stopping:
            time.sleep(poll_s)
            watch.poll()
            waiting = watch.offline_for() if watch.ever_connected else time.monotonic() - started
            if not watch.connected and waiting > offline_limit and not reported:
                why = watch.last_error or "no answer"
                say(f"[yellow]the SuperNode has not reached the SuperLink {superlink} for {waiting:.0f} s[/yellow] "
                    f"({why}); Flower keeps retrying; see {log_path}")
                reported = True
            elif watch.connected and reported:
                say(f"the SuperNode reached the SuperLink {superlink} again")
                reported = False
        if stopping:
            code = stop(node)
            say(f"stopped by {stopping['by']}: SuperNode exited with code {code}")
            return 0
        time.sleep(poll_s)  # the last lines it wrote
        watch.poll()
        why = watch.last_error or "no reason in its log"
        if not watch.ever_connected:
            say(f"[red]the SuperNode exited (code {node.returncode}) before it reached the SuperLink {superlink}"
                f"[/red]: {why}; see {log_path}")
            return 1
        if watch.gave_up or restarted >= restarts:
            say(f"[red]the SuperNode exited (code {node.returncode})[/red]: {why}"
                + ("" if watch.gave_up else f"; restarted {restarted} time(s) already") + f"; see {log_path}")
            return 1
        restarted += 1
        backoff = min(30, 2 ** restarted)
        say(f"[yellow]the SuperNode exited (code {node.returncode})[/yellow]: {why}; restarting in {backoff} s "
            f"({restarted} of {restarts})")
        deadline = time.monotonic() + backoff
        while time.monotonic() < deadline and not stopping:
            time.sleep(poll_s)
        if stopping:
            return 0
