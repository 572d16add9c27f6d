"""The folders are the architecture: checked here, so the tree cannot drift from the rules.

* ``quictun/proto``, ``quictun/punch`` and the relay's core (``PURE_RELAY``: matchmaking,
  admission, federation, relaying, the wire codecs and metrics) are pure: no module there
  imports ``asyncio``,
  ``socket``, ``time``, ``random``, ``secrets`` (or other I/O and clock modules), at the
  top or lazily inside a function (read from the syntax tree), and importing every one
  of them with those imports refused still works (a real interpreter, the imports made by
  quictun's own code refused).
* Each layer imports only the layers below it (the ``ALLOWED`` table), and the relay
  (``signal_server``) only ``quictun.proto``.
* No module imports itself in a circle.
* No module is longer than 600 lines, and no function longer than 80.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IMPURE = {"asyncio", "socket", "time", "random", "secrets", "selectors", "threading",
          "subprocess", "signal", "ssl"}

# layer -> the quictun layers it may import (itself always allowed)
ALLOWED = {
    "quictun.errors": set(),
    "quictun.version": set(),
    "quictun.proto": {"quictun.errors"},
    "quictun.punch": {"quictun.proto", "quictun.errors"},
    "quictun.config": {"quictun.punch"},
    "quictun.store": {"quictun.proto", "quictun.errors"},
    "quictun.quic": {"quictun.proto", "quictun.config", "quictun.errors"},
    "quictun.aio": {"quictun.proto", "quictun.punch", "quictun.quic", "quictun.config",
                    "quictun.store", "quictun.errors", "quictun.version"},
    "quictun.cli": {"quictun.aio", "quictun.proto", "quictun.punch", "quictun.quic",
                    "quictun.config", "quictun.store", "quictun.errors", "signal_server"},
    "quictun.bench": {"quictun.cli", "quictun.aio", "quictun.proto", "quictun.punch",
                      "quictun.quic", "quictun.config", "quictun.store", "quictun.errors",
                      "signal_server", "tests"},
    "quictun.__main__": {"quictun.cli"},
    "quictun": {"quictun.aio", "quictun.config", "quictun.version"},
    "signal_server": {"quictun.proto"},
}
MAX_LINES: dict[str, int] = {}  # exceptions to the 600-line limit (none today)
# the relay's sans-I/O core; its shells (server, cluster, peerlink, redis_registry, cli)
# move the bytes and fire the timers
PURE_RELAY = ("signal_server.matchmaker", "signal_server.types", "signal_server.admission",
              "signal_server.federation", "signal_server.relaying", "signal_server.registry",
              "signal_server.peerwire", "signal_server.metrics", "signal_server.servermetrics",
              "signal_server.resuming")
PURE = ("quictun.proto", "quictun.punch", *PURE_RELAY)


def modules() -> dict[str, Path]:
    out = {}
    for pkg in ("quictun", "signal_server"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path) -> list[tuple[str, int]]:
    """(absolute module, line) of every import in the file, lazy ones included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.append((mod, node.lineno))
            # `from . import x` names submodules: count them as imports too
            found += [(f"{mod}.{a.name}", node.lineno) for a in node.names]
    return found


def layer_of(module: str) -> str | None:
    """The ALLOWED key a module belongs to (the longest matching prefix)."""
    best = None
    for layer in ALLOWED:
        if module == layer or module.startswith(layer + "."):
            if best is None or len(layer) > len(best):
                best = layer
    return best


def test_pure_packages_import_no_io_or_clock_even_lazily() -> None:
    bad = []
    for name, path in modules().items():
        if not name.startswith(PURE):
            continue
        for mod, line in imports_of(name, path):
            if mod.split(".")[0] in IMPURE:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def test_pure_packages_import_with_io_and_clock_refused() -> None:
    """Import every pure module in a fresh interpreter whose ``__import__`` refuses the
    impure modules to quictun's own code (third-party code may use them freely)."""
    names = [n for n in modules() if n.startswith(PURE)]
    code = textwrap.dedent(f"""
        import builtins, importlib, sys
        blocked = {sorted(IMPURE)!r}
        real = builtins.__import__
        def guarded(name, globals=None, locals=None, fromlist=(), level=0):
            importer = (globals or {{}}).get("__name__", "")
            if (level == 0 and name.split(".")[0] in blocked
                    and importer.startswith({PURE!r})):
                raise ImportError(f"{{importer}} imports {{name}}: not pure")
            return real(name, globals, locals, fromlist, level)
        builtins.__import__ = guarded
        for name in {names!r}:
            importlib.import_module(name)
        print("ok", len({names!r}))
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok") and int(r.stdout.split()[1]) >= 15 + len(PURE_RELAY)


def test_each_layer_imports_only_the_layers_below() -> None:
    own = modules()
    bad = []
    for name, path in own.items():
        mine = layer_of(name)
        assert mine is not None, f"{name} belongs to no layer: add it to ALLOWED"
        for mod, line in imports_of(name, path):
            if not mod.startswith(("quictun", "signal_server", "tests")):
                continue
            theirs = layer_of(mod) or mod.split(".")[0]
            if theirs == mine or mod == "quictun" and name.startswith("quictun"):
                continue
            if theirs not in ALLOWED[mine]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {name} ({mine}) imports {mod}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles() -> None:
    own = modules()
    graph: dict[str, set[str]] = {}
    for name, path in own.items():
        deps = set()
        for mod, _line in imports_of(name, path):
            while mod and mod not in own:
                mod = mod.rpartition(".")[0]
            if mod and mod != name and not (name.startswith(mod + ".") and
                                            own[mod].name == "__init__.py"):
                deps.add(mod)
        graph[name] = deps
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_modules_and_functions_stay_small() -> None:
    bad = []
    for path in modules().values():
        rel = str(path.relative_to(ROOT))
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES.get(rel, 600):
            bad.append(f"{rel}: {lines} lines")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if size > 80:
                    bad.append(f"{rel}:{node.lineno} {node.name}(): {size} lines")
    assert not bad, "\n".join(bad)
