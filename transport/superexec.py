"""A site's SuperExec that starts each ClientApp as a fork of itself, warm, instead of a fresh `flwr-clientapp`.

Flower 1.41 runs every message's ClientApp in a new process (no isolation mode keeps one alive). Its SuperExec
starts `flwr-clientapp`, a new interpreter that imports flwr (0.8 s of CPU, measured) before it asks for its
task: with three sites on two cores that was 4-6 s of every round (benchmarks/round_overhead.py). This is
Flower's own SuperExec loop (`run_superexec`: task claims, tokens, signal handling) with one change, its executor:
`ForkExecutor` forks this process, which has imported `run_clientapp` already, and the child runs Flower's
`run_clientapp` exactly as `flwr-clientapp` would, then exits. Each message still gets a process of its own (a
crash ends that message only), with the same token, Runtime API address and parent watch.

The SuperNode runs with `--isolation process` and transport/supernode.py starts this beside it. Internal API
used: `flwr.supercore.superexec.run_superexec.get_executor` (the name replaced) and the Executor protocol
(`launch(spec)`, `reconcile()`); `check_flower()` refuses to start when they no longer look as written for.

    python -m transport.superexec --runtime-api-address HOST:PORT --parent-pid PID [--insecure]
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from flwr.supercore.constant import TaskType
from flwr.supercore.superexec import run_superexec as superexec_module
from flwr.supercore.superexec.executor import LaunchResult, SubprocessExecutor
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supernode.runtime.run_clientapp import run_clientapp  # imported once here, not once per message

from transport.object_pulls import quick_object_pulls


def check_flower() -> None:
    """Flower's SuperExec module and subprocess executor, checked to still be what this was written against."""
    if not callable(getattr(superexec_module, "get_executor", None)) or not hasattr(TaskType, "CLIENT_APP"):
        raise RuntimeError("flwr.supercore.superexec.run_superexec no longer picks its executor with get_executor: "
                           "revisit transport/superexec.py for this Flower version")
    for name in ("launch", "reconcile", "close", "get_eligible_capacity"):
        if not callable(getattr(SubprocessExecutor, name, None)):
            raise RuntimeError(f"Flower's SubprocessExecutor has no {name}(): revisit transport/superexec.py")


class ForkExecutor(SubprocessExecutor):
    """ClientApp tasks: a fork of this process runs `run_clientapp`; other task types as Flower does."""

    def __init__(self):
        self.children: set[int] = set()

    def launch(self, spec):
        if spec.task_type != TaskType.CLIENT_APP:
            return super().launch(spec)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os._exit(run_child(spec))  # never back into the parent's loop
        self.children.add(pid)
        print(f"m3fm superexec: ClientApp for task {spec.task_id} forked as pid {pid}", flush=True)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap children that have ended (Flower's loop calls this before every task claim)."""
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)


def run_child(spec) -> int:
    """In the forked child: Flower's `flwr-clientapp` body -> its exit code."""
    code = 1
    try:
        run_clientapp(runtime_api_address=spec.runtime_api_address, token=spec.token, insecure=spec.insecure,
                      certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
                      parent_pid=spec.parent_pid, runtime_dependency_install=spec.runtime_dependency_install)
        code = 0
    except SystemExit as e:  # run_clientapp ends with flwr_exit -> sys.exit(code)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - whatever happened, the child ends here
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runtime-api-address", required=True)
    ap.add_argument("--parent-pid", type=int, default=None)
    ap.add_argument("--insecure", action="store_true")
    ap.add_argument("--root-certificates", default=None)
    args = ap.parse_args(argv)
    check_flower()
    quick_object_pulls()  # the forked ClientApps inherit it: their pull of the task's objects
    executor = ForkExecutor()
    superexec_module.get_executor = lambda *a, **k: executor
    sys.argv[0] = "flower-superexec"
    superexec_module.run_superexec(runtime_api_address=args.runtime_api_address, insecure=args.insecure,
                                   root_certificates_path=args.root_certificates, parent_pid=args.parent_pid)


if __name__ == "__main__":
    main()
