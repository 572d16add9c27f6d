"""Every distribution the code imports is declared in pyproject.toml.

A module installed by hand on a developer's machine once hid a missing declaration, and
every fresh install broke. This test reads every import in the product packages (lazy ones
inside functions too) and in the tests, maps each top-level module to the distribution that
provides it in *this* environment (``importlib.metadata.packages_distributions()``), and
fails when that distribution is not declared where it has to be:

* product code (``quictun/``, ``signal_server/``): in ``[project] dependencies``, or, for
  the modules named in ``OPTIONAL`` (imported only behind a feature switch), in that extra;
* tests: in ``dependencies`` or the ``test`` extra.

A module that no installed distribution provides fails too: in the clean virtual
environment that ``.ci/run`` builds, an undeclared dependency is simply not there.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OWN = {"quictun", "signal_server", "tests", "benchmarks", "helpers", "natsim", "conftest"}

# Product-code imports that may live in an extra instead of the base dependencies, and
# why each is optional. Every other third-party import in the product must be a base
# dependency: it is imported on a path any user can take.
OPTIONAL = {
    "qh3": ("fast", "the second QUIC engine, loaded only when QUICTUN_ENGINE picks it"),
    "uvloop": ("fast", "a faster event loop, used only when installed"),
    "redis": ("redis", "the shared registry of a relay cluster, imported only with --redis"),
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    assert m, f"cannot read the requirement {req!r}"
    return _norm(m.group(1))


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {_req_name(r) for r in project.get("dependencies", [])}
    extras = {extra: {_req_name(r) for r in reqs}
              for extra, reqs in project.get("optional-dependencies", {}).items()}
    return base, extras


def _own_test_modules() -> set[str]:
    """Top-level names of the test tree's own modules (imported as ``import helpers``)."""
    return {p.stem for p in (ROOT / "tests").rglob("*.py")} | {
        p.name for p in (ROOT / "tests").rglob("*") if p.is_dir()}


def imports_in(folder: Path, root: Path = ROOT) -> dict[str, list[str]]:
    """Top-level module -> ["file:line", ...] (paths relative to ``root``) for every
    absolute import under ``folder``, at any depth of the syntax tree (lazy imports inside
    functions included)."""
    found: dict[str, list[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                where = f"{path.relative_to(root)}:{node.lineno}"
                found.setdefault(top, []).append(where)
    return found


def _third_party(found: dict[str, list[str]], own: set[str]) -> dict[str, list[str]]:
    return {m: w for m, w in found.items()
            if m not in sys.stdlib_module_names and m not in own and m != "__future__"}


def _problems(found: dict[str, list[str]], allowed: set[str],
              optional: dict[str, tuple[str, str]], extras: dict[str, set[str]],
              where_to: str) -> list[str]:
    dists = importlib.metadata.packages_distributions()
    out = []
    for module, places in sorted(found.items()):
        provided = {_norm(d) for d in dists.get(module, [])}
        if not provided:
            out.append(f"{module} (imported at {', '.join(places[:3])}) is installed by no "
                       f"distribution here: declare it in pyproject.toml {where_to}")
            continue
        ok = set(allowed)
        if module in optional:
            ok |= extras.get(optional[module][0], set())
        if not provided & ok:
            out.append(f"{module} (imported at {', '.join(places[:3])}) comes from "
                       f"{'/'.join(sorted(provided))}, which pyproject.toml does not declare "
                       f"{where_to}")
    return out


def test_product_imports_are_declared() -> None:
    base, extras = _declared()
    found: dict[str, list[str]] = {}
    for pkg in ("quictun", "signal_server"):
        for module, places in imports_in(ROOT / pkg).items():
            found.setdefault(module, []).extend(places)
    third = _third_party(found, OWN)
    assert third, "no third-party import found: the scan is broken"
    problems = _problems(third, base, OPTIONAL, extras, "in [project] dependencies")
    assert not problems, "\n".join(problems)


def test_optional_modules_are_in_their_extra() -> None:
    """Each OPTIONAL module's distribution is really declared in the extra named for it."""
    _base, extras = _declared()
    dists = importlib.metadata.packages_distributions()
    for module, (extra, _why) in OPTIONAL.items():
        provided = {_norm(d) for d in dists.get(module, [])} or {_norm(module)}
        assert provided & extras.get(extra, set()), f"{module} is not in the {extra!r} extra"


def test_test_imports_are_declared() -> None:
    base, extras = _declared()
    third = _third_party(imports_in(ROOT / "tests"), OWN | _own_test_modules())
    problems = _problems(third, base | extras.get("test", set()), {}, extras,
                         "in dependencies or the 'test' extra")
    assert not problems, "\n".join(problems)


def test_the_scan_sees_lazy_imports(tmp_path: Path) -> None:
    """The AST walk finds an import inside a function body (the ifaddr case)."""
    (tmp_path / "m.py").write_text("def f():\n    import lazy_thing.sub\n")
    assert imports_in(tmp_path, tmp_path) == {"lazy_thing": ["m.py:2"]}
