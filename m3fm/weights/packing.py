"""Weights on the wire: one flat vector per parameter group instead of one array per tensor.

Flower moves every array of a message as its own object, one HTTP request
each. M3FM has hundreds of small tensors (biases, norms), so a tiny model's
round spent most of its time moving objects (measured: 38 s to return two
sites' 224-array replies on loopback, 2 cores). Packing the state dict into
one vector per parameter group (m3fm/weights/groups.py) cuts a message to about
twenty arrays, and it is also the unit task-aware averaging works on.

The layout (which tensor sits where) is the model's state-dict order within
each group, so both ends derive it from the model configuration alone.
Tensors of another dtype than float32 go to a key `<group>@<dtype>`.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from m3fm.weights.groups import parameter_group


def packed_key(name: str, dtype: torch.dtype) -> str:
    group = parameter_group(name)
    return group if dtype == torch.float32 else f"{group}@{str(dtype).removeprefix('torch.')}"


def group_of_packed(key: str) -> str:
    return key.split("@")[0]


def layout(reference: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for name, t in reference.items():
        out[packed_key(name, t.dtype)].append(name)
    return dict(out)


def pack_state(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """state dict -> packed key -> flat numpy vector (a copy; the model is not shared)."""
    return {key: torch.cat([state[n].detach().reshape(-1).cpu() for n in names]).numpy()
            for key, names in layout(state).items()}


def unpack_state(packed: dict[str, np.ndarray], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Packed vectors -> a state dict shaped like `reference`; sizes and dtypes are checked, naming the group."""
    plan = layout(reference)
    if missing := sorted(plan.keys() - packed.keys()):
        raise ValueError(f"packed weights lack group(s) {missing}")
    if unexpected := sorted(packed.keys() - plan.keys()):
        raise ValueError(f"packed weights hold unknown group(s) {unexpected}")
    out = {}
    for key, names in plan.items():
        flat = torch.from_numpy(np.ascontiguousarray(packed[key]))
        want = sum(reference[n].numel() for n in names)
        if flat.ndim != 1 or flat.numel() != want:
            raise ValueError(f"packed group {key!r}: expected a vector of {want} values, got shape {tuple(flat.shape)}")
        if flat.dtype != reference[names[0]].dtype:
            raise ValueError(f"packed group {key!r}: expected dtype {reference[names[0]].dtype}, got {flat.dtype}")
        offset = 0
        for n in names:
            k = reference[n].numel()
            out[n] = flat[offset:offset + k].view(reference[n].shape).clone()
            offset += k
    return {n: out[n] for n in reference}


def packed_sizes(reference: dict[str, torch.Tensor]) -> dict[str, tuple[int, np.dtype]]:
    """Packed key -> (values, numpy dtype) of the vectors pack_state makes from a state dict like `reference`."""
    return {key: (sum(reference[n].numel() for n in names),
                  torch.empty(0, dtype=reference[names[0]].dtype).numpy().dtype)
            for key, names in layout(reference).items()}


def split_joined(joined: dict[str, np.ndarray], sizes: dict[str, tuple[int, np.dtype]]) -> dict[str, np.ndarray]:
    """The packed vectors as they travel, one vector per dtype (transport/wire.py), -> packed key -> a view of its
    part; `sizes` (packed_sizes, or the global model's vectors) gives the order and lengths. ValueError naming the
    dtype whose vector does not fit."""
    need: dict[str, int] = defaultdict(int)
    for size, dtype in sizes.values():
        need[np.dtype(dtype).name] += size
    if sorted(joined) != sorted(need):
        raise ValueError(f"expected one vector per dtype {sorted(need)}, got {sorted(joined)}")
    for name, v in joined.items():
        if v.ndim != 1 or v.dtype != np.dtype(name) or v.size != need[name]:
            raise ValueError(f"the {name} vector: expected {need[name]} values of {name}, got {v.dtype} {v.shape}")
    out, offset = {}, defaultdict(int)
    for key, (size, dtype) in sizes.items():
        name = np.dtype(dtype).name
        out[key] = joined[name][offset[name]:offset[name] + size]
        offset[name] += size
    return out
