"""What this machine offers for training: versions, devices, model configurations."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

import torch


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, str]:
    cuda = torch.cuda.is_available()
    return {
        "m3fm-fed": package_version("m3fm-fed"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": package_version("flwr"),
        "opacus": package_version("opacus"),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "bf16 autocast": "yes" if cuda and torch.cuda.is_bf16_supported() else "no (CPU runs fp32)",
        "cpu threads": str(torch.get_num_threads()),
    }


def environment_table(title: str, extra: dict[str, str] | None = None):
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for k, v in {**environment(), **(extra or {})}.items():
        table.add_row(k, v)
    return table
