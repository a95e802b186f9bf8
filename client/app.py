"""The site's Flower ClientApp: routes the coordinator's messages to client/federated.py.

Message types: `train.pretrain`, `train.multitask`, `evaluate` and, after the
last round, `query.report`; plain `train`
messages are SecAgg+ rounds (server/secure.py), whose protocol stages
`secaggplus_mod` answers before `secure_train` is called. Weights travel
packed, one vector per parameter group (m3fm/model/packing.py). Replies carry
them ("arrays"), counts and metrics ("metrics") and the site's id
("site"); a site that did not train says why in "site" and sends no weights.
"""

import json

import flwr.compat.common.recorddict_compat as compat
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, clip_inputs_inplace

from client.federated import evaluate_round, secure_update, site_for, train_round
from transport.protocol import PACKED_ORDER_KEY


def clip_for_central_dp(msg: Message, context: Context, call_next) -> Message:
    """Flower's fixedclipping_mod when the server asks for client-side clipping (central DP); a reply without
    weights (the site skipped the round) passes as it is, where the mod would turn it into an error."""
    if not msg.metadata.message_type.startswith("train.") or KEY_CLIPPING_NORM not in msg.content["config"]:
        return call_next(msg, context)  # SecAgg+ rounds ("train") clip inside secure_train
    reply = call_next(msg, context)
    if reply.has_error() or "arrays" not in reply.content.array_records:
        return reply
    return fixedclipping_mod(msg, context, lambda m, c: reply)


# secaggplus_mod runs the SecAgg+ stages of plain "train" messages (server/secure.py) and passes the others on
app = ClientApp(mods=[clip_for_central_dp, secaggplus_mod])


def _arrays(msg: Message) -> dict:
    return {k: a.numpy() for k, a in msg.content["arrays"].items()}


def _train(msg: Message, context: Context) -> Message:
    site = site_for(context.node_config, context.run_config)
    config = dict(msg.content["config"])
    weights, metrics, skipped = train_round(site, _arrays(msg), config)
    content = RecordDict({"site": ConfigRecord({"site_id": site.site_id, "skipped": skipped or ""})})
    if weights is not None:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in weights.items()})
        content["metrics"] = MetricRecord(metrics)
    return Message(content=content, reply_to=msg)


@app.train("pretrain")
def pretrain(msg: Message, context: Context) -> Message:
    return _train(msg, context)


@app.train("multitask")
def multitask(msg: Message, context: Context) -> Message:
    return _train(msg, context)


@app.train()
def secure_train(msg: Message, context: Context) -> Message:
    """A SecAgg+ round (legacy fit messages): the site's update and trained-group indicators, masked by the mod."""
    site = site_for(context.node_config, context.run_config)
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    packed = dict(zip(str(config[PACKED_ORDER_KEY]).split(","), parameters_to_ndarrays(fitins.parameters)))
    updates, indicators, metrics = secure_update(site, packed, config)
    if KEY_CLIPPING_NORM in config:  # central DP with client-side clipping: bound the update before masking
        clip_inputs_inplace(updates, float(config[KEY_CLIPPING_NORM]))
    res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(updates + indicators), 1, metrics)
    return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)


@app.query("report")
def report(msg: Message, context: Context) -> Message:
    """After the run: keep the final model, write the site's report, send back its aggregates (client/report.py)."""
    from client.report import report_round  # matplotlib and scipy: only the process that writes a report

    site = site_for(context.node_config, context.run_config)
    shared = report_round(site, _arrays(msg), dict(msg.content["config"]))
    return Message(RecordDict({"report": ConfigRecord({"json": json.dumps(shared)})}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    site = site_for(context.node_config, context.run_config)
    metrics = evaluate_round(site, _arrays(msg), dict(msg.content["config"]))
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"site_id": site.site_id})})
    return Message(content=content, reply_to=msg)
