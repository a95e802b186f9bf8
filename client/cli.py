"""`m3fm-client`: what a hospital runs. Commands for ingestion, the SuperNode and reports join here."""

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="m3fm-fed hospital site: ingest local data, train in federated rounds, report.",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """A command group (the callback keeps Typer from collapsing a one-command app)."""


@app.command()
def info() -> None:
    """Show versions and the compute this site offers for training."""
    from m3fm.envinfo import environment

    table = Table(title="m3fm-client environment", show_header=False)
    for k, v in environment().items():
        table.add_row(k, v)
    Console().print(table)
