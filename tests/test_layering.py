"""The layering the README promises, read from the source (every import, function-level ones included):
no import circles, `m3fm/` never imports Flower, a hospital (`client/`) never imports the coordinator (`server/`)
and the coordinator never imports a hospital, and the model package imports nothing above it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("m3fm", "client", "server", "privacy", "transport", "sim")


def module_imports() -> dict[str, set[str]]:
    """module -> the modules (ours and others', top level) it imports anywhere in its file."""
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            deps = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    deps.add(node.module)
                elif isinstance(node, ast.Import):
                    deps |= {a.name for a in node.names}
            out[name] = deps
    return out


def ours(deps: set[str], mods: dict) -> set[str]:
    return {d for d in deps if d in mods}


def test_no_import_circles():
    mods = module_imports()
    state, circles = {}, []

    def visit(m, stack):
        state[m] = "open"
        stack.append(m)
        for d in sorted(ours(mods[m], mods)):
            if state.get(d) == "open":
                circles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = "done"

    for m in sorted(mods):
        if m not in state:
            visit(m, [])
    assert not circles, circles


def test_the_layers_import_only_downwards():
    mods = module_imports()
    wrong = []
    for m, deps in mods.items():
        top = m.split(".")[0]
        for d in deps:
            root = d.split(".")[0]
            if top == "m3fm" and (root == "flwr" or root in PACKAGES and root != "m3fm"):
                wrong.append(f"{m} imports {d}")
            if (top, root) in (("client", "server"), ("server", "client")):
                wrong.append(f"{m} imports {d}")
            if m.startswith("m3fm.model") and d.startswith("m3fm.") and not d.startswith(("m3fm.model", "m3fm.tasks")):
                wrong.append(f"{m} imports {d}: the model package sits below everything but the task registry")
    assert not wrong, wrong
