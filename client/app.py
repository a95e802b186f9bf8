"""The site's Flower ClientApp: a thin relay to the site's warm service (client/service.py). No torch here.

Flower starts this app in a new process for every message, so it only converts the message's records to a
request on the site's private channel (client/channel.py), waits, and converts the answer back. A SuperNode
started by `m3fm-client start` names its service's socket in its node config (`service-socket`); without one
(Ray simulation, in-process grids) the service is this process's own (`local_service`), warm across the
messages an actor runs. Message types and records: transport/protocol.py. SecAgg+ rounds are plain `train`
messages whose protocol stages `secaggplus_mod` answers before `secure_train` is called.
"""

import json
import time
from pathlib import Path

import flwr.compat.common.recorddict_compat as compat
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client import channel
from transport.lean_masking import lean_collect_stage
from transport.masked_arrays import masked_vectors_as_arrays
from transport.processes import process_age
from transport.protocol import (ARRAYS, CLIENTAPP_AGE, CLIENTAPP_STARTED, CONFIG, METRICS, PACKED_ORDER_KEY,
                                RELAY_ANSWERED, RELAY_TIME, REPORT_JSON, REPORT_RECORD, SERVICE_SOCKET, SIM_SITES, SITE,
                                SITE_DIR, SITE_ID, SKIPPED, TRAIN)
from transport.wire import record_like


def clip_for_central_dp(msg: Message, context: Context, call_next) -> Message:
    """Flower's fixedclipping_mod when the server asks for client-side clipping (central DP); a reply without
    weights (the site skipped the round) passes as it is, where the mod would turn it into an error."""
    if not msg.metadata.message_type.startswith(f"{TRAIN}.") or KEY_CLIPPING_NORM not in msg.content[CONFIG]:
        return call_next(msg, context)  # SecAgg+ rounds ("train") clip inside secure_train
    reply = call_next(msg, context)
    if reply.has_error() or ARRAYS not in reply.content.array_records:
        return reply
    return fixedclipping_mod(msg, context, lambda m, c: reply)


# secaggplus_mod runs the SecAgg+ stages of plain "train" messages (server/secure.py) and passes the others on;
# its masked vectors then travel as Arrays (transport/masked_arrays.py)
lean_collect_stage()  # secaggplus_mod's masking in blocks and in place, the same integers
app = ClientApp(mods=[masked_vectors_as_arrays, clip_for_central_dp, secaggplus_mod])


def site_dir_for(node_config: dict, run_config: dict) -> Path:
    """The site a SuperNode serves: its own `site-dir`, or in simulation the partition's entry of `sim-sites`."""
    if SITE_DIR in node_config:
        return Path(str(node_config[SITE_DIR]))
    sites = [p for p in str(run_config.get(SIM_SITES, "")).split(",") if p]
    if "partition-id" in node_config and sites:
        return Path(sites[int(node_config["partition-id"]) % len(sites)])
    raise RuntimeError("this SuperNode serves no site: start it with `m3fm-client start --site SITE_DIR`")


def ask_site(context: Context, op: str, config: dict, arrays: dict) -> tuple[dict, dict]:
    """One request to the site's service -> (answer header, answer arrays)."""
    header = {"op": op, "config": config}
    if SERVICE_SOCKET in context.node_config:
        return channel.call(str(context.node_config[SERVICE_SOCKET]), header, arrays)
    from client.service import local_service  # simulation: torch is imported once per actor, not per message

    return local_service(site_dir_for(context.node_config, context.run_config)).handle(header, arrays)


def _arrays(msg: Message) -> dict:
    return {k: a.numpy() for k, a in msg.content[ARRAYS].items()}


def _train(msg: Message, context: Context) -> Message:
    age, t0 = process_age(), time.perf_counter()
    answer, weights = ask_site(context, channel.TRAIN, dict(msg.content[CONFIG]), _arrays(msg))
    content = RecordDict({SITE: ConfigRecord({SITE_ID: answer[SITE_ID], SKIPPED: answer[SKIPPED]})})
    if "metrics" in answer:
        content[ARRAYS] = record_like(weights, msg.content[ARRAYS])  # joined, as the coordinator sent it
        times = {RELAY_TIME: time.perf_counter() - t0}
        if SERVICE_SOCKET in context.node_config:  # a process per message (a simulation's actor lives on)
            now = time.time()
            times.update({CLIENTAPP_AGE: age, CLIENTAPP_STARTED: now - age - times[RELAY_TIME], RELAY_ANSWERED: now})
        content[METRICS] = MetricRecord({**answer["metrics"], **times})
    return Message(content=content, reply_to=msg)


@app.train("pretrain")
def pretrain(msg: Message, context: Context) -> Message:
    return _train(msg, context)


@app.train("multitask")
def multitask(msg: Message, context: Context) -> Message:
    return _train(msg, context)


@app.train()
def secure_train(msg: Message, context: Context) -> Message:
    """One chunk of a SecAgg+ round (legacy fit messages): the chunk's update values and trained-group marks,
    masked by the mod. Chunk 0 brings the global weights and the site trains; later chunks bring none and the
    site's service answers from the update it kept (transport/secure_chunks.py)."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    packed = dict(zip(str(config[PACKED_ORDER_KEY]).split(","), parameters_to_ndarrays(fitins.parameters)))
    answer, out = ask_site(context, channel.SECURE, config, packed)
    res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([out["values"], out["marks"]]), 1, answer["metrics"])
    return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)


@app.query("report")
def report(msg: Message, context: Context) -> Message:
    """After the run: the site keeps the final model, writes its report, sends back its aggregates
    (client/report.py)."""
    answer, _ = ask_site(context, channel.REPORT, dict(msg.content[CONFIG]), _arrays(msg))
    return Message(RecordDict({REPORT_RECORD: ConfigRecord({REPORT_JSON: json.dumps(answer["report"])})}),
                   reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    answer, _ = ask_site(context, channel.EVALUATE, dict(msg.content[CONFIG]), _arrays(msg))
    content = RecordDict({METRICS: MetricRecord(answer["metrics"]), SITE: ConfigRecord({SITE_ID: answer[SITE_ID]})})
    return Message(content=content, reply_to=msg)
