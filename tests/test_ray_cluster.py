"""`m3fm-sim run --engine ray --ray-address` on a real 2-node Ray cluster: a head and a worker node started with
`ray start`, inside a loopback-only network namespace (Ray binds the machine's own address) that is also a PID
namespace, so everything Ray starts ends with the test and `ray stop` sees only this cluster's processes. The run
is tests/test_deployment.py's secure one: every training round through SecAgg+ in chunks with central DP, and each
site's report at the end."""

import shutil
import subprocess
import tempfile

from test_deployment import SECURE_TOML, assert_secure_run_with_reports
from transport.flower import flower_bin, flower_env

SCRIPT = """set -u
ip link set lo up
{ray} start --head --port=6390 --num-cpus=1 --node-ip-address=127.0.0.1 --include-dashboard=false \\
    --disable-usage-stats --temp-dir={ray_tmp} > {tmp}/head.log 2>&1 || {{ cat {tmp}/head.log; exit 3; }}
{ray} start --address=127.0.0.1:6390 --num-cpus=1 --node-ip-address=127.0.0.1 --disable-usage-stats \\
    > {tmp}/worker.log 2>&1 || {{ cat {tmp}/worker.log; exit 4; }}
( for i in $(seq 1 900); do ps -eo pid,ppid,args >> {tmp}/ps.log; echo ---- >> {tmp}/ps.log; sleep 0.5; done ) &
watch=$!
{sim} run --cohort {cohort} --preset tiny --engine ray --ray-address 127.0.0.1:6390 --out {tmp}/out \\
    --server-config {tmp}/server.toml
rc=$?
kill $watch
{ray} stop --force > /dev/null 2>&1
exit $rc
"""


def test_ray_engine_joins_an_existing_two_node_cluster_and_runs_sites_on_both(cohort, ingested, tmp_path):
    out_dir, _ = cohort
    script = tmp_path / "cluster.sh"
    (tmp_path / "server.toml").write_text(SECURE_TOML)
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    script.write_text(SCRIPT.format(ray=flower_bin("ray"), sim=flower_bin("m3fm-sim"), tmp=tmp_path, cohort=out_dir,
                                    ray_tmp=ray_tmp))
    try:
        done = subprocess.run(["unshare", "-n", "-p", "-f", "--mount-proc", "sh", str(script)], capture_output=True,
                              text=True, env=flower_env(), timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "joining the Ray cluster at 127.0.0.1:6390" in done.stdout
    assert_secure_run_with_reports(done.stdout, tmp_path)
    # which node's raylet each virtual-site actor ran under, from the process table sampled during the run
    rows = [line.split(None, 2) for line in (tmp_path / "ps.log").read_text().splitlines() if line[:1] != "-"]
    raylets = {pid for pid, _, args in (r for r in rows if len(r) == 3) if args.split()[0].endswith("raylet/raylet")}
    working = {ppid for _, ppid, args in (r for r in rows if len(r) == 3) if args.startswith("ray::ClientAppActor.run")}
    assert len(raylets) == 2, raylets  # the head and the worker node
    assert working == raylets, (working, raylets)  # virtual sites trained on both nodes
