"""`m3fm-server`: what the coordinator runs. Run, status, certificates and enrollment join here."""

import typer
from rich.console import Console

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
