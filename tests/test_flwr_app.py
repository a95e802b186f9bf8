"""This repository is a Flower app (`[tool.flwr.app]` in pyproject.toml) and it is the app `m3fm-server run` submits.
Not yet here: a real-process test of `flwr run .` against a plain `flower-superlink` (issue 19)."""

import tomllib
from pathlib import Path

from transport.flower import APP_PYPROJECT

ROOT = Path(__file__).resolve().parents[1]


def test_the_repository_app_is_the_one_m3fm_server_runs():
    mine = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    theirs = APP_PYPROJECT["tool"]["flwr"]["app"]
    assert mine["components"] == theirs["components"] and mine["config"] == theirs["config"]
    assert mine["publisher"] == theirs["publisher"]
