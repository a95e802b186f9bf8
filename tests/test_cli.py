import shutil
import subprocess
import sys
from pathlib import Path


def script(name: str) -> str:
    """The console script installed beside this interpreter (a venv need not be on PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    assert found, f"{name} is not installed"
    return found


def run(*args, timeout=300):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)


def test_console_scripts_are_installed_and_answer_help():
    for name in ("m3fm-client", "m3fm-server", "m3fm-sim"):
        res = run(script(name), "--help")
        assert res.returncode == 0 and "Usage" in res.stdout, res.stderr


def test_client_info_reports_the_environment():
    res = run(script("m3fm-client"), "info")
    assert res.returncode == 0 and "torch" in res.stdout and "opacus" in res.stdout


def test_configs_table_lists_every_configuration():
    res = run(sys.executable, "-m", "m3fm.model")
    assert res.returncode == 0, res.stderr
    for name in ("tiny", "small", "base", "large", "huge"):
        assert name in res.stdout
    assert "M3FM total" in res.stdout


def test_model_demo_trains_and_reloads(tmp_path):
    res = run(script("m3fm-sim"), "model-demo", "--steps", "3", "--out", str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "predictions identical: True" in res.stdout.replace("\n", " ")
    assert (tmp_path / "model-demo.pt").is_file()


def test_progress_in_a_log_prints_plain_lines_at_most_every_interval_and_at_the_end():
    import io

    from rich.console import Console

    from m3fm.console import StageProgress

    out = io.StringIO()
    with StageProgress(Console(file=out, force_terminal=False, width=200), {"series": "cropping"}, every_s=3600) as p:
        for i in range(1, 101):
            p("series", i, 100)
    lines = out.getvalue().splitlines()  # the interval never passed: only the stage's completion
    assert len(lines) == 1 and lines[0].startswith("cropping: 100/100 (")
    out = io.StringIO()
    with StageProgress(Console(file=out, force_terminal=False, width=200), {}, every_s=0) as p:
        for i in range(1, 4):
            p("index", i, 3)
    assert [line.split(" (")[0] for line in out.getvalue().splitlines()] == ["index: 1/3", "index: 2/3", "index: 3/3"]
