"""How the command-line tools print problems: on one line, never wrapped, never read as markup.

Rich wraps at the terminal width (80 columns when output is captured); an error naming a long path got a line
break mid-path, so the path could no longer be copied, grepped, or matched (CI's deeper checkout path moved the
break onto "site.toml: not found"). Messages also carry user text (paths, field values) where "[...]" would be
taken for rich markup and vanish."""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape


def print_error(console: Console, message: object) -> None:
    console.print(f"[red]error:[/red] {escape(str(message))}", soft_wrap=True)


def print_warning(console: Console, message: object) -> None:
    console.print(f"[yellow]warning:[/yellow] {escape(str(message))}", soft_wrap=True)


def print_text(console: Console, message: object) -> None:
    """A line of text as it is: site names, errors and what the ServerApp said can hold "[...]"."""
    console.print(str(message), markup=False, highlight=False)


class StageProgress:
    """Progress of the stages a person waits for (stage, done, total): rich bars on a terminal; in a log file or
    CI, where bars would print nothing until the end, a plain line per stage at most every `every_s` seconds and
    when it completes. Use as a context manager; call it as the work goes."""

    def __init__(self, console: Console, labels: dict[str, str], every_s: float = 10.0):
        self.console, self.labels, self.every_s = console, labels, every_s
        self.bar, self.tasks, self.last = None, {}, {}

    def __enter__(self) -> "StageProgress":
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            # redrawn on each call, not by rich's refresh thread: with a thread running, ingestion's workers
            # spawn instead of fork (client/series_reader.worker_pool), 2 s later on a bench site
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=self.console, transient=False,
                                auto_refresh=False).__enter__()
        self.t0 = time.monotonic()
        return self

    def __call__(self, stage: str, done: int, total: int) -> None:
        label = self.labels.get(stage, stage)
        if self.bar is not None:
            if stage not in self.tasks:
                self.tasks[stage] = self.bar.add_task(label, total=total)
            self.bar.update(self.tasks[stage], completed=done, total=total, refresh=True)
            return
        now = time.monotonic()
        if done >= total or now - self.last.get(stage, self.t0) >= self.every_s:
            self.last[stage] = now
            self.console.print(f"{escape(label)}: {done}/{total} ({now - self.t0:.0f}s)", soft_wrap=True)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
