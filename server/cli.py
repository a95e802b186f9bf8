"""`m3fm-server`: what the coordinator runs. Run, status, certificates and enrollment join here."""

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="m3fm-fed coordinator: drive federated rounds and aggregate site updates.",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """A command group (the callback keeps Typer from collapsing a one-command app)."""


@app.command()
def info() -> None:
    """Show versions and the model configurations the coordinator can run."""
    from m3fm.envinfo import environment
    from m3fm.model.configs import CONFIGS

    table = Table(title="m3fm-server environment", show_header=False)
    for k, v in environment().items():
        table.add_row(k, v)
    table.add_row("model configurations", ", ".join(CONFIGS))
    Console().print(table)
