"""A site's warm service: what is expensive is built once and kept between rounds.

Flower 1.41 starts a new ClientApp process for every message (its SuperNode's subprocess isolation); before this
service each of them imported torch, reopened the site's database and crops, rebuilt the model and the tokenizer.
Now `m3fm-client start` runs this service beside its SuperNode:

    python -m client.service --site SITE_DIR --socket PATH

and the ClientApp (client/app.py) only relays each message here over the site's private channel
(client/channel.py). In Ray simulation the same SiteService lives in each actor's process (`local_service`).

What stays warm: the opened site (data, tokenizer, one model on the site's device; client/federated.py's
OpenSite). It is reopened when the site was re-ingested, its site.toml changed, or a run asks for another model
configuration, so no request is served from stale state; every request loads the incoming weights. Under DP-SGD
the accountant's state is the site's ledger on disk (privacy/dp_sgd.py), read at each round.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
import traceback
from collections import OrderedDict
from pathlib import Path

import numpy as np

from client.channel import EVALUATE, REPORT, SECURE, TRAIN, listen, recv_frame, send_frame
from client.ranks import RankGroup, join_group, serve_rank
from client.federated import (OpenSite, check_tokenizer, evaluate_round, last_ingest, load_weights, open_site,
                              secure_folder, secure_round_id, secure_update, train_round, uses_cuda)
from client.site import SiteConfig, load_site
from m3fm.distributed import Ranks
from m3fm.weights.packing import packed_sizes, split_joined
from transport.protocol import CHUNK_KEY, SERVICE_TIME, SITE_ID, SKIPPED
from transport.secure_chunks import ChunkedUpdate, answer_chunk

OPS = (TRAIN, SECURE, EVALUATE, REPORT)


def packed_weights(o: OpenSite, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The relayed weights as the model's packed vectors: they travel joined, one vector per dtype
    (transport/wire.py); already packed ones (in-process callers) pass as they are."""
    sizes = packed_sizes(o.model.state_dict())
    return arrays if arrays.keys() == sizes.keys() else split_joined(arrays, sizes)


class SiteService:
    """One site, opened once and reused; `handle` answers one relayed request. A site with several devices passes
    each request to its ranks (client/ranks.py), each of which runs a SiteService of its own with `ranks` set."""

    def __init__(self, site_dir: Path, log=None, devices: int | None = None, ranks: Ranks | None = None,
                 log_path: Path | None = None):
        self.site_dir = Path(site_dir).resolve()
        self.devices, self.ranks, self.log_path = devices, ranks, log_path  # devices: overrides site.toml's
        self.group: RankGroup | None = None
        self.opened: OpenSite | None = None
        self.key: tuple | None = None  # what `opened` was built from
        self.builds = 0  # models built by this service (the count the warm-runtime test checks)
        self.requests = 0
        self.log = log or (lambda line: None)

    def site(self, model_name: str, site: SiteConfig | None = None) -> OpenSite:
        """The opened site for this model configuration, reopened when the site or its configuration changed.
        site: its site.toml as the caller loaded it for this request."""
        site = site or load_site(self.site_dir)  # names a missing or broken site.toml
        st = (self.site_dir / "site.toml").stat()
        key = (st.st_mtime_ns, st.st_size, last_ingest(site)[0], model_name)
        if self.opened is None or key != self.key:
            why = "first request" if self.key is None else "site re-ingested, site.toml or model changed"
            self.opened, self.key = None, None  # free the old model before building the next
            self.opened, self.key = open_site(site, model_name, self.ranks), key
            self.builds += 1
            self.log(f"opened {site.site_id} for model {model_name} ({why}); models built: {self.builds}")
        return self.opened

    def handle(self, header: dict, arrays: dict[str, np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
        """A relayed request {op, config} with the packed global weights -> (answer header, answer arrays)."""
        op, config = header["op"], header["config"]
        if op not in OPS:
            raise ValueError(f"unknown request {op!r}; expected one of {OPS}")
        self.requests += 1
        what = f"request {self.requests}: {op} {config.get('phase', '')} round {config.get('server-round', '')}"
        self.log(f"{what} started")
        t0 = time.perf_counter()
        site = load_site(self.site_dir)  # once a request: site.toml may have changed since the last one
        if (group := self.rank_group(site)) is not None:
            answer, out = group.request(header, arrays)
        else:
            o = self.site(str(config["model"]), site)
            try:
                answer, out = self._run(op, o, config, arrays)
            except BaseException:
                self.opened, self.key = None, None  # a request that failed half-way may leave the model changed
                raise
        took = time.perf_counter() - t0
        if "metrics" in answer and op == TRAIN:
            answer["metrics"][SERVICE_TIME] = took
        self.log(f"{what} in {took:.2f}s (pid {os.getpid()}, models built {self.builds})")
        return answer, out

    def rank_group(self, site: SiteConfig | None = None) -> RankGroup | None:
        """The site's ranks when it trains on several devices (started on first use, restarted when the number of
        devices in site.toml changes); None when this process trains alone or is itself a rank. site: its site.toml
        as the caller loaded it for this request."""
        if self.ranks is not None:
            return None
        site = site or load_site(self.site_dir)
        world = self.devices or site.devices
        if self.group is not None and self.group.world != world:
            self.group.stop()
            self.group = None
        if world > 1 and self.group is None:
            uses_cuda(site, world)  # names a site that asks for more GPUs than the machine has
            self.opened, self.key = None, None  # the ranks hold the models now
            self.group = RankGroup(self.site_dir, world, site.work_dir, self.log, self.log_path)
        return self.group

    def _secure_chunk(self, o: OpenSite, config: dict, packed: dict[str, np.ndarray]):
        """A SecAgg+ chunk: chunk 0 trains and saves the update in the site's work folder; later chunks of the same
        round are read from there (by whichever process of the site is asked), and the last removes it."""
        metrics = {}

        def train() -> ChunkedUpdate:
            update, metrics["sent"] = secure_update(o, packed, config)
            return update

        values, marks = answer_chunk(secure_folder(o), secure_round_id(config), int(config.get(CHUNK_KEY, 0)), train)
        return {"metrics": metrics.get("sent", {})}, {"values": values, "marks": marks}

    def _run(self, op: str, o: OpenSite, config: dict, arrays: dict[str, np.ndarray]):
        check_tokenizer(o, config)
        if op != SECURE:  # SecAgg+ sends the packed vectors in its own order (server/secure.py)
            arrays = packed_weights(o, arrays)
        if o.ranks is not None and o.ranks.rank > 0 and op in (TRAIN, SECURE):  # (SecAgg: chunk 0) its steps' share;
            train_round(o, arrays, config, send=False)  # rank 0 answers for the site and keeps SecAgg's update
            return {}, {}
        if op == TRAIN:
            weights, result = train_round(o, arrays, config)
            answer = {SITE_ID: o.site.site_id, SKIPPED: result.skipped}
            return ({**answer, "metrics": result.to_metrics()}, weights) if weights is not None else (answer, {})
        if op == SECURE:
            return self._secure_chunk(o, config, arrays)
        if op == EVALUATE:
            return {SITE_ID: o.site.site_id, "metrics": evaluate_round(o, arrays, config)}, {}
        from client.report import report_round  # matplotlib and scipy: only once a report is asked for

        load_weights(o, arrays)
        return {"report": report_round(o, config)}, {}


_local: OrderedDict[Path, SiteService] = OrderedDict()
LOCAL_SITES = 8  # warm sites one process keeps (a Ray actor may serve several virtual sites in turn)


def local_service(site_dir: Path) -> SiteService:
    """This process's own service for a site: Ray simulation actors and in-process grids."""
    key = Path(site_dir).resolve()
    service = _local.pop(key, None) or SiteService(key)
    _local[key] = service
    while len(_local) > LOCAL_SITES:
        _local.popitem(last=False)
    return service


def log_to(path: Path | None, who: str):
    log_file = open(path, "a", buffering=1) if path else sys.stderr

    def log(line: str) -> None:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{who} pid {os.getpid()}] {line}", file=log_file, flush=True)
    return log


def serve(site_dir: Path, socket_path: Path, log_path: Path | None = None, devices: int | None = None) -> None:
    """Answer relayed requests one at a time until SIGTERM; the site (or its ranks) is opened before the first one
    arrives."""
    log = log_to(log_path, "service")
    service = SiteService(site_dir, log, devices=devices, log_path=log_path)
    site = load_site(service.site_dir)
    try:
        if (group := service.rank_group(site)) is not None:
            group.start()  # each rank opens the site: data, tokenizer, its model
        else:
            service.site(site.model_config, site)  # warm before the first round: data, tokenizer, model
    except Exception as e:  # noqa: BLE001 - the run's first request reports it again, to the coordinator
        log(f"could not open the site yet: {type(e).__name__}: {e}")
    server = listen(socket_path)
    def stop(*_):
        server.close()
        socket_path.unlink(missing_ok=True)  # no socket left behind for a relay to find dead
        if service.group is not None:
            service.group.stop()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    (socket_path.parent / "service.json").write_text(json.dumps({"pid": os.getpid(), "socket": str(socket_path)}))
    log(f"listening on {socket_path}")
    while True:
        conn, _ = server.accept()
        with conn:
            try:
                header, arrays = recv_frame(conn)
            except (OSError, ConnectionError, ValueError) as e:
                log(f"dropped a malformed request: {e}")
                continue
            try:
                answer, out = service.handle(header, arrays)
            except Exception as e:  # noqa: BLE001 - the relay raises it, Flower turns it into an error reply
                log(f"request failed: {traceback.format_exc()}")
                answer, out = {"error": f"{type(e).__name__}: {e}"}, {}
            del arrays
            try:
                send_frame(conn, answer, out)
            except OSError as e:  # the relay went away (its message timed out): the next request is unaffected
                log(f"could not answer: {e}")


def serve_as_rank(site_dir: Path, rank: int, world: int, init: str, fd: int, log_path: Path | None) -> None:
    """One of the site's ranks (started by client/ranks.py's RankGroup): join the group, open the site, answer."""
    log = log_to(log_path, f"rank {rank}")
    ranks = join_group(rank, world, init, uses_cuda(load_site(site_dir), world))
    service = SiteService(site_dir, log, ranks=ranks)
    try:
        service.site(load_site(service.site_dir).model_config)
    except Exception as e:  # noqa: BLE001 - the first request reports it again
        log(f"could not open the site yet: {type(e).__name__}: {e}")
    log(f"rank {rank} of {world} ready")
    serve_rank(socket.socket(fileno=fd), service.handle, log)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--site", type=Path, required=True)
    p.add_argument("--socket", type=Path, help="where to listen for the ClientApp relay")
    p.add_argument("--log", type=Path)
    p.add_argument("--devices", type=int, help="local ranks to train on (default: site.toml [device] devices)")
    p.add_argument("--rank", type=int, help="run as this rank of a site's group (client/ranks.py)")
    p.add_argument("--world", type=int)
    p.add_argument("--init", help="the group's rendezvous (torch.distributed init_method)")
    p.add_argument("--fd", type=int, help="the socket inherited from the service")
    a = p.parse_args()
    if a.rank is not None:
        serve_as_rank(a.site, a.rank, a.world, a.init, a.fd, a.log)
    else:
        serve(a.site, a.socket, a.log, a.devices)


if __name__ == "__main__":
    main()
