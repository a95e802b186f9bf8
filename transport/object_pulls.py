"""Shorter waits between looks for a message's objects, in this process (SuperNode, ServerApp).

Flower 1.41 sends a message as its metadata first, then its objects (one per array). Whoever pulls a fresh message
(the SuperNode from the SuperLink, the ClientApp from the SuperNode, the ServerApp from the SuperLink) often asks
for an object its sender has not finished pushing; Flower then waits 1 s, 2 s, 4 s ... (capped at 10 s) before
asking again (`supercore/inflatable/inflatable_utils.py`: PULL_INITIAL_BACKOFF / PULL_BACKOFF_CAP, bound as the
keyword defaults of `pull_objects` and `pull_and_inflate_object_from_tree`, not configurable). Traced with
FLWR_LOG_LEVEL=DEBUG on a tiny round: the SuperNode's receive took 2.0 s for 0.1 s of transfer, the reply reached
the coordinator 1.6 s after the ClientApp had it; about 1 s a hop, 2-3 s of every round.

`quick_object_pulls` starts that backoff at QUICK_BACKOFF_S and caps it at QUICK_CAP_S: a look for an absent object
is a request of a few hundred bytes that the other side answers from memory. The tries per object grow by the same
factor as the cap shrinks, so a slow sender (a large model over a hospital's WAN link) gets as long as before; the
total bound (PULL_MAX_TIME, 2 h) stays. Only the two functions' keyword defaults change; this refuses to start if
Flower's functions no longer take them.
"""

QUICK_BACKOFF_S, QUICK_CAP_S = 0.01, 0.1


def quick_object_pulls(initial_s: float = QUICK_BACKOFF_S, cap_s: float = QUICK_CAP_S) -> None:
    from flwr.supercore.inflatable import inflatable_utils

    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = fn.__kwdefaults__ or {}
        if not {"initial_backoff", "backoff_cap", "max_tries_per_object"} <= defaults.keys():
            raise RuntimeError(f"flwr's {fn.__name__} no longer takes initial_backoff/backoff_cap/max_tries_per_object"
                               " keywords: revisit transport/object_pulls.py for this Flower version")
        if defaults["backoff_cap"] > cap_s and defaults["max_tries_per_object"] is not None:
            defaults["max_tries_per_object"] = int(defaults["max_tries_per_object"] * defaults["backoff_cap"] / cap_s)
        defaults["initial_backoff"], defaults["backoff_cap"] = initial_s, cap_s
