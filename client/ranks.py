"""A site with several devices: its service (client/service.py) trains on N local ranks, one process each.

`devices = N` in site.toml's [device] table (or `m3fm-client start --devices N`) makes the service start N rank
processes (`python -m client.service --rank R ...`), joined in one torch.distributed group ("cpu:gloo,cuda:nccl": NCCL for the
gradients on GPUs, gloo for everything on CPU). Each rank opens the site itself (data, tokenizer, its own model on
GPU r) and keeps it warm, as the service does with one device. The service stays the only one that talks to the
ClientApp relay; it passes each request down to the ranks over a private socket pair per rank (client/channel.py
frames) and relays rank 0's answer:
- training (and a SecAgg+ round's chunk 0, which trains) goes to every rank: multitask steps are task-parallel,
  pretraining steps data-parallel over their micro-batches (m3fm/local.py, m3fm/distributed.py), and rank 0's
  reply carries the site's totals, the same whatever N is;
- evaluation, reports and later SecAgg+ chunks go to rank 0 alone.

A rank that dies or fails takes the request down with it: the service stops every rank (by the pids it started),
answers the relay with an error naming the rank (the coordinator sees this site fail the round), and starts a fresh
group for the next request. Nothing is left waiting in a collective.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from client.channel import SECURE, TRAIN, recv_frame, send_frame
from m3fm.distributed import Ranks
from transport.protocol import CHUNK_KEY

COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # a rank stuck in a collective this long fails the request


class RankFailure(RuntimeError):
    """A rank died or failed during a request; the group was stopped and the next request starts a new one."""


def every_rank(header: dict) -> bool:
    """Requests that train need all ranks; the rest are rank 0's alone."""
    return header["op"] == TRAIN or (header["op"] == SECURE and int(header["config"].get(CHUNK_KEY, 0)) == 0)


class RankGroup:
    """N rank processes of one site, started lazily, stopped as a whole when any of them fails."""

    def __init__(self, site_dir: Path, world: int, work_dir: Path, log: Callable[[str], None],
                 log_path: Path | None = None):
        self.site_dir, self.world, self.work_dir, self.log, self.log_path = site_dir, world, work_dir, log, log_path
        self.procs: list[subprocess.Popen] = []
        self.socks: list[socket.socket] = []
        self.rendezvous: Path | None = None

    def start(self) -> None:
        from transport.flower import flower_env
        from transport.processes import die_with_parent

        (self.work_dir / "service").mkdir(parents=True, exist_ok=True)
        self.rendezvous = Path(tempfile.mkdtemp(prefix="ranks-", dir=self.work_dir / "service"))
        out = open(self.log_path, "ab") if self.log_path else None
        env = {"GLOO_SOCKET_IFNAME": "lo", **flower_env()}  # the ranks are on this machine: loopback only
        for rank in range(self.world):
            mine, theirs = socket.socketpair()
            args = [sys.executable, "-m", "client.service", "--site", str(self.site_dir), "--rank", str(rank),
                    "--world", str(self.world), "--init", f"file://{self.rendezvous / 'store'}",
                    "--fd", str(theirs.fileno())] + (["--log", str(self.log_path)] if self.log_path else [])
            self.procs.append(subprocess.Popen(args, pass_fds=(theirs.fileno(),), stdout=out, stderr=out,
                                               env=env, preexec_fn=die_with_parent))
            theirs.close()
            self.socks.append(mine)
        (self.work_dir / "service" / "ranks.json").write_text(json.dumps({"pids": [p.pid for p in self.procs]}))
        self.log(f"started {self.world} ranks: pids {[p.pid for p in self.procs]}")

    def request(self, header: dict, arrays: dict[str, np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
        """Pass one request to the ranks it needs -> rank 0's answer; RankFailure when any of them fails."""
        if not self.procs:
            self.start()
        targets = list(range(self.world)) if every_rank(header) else [0]
        broken: list[str] = []

        def send(r: int) -> None:  # in threads: a rank that never reads (stuck, or dead) must not block the others
            try:
                send_frame(self.socks[r], header, arrays)
            except OSError as e:
                broken.append(f"the channel to rank {r} broke ({e})")

        senders = [threading.Thread(target=send, args=(r,), daemon=True) for r in targets]
        for t in senders:
            t.start()
        try:
            return self._answers(targets, broken)
        except RankFailure:
            self.stop()  # a sender still blocked on a rank's socket fails once the rank is gone
            raise
        finally:
            for t in senders:
                t.join(timeout=30)

    def _answers(self, targets: list[int], broken: list[str]) -> tuple[dict, dict[str, np.ndarray]]:
        again = "all ranks stopped, the next request starts them again"
        waiting, first = {self.socks[r].fileno(): r for r in targets}, None
        while waiting:
            ready, _, _ = select.select(list(waiting), [], [], 1.0)
            if not ready and (why := self._dead() or "; ".join(broken)):
                raise RankFailure(f"{why} during the request; {again}")
            for fd in ready:
                r = waiting.pop(fd)
                try:
                    answer, out = recv_frame(self.socks[r])
                except (OSError, ConnectionError):
                    time.sleep(0.5)  # its exit code, if it is exiting
                    why = self._dead() or f"rank {r} closed its channel"
                    raise RankFailure(f"{why} during the request; {again}") from None
                if "error" in answer:
                    time.sleep(0.5)  # a rank that died makes the others fail in their collective: name it instead
                    why = self._dead() or f"rank {r} failed: {answer['error']}"
                    raise RankFailure(f"{why}; {again}")
                if r == 0:
                    first = (answer, out)
        return first

    def _dead(self) -> str:
        gone = [(r, p) for r, p in enumerate(self.procs) if p.poll() is not None]
        return ", ".join(f"rank {r} (pid {p.pid}) exited with code {p.returncode}" for r, p in gone)

    def stop(self) -> None:
        """Stop every rank this group started (by pid), wait for them, and forget the group."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for s in self.socks:
            s.close()
        if self.rendezvous is not None:
            shutil.rmtree(self.rendezvous, ignore_errors=True)
        if self.procs:
            self.log(f"stopped ranks {[p.pid for p in self.procs]}")
        self.procs, self.socks, self.rendezvous = [], [], None


def join_group(rank: int, world: int, init: str, cuda: bool) -> Ranks:
    """This process as rank `rank` of the site's group: on GPU `rank` when the site trains on GPUs."""
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", init_method=init, rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    return Ranks(rank, world)


def serve_rank(sock: socket.socket, handle, log: Callable[[str], None]) -> None:
    """Answer the service's requests (handle(header, arrays) -> answer; ranks other than 0 answer training with
    nothing, client/service.py) until it closes the channel."""
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        try:
            header, arrays = recv_frame(sock)
        except (OSError, ConnectionError):
            break  # the service closed the group
        try:
            answer, out = handle(header, arrays)
        except Exception as e:  # noqa: BLE001 - the service stops the group and reports it
            log(f"request failed: {traceback.format_exc()}")
            answer, out = {"error": f"{type(e).__name__}: {e}"}, {}
        del arrays
        send_frame(sock, answer, out)
    dist.destroy_process_group()
