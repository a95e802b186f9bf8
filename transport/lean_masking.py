"""SecAgg+'s masking at a site and unmasking at the coordinator with less memory: Flower's own steps, in blocks
and in place.

`secaggplus_mod._collect_masked_vectors` quantizes the site's update and masks it with whole-vector NumPy
expressions, each a new array: `quantize` holds a float64 uniform draw and a float64 difference beside the chunk,
and the private mask stays bound for the whole stage while each pairwise mask is drawn beside the previous one and
added into a third vector. Traced with tracemalloc over a chunk of 2**24 values, its loop as Flower writes it:
29 bytes a value at quantization, 32 while masking, so with chunks of 2**25 values about 1 GB of the fixed working
set a secure round adds at a site (docs/privacy.md).

`lean_collect_stage` rebinds five names in the mod's module (nothing else of Flower's changes):
  quantize                Flower's formula and Flower's `_stochastic_round`, QUANTIZE_BLOCK values at a time,
                          into one int64 vector (Flower's int32 one becomes int64 at the first mask addition, so
                          the masked vector is the same; the draws come from NumPy's global generator in the
                          same order, so even the rounding is);
  pseudo_rand_gen         a `MaskDraw`: the seed, range and shapes of Flower's mask, not drawn yet;
  parameters_addition,    a MaskDraw is drawn block by block, in Flower's order from Flower's generator (NumPy's
  parameters_subtraction  RandomState gives the same numbers drawn in blocks as at once), into the left operand;
                          anything else as Flower does it, in place when the left operand's dtype holds the result
                          (the mod rebinds its name to the result and never reads the operand again);
  parameters_mod          in place (a power-of-two divisor as a bitwise and, as Flower's).
The masks are the ones the coordinator regenerates from the shared seeds to unmask (tests/test_secure.py: drawn
in blocks they equal `pseudo_rand_gen`'s; the secure aggregate equals the plaintext mean within the quantization
step). `lean_unmasking` does the same for the coordinator's SecAggPlusWorkflow: its sum of the masked vectors
(into the first) and the masks it regenerates. Each refuses to start if Flower's module lacks these names.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np

QUANTIZE_BLOCK = 2**20  # values: a block's float64 temporaries are 8 MiB each
MASK_BLOCK = 2**20


def quantize_in_blocks(parameters: list[np.ndarray], clipping_range: float, target_range: int) -> list[np.ndarray]:
    from flwr.common.secure_aggregation.quantization import _stochastic_round

    quantizer = target_range / (2 * clipping_range)
    out = []
    for arr in parameters:
        flat = np.asarray(arr).reshape(-1)
        q = np.empty(flat.shape, dtype=np.int64)
        for i in range(0, flat.size, QUANTIZE_BLOCK):
            part = flat[i:i + QUANTIZE_BLOCK]
            q[i:i + QUANTIZE_BLOCK] = _stochastic_round((np.clip(part, -clipping_range, clipping_range)
                                                         + clipping_range) * quantizer)
        out.append(q.reshape(np.shape(arr)))
    return out


@dataclass
class MaskDraw:
    """`pseudo_rand_gen(seed, num_range, dimensions_list)`, drawn only as it is added."""
    seed: bytes
    num_range: int
    dimensions_list: list[tuple[int, ...]]

    def blocks(self):
        """(array index, flat start, values) in the order Flower's pseudo_rand_gen draws them."""
        assert len(self.seed) & 0x3 == 0
        seed32 = 0
        for i in range(0, len(self.seed), 4):  # Flower's seed derivation (secaggplus_utils.pseudo_rand_gen)
            seed32 ^= int.from_bytes(self.seed[i:i + 4], "little")
        gen = np.random.RandomState(seed32)
        for k, dimension in enumerate(self.dimensions_list):
            if len(dimension) == 0:
                yield k, 0, np.array(gen.randint(0, self.num_range - 1), dtype=np.int64)
                continue
            n = int(np.prod(dimension))
            for start in range(0, n, MASK_BLOCK):
                yield k, start, gen.randint(0, self.num_range - 1, min(MASK_BLOCK, n - start), dtype=np.int64)


def _in_place(op):
    def apply(left: list[np.ndarray], right) -> list[np.ndarray]:
        if isinstance(right, MaskDraw):
            out = [x if isinstance(x, np.ndarray) and x.ndim and x.dtype == np.int64 else np.array(x, np.int64)
                   for x in left]
            for k, start, values in right.blocks():
                flat = out[k].reshape(-1)
                part = flat[start:start + values.size]
                op(part, values, out=part)
            return out
        return [op(x, y, out=x) if isinstance(x, np.ndarray) and x.ndim and x.dtype == np.result_type(x, y)
                else op(x, y) for x, y in zip(left, right)]
    return apply


def parameters_mod_in_place(parameters: list[np.ndarray], divisor: int) -> list[np.ndarray]:
    if bin(divisor).count("1") == 1:
        op, divisor = np.bitwise_and, divisor - 1
    else:
        op = np.mod
    return [op(x, divisor, out=x) if isinstance(x, np.ndarray) and x.ndim else op(x, divisor) for x in parameters]


LEAN = {"quantize": quantize_in_blocks, "pseudo_rand_gen": MaskDraw, "parameters_addition": _in_place(np.add),
        "parameters_subtraction": _in_place(np.subtract), "parameters_mod": parameters_mod_in_place}


WORKFLOW_NAMES = ("pseudo_rand_gen", "parameters_addition", "parameters_subtraction", "parameters_mod")


def secaggplus_module():
    """The module secaggplus_mod lives in (its package exports the function under the module's name)."""
    return importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")


def _rebind(module, names) -> None:
    missing = [name for name in names if not callable(getattr(module, name, None))]
    if missing:
        raise RuntimeError(f"flwr's {module.__name__} no longer uses {missing}: revisit transport/lean_masking.py "
                           "for this Flower version")
    for name in names:
        setattr(module, name, LEAN[name])


def lean_collect_stage() -> None:
    """At a site: rebind secaggplus_mod's arithmetic (see the module's docstring); idempotent."""
    _rebind(secaggplus_module(), LEAN)


def lean_unmasking() -> None:
    """At the coordinator: the same for SecAggPlusWorkflow, which sums the sites' masked vectors (in place into
    the first) and regenerates the masks of every site to remove them (drawn block by block into the sum, where
    Flower draws each whole, the previous still bound); idempotent."""
    _rebind(importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow"), WORKFLOW_NAMES)
