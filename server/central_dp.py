"""Site-level central DP: Flower's DP strategy wrappers around the task-aware average.

Flower clips every site's whole update to `clipping_norm` (on the server, or at
the site with `fixedclipping_mod`), the inner strategy averages, and the
wrapper adds Gaussian noise. Two things change so the guarantee holds for a
task-aware average:

- Inside each parameter group the sites that trained it count equally (the
  inner strategy runs with `uniform_weights`): sample-count weights would let
  one large site move the average by more than clipping_norm / sites.
- The noise is calibrated per group: a group averaged over k sites gets noise
  of standard deviation noise_multiplier * clipping_norm / k. One site's clipped
  update u moves group g by u_g / k_g, so the whole release is a Gaussian
  mechanism of sensitivity-to-noise ratio ||u|| / (noise_multiplier *
  clipping_norm) <= 1 / noise_multiplier, the same as Flower's uniform case.
  Groups no site trained are released unchanged, so they get no noise.

Which groups a site trains follows from its declared task list, not from
patient data, so k_g is public (replace-one-site adjacency). Epsilon per round
is accounted with Opacus's RDP accountant at sample rate 1 (every site, every
round; no amplification), because Flower's own accountant requires plain
FedAvg.aggregate_train.

Replies are streamed (server/strategy.py) here too. Flower's wrappers would
first collect every reply (`list(replies)`), so their aggregate_train is
replaced by the same steps on the stream: the inner strategy checks each reply
as it arrives, server-side clipping clips it then with Flower's
`compute_clip_model_update` (whole update to clipping_norm, as the wrapper
does), the clipped update is folded into the uniform running sum, and the
aggregate gets the per-group noise once. A reply is checked before it is
clipped (Flower's wrapper clipped first, subtracting arrays of any shape); the
update bound still applies to the clipped update, as before, so which replies
count does not depend on the size of an update.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import (DifferentialPrivacyClientSideFixedClipping,
                                     DifferentialPrivacyServerSideFixedClipping)
from flwr.supercore.differential_privacy import compute_clip_model_update

from privacy.accounting import epsilon_of

MECHANISM = "central-dp per site"  # the unit is a site: its whole update is clipped and noised
from server.strategy import TaskAwareFedAvg
from server.task_sum import array_view, record_values
from transport.protocol import ARRAYS
from transport.wire import arrays_of, npy_array


class TaskAwareCentralDP:
    """Mixin over Flower's fixed-clipping wrappers; `self.strategy` is a TaskAwareFedAvg."""

    delta: float = 1e-5
    releases: int = 0  # aggregates released so far in this run (restored on resume)

    def __getattr__(self, name):  # outcome, who, sent_to, ... live on the inner strategy
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def aggregate_train(self, server_round: int, replies):
        """Flower's wrapper steps on a stream of replies (see the module docstring); errors and bad replies are
        the inner strategy's rejections instead of the end of the round."""
        event = self._pop_pending_event(server_round)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            arrays = self._add_noise_to_aggregated_arrays(arrays)
            self._compose_release(event)
        return arrays, metrics

    def _compose_release(self, event) -> None:  # Flower calls it once per released (noised) aggregate
        self.releases += 1

    def release(self, aggregated: ArrayRecord) -> ArrayRecord:
        """Noise an aggregate made elsewhere (a SecAgg+ round's unmasked mean) and count the release."""
        noisy = self._add_noise_to_aggregated_arrays(aggregated)
        self._compose_release(None)
        return noisy

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        rng = np.random.default_rng()
        out = {}
        for key, a in aggregated.items():
            k = self.strategy.outcome.contributors.get(key, 0)
            if k == 0:
                out[key] = a
                continue
            x = array_view(a)
            std = self.noise_multiplier * self.clipping_norm / k
            out[key] = npy_array((x + rng.normal(0.0, std, x.shape)).astype(x.dtype))
        return ArrayRecord(out)

    def epsilon(self, releases: int | None = None) -> float:
        """After `releases` aggregates (default: all so far); Opacus's RDP at sample rate 1."""
        return epsilon_of([(self.noise_multiplier, 1.0, self.releases if releases is None else releases)], self.delta)

    def state(self) -> dict[str, np.ndarray]:
        return {**self.strategy.state(), "central_dp/releases": np.array([self.releases], dtype=np.int64)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.releases = int(state.get("central_dp/releases", np.zeros(1))[0])
        self.strategy.load_state({k: v for k, v in state.items() if not k.startswith("central_dp/")})


class ServerClippingDP(TaskAwareCentralDP, DifferentialPrivacyServerSideFixedClipping):
    def clip_reply(self, msg: Message) -> None:
        """Clip a checked reply's whole update to clipping_norm, in the message (as Flower's wrapper does)."""
        reference = self.strategy.reference
        values = record_values(arrays_of(msg.content), reference)  # checked: it fits
        clipped = [values[k] for k in reference]
        compute_clip_model_update(param1=clipped, param2=list(reference.values()), clipping_norm=self.clipping_norm)
        msg.content[ARRAYS] = ArrayRecord({k: npy_array(v) for k, v in zip(reference, clipped)})


class ClientClippingDP(TaskAwareCentralDP, DifferentialPrivacyClientSideFixedClipping):
    pass


def wrap_central_dp(strategy: TaskAwareFedAvg, noise_multiplier: float, clipping_norm: float, clipping: str,
                    num_sites: int, delta: float):
    strategy.uniform_weights = True
    cls = {"server": ServerClippingDP, "client": ClientClippingDP}[clipping]
    wrapped = cls(strategy, noise_multiplier, clipping_norm, num_sites)
    wrapped.delta = delta
    if clipping == "server":
        strategy.clip_reply = wrapped.clip_reply
    return wrapped
