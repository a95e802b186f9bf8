"""`m3fm-server`: what the coordinator runs. Run, status, certificates and enrollment join here."""

import re
from functools import partial
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from m3fm.console import print_error, print_text, print_warning

app = typer.Typer(help="m3fm-fed coordinator: drive federated rounds and aggregate site updates.",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """A command group (the callback keeps Typer from collapsing a one-command app)."""


@app.command()
def info() -> None:
    """Show versions and the model configurations the coordinator can run."""
    from m3fm.envinfo import environment_table
    from m3fm.model.configs import CONFIGS

    Console().print(environment_table("m3fm-server environment", {"model configurations": ", ".join(CONFIGS)}))


SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # it names files and SuperNodes


def _database_url(config: Path | None, database: str | None, console: Console) -> str:
    """--database, else the database of --config's server.toml; exit 2 naming what is wrong."""
    from server.config import ServerConfigError, load_server_config

    if database:
        return database
    if config is None:
        print_error(console, "give --config server.toml or --database URL")
        raise typer.Exit(2)
    try:
        return load_server_config(config).database_url
    except ServerConfigError as e:
        print_error(console, e)
        raise typer.Exit(2) from None


def _find_run(s, run_id: int | None, database: str, console: Console):
    """The run with that id, or the latest; exit 1 saying so when there is none."""
    from sqlalchemy import select

    from server.store import Run

    row = s.get(Run, run_id) if run_id is not None else s.scalars(select(Run).order_by(Run.id.desc())).first()
    if row is None:
        console.print(f"no run {'with id ' + str(run_id) if run_id is not None else ''} in {database}")
        raise typer.Exit(1)
    return row


@app.command()
def run(
    config: Path = typer.Option(..., "--config", help="the run's server.toml"),
    resume: bool = typer.Option(False, "--resume", help="continue the run of this name from its last checkpoint"),
    database: str = typer.Option(None, "--database", help="SQLAlchemy URL of the server database (default: "
                                 "[run] database, else a SQLite file in [run] out_dir)"),
    host: str = typer.Option("127.0.0.1", help="address the SuperLink binds"),
    port: int = typer.Option(9092, help="the SuperLink's port (Fleet, Control and Runtime APIs)"),
    tls: Path = typer.Option(None, "--tls", help="folder from `m3fm-server certs` (ca.crt, server.pem, server.key)"),
    node_auth: bool = typer.Option(False, "--node-auth", help="admit only sites enrolled with `m3fm-server enroll`"),
    insecure: bool = typer.Option(False, "--insecure", help="run without TLS (plaintext; for loopback tests)"),
) -> None:
    """Start a SuperLink, submit the federated run, show each round, exit non-zero if the run fails."""
    from server.config import ServerConfigError, load_server_config
    from server.coordinator import Security, Stopped, coordinate
    from server.lifecycle import CoordinatorBusy

    console = Console()
    if (tls is None) == (not insecure):
        print_error(console, "give --tls DIR (made by `m3fm-server certs`) or, for plaintext, --insecure")
        raise typer.Exit(2)
    try:
        cfg = load_server_config(config)
        security = Security(tls_dir=tls, node_auth=node_auth)
    except (ServerConfigError, FileNotFoundError) as e:
        print_error(console, e)
        raise typer.Exit(2) from None
    if database:
        cfg.database = database
    if insecure:
        print_warning(console, f"the SuperLink runs without TLS on {host}:{port}"
                               + ("" if node_auth else " and without node authentication"))
    console.print(f"run {cfg.name!r}: {cfg.total_rounds} rounds ({', '.join(f'{p.name} {p.rounds}' for p in cfg.phases)}),"
                  f" strategy {cfg.strategy.name}, model {cfg.model}, database {cfg.database_url}")
    try:
        outcome = coordinate(cfg, resume, host, port, log=partial(print_text, console), security=security)
    except CoordinatorBusy as e:
        print_error(console, e)
        raise typer.Exit(2) from None
    except Stopped as e:
        console.print(f"stopped by {e}; the SuperLink was shut down. Continue later with --resume.")
        raise typer.Exit(130) from None
    if not outcome.ok:
        console.print(f"[red]run failed[/red] ({outcome.status}): {escape(str(outcome.error))}")
        raise typer.Exit(1)
    console.print(f"[green]run {outcome.run_id} completed[/green]: checkpoints in {cfg.out_dir}")


@app.command()
def certs(
    out: Path = typer.Option(..., "--out", help="folder for ca.crt, ca.key, server.pem, server.key (must not hold them)"),
    host: list[str] = typer.Option(..., "--host", help="a name or IP address sites dial (repeat for several)"),
    days: int = typer.Option(825, help="validity of both certificates"),
) -> None:
    """Make the coordinator's CA and its TLS certificate (SubjectAltName: every --host). Give ca.crt to the sites."""
    from privacy.certs import KeyMaterialError, make_certificates

    console = Console()
    try:
        paths = make_certificates(out, host, days)
    except KeyMaterialError as e:
        print_error(console, e)
        raise typer.Exit(2) from None
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}; sites need only {paths['ca.crt']} "
                  f"(keep ca.key offline); run with `m3fm-server run --tls {out}`")


@app.command()
def enroll(
    public_key: Path = typer.Argument(..., help="the site's public key (site.pub from `m3fm-client keys`)"),
    name: str = typer.Option(..., "--name", help="the site's name (e.g. its site_id)"),
    config: Path = typer.Option(None, "--config", help="server.toml (to find its database)"),
    database: str = typer.Option(None, "--database", help="SQLAlchemy URL of the server database"),
) -> None:
    """Register a site's public key: with `m3fm-server run --node-auth` only enrolled sites can connect."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from privacy.certs import KeyMaterialError, read_site_public_key
    from server.store import EnrolledSite, open_server_store

    console = Console()
    if not SITE_NAME.fullmatch(name):
        print_error(console, f"--name {name!r}: use letters, digits, '.', '_' and '-' (it names files)")
        raise typer.Exit(2)
    database = _database_url(config, database, console)
    try:
        key, fingerprint = read_site_public_key(public_key)
    except KeyMaterialError as e:
        print_error(console, e)
        raise typer.Exit(2) from None
    engine = open_server_store(database)
    with Session(engine) as s:
        same = s.scalars(select(EnrolledSite).where((EnrolledSite.name == name) |
                                                    (EnrolledSite.fingerprint == fingerprint))).first()
        if same is not None:  # never replace a site's key silently
            print_error(console, f"{same.name!r} is already enrolled with key SHA-256 {same.fingerprint[:16]}"
                        "...; a site and a key are enrolled once")
            raise typer.Exit(2)
        s.add(EnrolledSite(name=name, public_key=key, fingerprint=fingerprint))
        s.commit()
    engine.dispose()
    console.print(f"enrolled {name!r} (key SHA-256 {fingerprint[:16]}...) in {database}")


@app.command()
def status(
    run_id: int = typer.Argument(None, help="the run's id in the server database (default: the latest)"),
    config: Path = typer.Option(None, "--config", help="server.toml (to find its database)"),
    database: str = typer.Option(None, "--database", help="SQLAlchemy URL of the server database"),
) -> None:
    """Rounds done, sites seen and the last metrics of a run."""
    from rich.table import Table
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from server.coordinator import settle_dead_coordinators
    from server.store import (Coordinator, PrivacyLedger, RejectedReply, Round, RoundAttempt, SiteMetric,
                              open_server_store)
    from transport.protocol import ITEMS, LOSS, NUM_EXAMPLES

    console = Console()
    database = _database_url(config, database, console)
    engine = open_server_store(database)
    settle_dead_coordinators(engine)  # a run whose coordinator process is gone is killed, not running
    with Session(engine) as s:
        run_row = _find_run(s, run_id, database, console)
        attempts = s.scalars(select(RoundAttempt).where(RoundAttempt.run_id == run_row.id)
                             .order_by(RoundAttempt.round, RoundAttempt.attempt)).all()
        coordinator = s.scalars(select(Coordinator).where(Coordinator.run_name == run_row.name)
                                .order_by(Coordinator.id.desc())).first()
        rounds = s.scalars(select(Round).where(Round.run_id == run_row.id).order_by(Round.round)).all()
        sites = sorted(set(s.scalars(select(SiteMetric.site_id).where(SiteMetric.run_id == run_row.id))))
        rejected = s.scalars(select(RejectedReply).where(RejectedReply.run_id == run_row.id)).all()
        console.print(f"run {run_row.id} {run_row.name!r}: {run_row.status}, {len(rounds)}/{run_row.total_rounds} "
                      f"rounds, sites seen: {', '.join(sites) or 'none'}"
                      + (f"\n[red]error:[/red] {escape(run_row.error)}" if run_row.error else ""))
        if coordinator is not None:
            console.print(f"coordinator: pid {coordinator.pid} on {coordinator.host}, "
                          + (f"ended ({coordinator.outcome})" if coordinator.outcome else "running"))
        tries = {r.round: sum(a.round == r.round for a in attempts) for r in rounds}
        t = Table(title="rounds")
        for col in ("round", "phase", "sites", "attempts", "seconds", "train loss (mean)", "evaluation"):
            t.add_column(col)
        for r in rounds:
            losses = [v for k, v in (r.train_metrics or {}).items() if k.startswith(LOSS)]
            ev = ", ".join(f"{k} {v:.3f}" for k, v in (r.evaluate_metrics or {}).items()
                           if not k.startswith(ITEMS) and k != NUM_EXAMPLES)
            t.add_row(str(r.round), f"{r.phase} {r.phase_round}", f"{r.sites_accepted}/{r.sites_replied}",
                      str(tries.get(r.round) or "-"), f"{r.seconds:.0f}",
                      f"{sum(losses) / len(losses):.3f}" if losses else "-", ev[:60] or "-")
        console.print(t)
        ledger = s.scalars(select(PrivacyLedger).where(PrivacyLedger.run_id == run_row.id)
                           .order_by(PrivacyLedger.round)).all()
        if ledger:
            last = {r.site_id: r for r in ledger}  # the latest row per site (or "*": central DP)
            pt = Table(title="privacy spent (latest round per site; * = central DP on the aggregate)")
            for col in ("site", "mechanism", "round", "epsilon", "delta", "noise multiplier"):
                pt.add_column(col)
            for r in last.values():
                pt.add_row(r.site_id, r.mechanism, str(r.round), f"{r.epsilon:.3f}", f"{r.delta:g}",
                           f"{r.noise_multiplier:g}")
            console.print(pt)
        if retried := [a for a in attempts if a.outcome != "ok"]:
            at = Table(title="round attempts that did not count (retried, interrupted by a coordinator stop, failed)")
            for col in ("round", "attempt", "outcome", "sites", "lost", "detail"):
                at.add_column(col)
            for a in retried:
                at.add_row(str(a.round), str(a.attempt), a.outcome, str(a.sent), str(a.lost), (a.detail or "")[:100])
            console.print(at)
        if rejected:
            rt = Table(title="replies that did not count")
            for col in ("round", "site", "kind", "reason"):
                rt.add_column(col)
            for r in rejected:
                rt.add_row(str(r.round), r.site_id, r.kind, r.reason[:100])
            console.print(rt)
    engine.dispose()


@app.command()
def report(
    run_id: int = typer.Argument(None, help="the run's id in the server database (default: the latest)"),
    config: Path = typer.Option(None, "--config", help="server.toml (to find its database and out_dir)"),
    database: str = typer.Option(None, "--database", help="SQLAlchemy URL of the server database"),
    out: Path = typer.Option(None, "--out", help="folder for report.json and report.html (default: the run's "
                                                "checkpoint folder, OUT_DIR/run-NNNN)"),
) -> None:
    """The run report: site x task AUC (from the sites' reports), learning curves, epsilon per site, replies that
    did not count; as report.json and a self-contained report.html."""
    from sqlalchemy.orm import Session

    from server.config import load_server_config
    from server.report import auc_table, write_run_report
    from server.store import open_server_store

    console = Console()
    database = _database_url(config, database, console)
    engine = open_server_store(database)
    with Session(engine) as s:
        run_id = _find_run(s, run_id, database, console).id
    if out is None:
        if config is None:
            print_error(console, "give --out FOLDER (or --config, whose out_dir holds the run's folder)")
            raise typer.Exit(2)
        out = load_server_config(config).run_dir(run_id)
    json_path, html_path, summary = write_run_report(engine, run_id, out)
    engine.dispose()
    console.print(auc_table(summary) if summary["auc"] else "no site reports for this run")
    for site, e in summary["epsilon"].items():
        console.print(f"epsilon {site}: {e['epsilon']:.3f} ({e['mechanism']}, delta {e['delta']:g})")
    console.print(f"{len(summary['rejected'])} replies did not count; wrote {json_path} and {html_path}")


@app.command("import-weights")
def import_weights(
    reference: Path = typer.Argument(..., help="a state dict of the public M3FM code (e.g. model_heart.pth)"),
    config: str = typer.Option(..., "--config", help="its size: base, large or huge (tiny, small for tests)"),
    out: Path = typer.Option(..., "--out", help="the checkpoint to write (must not exist)"),
    head: list[str] = typer.Option([], "--head", help="REFERENCE_HEAD=OURS for a head not known by name "
                                   "(known: heart=yes_no, cancer_risk=lung_cancer_risk)"),
    allow_extra: bool = typer.Option(False, "--allow-extra", help="convert even when reference keys map to nothing "
                                     "(they are listed)"),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="the RoBERTa folder (vocab.json, merges.txt) the "
                                   "weights were trained with; recorded, so runs and sites must use the same"),
) -> None:
    """Convert published M3FM weights into a checkpoint of the "<size>-ref" configuration ([run] init starts a run
    from it; `m3fm-client predict --model` answers with it)."""
    import torch

    from m3fm.checkpoint import write_checkpoint
    from m3fm.model.configs import SIZES, get_config
    from m3fm.model.text import load_tokenizer
    from m3fm.reference import ReferenceWeightsError, check_heads, convert
    from m3fm.tokenizer_folder import tokenizer_folder

    console = Console()
    if config not in SIZES:
        print_error(console, f"--config {config!r}: give one of {', '.join(SIZES)}")
        raise typer.Exit(2)
    if out.exists():
        print_error(console, f"{out} exists; nothing is overwritten")
        raise typer.Exit(2)
    try:
        state = torch.load(reference, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a missing, truncated or foreign file: named, with torch's reason
        print_error(console, f"{reference}: not a readable state dict ({type(e).__name__}: {e})")
        raise typer.Exit(2) from None
    state = state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        print_error(console, f"{reference}: not a state dict of tensors")
        raise typer.Exit(2)
    cfg = get_config(f"{config}-ref")
    try:
        converted, report = convert(state, cfg, check_heads(head), allow_extra)
        text = load_tokenizer(cfg, tokenizer_folder(tokenizer, Path.cwd(), "--tokenizer"))
    except (ReferenceWeightsError, ValueError, FileNotFoundError) as e:
        print_error(console, f"{reference}: {e}")
        raise typer.Exit(2) from None
    if tokenizer is None:
        print_warning(console, "no --tokenizer: the checkpoint is tied to the shipped tokenizer; the published "
                      "weights were trained with RoBERTa's vocab.json and merges.txt")
    write_checkpoint(out, converted, cfg, extra={"imported_from": str(reference.resolve()), "tokenizer":
                                                 text.fingerprint, **report.summary()})
    console.print(f"{reference} -> {out} (config {cfg.name}): {len(report.mapped)} tensors mapped from "
                  f"{len(state)} reference keys, {len(report.dropped)} constants and aliases dropped, "
                  f"{len(report.initialised)} initialised (what the reference lacks)")
    for key in report.extra:
        print_warning(console, f"reference key {key} maps to nothing; left out (--allow-extra)")
