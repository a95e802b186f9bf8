"""`m3fm-sim`: every site on one machine. Cohort generation and federated runs join here."""

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

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
