"""`m3fm-client start` never hangs silently: bad certificate and key files are named before anything starts, a
SuperNode whose main thread dies exits, and a SuperNode that loses its SuperLink is reported (real processes)."""

import os
import re
import signal
import subprocess
import time

from privacy.certs import make_certificates, make_site_keys
from server.coordinator import free_port
from client.supervise import SuperNodeLog
from transport.flower import flower_bin, flower_env, start_superlink, stop, wait_for_port


def client_start(args, timeout=30):
    t0 = time.monotonic()
    done = subprocess.run([flower_bin("m3fm-client"), "start", *args], capture_output=True, text=True,
                          env=flower_env(), timeout=timeout)
    return done.returncode, " ".join((done.stdout + done.stderr).split()), time.monotonic() - t0


def test_bad_certificate_and_key_files_stop_the_site_within_seconds_naming_the_file(tmp_path):
    paths = make_certificates(tmp_path / "tls", ["127.0.0.1"])
    key, _ = make_site_keys(tmp_path / "keys")
    truncated, garbage = tmp_path / "truncated.crt", tmp_path / "garbage.crt"
    truncated.write_bytes(paths["ca.crt"].read_bytes()[:200])
    garbage.write_bytes(os.urandom(600))
    site = ["--site", str(tmp_path / "no-site"), "--superlink", "127.0.0.1:1"]
    for ca, expected in ((truncated, "never ends: truncated?"), (garbage, "binary data")):
        code, out, seconds = client_start([*site, "--root-cert", str(ca)])
        assert code == 2 and seconds < 10 and str(ca) in out and "not a PEM certificate file" in out, out
        assert expected in out
    # a PEM private key where the OpenSSH key belongs (the wrong format), with a good CA
    code, out, seconds = client_start([*site, "--root-cert", str(paths["ca.crt"]), "--key", str(paths["server.key"])])
    assert code == 2 and seconds < 10 and str(paths["server.key"]) in out and "not an unencrypted OpenSSH" in out, out
    # both good: the next problem is the site folder, so the files passed
    code, out, _ = client_start([*site, "--root-cert", str(paths["ca.crt"]), "--key", str(key)])
    assert code == 2 and "no-site/site.toml: not found" in out and ".crt" not in out and ".key" not in out, out


def test_a_supernode_whose_main_thread_dies_exits_instead_of_hanging(tmp_path):
    """Flower's SuperNode keeps running when its connection thread dies on a CA without a certificate; run
    through transport/supernode.py it exits non-zero with the reason in its output."""
    bad = tmp_path / "empty-ca.crt"
    bad.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    log = tmp_path / "supernode.log"
    proc = subprocess.Popen([flower_bin("python"), "-m", "transport.supernode", "--superlink", "127.0.0.1:1",
                             "--host", "127.0.0.1", "--port", str(free_port()), "--root-certificates", str(bad),
                             "--node-config", 'site-dir="x"'], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=flower_env())
    try:
        proc.wait(60)  # (a pipe would stay open: Flower's SuperExec child inherits it for a moment)
    finally:
        stop(proc)
    out = log.read_text()
    assert proc.returncode == 1 and "ssl.SSLError: no start line" in out, out[-2000:]


def test_the_supernode_heartbeat_interval_is_the_one_it_reports_and_flowers_range_is_kept():
    """transport/supernode.py sends heartbeats every 10 s (not Flower's 30) and reports that interval to the SuperLink,
    which takes a node for dead after two: the round a dead site was in goes on after about 20 s, not a minute."""
    import pytest
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    from transport.supernode import HEARTBEAT_DEFAULT, quick_heartbeat

    before = heartbeat.HEARTBEAT_DEFAULT_INTERVAL, fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL
    try:
        quick_heartbeat(HEARTBEAT_DEFAULT)
        assert heartbeat.HEARTBEAT_DEFAULT_INTERVAL == fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL == 10.0
        with pytest.raises(ValueError, match="M3FM_SUPERNODE_HEARTBEAT_S=5: the SuperLink accepts 10-1800 s"):
            quick_heartbeat(5)
    finally:
        heartbeat.HEARTBEAT_DEFAULT_INTERVAL, fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL = before


def test_log_reading_tells_connected_offline_and_why():
    watch = SuperNodeLog(path=None)  # fed line by line
    watch.feed("INFO :      SuperNode ID: 123", 0.0)
    assert watch.connected and watch.ever_connected and watch.offline_for(5.0) == 0.0
    watch.feed("WARNING :   Connection attempt failed, retrying in 1.20 seconds", 10.0)
    watch.feed("WARNING :   Connection attempt failed, retrying in 2.50 seconds", 12.0)
    assert not watch.connected and watch.offline_for(40.0) == 30.0 and "retrying" in watch.last_error
    watch.feed("INFO :      Connection successful after 31.00 seconds and 7 tries.", 41.0)
    assert watch.connected and watch.offline_since is None
    watch.feed("ERROR :     Exit Code: 305", 50.0)
    watch.feed("The SuperNode is not registered", 50.0)
    assert watch.last_error == "Flower exit code 305: The SuperNode is not registered"
    watch.feed("ssl.SSLError: [X509: NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl found", 60.0)
    assert watch.last_error.startswith("ssl.SSLError")


def test_a_site_that_loses_its_superlink_is_reported_and_a_dead_supernode_restarted(ingested, tmp_path):
    _, sites, _ = ingested
    site = sites[0]
    port = free_port()
    link = start_superlink(tmp_path / "link", "127.0.0.1", port, tmp_path / "superlink.log", extra_args=("--insecure",))
    client = subprocess.Popen([flower_bin("m3fm-client"), "start", "--site", str(site.site_dir), "--superlink",
                               f"127.0.0.1:{port}", "--port", str(free_port()), "--insecure", "--offline-limit", "3"],
                              stdout=open(tmp_path / "client.log", "w"), stderr=subprocess.STDOUT, env=flower_env(),
                              start_new_session=True)
    try:
        wait_for_port("127.0.0.1", port, link)
        watch = SuperNodeLog.from_end(site.work_dir / "supernode.log")
        until(lambda: watch.poll() or watch.ever_connected, 90, "the SuperNode to connect", client)
        out = tmp_path / "client.log"
        before = len(out.read_text())
        stop(link)  # the coordinator goes away

        def said():  # what m3fm-client printed since then, unwrapped
            return " ".join(out.read_text()[before:].split())

        until(lambda: "has not reached the SuperLink" in said(), 90, "the offline report", client)
        assert f"has not reached the SuperLink 127.0.0.1:{port} for" in said() and "Flower keeps retrying" in said()
        link = start_superlink(tmp_path / "link", "127.0.0.1", port, tmp_path / "superlink.log",
                               extra_args=("--insecure",))
        until(lambda: "SuperNode reached the SuperLink" in said(), 120, "the reconnection report", client)
        # the SuperNode itself dies after it had connected: m3fm-client restarts it, and the new one connects
        node = int(re.findall(r"SuperNode pid (\d+)", out.read_text())[-1])
        watch = SuperNodeLog.from_end(site.work_dir / "supernode.log")
        os.kill(node, signal.SIGKILL)
        until(lambda: "restarting in 2 s (1 of 3)" in said(), 60, "the restart report", client)
        until(lambda: watch.poll() or watch.ever_connected, 90, "the restarted SuperNode to connect", client)
        assert len(re.findall(r"SuperNode pid (\d+)", out.read_text())) == 2
    finally:
        assert stop(client, timeout=30) == 0
        stop(link)


def until(condition, limit_s, what, proc):
    deadline = time.monotonic() + limit_s
    while not condition():
        assert proc.poll() is None, f"m3fm-client exited with {proc.returncode} while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} within {limit_s}s"
        time.sleep(0.5)


def test_errors_print_on_one_line_with_brackets_kept_at_any_terminal_width():
    import io
    from rich.console import Console
    from m3fm.console import print_error
    out = io.StringIO()
    path = "/check/" + "deep/" * 20 + "site.toml"
    print_error(Console(file=out, width=40), f"{path}: not found; set [ingest] model_config")
    assert out.getvalue() == f"error: {path}: not found; set [ingest] model_config\n"
