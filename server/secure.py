"""Secure aggregation: a training round through Flower's SecAgg+ workflow, task-aware.

SecAgg+ exists only on Flower's legacy API (LegacyContext, legacy Strategy,
`secaggplus_mod` at the sites), as in Flower's `fl-dp-sa` example. The server
learns only the sum of what the sites send, so each site sends (client/app.py)
its update per parameter group, zeroed for groups it did not train, followed by
one "trained it" indicator per group (0, or clipping_range: SecAgg+ clips every
value to that range), all with weight 1. The update travels in chunks, one
SecAgg+ instance each, so no message passes Flower's 2 GiB object cap and no
process holds more than a chunk's masks (transport/secure_chunks.py). The
unmasked mean over K sites then gives, per group, mean(update) and k/K (k
sites trained it):
the group moves by mean(update) * K / k, the uniform task-aware average of
server/central_dp.py, and stays where it was when k = 0. Sites never reveal
their own update or which groups they trained; only per-site counts and losses
(aggregates the site chose to report) travel in clear.

Updates, not weights, are quantized: SecAgg+ clips every value to
[-clipping_range, clipping_range] before quantizing, and updates are small.
Combined with central DP (client-side clipping, `fl-dp-sa`'s pattern), each
site clips its whole update to clipping_norm before masking (client/federated.py)
and the server adds the per-group noise of server/central_dp.py to the unmasked
mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerConfig as LegacyServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

from server.delivery import arrivals
from transport.lean_masking import lean_unmasking
from transport.masked_arrays import masked_vectors_as_bytes
from transport.protocol import CHUNK_KEY, CHUNK_VALUES_KEY, PACKED_ORDER_KEY, TRAINED_MARK_KEY
from transport.secure_chunks import chunk_plan, fold_chunk



@dataclass
class SecAggConfig:
    """[privacy.secagg] of server.toml (Flower's SecAggPlusWorkflow arguments)."""
    num_shares: float = 1.0  # fraction of the round's sites (or a count > 1) each secret is shared with
    reconstruction_threshold: float = 0.67
    clipping_range: float = 1.0  # every update value is clipped to +-this before quantization
    quantization_range: int = 2**22
    modulus_range: int = 2**32
    timeout: float = 600.0
    # values a SecAgg+ instance sums at a time (transport/secure_chunks.py): 2**25 is 256 MiB of masked int64 as
    # Flower's mod and workflow hold it (128 MiB of uint32 on the wire), well under Flower's 2 GiB object cap, and
    # bounds every process's extra memory to a few such vectors
    chunk_values: int = 2**25

    def workflow(self) -> SecAggPlusWorkflow:
        shares = int(self.num_shares) if self.num_shares > 1 else self.num_shares
        threshold = int(self.reconstruction_threshold) if self.reconstruction_threshold > 1 \
            else self.reconstruction_threshold
        return KeysSharedWorkflow(num_shares=shares, reconstruction_threshold=threshold, max_weight=1.0,
                                  clipping_range=self.clipping_range, quantization_range=self.quantization_range,
                                  modulus_range=self.modulus_range, timeout=self.timeout)


class KeysSharedWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, whose unmask stage takes every sampled node that did not send a masked vector as
    dead and asks the others for its key shares. A node lost before it shared its keys (down when the round began,
    or lost in stage 1) left no shares with anyone, and nobody's vector carries a pairwise mask with it (a site masks
    only against the nodes whose shares it received), so every site failed the round with a KeyError
    (secaggplus_mod._unmask) and the server would have found no shares to combine for it. After stage 1 the round's
    sampled set is the nodes that shared keys: exactly those whose masks the sum can hold."""

    def share_keys_stage(self, grid, context, state) -> bool:
        ok = super().share_keys_stage(grid, context, state)
        state.sampled_node_ids = set(state.active_node_ids)
        return ok


class SecureRound(LegacyStrategy):
    """The legacy strategy SecAggPlusWorkflow drives for one round: every given node trains; the workflow hands
    aggregate_fit the unmasked mean (as every result's parameters) and each site's clear metrics."""

    def __init__(self, grid, node_ids: list[int], parameters, config: dict):
        super().__init__()
        self.grid, self.node_ids, self.fit_ins = grid, node_ids, FitIns(parameters, config)
        self.mean: list[np.ndarray] | None = None
        self.site_metrics: list[tuple[int, dict]] = []
        self.failures = []

    def configure_fit(self, server_round, parameters, client_manager):
        run_id = self.grid.run.run_id
        return [(GridClientProxy(node_id=n, grid=self.grid, run_id=run_id), self.fit_ins) for n in self.node_ids]

    def aggregate_fit(self, server_round, results, failures):
        # the workflow's collect stage lists each error reply twice (two loops over the replies): once per Error
        self.failures = list({id(e.args[0]) if e.args else id(e): e for e in failures}.values())
        self.site_metrics = [(proxy.node_id, dict(res.metrics)) for proxy, res in results]
        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class PromptGrid:
    """The grid SecAgg+'s workflow drives: Flower's Grid.send_and_receive sleeps 3 s between looks for replies and
    the workflow calls it once per stage, four times per instance (a chunk), so every stage took 3 s or more. This
    one pushes the same messages and looks every POLL_S (server/delivery.py's arrivals), and hands the workflow each
    masked vector back as secaggplus_mod wrote it (they travel as Arrays: transport/masked_arrays.py); everything
    else is the grid's own. (Through the deployment engine a stage now costs about 1.2 s: benchmarks/secagg.py.)"""

    def __init__(self, grid):
        self.grid = grid

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        pending = {message_id: 0 for message_id in self.grid.push_messages(list(messages))}
        return [masked_vectors_as_bytes(reply)
                for _, reply in arrivals(self.grid, pending, float("inf") if timeout is None else timeout)]


def run_secagg(grid, secagg: SecAggConfig, node_ids: list[int], weights: list[np.ndarray], config: dict,
               server_round: int = 1) -> SecureRound:
    """Flower's SecAgg+ workflow for one round over `node_ids`, through the legacy context it needs;
    -> the round's strategy (the unmasked mean, or None if the protocol halted; each site's clear metrics)."""
    strategy = SecureRound(grid, node_ids, ndarrays_to_parameters(weights), config)
    context = LegacyContext(Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(),
                                    run_config={}), config=LegacyServerConfig(num_rounds=1), strategy=strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()  # unused: SecureRound sends fit_ins
    secagg.workflow()(PromptGrid(grid), context)
    return strategy


def secure_train_round(grid, secagg: SecAggConfig, arrays: ArrayRecord, config: dict, server_round: int,
                       node_ids: list[int]) -> tuple[dict[str, np.ndarray] | None, dict[str, int], SecureRound]:
    """One secure round, a SecAgg+ instance per chunk of the packed update (transport/secure_chunks.py) -> (new
    packed weights or None if any chunk's protocol failed, per key how many sites trained it, the first chunk's
    strategy with each site's clear metrics and every chunk's failures)."""
    lean_unmasking()  # the workflow's sum and unmasking in place, masks drawn in blocks (transport/lean_masking.py)
    weights = {k: a.numpy() for k, a in arrays.items()}  # fresh arrays: the chunks fold into them
    keys = list(weights)
    plan = chunk_plan([(k, weights[k].size) for k in keys], secagg.chunk_values)
    # sites name the vectors by the packed order, and mark a trained group with the largest value SecAgg+ keeps
    config = {**config, PACKED_ORDER_KEY: ",".join(keys), TRAINED_MARK_KEY: secagg.clipping_range,
              CHUNK_VALUES_KEY: secagg.chunk_values}
    contributors: dict[str, int] = {}
    first, failures = None, []
    for c, segments in enumerate(plan):
        # a site trains on chunk 0 and keeps its update; the weights are serialized here, before any fold
        sent = [weights[k] for k in keys] if c == 0 else []
        chunk = run_secagg(grid, secagg, node_ids, sent, {**config, CHUNK_KEY: c}, server_round)
        first, failures = first or chunk, failures + chunk.failures
        if chunk.mean is None:
            first.failures = failures
            return None, {}, first
        for key, k in fold_chunk(weights, segments, chunk.mean, len(chunk.site_metrics),
                                 secagg.clipping_range).items():
            contributors[key] = min(k, contributors.get(key, k))
        node_ids = [node for node, _ in chunk.site_metrics]  # a site lost in this chunk is not asked again
    first.failures = failures
    return weights, {k: contributors.get(k, 0) for k in keys}, first
