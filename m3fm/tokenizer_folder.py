"""Where a RoBERTa tokenizer lives: a folder with vocab.json and merges.txt (site.toml [model] tokenizer, server.toml
[run] tokenizer, the CLIs' --tokenizer). No torch here: configuration files are read before it is imported."""

from __future__ import annotations

from pathlib import Path


def tokenizer_folder(value, base: Path, where: str) -> Path | None:
    """A tokenizer setting (a path, relative to `base`) -> the folder; None when unset; ValueError naming `where`
    when it is not a folder with vocab.json and merges.txt."""
    if value in (None, ""):
        return None
    if not isinstance(value, (str, Path)):
        raise ValueError(f"{where} must be a folder path, got {value!r}")
    path = Path(value) if Path(value).is_absolute() else (Path(base) / value).resolve()
    missing = [f for f in ("vocab.json", "merges.txt") if not (path / f).is_file()]
    if missing:
        raise ValueError(f"{where} {str(value)!r}: {path} lacks {' and '.join(missing)} (a RoBERTa tokenizer folder)")
    return path
