"""`flower-supernode`, with three changes: the process ends when the SuperNode's main thread ends, it looks for
messages more often, and its ClientApps start warm.

Flower 1.41 serves the SuperNode's Runtime API from a non-daemon thread. When the main thread (the connection to
the SuperLink) dies of an exception - a CA file that holds no certificate raises `ssl.SSLError` there - Python
waits for that thread forever: the process looks alive while it can never train. Here the traceback goes to the
log and the process exits with code 1, so whoever supervises it (`m3fm-client start`) sees it and reports why.

Flower 1.41's SuperNode sleeps 3 s whenever the SuperLink had no message for it, and 0.5 s between looks for the
ClientApp's reply (`supernode/start_client_internal.py`, fixed, not configurable): on average 1.5-2 s of every
round's fixed cost. Here those sleeps are capped at POLL_ENV seconds (default 0.25: four pulls a second, a few
hundred bytes each, against a SuperLink that answers them from memory). The patch replaces that one module's
`time` name; `pinned_sleeps` checks the module still looks as it did when this was written.

Flower 1.41's SuperNode tells the SuperLink it sends a heartbeat every 30 s (`HEARTBEAT_DEFAULT_INTERVAL`, fixed),
and the SuperLink takes a node for dead after two intervals: a site whose machine died held up the round it was in
for about a minute before the others could finish it. Here the interval is HEARTBEAT_ENV seconds (default 10, the
shortest the SuperLink accepts): a dead site is noticed in about 20 s, for one small request every 4 s.

Unless the caller picks an isolation mode or TLS for the Runtime API, the SuperNode runs with `--isolation process`
and this starts transport/superexec.py beside it (what Flower's subprocess mode does with `flower-superexec`): each
message's ClientApp is then a fork of a process that has imported Flower already, not a new interpreter.

    python -m transport.supernode FLOWER_SUPERNODE_ARGS...
"""

import argparse
import os
import subprocess
import sys
import time
import traceback

from transport.object_pulls import quick_object_pulls
from transport.processes import die_with_parent

POLL_ENV, POLL_DEFAULT = "M3FM_SUPERNODE_POLL_S", 0.25
HEARTBEAT_ENV, HEARTBEAT_DEFAULT = "M3FM_SUPERNODE_HEARTBEAT_S", 10.0


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


def quick_heartbeat(interval: float) -> None:
    """Heartbeats every `interval` s, and the SuperLink told so (flwr 1.41 reads the constant in both modules)."""
    from flwr.common.constant import HEARTBEAT_MAX_INTERVAL, HEARTBEAT_MIN_INTERVAL
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    if not HEARTBEAT_MIN_INTERVAL <= interval <= HEARTBEAT_MAX_INTERVAL:
        raise ValueError(f"{HEARTBEAT_ENV}={interval:g}: the SuperLink accepts {HEARTBEAT_MIN_INTERVAL}-"
                         f"{HEARTBEAT_MAX_INTERVAL} s")
    for module in (heartbeat, fleet_http_connection):
        if not isinstance(getattr(module, "HEARTBEAT_DEFAULT_INTERVAL", None), (int, float)):
            raise RuntimeError(f"{module.__name__} no longer reads HEARTBEAT_DEFAULT_INTERVAL: revisit "
                               "transport/supernode.py for this Flower version")
        module.HEARTBEAT_DEFAULT_INTERVAL = interval


def warm_clientapps(argv: list[str]) -> list[str]:
    """argv for Flower with `--isolation process`, and transport/superexec.py started for this SuperNode; argv as
    given when it names an isolation mode or Runtime API TLS (Flower's own `flower-superexec` then)."""
    if any(a.startswith(("--isolation", "--ssl-", "--appio-ssl-")) for a in argv):
        return argv
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", default="9094")  # Flower's SUPERNODE_UVICORN_DEFAULT_PORT
    known, _ = ap.parse_known_args(argv)
    host = f"[{known.host}]" if ":" in known.host else known.host
    subprocess.Popen([sys.executable, "-m", "transport.superexec", "--insecure", "--runtime-api-address",
                      f"{host}:{known.port}", "--parent-pid", str(os.getpid())], preexec_fn=die_with_parent)
    return [*argv, "--isolation", "process"]


def main() -> None:
    from flwr.supernode.cli.flower_supernode import flower_supernode

    pinned_sleeps(float(os.environ.get(POLL_ENV, POLL_DEFAULT)))
    quick_heartbeat(float(os.environ.get(HEARTBEAT_ENV, HEARTBEAT_DEFAULT)))
    quick_object_pulls()
    sys.argv = ["flower-supernode", *warm_clientapps(sys.argv[1:])]
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
