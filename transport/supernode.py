"""`flower-supernode`, with two changes: the process ends when the SuperNode's main thread ends, and it looks for
messages more often.

Flower 1.41 serves the SuperNode's Runtime API from a non-daemon thread. When the main thread (the connection to
the SuperLink) dies of an exception - a CA file that holds no certificate raises `ssl.SSLError` there - Python
waits for that thread forever: the process looks alive while it can never train. Here the traceback goes to the
log and the process exits with code 1, so whoever supervises it (`m3fm-client start`) sees it and reports why.

Flower 1.41's SuperNode sleeps 3 s whenever the SuperLink had no message for it, and 0.5 s between looks for the
ClientApp's reply (`supernode/start_client_internal.py`, fixed, not configurable): on average 1.5-2 s of every
round's fixed cost. Here those sleeps are capped at POLL_ENV seconds (default 0.25: four pulls a second, a few
hundred bytes each, against a SuperLink that answers them from memory). The patch replaces that one module's
`time` name; `pinned_sleeps` checks the module still looks as it did when this was written.

    python -m transport.supernode FLOWER_SUPERNODE_ARGS...
"""

import os
import sys
import time
import traceback

POLL_ENV, POLL_DEFAULT = "M3FM_SUPERNODE_POLL_S", 0.25


class _CappedSleep:
    """The `time` module, except that sleep() waits at most `cap` seconds."""

    def __init__(self, cap: float):
        self.cap = cap

    def __getattr__(self, name):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))


def pinned_sleeps(cap: float) -> None:
    """Cap the SuperNode loop's idle sleeps (flwr 1.41's start_client_internal sleeps with `time.sleep`)."""
    from flwr.supernode import start_client_internal

    if getattr(start_client_internal, "time", None) is not time:
        raise RuntimeError("flwr.supernode.start_client_internal no longer sleeps through its `time` module: "
                           "revisit transport/supernode.py for this Flower version")
    start_client_internal.time = _CappedSleep(cap)


def main() -> None:
    from flwr.supernode.cli.flower_supernode import flower_supernode

    pinned_sleeps(float(os.environ.get(POLL_ENV, POLL_DEFAULT)))
    sys.argv[0] = "flower-supernode"
    code = 0
    try:
        flower_supernode()
    except SystemExit as e:  # Flower's own exits (flwr_exit) carry their code and have logged their reason
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - whatever ended the main thread ends the process
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
