"""`m3fm-client`: what a hospital runs. Commands for ingestion, the SuperNode and reports join here."""

import typer
from rich.console import Console

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
