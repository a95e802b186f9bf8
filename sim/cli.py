"""`m3fm-sim`: every site on one machine. Cohort generation and federated runs join here."""

import json
from functools import partial
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from m3fm.console import StageProgress, print_error, print_text

app = typer.Typer(help="m3fm-fed simulation: synthetic hospitals and federated runs on one machine.",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """A command group (the callback keeps Typer from collapsing a one-command app)."""


@app.command("model-demo")
def model_demo(
    config: str = typer.Option("tiny", help="model configuration: tiny, small, base, large, huge"),
    steps: int = typer.Option(20, min=1, help="optimizer steps per phase"),
    out: Path = typer.Option(Path("m3fm-demo"), help="where the checkpoint is written"),
) -> None:
    """Train the full M3FM locally on synthetic tensors: MIM+MLM pretraining, then all tasks at once."""
    from m3fm.tasks import ALL_TASKS
    from sim.model_demo import run_model_demo

    console = Console()
    result = run_model_demo(config, steps, out, log=console.print)
    first, last = result["multitask"][0]["tasks"], result["multitask"][-1]["tasks"]
    table = Table(title=f"multitask loss per task ({config}, {steps} steps, {result['device']})")
    for col in ("task", "first step", "last step"):
        table.add_column(col, justify="right" if col != "task" else "left")
    for t in ALL_TASKS:
        table.add_row(t.name, f"{first[t.name]:.3f}", f"{last[t.name]:.3f}")
    console.print(table)
    if not result["reload_identical"]:
        raise typer.Exit(1)


@app.command()
def cohort(
    out_dir: Path = typer.Argument(..., help="folder to write one site folder per hospital into (must not hold them yet)"),
    sites: int = typer.Option(None, "--sites", min=1, help="number of hospitals (default: the preset's)"),
    exams_per_site: int = typer.Option(None, "--exams-per-site", min=1, help="exams per hospital (default: the preset's)"),
    preset: str = typer.Option("tiny", help="tiny (tests, CI), demo (README main job), eval (learning benchmark), bench (full-size volumes)"),
    seed: int = typer.Option(0, help="same seed, same bytes"),
    workers: int = typer.Option(1, min=1, help="processes rendering exams in parallel"),
    devices: list[str] = typer.Option([], "--devices", help="SITE=N: that site trains on N local ranks (its "
                                      "site.toml [device] devices); repeat per site"),
) -> None:
    """Write a synthetic multi-hospital cohort as real DICOM, with clinical data, reports and labels."""
    import time
    from dataclasses import replace

    from sim.cohort.generate import generate_cohort
    from sim.cohort.presets import build_sites

    console = Console(width=max(Console().width, 120))
    try:
        profiles = build_sites(preset, sites, exams_per_site)
    except KeyError as e:
        raise typer.BadParameter(str(e.args[0]), param_hint="--preset") from None
    ranks = {}
    for d in devices:
        site, _, n = d.partition("=")
        if site not in {p.site_id for p in profiles} or not n.isdigit() or int(n) < 1:
            raise typer.BadParameter(f"{d!r}: give SITE=N with one of {', '.join(p.site_id for p in profiles)} and "
                                     "N a positive number", param_hint="--devices")
        ranks[site] = int(n)
    profiles = [replace(p, devices=ranks.get(p.site_id, 1)) for p in profiles]
    t0 = time.perf_counter()
    with StageProgress(console, {p.site_id: f"writing {p.site_id} (exams)" for p in profiles}) as exams:
        try:
            summaries = generate_cohort(out_dir, profiles, seed, workers, exam_progress=exams)
        except FileExistsError as e:
            print_error(console, e)
            raise typer.Exit(2) from None
    console.print(cohort_table(summaries))
    console.print(f"{len(summaries)} sites written to {out_dir} in {time.perf_counter() - t0:.1f}s (seed {seed}, preset {preset})")


def cohort_table(summaries: list[dict]) -> Table:
    from m3fm.tasks import TASKS

    table = Table(title="synthetic cohort: exams, series and label prevalence (positives / labelled) per site")
    table.add_column("", style="bold")
    for s in summaries:
        table.add_column(s["site_id"], justify="right")
    table.add_row("scanner", *(s["scanner"].replace("MEDICAL SYSTEMS ", "") for s in summaries))
    for key in ("patients", "exams", "series", "slices"):
        table.add_row(key, *(str(s[key]) for s in summaries))
    for t in TASKS:
        cells = []
        for s in summaries:
            p = s["prevalence"].get(t.name)
            if p is None:
                cells.append("-")
            elif p["positive"] is None:  # multi-class task
                cells.append(f"{p['labelled']} labelled")
            else:
                cells.append(f"{p['positive']}/{p['labelled']}")
        table.add_row(t.name, *cells)
    return table


@app.command()
def run(
    cohort_dir: Path = typer.Option(None, "--cohort", help="an existing cohort (site-*/ folders); default: generate one"),
    preset: str = typer.Option("demo", help="cohort preset to generate when no --cohort is given: tiny or demo"),
    config: str = typer.Option(None, help="model configuration (default: the one the sites cached crops for)"),
    engine: str = typer.Option("deployment", help="deployment (SuperLink + one SuperNode per site) or ray"),
    out: Path = typer.Option(Path("m3fm-sim-run"), help="folder for the cohort, run, checkpoints and metrics"),
    server_config: Path = typer.Option(None, "--server-config", help="a server.toml to use instead of the preset's plan"),
    ray_address: str = typer.Option(None, envvar="RAY_ADDRESS",
                                    help="ray engine: join the Ray cluster whose head is at HOST:PORT instead of "
                                    "starting one"),
    cpus_per_site: int = typer.Option(1, min=1, help="ray engine: CPUs a virtual site's actor takes"),
    gpus_per_site: float = typer.Option(0.0, min=0.0,
                                        help="ray engine: GPUs (or a fraction) a virtual site's actor takes"),
) -> None:
    """Federated pretraining then multitask training of every site of a cohort, on this machine (or a Ray cluster)."""
    import time

    from client.ingest import INGEST_STAGES
    from sim.cohort.presets import PRESETS, build_sites
    from sim.federation import (RUN_PLANS, gather_reports, ingest_all, prepare_cohort, run_deployment, run_ray,
                                write_server_toml, write_site_metrics)

    console = Console()
    if engine not in ("deployment", "ray"):
        raise typer.BadParameter("choose deployment or ray", param_hint="--engine")
    if preset not in RUN_PLANS:
        raise typer.BadParameter(f"choose one of {', '.join(RUN_PLANS)}", param_hint="--preset")
    t0 = time.perf_counter()
    out = out.resolve()
    profiles = build_sites(preset) if preset in PRESETS else []
    with StageProgress(console, {p.site_id: f"writing {p.site_id} (exams)" for p in profiles}) as exams:
        sites = prepare_cohort(out, cohort_dir, preset, log=console.print, progress=exams)
    labels = {f"{p.name} {k}": f"{p.name}: {v}" for p in sites for k, v in INGEST_STAGES.items()}
    with StageProgress(console, labels) as ingesting:
        cached = ingest_all(sites, log=console.print, progress=ingesting)
    if config is not None and config != cached:
        print_error(console, f"the sites cached crops for model {cached!r}, not {config!r}; set [ingest] "
                    "model_config in their site.toml and ingest again")
        raise typer.Exit(2)
    toml = server_config or write_server_toml(out / "server.toml", f"sim-{preset}", cached, len(sites), RUN_PLANS[preset])
    console.print(f"federated run with {len(sites)} sites, engine {engine}, config {toml}")
    plain = partial(print_text, console)
    if engine == "deployment":
        code = run_deployment(toml, sites, out, log=plain)
        ok = code == 0
    else:
        outcome = run_ray(toml, sites, log=plain, cpus_per_site=cpus_per_site, gpus_per_site=gpus_per_site,
                          ray_address=ray_address)
        ok = outcome.ok
        if not ok:
            console.print(f"[red]run failed[/red] ({outcome.status}): {escape(str(outcome.error))}")
    written = write_site_metrics(toml, out)
    console.print(f"site metrics: {', '.join(str(p) for p in written.values()) or 'none'}")
    reports = gather_reports(toml, sites, out)
    html = [p for p in reports if p.suffix == ".html"]
    console.print(f"reports ({len(html)}: the run's and one per site that answered): "
                  f"{', '.join(str(p) for p in html) or 'none'}")
    run_json = [p for p in reports if p.name == "report.json" and p.parent.name == "run"]
    if run_json:
        from server.report import above_chance, auc_table, pooled_above_chance

        summary = json.loads(run_json[0].read_text())
        if summary["auc"]:
            console.print(auc_table(summary))
        sure = above_chance(summary)
        console.print(f"{len(sure)} site-task AUCs are above 0.5 with 95% confidence"
                      + (": " + ", ".join(f"{site} {t} (lower bound {lo:.2f})" for site, t, lo in sure) if sure else ""))
        pooled = pooled_above_chance(summary)
        console.print(f"{len(pooled)} tasks are above 0.5 with 95% confidence pooled over sites (fixed-effect)"
                      + (": " + ", ".join(f"{t} (lower bound {lo:.2f})" for t, lo in pooled) if pooled else ""))
    console.print(f"{'[green]done[/green]' if ok else '[red]failed[/red]'} in {time.perf_counter() - t0:.0f}s")
    if not ok:
        raise typer.Exit(1)


@app.command()
def compare(
    cohort_dir: Path = typer.Option(None, "--cohort", help="an existing cohort (site-*/ folders); default: generate one"),
    preset: str = typer.Option("tiny", help="cohort preset to generate when no --cohort is given, and the compute "
                                            "budget (rounds x local steps per phase): tiny or demo"),
    out: Path = typer.Option(Path("m3fm-sim-compare"), help="folder for the cohort (if generated), runs and results"),
    min_cell: int = typer.Option(None, "--min-cell", min=1, help="override every site's minimum cell size (synthetic "
                                                                 "cohorts only: it decides which groups get an AUC)"),
    rounds: int = typer.Option(None, "--rounds", min=1, help="federated rounds per phase (default: the preset's)"),
    local_steps: int = typer.Option(None, "--local-steps", min=1, help="local steps per round (default: the preset's)"),
) -> None:
    """Federated vs centralized vs local-only, pretrained vs from scratch: mean test AUC per task group."""
    import time

    from sim.compare import ARMS, GROUPS, compare as run_compare
    from sim.federation import RUN_PLANS, ingest_all, prepare_cohort

    console = Console(width=max(Console().width, 140))
    if preset not in RUN_PLANS:
        raise typer.BadParameter(f"choose one of {', '.join(RUN_PLANS)}", param_hint="--preset")
    t0 = time.perf_counter()
    out = out.resolve()
    try:
        sites = prepare_cohort(out, cohort_dir, preset, log=console.print)
        ingest_all(sites, log=console.print)
    except (FileNotFoundError, ValueError) as e:  # no site folders, a bad site.toml, sites cut for different models
        print_error(console, e)
        raise typer.Exit(2) from None
    budget = {k: v for k, v in (("rounds", rounds), ("local_steps", local_steps)) if v is not None}
    plan = {k: {**v, **budget} for k, v in RUN_PLANS[preset].items() if k != "evaluate_every"}
    summary = run_compare(sites, plan, out, min_cell, log=console.print)
    table = Table(title=f"mean test AUC per task group ({len(sites)} sites, budget {plan}; "
                        "suppressed: no site had both classes above its minimum cell size)")
    table.add_column("arm")
    for g in (*GROUPS, "mean"):
        table.add_column(g, justify="right")
    lines = ["| arm | " + " | ".join((*GROUPS, "mean")) + " |", "|---" * (len(GROUPS) + 2) + "|"]
    for arm in ARMS:
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in summary["arms"][arm]["groups"].values()]
        table.add_row(arm, *cells)
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    console.print(table)
    (out / "compare.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    console.print(f"wrote {out / 'compare.json'} and {out / 'compare.md'} in {time.perf_counter() - t0:.0f}s")
