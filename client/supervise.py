"""`m3fm-client start` keeps its SuperNode healthy, judged by what the SuperNode logs, not only by its exit.

The policy (docs/deployment.md, "How failures show"):
- Certificate and key files are parsed before anything starts (privacy/certs.py); a bad one stops the command
  with exit 2, naming the file.
- The SuperNode runs as transport/supernode.py, which exits when its main thread dies, so a dead connection
  never hides behind a live process.
- It exits before it ever reached the SuperLink: a configuration problem (certificate, refused key, address);
  reported with the reason from its log, not restarted, exit 1.
- It exits after it had been connected: reported and restarted, at most `restarts` times (backoff 2, 4, ... 30 s);
  then exit 1. When Flower gave up reconnecting by itself (`--max-retries`), that is final: exit 1.
- The site's warm service (client/service.py) starts first; the SuperNode starts once the service listens. A
  service that dies is reported and restarted (backoff 2, 4, ... 30 s, reset after a minute alive); the round it
  was serving becomes an error reply, and the next round is served by the new one.
- It has not reached the SuperLink for `offline_limit` seconds (Flower logs every failed attempt and the first
  success after them): reported once per outage with the last error, and again when it reconnects; Flower keeps
  retrying meanwhile, so a coordinator that comes back finds its sites.
"""

from __future__ import annotations

import re
import subprocess
import sys
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


def start_site_service(site_dir: Path, socket: Path, log_path: Path, devices: int | None = None) -> subprocess.Popen:
    """A site's warm service (client/service.py), on `devices` local ranks (None: site.toml's); it gets SIGTERM when
    whoever started it dies."""
    from transport.flower import flower_env
    from transport.processes import die_with_parent

    args = [sys.executable, "-m", "client.service", "--site", str(site_dir), "--socket", str(socket),
            "--log", str(log_path)] + (["--devices", str(devices)] if devices else [])
    log = open(log_path, "ab")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=flower_env(), preexec_fn=die_with_parent)


class ServiceKeeper:
    """The site's warm service beside the SuperNode: started before it, restarted whenever it dies.
    start() -> a Popen of `python -m client.service ...` that listens on `socket` once the site is open."""

    def __init__(self, start: Callable[[], object], socket: Path, say: Callable[[str], None],
                 ready_timeout: float = 600.0):
        self.start, self.socket, self.say, self.ready_timeout = start, Path(socket), say, ready_timeout
        self.proc, self.started, self.failures, self.next_try = None, 0.0, 0, 0.0

    def launch(self) -> None:
        """Start it and wait until it listens (a bounded wait); RuntimeError when it exits first or never listens."""
        self.socket.unlink(missing_ok=True)  # a dead service's socket must not pass for a live one
        self.proc, self.started = self.start(), time.monotonic()
        while not self.listening():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the site service exited with code {self.proc.returncode} before it listened")
            if time.monotonic() - self.started > self.ready_timeout:
                raise RuntimeError(f"the site service did not listen on {self.socket} within {self.ready_timeout:.0f} s")
            time.sleep(0.2)

    def listening(self) -> bool:
        import socket

        with socket.socket(socket.AF_UNIX) as s:
            return s.connect_ex(str(self.socket)) == 0

    def check(self) -> None:
        """Called on every supervision tick: restart a service that died (with backoff)."""
        if self.proc is None or self.proc.poll() is None or time.monotonic() < self.next_try:
            return
        alive = time.monotonic() - self.started
        self.failures = 1 if alive > 60 else self.failures + 1
        self.say(f"[yellow]the site service (pid {self.proc.pid}) exited with code {self.proc.returncode}[/yellow] "
                 f"after {alive:.0f} s; restarting it")
        try:
            self.launch()
            self.say(f"site service restarted: pid {self.proc.pid}")
        except RuntimeError as e:
            backoff = min(30, 2 ** self.failures)
            self.say(f"[red]{e}[/red]; trying again in {backoff} s")
            self.next_try = time.monotonic() + backoff


def supervise(start: Callable[[], object], log_path: Path, superlink: str, offline_limit: float, restarts: int,
              say: Callable[[str], None], stopping: dict, stop: Callable[[object], int | None],
              poll_s: float = 0.5, tick: Callable[[], None] = lambda: None) -> int:
    """Run and watch the SuperNode (start() -> a Popen) until `stopping` is set or it fails for good; -> exit code
    for `m3fm-client start` (0 stopped on request, 1 failed). tick(): the service keeper's check, every poll."""
    restarted = 0
    while True:
        watch = SuperNodeLog.from_end(log_path)
        node = start()
        started, reported = time.monotonic(), False
        while node.poll() is None and not stopping:
            time.sleep(poll_s)
            tick()
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
