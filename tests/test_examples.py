"""The examples and the docs do not rot: examples/server.toml and examples/site.toml load through the real loaders
and name every field those know; README.md stays short; every link and repository path the docs give exists."""

import re
import shutil
import tomllib
from pathlib import Path

from client.site import FIELDS as SITE_FIELDS, load_site
from server.config import FIELDS as SERVER_FIELDS, load_server_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")}


def named_fields(path: Path) -> dict[str, set[str]]:
    """table -> the fields the file sets or shows commented out (`# key = value`)."""
    out: dict[str, set[str]] = {"": set()}
    table = ""
    for line in path.read_text().splitlines():
        if m := re.match(r"\s*#?\s*\[([\w.]+)\]\s*(#|$)", line):  # a table, or one shown commented out
            table = m.group(1)
            out.setdefault(table, set())
            parts = table.split(".")
            for i in range(len(parts)):  # [privacy.dp_sgd] names privacy at the top and dp_sgd in [privacy]
                out.setdefault(".".join(parts[:i]), set()).add(parts[i])
        elif m := re.match(r"\s*#?\s*(\w+)\s*=", line):
            out[table].add(m.group(1))
    return out


def test_example_server_toml_loads_and_names_every_field():
    cfg = load_server_config(ROOT / "examples" / "server.toml")
    assert cfg.dp_sgd is not None and cfg.central_dp is not None and cfg.secagg is not None
    assert cfg.name == "m3fm-demo" and cfg.model == "tiny" and cfg.total_rounds == 2
    named = named_fields(ROOT / "examples" / "server.toml")
    missing = {t: sorted(f - named.get(t, set())) for t, f in SERVER_FIELDS.items() if f - named.get(t, set())}
    assert not missing, f"examples/server.toml does not show {missing}"


def test_example_site_toml_loads_and_names_every_field(tmp_path):
    site_dir = tmp_path / "site-01"
    site_dir.mkdir()
    shutil.copy(ROOT / "examples" / "site.toml", site_dir / "site.toml")
    site = load_site(site_dir)
    assert site.site_id == "site-01" and site.work_dir == (tmp_path / "work" / "site-01").resolve()
    assert site.model_config == "base" and site.privacy["max_epsilon"] == 8.0 and site.devices == 1
    named = named_fields(ROOT / "examples" / "site.toml")
    informational = {"scanner", "cohort"}
    missing = {t: sorted(f - named.get(t, set()) - (informational if t == "" else set()))
               for t, f in SITE_FIELDS.items()}
    assert not any(missing.values()), f"examples/site.toml does not show {missing}"


def test_a_misspelt_site_field_is_refused(tmp_path):
    import pytest

    from client.site import SiteConfigError

    (tmp_path / "site.toml").write_text('site_id = "s"\ntasks = []\n[privacy]\nmax_epsilion = 3.0\n')
    with pytest.raises(SiteConfigError, match=r"unknown field\(s\) \['max_epsilion'\] in \[privacy\]"):
        load_site(tmp_path)


def test_readme_is_short_and_every_link_and_path_in_the_docs_exists():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
    broken = []
    for doc in DOCS:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):  # markdown links
            if not re.match(r"https?://", target) and not (doc.parent / target).exists():
                broken.append(f"{doc.name}: link {target}")
        for path in re.findall(r"`([\w./-]+\.(?:py|md|toml|json|png))`", text):  # repository paths in code spans
            placeholder = re.search(r"(^|/)[A-Z_]+(\.|/|$)", path)  # benchmarks/results/NAME.json
            if path.split("/")[0] in TOP and "/" in path and not placeholder and not (ROOT / path).exists():
                broken.append(f"{doc.name}: path {path}")
    assert not broken, broken


def test_code_cites_only_documents_the_repository_has():
    cited = set()
    for py in ROOT.glob("*/**/*.py"):
        if ".venv" in py.parts:
            continue
        for name in re.findall(r"\b([A-Z][A-Z0-9_]+\.md)\b", py.read_text()):
            cited.add((py.relative_to(ROOT).as_posix(), name))
    present = {p.name for p in ROOT.rglob("*.md") if ".venv" not in p.parts}
    assert not [c for c in cited if c[1] not in present], sorted(c for c in cited if c[1] not in present)
