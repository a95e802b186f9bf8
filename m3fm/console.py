"""How the command-line tools print problems: on one line, never wrapped, never read as markup.

Rich wraps at the terminal width (80 columns when output is captured); an error naming a long path got a line
break mid-path, so the path could no longer be copied, grepped, or matched (CI's deeper checkout path moved the
break onto "site.toml: not found"). Messages also carry user text (paths, field values) where "[...]" would be
taken for rich markup and vanish."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape


def print_error(console: Console, message: object) -> None:
    console.print(f"[red]error:[/red] {escape(str(message))}", soft_wrap=True)


def print_warning(console: Console, message: object) -> None:
    console.print(f"[yellow]warning:[/yellow] {escape(str(message))}", soft_wrap=True)
