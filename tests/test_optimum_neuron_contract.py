"""What we call of optimum-neuron exists in the pinned wheel, read as source (never imported).

The wheel of the version `requirements-neuron.txt` pins is downloaded once (`pip download`, kept
in pytest's cache directory) and parsed with `ast`. Each entry of `neuron_loader.CONTRACT` must
resolve, through `from ... import` re-exports and optimum's lazy `_import_structure`, to a
function or class, its methods through base classes, with every keyword argument we pass and
every attribute we read. Without network or package index, the tests are skipped.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from handler.model.neuron_loader import CONTRACT, OPTIMUM_NEURON_PIN, ContractEntry

ROOT = Path(__file__).resolve().parents[1]
NETWORK_FAILURES = (
    "from versions: none",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "Max retries exceeded",
    "Could not fetch URL",
    "ProxyError",
    "timed out",
)
DEFINITIONS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def pins(path: Path) -> dict[str, Requirement]:
    """`name -> requirement` of a requirements file (comments and options skipped)."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            requirement = Requirement(line)
            found[canonicalize_name(requirement.name)] = requirement
    return found


def pinned_version() -> str:
    return str(pins(ROOT / "requirements-neuron.txt")["optimum-neuron"].specifier).removeprefix(
        "=="
    )


@pytest.fixture(scope="session")
def wheel(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    version = pinned_version()
    cache = getattr(request.config, "cache", None)
    directory = (
        Path(cache.mkdir(f"optimum-neuron-{version}"))
        if cache is not None
        else tmp_path_factory.mktemp("optimum-neuron")
    )
    found = sorted(directory.glob(f"optimum_neuron-{version}-*.whl"))
    if found:
        return found[0]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--retries", "1", "--timeout", "10", "--disable-pip-version-check"]
    command += [f"optimum-neuron=={version}", "-d", str(directory)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.skip(f"pip download optimum-neuron=={version} timed out: no package index reachable")
    output = result.stdout + result.stderr
    if result.returncode != 0:
        if any(failure in output for failure in NETWORK_FAILURES):
            pytest.skip(
                f"cannot download optimum-neuron=={version} (no network or package index): "
                + output.strip().splitlines()[-1]
            )
        pytest.fail(f"pip download optimum-neuron=={version} failed:\n{output}")
    found = sorted(directory.glob(f"optimum_neuron-{version}-*.whl"))
    assert found, f"pip download wrote no wheel to {directory}:\n{output}"
    return found[0]


@dataclass
class Definition:
    module: str
    node: ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef


class SourceIndex:
    """The modules of a wheel, parsed, with name resolution across re-exports."""

    def __init__(self, sources: dict[str, str]) -> None:
        self.modules: dict[str, ast.Module] = {}
        self.packages: set[str] = set()
        for path, text in sources.items():
            parts = path.removesuffix(".py").split("/")
            if parts[-1] == "__init__":
                parts.pop()
                self.packages.add(".".join(parts))
            self.modules[".".join(parts)] = ast.parse(text, filename=path)

    @classmethod
    def from_wheel(cls, wheel: Path) -> SourceIndex:
        with zipfile.ZipFile(wheel) as archive:
            sources = {
                name: archive.read(name).decode()
                for name in archive.namelist()
                if name.startswith("optimum/") and name.endswith(".py")
            }
        return cls(sources)

    def _absolute(self, module: str, node: ast.ImportFrom) -> str:
        if node.level == 0:
            return node.module or ""
        base = module.split(".") if module in self.packages else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def find(self, module: str, name: str, depth: int = 0) -> Definition | None:
        """The definition `name` refers to in `module`."""
        tree = self.modules.get(module)
        if tree is None or depth > 20:
            return None
        statements = list(_module_level(tree.body))
        for node in statements:
            if isinstance(node, DEFINITIONS) and node.name == name:
                return Definition(module, node)
        for node in statements:
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        found = self.find(self._absolute(module, node), alias.name, depth + 1)
                        if found is not None:
                            return found
        for submodule, names in _lazy_structure(statements).items():
            if name in names:
                return self.find(f"{module}.{submodule}", name, depth + 1)
        return None

    def member(self, owner: Definition, name: str) -> Definition | None:
        """`owner.name` for a class, looked up through its base classes."""
        if not isinstance(owner.node, ast.ClassDef):
            return None
        for node in owner.node.body:
            if isinstance(node, DEFINITIONS) and node.name == name:
                return Definition(owner.module, node)
        for base in owner.node.bases:
            if isinstance(base, ast.Name):
                parent = self.find(owner.module, base.id)
                found = parent and self.member(parent, name)
                if found is not None:
                    return found
        return None

    def resolve(self, entry: ContractEntry) -> Definition | None:
        first, *rest = entry.name.split(".")
        found = self.find(entry.module, first)
        for part in rest:
            found = found and self.member(found, part)
        return found

    def problems(self, entry: ContractEntry) -> list[str]:
        """What `entry` needs that the source lacks (empty: all there)."""
        found = self.resolve(entry)
        if found is None:
            return [f"{entry.module}.{entry.name} not found"]
        problems = []
        if entry.keywords or entry.forwarded:
            if not isinstance(found.node, ast.FunctionDef | ast.AsyncFunctionDef):
                return [f"{entry.name} is not a function"]
            arguments = found.node.args
            named = {a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs}
            problems += [
                f"{entry.name} has no parameter {keyword!r} (in {found.module})"
                for keyword in entry.keywords
                if keyword not in named
            ]
            if entry.forwarded and arguments.kwarg is None:
                problems.append(
                    f"{entry.name} takes no **kwargs to forward {list(entry.forwarded)} "
                    f"(in {found.module})"
                )
        if entry.attributes:
            assigned = self._init_attributes(found)
            problems += [
                f"{entry.name}.__init__ does not set self.{attribute} (in {found.module})"
                for attribute in entry.attributes
                if attribute not in assigned
            ]
        return problems

    def _init_attributes(self, owner: Definition) -> set[str]:
        init = self.member(owner, "__init__")
        if init is None:
            return set()
        assigned = set()
        for node in ast.walk(init.node):
            targets = node.targets if isinstance(node, ast.Assign) else []
            if isinstance(node, ast.AnnAssign):
                targets = [node.target]
            for target in targets:
                if (
                    isinstance(target, ast.Attribute)
                    and isinstance(target.value, ast.Name)
                    and target.value.id == "self"
                ):
                    assigned.add(target.attr)
        return assigned


def _module_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements run at import, including those in `if` and `try` blocks."""
    statements = []
    for node in body:
        statements.append(node)
        if isinstance(node, ast.If):
            statements += _module_level(node.body) + _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            statements += _module_level(node.body) + _module_level(node.orelse)
            for handler in node.handlers:
                statements += _module_level(handler.body)
    return statements


def _lazy_structure(statements: list[ast.stmt]) -> dict[str, list[str]]:
    """`_import_structure` of a lazy module: submodule -> names it provides."""
    structure: dict[str, list[str]] = {}

    def names(value: ast.expr) -> list[str]:
        if isinstance(value, ast.List | ast.Tuple):
            return [e.value for e in value.elts if isinstance(e, ast.Constant)]
        return []

    for node in statements:
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            if isinstance(target, ast.Name) and target.id == "_import_structure":
                if isinstance(node.value, ast.Dict):
                    for key, value in zip(node.value.keys, node.value.values):
                        if isinstance(key, ast.Constant):
                            structure.setdefault(key.value, []).extend(names(value))
            elif (
                isinstance(target, ast.Subscript)
                and isinstance(target.value, ast.Name)
                and target.value.id == "_import_structure"
                and isinstance(target.slice, ast.Constant)
            ):
                structure.setdefault(target.slice.value, []).extend(names(node.value))
    return structure


@pytest.fixture(scope="session")
def index(wheel: Path) -> SourceIndex:
    return SourceIndex.from_wheel(wheel)


@pytest.fixture(scope="session")
def wheel_metadata(wheel: Path) -> dict[str, list[str]]:
    with zipfile.ZipFile(wheel) as archive:
        [name] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        message = Parser().parsestr(archive.read(name).decode())
    return {"Version": [message["Version"]], "Requires-Dist": message.get_all("Requires-Dist")}


@pytest.mark.parametrize("entry", CONTRACT, ids=lambda entry: entry.name)
def test_contract_entry_exists_in_the_pinned_source(
    index: SourceIndex, entry: ContractEntry
) -> None:
    assert index.problems(entry) == []


def test_the_checker_reports_what_is_missing(index: SourceIndex) -> None:
    """Counter-check: the same checker fails on names and keywords the source lacks."""
    module = "optimum.neuron.cache.hub_cache"
    assert index.problems(ContractEntry(module, "select_hub_cached_entries", ("dtype",))) == [
        "select_hub_cached_entries has no parameter 'dtype' (in optimum.neuron.cache.hub_cache)"
    ]
    assert index.problems(ContractEntry(module, "select_cached_entries")) == [
        f"{module}.select_cached_entries not found"
    ]
    get_config = ContractEntry(
        "optimum.neuron", "NeuronModelForCausalLM.get_neuron_config", forwarded=("token",)
    )
    assert index.problems(get_config) == [
        "NeuronModelForCausalLM.get_neuron_config takes no **kwargs to forward ['token'] "
        "(in optimum.neuron.models.inference.modeling_utils)"
    ]
    fields = ContractEntry(
        "optimum.neuron.models.inference.backend.config", "NxDNeuronConfig", attributes=("tp",)
    )
    assert index.problems(fields) == [
        "NxDNeuronConfig.__init__ does not set self.tp "
        "(in optimum.neuron.models.inference.backend.config)"
    ]


def test_wheel_is_the_pinned_version(wheel_metadata: dict[str, list[str]]) -> None:
    assert wheel_metadata["Version"] == [pinned_version()]
    assert pinned_version() == OPTIMUM_NEURON_PIN


def test_pins_satisfy_what_optimum_neuron_requires(wheel_metadata: dict[str, list[str]]) -> None:
    """Its requirements and its `neuronx` extra (the Neuron SDK), against our pins: those of
    requirements-neuron.txt, else those of requirements.txt."""
    ours = pins(ROOT / "requirements.txt") | pins(ROOT / "requirements-neuron.txt")
    problems = []
    for line in wheel_metadata["Requires-Dist"]:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is not None and not marker.evaluate({"extra": "neuronx"}):
            continue
        name = canonicalize_name(requirement.name)
        if name == "wheel":
            continue
        pin = ours.get(name)
        if pin is None:
            problems.append(f"{requirement} is not pinned")
            continue
        exact = [spec.version for spec in pin.specifier if spec.operator == "=="]
        satisfied = (
            all(requirement.specifier.contains(version, prereleases=True) for version in exact)
            if exact
            else pin.specifier == requirement.specifier
        )
        if not satisfied:
            problems.append(f"optimum-neuron needs {requirement}, we pin {pin}")
    assert problems == []
