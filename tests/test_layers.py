"""The layering rules, read from the source with `ast` (nothing is imported).

- Flask belongs to the HTTP server: no module outside `handler/server/` imports it, and
  importing one does not load it through another (the SageMaker toolkit's worker and
  `EndpointHandler` run without a WSGI app).
- Arrows point one way, routes -> api -> generation -> model: `handler/model/` imports none of
  `handler.generation`, `handler.api` and `handler.server`, not even for type checking.
- The serving image leaves `handler/testing/` out (container/Dockerfile.*): importing a serving
  module does not load it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("handler", "deploy")
SERVER = "handler.server"
MODEL = "handler.model"
ABOVE_MODEL = ("handler.generation", "handler.api", "handler.server")
TESTING = "handler.testing"


@dataclass(frozen=True)
class Import:
    target: str
    """A dotted name the statement imports: `from a import b` gives `a` and `a.b`."""
    line: int
    at_import_time: bool
    """Run when the module is imported: not in a function, not under `if TYPE_CHECKING:`."""


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    imports: tuple[Import, ...]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def read_imports(path: Path, name: str) -> tuple[Import, ...]:
    """Every import statement of the file, relative ones resolved against `name`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, at_import_time: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(a.name, node.lineno, at_import_time) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.append(Import(base, node.lineno, at_import_time))
            found.extend(
                Import(f"{base}.{a.name}", node.lineno, at_import_time) for a in node.names
            )
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, at_import_time)
            return
        deferred = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, at_import_time and not deferred)

    visit(ast.parse(path.read_text(), filename=str(path)), True)
    return tuple(found)


def read_modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Module]:
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            name = module_name(path, root)
            modules[name] = Module(name, path, read_imports(path, name))
    return modules


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def is_flask(target: str) -> bool:
    """Flask, or one of its extensions (`flask_swagger_ui`)."""
    top = target.split(".")[0]
    return top == "flask" or top.startswith("flask_")


def loading_chains(modules: dict[str, Module], start: str) -> Iterator[list[str]]:
    """For each module that importing `start` loads (itself, the packages above it and what
    they import at import time, transitively), the chain of imports that loads it."""
    chains: dict[str, list[str]] = {}
    pending = [[start]]
    while pending:
        chain = pending.pop()
        name = chain[-1]
        if name in chains or name not in modules:
            continue
        chains[name] = chain
        yield chain
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        pending += [[*chain, parent] for parent in parents]
        pending += [[*chain, item.target] for item in modules[name].imports if item.at_import_time]


def flask_problems(modules: dict[str, Module]) -> list[str]:
    problems = []
    outside = [m for m in modules.values() if not within(m.name, SERVER)]
    for module in outside:
        problems += [
            f"{module.name} imports {item.target} (line {item.line}): Flask belongs in "
            f"{SERVER}; move what it needs into a module that does not import Flask"
            for item in module.imports
            if is_flask(item.target)
        ]
        for chain in loading_chains(modules, module.name):
            flask = [
                i for i in modules[chain[-1]].imports if i.at_import_time and is_flask(i.target)
            ]
            if len(chain) > 1 and flask:
                problems.append(
                    f"importing {module.name} loads Flask: {' -> '.join(chain)} -> "
                    f"{flask[0].target}"
                )
                break  # one chain says it
    return problems


def model_layer_problems(modules: dict[str, Module]) -> list[str]:
    return [
        f"{module.name} imports {item.target} (line {item.line}): the model layer imports "
        f"none of {', '.join(ABOVE_MODEL)}; move the shared type into {MODEL} or a module "
        "both import"
        for module in modules.values()
        if within(module.name, MODEL)
        for item in module.imports
        if any(within(item.target, upper) for upper in ABOVE_MODEL)
    ]


def helper_loading_problems(modules: dict[str, Module]) -> list[str]:
    problems = []
    serving = [m for m in modules if within(m, "handler") and not within(m, TESTING)]
    for name in serving:
        problems += [
            f"importing {name} loads {TESTING}, which the serving image leaves out: "
            + " -> ".join(chain)
            for chain in loading_chains(modules, name)
            if within(chain[-1], TESTING)
        ]
    return problems


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    found = read_modules(ROOT)
    assert {"handler.server.app", "handler.model.base", "deploy.sagemaker"} <= found.keys()
    return found


def test_only_the_server_imports_flask(modules: dict[str, Module]) -> None:
    assert flask_problems(modules) == []


def test_the_model_layer_imports_no_layer_above_it(modules: dict[str, Module]) -> None:
    assert model_layer_problems(modules) == []


def test_serving_modules_do_not_load_the_test_helpers(modules: dict[str, Module]) -> None:
    assert helper_loading_problems(modules) == []


# --- the checks catch what they are for -----------------------------------------------------


def write(root: Path, files: dict[str, str]) -> dict[str, Module]:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return read_modules(root, ("handler",))


def test_the_checks_catch_violations(tmp_path: Path) -> None:
    modules = write(
        tmp_path,
        {
            "handler/__init__.py": "",
            "handler/server/__init__.py": "",
            "handler/server/app.py": "from flask import Flask\n",
            "handler/server/metrics.py": "import prometheus_client\n",
            "handler/api/__init__.py": "",
            "handler/api/direct.py": "def f():\n    import flask_swagger_ui\n",
            "handler/api/shared.py": "from ..server import app\n",
            "handler/api/fine.py": "from handler.server import metrics\n",
            "handler/mms/__init__.py": "",
            "handler/mms/inference.py": "from handler.api.shared import x\n",
            "handler/model/__init__.py": "",
            "handler/model/base.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from handler.generation.request import Event\n"
            ),
            "handler/model/other.py": "from handler import api\nfrom handler.model import base\n",
            "handler/generation/__init__.py": "",
            "handler/generation/request.py": "from handler.model import base\n",
            "handler/testing/__init__.py": "",
            "handler/engine.py": "import handler.testing\n",
            "handler/cli.py": "def main():\n    import handler.testing\n",
        },
    )
    flask = flask_problems(modules)
    assert any(p.startswith("handler.api.direct imports flask_swagger_ui") for p in flask)
    assert any(
        "importing handler.mms.inference loads Flask: handler.mms.inference -> "
        "handler.api.shared -> handler.server.app -> flask" in p
        for p in flask
    ), flask
    assert not any("handler.api.fine" in p for p in flask)
    assert not any(p.startswith("handler.server") for p in flask)
    layers = model_layer_problems(modules)
    assert [p.split(" (")[0] for p in layers] == [
        "handler.model.base imports handler.generation.request",
        "handler.model.base imports handler.generation.request.Event",
        "handler.model.other imports handler.api",
    ]
    assert [p.split(":")[0] for p in helper_loading_problems(modules)] == [
        "importing handler.engine loads handler.testing, which the serving image leaves out"
    ]
