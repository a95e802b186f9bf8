"""The coordinator's Flower ServerApp: reads the run config and hands the Grid to server/rounds.py.

Run config keys (set by `m3fm-server run` / `m3fm-sim run`): `config` (path to
server.toml), `resume` (continue the run of that name), `database` (overrides
the URL in server.toml), `coordinator` (the submitting `m3fm-server run` process as
"pid:start"; this ServerApp ends when it is gone, server/lifecycle.py), `enrolled-sites` (how many site keys
`m3fm-server run --node-auth` admitted; 0 without node authentication).
"""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.config import load_server_config
from server.lifecycle import watch_coordinator
from server.rounds import run_federation
from transport.object_pulls import quick_object_pulls

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    quick_object_pulls()  # this flwr-serverapp process pulls every reply's objects from the SuperLink
    rc = context.run_config
    if rc.get("coordinator"):
        watch_coordinator(str(rc["coordinator"]))
    cfg = load_server_config(str(rc["config"]))
    if rc.get("database"):
        cfg.database = str(rc["database"])
    if not cfg.expected_sites:  # under node authentication the run is for the enrolled sites
        cfg.expected_sites = int(rc.get("enrolled-sites", 0))
    run_federation(grid, cfg, resume=bool(rc.get("resume", False)), flwr_run_id=context.run_id)
