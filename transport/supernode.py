"""`flower-supernode`, with one change: the process ends when the SuperNode's main thread ends.

Flower 1.41 serves the SuperNode's Runtime API from a non-daemon thread. When the main thread (the connection to
the SuperLink) dies of an exception - a CA file that holds no certificate raises `ssl.SSLError` there - Python
waits for that thread forever: the process looks alive while it can never train. Here the traceback goes to the
log and the process exits with code 1, so whoever supervises it (`m3fm-client start`) sees it and reports why.

    python -m transport.supernode FLOWER_SUPERNODE_ARGS...
"""

import os
import sys
import traceback


def main() -> None:
    from flwr.supernode.cli.flower_supernode import flower_supernode

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
