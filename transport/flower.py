"""Flower's processes and CLI, driven as flwr 1.41 works (docs/deployment.md).

- `flower-superlink` serves the Fleet, Control and Runtime APIs on one port;
  it is started with its state in memory (or a database file) and without runtime dependency
  installation (which would run `uv sync` and fail offline).
- A run is submitted with `flwr run APP_DIR CONNECTION`. The app directory is
  thin: a pyproject.toml whose components name modules of this installed
  package. The connection lives in `$FLWR_HOME/config.toml`, which we write.
- `flwr run` exits 0 even when the run fails, so the outcome is read back
  with `flwr ls --run-id N --format json`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import tomli_w

from transport.processes import die_with_parent

APP_PYPROJECT = {
    "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
    "project": {"name": "m3fm-fed-app", "version": "1.0.0", "description": "m3fm-fed run (thin app: the "
                "components are modules of the installed m3fm-fed package)", "license": "Apache-2.0",
                "dependencies": []},
    "tool": {"flwr": {"app": {"publisher": "m3fm-fed",
                              "components": {"serverapp": "server.app:app", "clientapp": "client.app:app"},
                              # every key a run may override must exist here
                              "config": {"config": "", "resume": False, "database": "", "sim-sites": "",
                                         "coordinator": "", "enrolled-sites": 0}}}},
}


def flower_env(flwr_home: Path | None = None) -> dict[str, str]:
    # the SuperLink and SuperNode spawn flower-superexec, flwr-serverapp, flwr-clientapp by name: our venv first
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    # flower-superexec looks for a ClientApp/ServerApp task every second by default: a round's fixed cost
    env = dict(os.environ, PATH=path, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               PYTHONUNBUFFERED="1", FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.1")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def flower_bin(name: str) -> str:
    """An executable (Flower's, or our console scripts) next to this interpreter (the venv's), else on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def write_app_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "pyproject.toml").write_text(tomli_w.dumps(APP_PYPROJECT), encoding="utf-8")
    return path


def write_connection(flwr_home: Path, name: str, address: str, insecure: bool = True,
                     root_certificates: Path | None = None) -> None:
    conn: dict = {"address": address}
    if insecure:
        conn["insecure"] = True
    if root_certificates is not None:
        conn["root-certificates"] = str(root_certificates)
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": name, name: conn}}),
                                           encoding="utf-8")


def start_superlink(state_dir: Path, host: str, port: int, log_path: Path, simulation: bool = False,
                    extra_args: tuple[str, ...] = (), env: dict | None = None,
                    database: bool = True) -> subprocess.Popen:
    """`database`: keep the SuperLink's state (and every message's objects) in state_dir/superlink.db, or, False,
    in Flower's in-memory store."""
    state_dir.mkdir(parents=True, exist_ok=True)
    args = [flower_bin("flower-superlink"), "--host", host, "--port", str(port),
            *(("--database", str(state_dir / "superlink.db")) if database else ()),
            "--disable-runtime-dependency-installation", *extra_args]
    if simulation:
        args.append("--simulation")
    # same process group as the caller, and SIGTERM when the caller dies (even by SIGKILL): whatever stops or kills
    # `m3fm-server run` stops its SuperLink too
    log = open(log_path, "ab")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env or flower_env(),
                            preexec_fn=die_with_parent)


def stream_run_log(connection: str, run_id: int, log_path: Path, env: dict) -> subprocess.Popen:
    """`flwr log --stream` into log_path. Flower's SuperExec starts the ServerApp with its output suppressed and
    forwards it to the SuperLink (flwr/supercore/superexec/plugin/base_exec_plugin.py): without this the round
    messages of `m3fm-server run` would reach nobody. The stream ends by itself when the run does."""
    log = open(log_path, "ab")
    return subprocess.Popen([flower_bin("flwr"), "log", str(run_id), connection, "--stream"], stdout=log,
                            stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent)


def start_supernode(superlink: str, port: int, node_config: str, log_path: Path,
                    extra_args: tuple[str, ...] = (), env: dict | None = None) -> subprocess.Popen:
    # Flower's SuperNode, run by transport/supernode.py so that it exits when its main thread ends
    args = [sys.executable, "-m", "transport.supernode", "--superlink", superlink, "--host", "127.0.0.1",
            "--port", str(port), "--node-config", node_config, *extra_args]
    log = open(log_path, "ab")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env or flower_env(),
                            preexec_fn=die_with_parent)


def _signal(proc: subprocess.Popen, sig: int) -> None:
    """The process group when the process leads one (we started it in a session of its own), else the process."""
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> int | None:
    """SIGTERM a process we started (its group, if it leads one), then SIGKILL if it lingers; returns its exit code.

    Flower's own children (flower-superexec, flwr-serverapp, flwr-clientapp) watch their parent's pid and exit
    with it."""
    if proc.poll() is None:
        _signal(proc, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal(proc, signal.SIGKILL)
            proc.wait(5)
    return proc.returncode


def wait_for_port(host: str, port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{Path(proc.args[0]).name} exited with code {proc.returncode} before listening")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.0f}s")


def _config_arg(values: dict) -> str:
    parts = []
    for k, v in values.items():
        if isinstance(v, bool):
            parts.append(f"{k}={'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            parts.append(f"{k}={v}")
        else:
            parts.append(f"{k}={json.dumps(str(v))}")
    return " ".join(parts)


def submit_run(app_dir: Path, connection: str, run_config: dict, env: dict, federation_config: dict | None = None,
               timeout: float = 120.0) -> int:
    """`flwr run` without streaming; returns the Flower run id."""
    args = [flower_bin("flwr"), "run", str(app_dir), connection, "--format", "json"]
    if run_config:
        args += ["--run-config", _config_arg(run_config)]
    if federation_config:
        args += ["--federation-config", _config_arg(federation_config)]
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
    try:
        data = json.loads(out.stdout)
    except json.JSONDecodeError:
        data = {}
    if data.get("success") and "run-id" in data:
        return int(data["run-id"])
    raise RuntimeError(f"flwr run failed (exit {out.returncode}): {(out.stdout + out.stderr).strip()[-2000:]}")


def register_supernode(public_key: Path, name: str, connection: str, env: dict, timeout: float = 60.0) -> None:
    """`flwr supernode register`: the SuperLink (started with --enable-supernode-auth) admits this key."""
    out = subprocess.run([flower_bin("flwr"), "supernode", "register", str(public_key), connection, "--name", name],
                         capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"registering {name}'s key failed (exit {out.returncode}): "
                           f"{(out.stdout + out.stderr).strip()[-1000:]}")


def run_status(connection: str, run_id: int, env: dict, timeout: float = 60.0) -> str:
    """The run's status as Flower reports it, e.g. 'running' or 'finished:completed' / 'finished:failed'."""
    out = subprocess.run([flower_bin("flwr"), "ls", connection, "--run-id", str(run_id), "--format", "json"],
                         capture_output=True, text=True, env=env, timeout=timeout)
    try:
        runs = json.loads(out.stdout).get("runs", [])
    except json.JSONDecodeError:
        raise RuntimeError(f"flwr ls failed (exit {out.returncode}): {(out.stdout + out.stderr).strip()[-1000:]}")
    for r in runs:
        if int(r.get("run-id", -1)) == run_id:
            return str(r.get("status", "unknown"))
    return "unknown"
