"""`m3fm-client`: what a hospital runs. Commands for ingestion, the SuperNode and reports join here."""

from pathlib import Path

import typer
from rich.console import Console

from m3fm.console import StageProgress, print_error, print_warning

app = typer.Typer(help="m3fm-fed hospital site: ingest local data, train in federated rounds, report.",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """A command group (the callback keeps Typer from collapsing a one-command app)."""


@app.command()
def info() -> None:
    """Show versions and the compute this site offers for training."""
    from m3fm.envinfo import environment_table

    Console().print(environment_table("m3fm-client environment"))


@app.command()
def ingest(
    site_dir: Path = typer.Argument(..., help="the site folder (site.toml, dicom/, clinical.csv, labels.csv, reports/)"),
    workers: int = typer.Option(1, min=1, help="processes reading and cropping series in parallel"),
) -> None:
    """Check, convert and cache the site's CT series and tables into its work folder and database."""
    from client.ingest import INGEST_STAGES, ingest_site
    from client.site import SiteConfigError, load_site

    console = Console()
    try:
        site = load_site(site_dir)
    except SiteConfigError as e:
        print_error(console, e)
        raise typer.Exit(2) from None
    source = f"the PACS at {site.dicomweb.url} and {site.site_dir}" if site.dicomweb else str(site.site_dir)
    console.print(f"ingesting {site.site_id} ({site.name}) from {source} into {site.work_dir}")
    with StageProgress(console, INGEST_STAGES) as progress:
        summary = ingest_site(site, workers=workers, progress=progress)
    print_summary(console, site, summary)
    if summary["series_accepted"] == 0 and summary["exams"] == 0:
        console.print("[red]nothing usable was found[/red]: no accepted CT series and no clinical records")
        raise typer.Exit(1)


def print_summary(console: Console, site, summary: dict) -> None:
    from rich.table import Table

    from client.ingest import rejection_rows

    t = Table(title=f"{site.site_id}: ingestion summary ({summary['seconds']:.1f} s)")
    t.add_column("what")
    t.add_column("count", justify="right")
    for key, label in (("files", "DICOM files"), ("files_read", "files read this run"),
                       ("series_accepted", "series accepted"), ("series_rejected", "series rejected"),
                       ("series_processed", "series processed this run"), ("exams", "exams (clinical.csv)"),
                       ("exams_with_images", "exams with an accepted series"), ("patients", "patients"),
                       ("crops", "cached crops")):
        t.add_row(label, str(summary[key]))
    for key, label in (("series_listed", "PACS: CT series listed"), ("series_downloaded", "PACS: series downloaded"),
                       ("instances_downloaded", "PACS: instances downloaded"),
                       ("series_failed", "PACS: series that failed to download")) if "pacs" in summary else ():
        t.add_row(label, str(summary["pacs"][key]))
    for split, n in sorted(summary["splits"].items()):
        t.add_row(f"patients in {split}", str(n))
    console.print(t)
    if summary["rejected"]:
        r = Table(title="rejected, by reason")
        r.add_column("reason")
        r.add_column("count", justify="right")
        for category, n in sorted(summary["rejected"].items()):
            r.add_row(category, str(n))
        console.print(r)
        d = Table(title="problems (first 30; all are in the site database, table 'rejections')")
        for col in ("file", "row", "column", "problem"):
            d.add_column(col)
        for row in rejection_rows(site)[:30]:
            d.add_row(*row)
        console.print(d)
    lab = Table(title="labelled exams per task (with the image the task needs)")
    lab.add_column("task")
    lab.add_column("exams", justify="right")
    for task, n in summary["labelled"].items():
        lab.add_row(task, str(n))
    console.print(lab)


@app.command()
def keys(
    out: Path = typer.Option(..., "--out", help="folder for the key pair (must not hold one already)"),
    name: str = typer.Option("site", help="file names: NAME.key (private, stays here) and NAME.pub (to the coordinator)"),
) -> None:
    """Make this site's ECDSA key pair for node authentication; send NAME.pub to the coordinator to enroll."""
    from privacy.certs import KeyMaterialError, make_site_keys

    console = Console()
    try:
        private, public = make_site_keys(out, name)
    except KeyMaterialError as e:
        print_error(console, e)
        raise typer.Exit(2) from None
    console.print(f"wrote {private} (private: keep it here) and {public} (send it for `m3fm-server enroll`)")


@app.command()
def start(
    site_dir: Path = typer.Option(..., "--site", help="the site folder (ingested with `m3fm-client ingest`)"),
    superlink: str = typer.Option(..., "--superlink", help="the coordinator's SuperLink, HOST:PORT"),
    port: int = typer.Option(9094, help="local port of this SuperNode's runtime API (one per SuperNode on a host)"),
    root_cert: Path = typer.Option(None, "--root-cert", help="the coordinator's ca.crt (TLS)"),
    key: Path = typer.Option(None, "--key", help="this site's private key from `m3fm-client keys` (node auth)"),
    insecure: bool = typer.Option(False, "--insecure", help="connect without TLS (plaintext; for loopback tests)"),
    max_retries: int = typer.Option(None, "--max-retries", help="give up after this many failed connection attempts"),
    offline_limit: float = typer.Option(120.0, "--offline-limit", min=1.0,
                                        help="report when the SuperNode has not reached the SuperLink for this long (s)"),
    restarts: int = typer.Option(3, "--restarts", min=0,
                                 help="restart a SuperNode that exits after it had connected, at most this often"),
    devices: int = typer.Option(None, "--devices", min=1,
                                help="local ranks to train on, one per GPU (default: site.toml [device] devices, 1)"),
) -> None:
    """Join the federation: run a Flower SuperNode for this site, and keep it healthy, until Ctrl-C or SIGTERM."""
    import signal

    from privacy.certs import KeyMaterialError, check_root_certificate, check_site_private_key

    console = Console()
    if (root_cert is None) == (not insecure):
        print_error(console, "give --root-cert CA.crt (TLS, from the coordinator) or, for plaintext, --insecure")
        raise typer.Exit(2)
    try:  # first, before torch is even imported: a bad file is named here, not found dead in a SuperNode log later
        if root_cert is not None:
            check_root_certificate(root_cert)
        if key is not None:
            check_site_private_key(key)
    except KeyMaterialError as e:
        print_error(console, e)
        raise typer.Exit(2) from None

    from client.channel import socket_path
    from client.federated import SiteNotReady, ensure_ingested
    from client.site import SiteConfigError, load_site
    from client.supervise import ServiceKeeper, start_site_service, supervise
    from transport.flower import flower_env, start_supernode, stop
    from transport.protocol import SERVICE_SOCKET, SITE_DIR

    try:
        site = load_site(site_dir)
        summary = ensure_ingested(site)
    except (SiteConfigError, SiteNotReady) as e:
        print_error(console, e)
        raise typer.Exit(2) from None
    args: list[str] = ["--insecure"] if insecure else ["--root-certificates", str(root_cert.resolve())]
    if key is not None:
        args += ["--auth-supernode-private-key", str(key.resolve())]
    if max_retries is not None:
        args += ["--max-retries", str(max_retries)]
    if insecure:
        print_warning(console, f"connecting to {superlink} without TLS" + ("" if key else " or node authentication"))
    log_path = site.work_dir / "supernode.log"
    sock = socket_path(site.work_dir)
    service_log = site.work_dir / "service.log"
    keeper = ServiceKeeper(lambda: start_site_service(site.site_dir, sock, service_log, devices), sock, console.print)
    try:
        keeper.launch()  # the site opened, the model built: the first round pays no start-up
    except RuntimeError as e:
        print_error(console, f"{e}; see {service_log}")
        raise typer.Exit(1) from None
    ranks = devices or site.devices
    console.print(f"{site.site_id}: site service pid {keeper.proc.pid} on {sock}"
                  + (f", training on {ranks} ranks" if ranks > 1 else "") + f"; log {service_log}")

    def launch():
        node_config = f'{SITE_DIR}="{site.site_dir}" {SERVICE_SOCKET}="{sock}"'
        node = start_supernode(superlink, port, node_config, log_path, env=flower_env(), extra_args=tuple(args))
        console.print(f"{site.site_id}: SuperNode pid {node.pid} serving {summary.get('series_accepted', 0)} series, "
                      f"{summary.get('exams', 0)} exams; log {log_path}")
        return node

    stopping: dict = {}

    def on_signal(signum, frame):
        stopping["by"] = signal.Signals(signum).name

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    try:
        code = supervise(launch, log_path, superlink, offline_limit, restarts, console.print, stopping, stop,
                         tick=lambda: stopping or keeper.check())  # a signal also reaches the service: no restart
    finally:
        stop(keeper.proc)
    if code:
        raise typer.Exit(code)


@app.command()
def report(
    site_dir: Path = typer.Option(..., "--site", help="the site folder (site.toml)"),
    model: Path = typer.Option(None, "--model", help="an m3fm checkpoint; default: the last model a run sent here"),
    out: Path = typer.Option(None, "--out", help="folder for report.json and report.html; default: "
                                                "WORK_DIR/reports/<model>-<split>-<time>"),
    split: str = typer.Option("test", help="train, val or test"),
    threshold: float = typer.Option(0.5, min=0.0, max=1.0, help="probability threshold of sensitivity/specificity"),
) -> None:
    """Evaluate a model on the site's split and write report.json and a self-contained report.html."""
    import time

    from rich.table import Table

    from client.federated import SiteNotReady
    from client.report import ReportError, build_report, latest_model, load_model, write_report
    from client.site import SiteConfigError, load_site

    console = Console()
    if split not in ("train", "val", "test"):
        print_error(console, f"--split must be train, val or test, got {split!r}")
        raise typer.Exit(2)
    try:
        site = load_site(site_dir)
        path = model or latest_model(site)
        net, source = load_model(path)
        out = out or site.work_dir / "reports" / f"{path.stem}-{split}-{time.strftime('%Y%m%d-%H%M%S')}"
        rep = build_report(site, net, source, split, threshold)
        json_path, html_path = write_report(rep, out)
    except (SiteConfigError, SiteNotReady, ReportError, FileNotFoundError, ValueError) as e:
        print_error(console, e)
        raise typer.Exit(2) from None
    table = Table(title=f"{site.site_id}: {split} split, model {path.name}")
    for col in ("task", "n", "AUC", "95% CI"):
        table.add_column(col)
    for name, m in rep["tasks"].items():
        ci = m.get("auc_ci", "")
        table.add_row(name, str(m["n"]), f"{m['auc']:.3f}" if isinstance(m.get("auc"), float) else str(m.get("auc", "")),
                      f"{ci[0]:.3f}-{ci[1]:.3f}" if isinstance(ci, list) else str(ci))
    console.print(table)
    console.print(f"wrote {json_path} and {html_path}")


@app.command()
def predict(
    dicom_dir: Path = typer.Argument(..., help="a folder with one CT series (DICOM files, any layout)"),
    model: Path = typer.Option(..., "--model", help="an m3fm checkpoint (a run's, or `m3fm-server import-weights`)"),
    text: str = typer.Option(None, "--text", help="the clinical record as sentences"),
    clinical: Path = typer.Option(None, "--clinical", help="a clinical.csv (the site format); its row for --exam"),
    exam: str = typer.Option(None, "--exam", help="the exam_id of --clinical's row (default: its only row)"),
    report_file: Path = typer.Option(None, "--report", help="the radiology report text (Lung-RADS reads it)"),
    task: list[str] = typer.Option([], "--task", help="ask only these tasks (default: every task)"),
    series: str = typer.Option(None, "--series", help="the SeriesInstanceUID when the folder holds several"),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="the RoBERTa folder the model was trained with"),
    min_slices: int = typer.Option(64, "--min-slices", min=1, help="as ingestion's [ingest] min_slices"),
    out: Path = typer.Option(None, "--out", help="also write the answers as JSON here"),
) -> None:
    """Answer every task for one patient's CT series: the series read and cropped as ingestion does."""
    import json

    from rich.table import Table

    from client.predict import PredictError, model_and_tokenizer, places, predict as ask, read_one_series
    from m3fm.data.clinical import clinical_sentences, read_clinical
    from m3fm.tasks import TASK_BY_NAME
    from m3fm.tokenizer_folder import tokenizer_folder

    console = Console()
    try:
        if unknown := [t for t in task if t not in TASK_BY_NAME]:
            raise PredictError(f"--task {unknown}: not tasks; known: {', '.join(TASK_BY_NAME)}")
        if text is not None and clinical is not None:
            raise PredictError("give --text or --clinical, not both")
        sentences = [text] if text else []
        if clinical is not None:
            records, problems = read_clinical(clinical, str(clinical))
            if not records:
                raise PredictError(f"{problems[0] if problems else f'{clinical}: no rows'}")
            for problem in problems:  # a bad value is left out of the record, as ingestion does
                print_warning(console, problem)
            if exam is None and len(records) != 1:
                raise PredictError(f"{clinical} holds {len(records)} exams; choose one with --exam")
            exam = exam or next(iter(records))
            if exam not in records:
                raise PredictError(f"{clinical}: no exam {exam!r}")
            sentences = clinical_sentences(records[exam])
        net, tok = model_and_tokenizer(model, tokenizer_folder(tokenizer, Path.cwd(), "--tokenizer"))
        uid, geo, hu, boxes = read_one_series(dicom_dir, min_slices, series)
        answers = ask(net, tok, hu, geo.spacing, boxes, sentences,
                      report_file.read_text(encoding="utf-8") if report_file else None, task or None)
    except (PredictError, FileNotFoundError, ValueError) as e:
        print_error(console, e)
        raise typer.Exit(2) from None
    table = Table(title=f"series {uid} ({'x'.join(map(str, geo.shape))} voxels), model {model.name}")
    for col in ("task", "where", "answer", "probabilities or 1-6 y risk"):
        table.add_column(col)
    for name, got in answers.items():
        for where, a in places(got):
            shown = (" ".join(f"{p:.3f}" for p in a["risk"]) if "risk" in a else a.get("skipped") or
                     ", ".join(f"{k} {p:.3f}" for k, p in a["answers"].items()))
            table.add_row(name, where, a.get("answer", "risk" if "risk" in a else "-"), shown)
    console.print(table)
    if out is not None:
        out.write_text(json.dumps({"series": uid, "model": str(model), "answers": answers}, indent=1))
        console.print(f"answers: {out}")
