"""TLS and node authentication through the real processes: `m3fm-server certs`, `m3fm-client keys`,
`m3fm-server enroll`, then `m3fm-server run --tls --node-auth` with one good site, one whose key was never
enrolled and one that does not trust the coordinator's CA."""

import subprocess
import time

import pytest
from cryptography import x509
from sqlalchemy import select
from sqlalchemy.orm import Session

from server.coordinator import free_port
from transport.flower import flower_bin, flower_env, stop
from server.store import EnrolledSite, Round, SiteMetric, open_server_store

TOML = """
[run]
name = "secure"
model = "tiny"
min_sites = 1
join_wait = 5
round_timeout = 120
out_dir = "runs"
[pretrain]
rounds = 1
local_steps = 1
[multitask]
rounds = 0
"""


def cli(*args):
    return subprocess.run([flower_bin(args[0]), *args[1:]], capture_output=True, text=True, env=flower_env(),
                          timeout=120)


def test_certs_keys_and_enroll_refuse_to_overwrite_and_name_bad_input(tmp_path):
    assert cli("m3fm-server", "certs", "--out", str(tmp_path / "tls"), "--host", "127.0.0.1", "--host",
               "coordinator.example").returncode == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "tls" / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["coordinator.example"]
    again = cli("m3fm-server", "certs", "--out", str(tmp_path / "tls"), "--host", "127.0.0.1")
    assert again.returncode == 2 and "refusing to overwrite" in again.stdout
    assert cli("m3fm-client", "keys", "--out", str(tmp_path / "k"), "--name", "a").returncode == 0
    (tmp_path / "toml").write_text(TOML)
    db = f"sqlite:///{tmp_path / 'server.db'}"
    assert cli("m3fm-server", "enroll", str(tmp_path / "k" / "a.pub"), "--name", "a", "--database", db).returncode == 0
    twice = cli("m3fm-server", "enroll", str(tmp_path / "k" / "a.pub"), "--name", "b", "--database", db)
    assert twice.returncode == 2 and "already enrolled" in twice.stdout
    bad = cli("m3fm-server", "enroll", str(tmp_path / "tls" / "ca.crt"), "--name", "c", "--database", db)
    assert bad.returncode == 2 and "ca.crt: not an OpenSSH public key" in " ".join(bad.stdout.split())
    plain = cli("m3fm-server", "run", "--config", str(tmp_path / "toml"))
    assert plain.returncode == 2 and "--insecure" in plain.stdout  # no silent plaintext


@pytest.fixture
def procs():
    started = []
    yield started
    for p in started:
        stop(p, timeout=20)


def test_tls_run_with_node_auth_admits_only_an_enrolled_site_that_trusts_the_ca(ingested, tmp_path, procs):
    _, sites, _ = ingested
    good, unenrolled, untrusting = sites
    assert cli("m3fm-server", "certs", "--out", str(tmp_path / "tls"), "--host", "127.0.0.1").returncode == 0
    assert cli("m3fm-server", "certs", "--out", str(tmp_path / "other"), "--host", "127.0.0.1").returncode == 0
    for site in sites:
        assert cli("m3fm-client", "keys", "--out", str(tmp_path / "keys"), "--name", site.site_id).returncode == 0
    toml = tmp_path / "server.toml"
    toml.write_text(TOML)
    for site in (good, untrusting):  # enrolled; `unenrolled` never is
        done = cli("m3fm-server", "enroll", str(tmp_path / "keys" / f"{site.site_id}.pub"), "--name", site.site_id,
                   "--config", str(toml))
        assert done.returncode == 0, done.stdout + done.stderr
    port = free_port()
    server = subprocess.Popen([flower_bin("m3fm-server"), "run", "--config", str(toml), "--port", str(port),
                               "--tls", str(tmp_path / "tls"), "--node-auth"], stdout=open(tmp_path / "server.log", "ab"),
                              stderr=subprocess.STDOUT, env=flower_env(), start_new_session=True)
    procs.append(server)

    def client(site, ca):
        p = subprocess.Popen([flower_bin("m3fm-client"), "start", "--site", str(site.site_dir), "--superlink",
                              f"127.0.0.1:{port}", "--port", str(free_port()), "--root-cert", str(ca / "ca.crt"),
                              "--key", str(tmp_path / "keys" / f"{site.site_id}.key"), "--max-retries", "3"],
                             stdout=open(tmp_path / f"{site.site_id}.log", "ab"), stderr=subprocess.STDOUT,
                             env=flower_env(), start_new_session=True)
        procs.append(p)
        return p

    deadline = time.monotonic() + 120  # the SuperLink is up and has admitted the enrolled keys
    while "enrolled site key(s) registered" not in (tmp_path / "server.log").read_text():
        assert time.monotonic() < deadline and server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
        time.sleep(1)
    logs = {s.site_id: s.work_dir / "supernode.log" for s in sites}  # shared with other tests: read only our part
    offset = {k: p.stat().st_size if p.exists() else 0 for k, p in logs.items()}
    since = lambda site: logs[site.site_id].read_bytes()[offset[site.site_id]:].decode(errors="replace")  # noqa: E731
    # all three at once (min_sites 1): the refused two knock while the enrolled one trains
    refused = [client(unenrolled, tmp_path / "tls"), client(untrusting, tmp_path / "other")]
    client(good, tmp_path / "tls")
    for p in refused:
        assert p.wait(240) != 0
    refused_key = since(unenrolled)
    assert "Failed to activate SuperNode" in refused_key and "Giving up reconnection" not in refused_key  # 412
    assert "CERTIFICATE_VERIFY_FAILED" in since(untrusting)
    assert server.wait(400) == 0, (tmp_path / "server.log").read_text()[-3000:]
    log = (tmp_path / "server.log").read_text()
    assert "2 enrolled site key(s) registered" in log and "without TLS" not in log
    # the run is for the enrolled sites: round 1 waited join_wait for the second, which never got in
    # (the ServerApp's output reaches serverapp.log and, where it is meant for the operator, the coordinator's console)
    app_log = (tmp_path / "runs" / "superlink" / "serverapp.log").read_text(errors="replace")
    said = "1 of run.expected_sites = 2 connected after run.join_wait = 5s"
    assert said in app_log and f"ServerApp: {said}" in " ".join(log.split()), app_log[-3000:]
    engine = open_server_store(f"sqlite:///{tmp_path / 'runs' / 'server.db'}")
    with Session(engine) as s:
        assert [r.sites_accepted for r in s.scalars(select(Round))] == [1]
        assert {m.site_id for m in s.scalars(select(SiteMetric))} == {good.site_id}
        assert len(s.scalars(select(EnrolledSite)).all()) == 2
    engine.dispose()
