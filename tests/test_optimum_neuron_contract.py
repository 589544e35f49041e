"""What we call of optimum-neuron exists in the pinned wheel, read as source (never imported).

The wheel of the version `requirements-neuron.txt` pins is downloaded once (`pip download`, kept
in pytest's cache directory) and parsed with `ast`. Each entry of `neuron_contract.CONTRACT` must
resolve, through `from ... import` re-exports and optimum's lazy `_import_structure`, to a
function or class, its methods through base classes, with every keyword argument we pass and
every attribute we read. Without network or package index, the tests are skipped, unless
`REQUIRE_NEURON_WHEEL=1` (set by `.ci/run`, where the index is reachable): then they fail.

It also checks the fakes against the wheel: `FakeNeuronModel.forward` takes the parameters of
`NxDModelForCausalLM.forward`, pads with the constants of `decoder_wrappers.py`, and its
on-device sampler chooses the tokens the wheel's own `Sampler` (run on the CPU) chooses.
"""

from __future__ import annotations

import ast
import inspect
import logging
import os
import subprocess
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from handler.model.neuron_contract import CONTRACT, OPTIMUM_NEURON_PIN, ContractEntry
from handler.testing.fake_neuron import (
    CONTEXT_POSITION_PAD,
    DEFAULT_PAD_TOKEN_ID,
    IGNORED_LOGIT,
    FakeNeuronModel,
    device_sample,
    padded_vocab,
)

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


REQUIRE_WHEEL = "REQUIRE_NEURON_WHEEL"
"""Set to 1 where the package index must be reachable (`.ci/run` does): a failed download of the
wheel then fails these tests instead of skipping them."""


def wheel_required(environ: Mapping[str, str]) -> bool:
    return environ.get(REQUIRE_WHEEL, "").strip().lower() in ("1", "true", "yes")


def download_wheel(version: str, directory: Path, *, required: bool) -> Path:
    """The optimum-neuron wheel of `version` in `directory`, downloaded with pip if missing.

    Without a package index the calling test is skipped, or failed when `required`.
    """
    found = sorted(directory.glob(f"optimum_neuron-{version}-*.whl"))
    if found:
        return found[0]
    give_up = pytest.fail if required else pytest.skip
    why = f" ({REQUIRE_WHEEL} is set: the index must be reachable here)" if required else ""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--retries", "1", "--timeout", "10", "--disable-pip-version-check"]
    command += [f"optimum-neuron=={version}", "-d", str(directory)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        give_up(
            f"pip download optimum-neuron=={version} timed out: no package index reachable{why}"
        )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        if any(failure in output for failure in NETWORK_FAILURES):
            give_up(
                f"cannot download optimum-neuron=={version} (no network or package index){why}: "
                + output.strip().splitlines()[-1]
            )
        pytest.fail(f"pip download optimum-neuron=={version} failed:\n{output}")
    found = sorted(directory.glob(f"optimum_neuron-{version}-*.whl"))
    assert found, f"pip download wrote no wheel to {directory}:\n{output}"
    return found[0]


@pytest.fixture(scope="session")
def wheel(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    version = pinned_version()
    cache = getattr(request.config, "cache", None)
    directory = (
        Path(cache.mkdir(f"optimum-neuron-{version}"))
        if cache is not None
        else tmp_path_factory.mktemp("optimum-neuron")
    )
    return download_wheel(version, directory, required=wheel_required(os.environ))


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


# --- REQUIRE_NEURON_WHEEL ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("required", "outcome"), [(True, pytest.fail.Exception), (False, pytest.skip.Exception)]
)
def test_an_unreachable_index_fails_where_it_is_required(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, required: bool, outcome: type
) -> None:
    def offline(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(
            command,
            1,
            "",
            "ERROR: Could not find a version that satisfies the requirement "
            "optimum-neuron==0.4.5 (from versions: none)\n",
        )

    monkeypatch.setattr(subprocess, "run", offline)

    with pytest.raises(outcome) as raised:
        download_wheel(OPTIMUM_NEURON_PIN, tmp_path, required=required)

    assert ("REQUIRE_NEURON_WHEEL is set" in str(raised.value)) is required


def test_the_ci_entry_point_requires_the_wheel() -> None:
    assert wheel_required({"REQUIRE_NEURON_WHEEL": "1"})
    assert not wheel_required({})
    assert "export REQUIRE_NEURON_WHEEL=1" in (ROOT / ".ci" / "run").read_text()


# --- the fakes against the wheel -----------------------------------------------------------------

DECODER = "optimum.neuron.models.inference.backend.modules.decoder"
SAMPLING = "optimum.neuron.models.inference.backend.modules.generation.sampling"


def _function(index: SourceIndex, module: str, name: str) -> ast.FunctionDef:
    found = index.resolve(ContractEntry(module, name))
    assert found is not None and isinstance(found.node, ast.FunctionDef), f"{module}.{name}"
    return found.node


def test_fake_forward_takes_the_parameters_of_the_compiled_model(index: SourceIndex) -> None:
    real = _function(index, f"{DECODER}.modeling_decoder", "NxDModelForCausalLM.forward").args
    names = [a.arg for a in real.posonlyargs + real.args]
    defaults = [ast.literal_eval(d) for d in real.defaults]
    fake = inspect.signature(FakeNeuronModel.forward).parameters
    assert list(fake) == names
    assert [p.default for p in list(fake.values())[len(names) - len(defaults) :]] == defaults


def test_fake_pads_context_encoding_with_the_runtimes_constants(index: SourceIndex) -> None:
    """`NxDDecoderWrapperForCausalLM.forward` pads input_ids with `config.pad_token_id` (0
    when the config has none, in `__init__`) and position_ids with a constant."""
    wrapper = f"{DECODER}.decoder_wrappers"
    forward = _function(index, wrapper, "NxDDecoderWrapperForCausalLM.forward")
    padded = {
        call.args[0].id: call.args[1]
        for call in ast.walk(forward)
        if isinstance(call, ast.Call)
        and isinstance(call.func, ast.Name)
        and call.func.id == "pad_to_max_context_length"
    }
    assert ast.literal_eval(padded["position_ids"]) == CONTEXT_POSITION_PAD
    assert ast.unparse(padded["input_ids"]) == "self.config.pad_token_id"
    init = _function(index, wrapper, "NxDDecoderWrapperForCausalLM.__init__")
    defaults = [
        ast.literal_eval(node.value)
        for node in ast.walk(init)
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "config.pad_token_id"
    ]
    assert defaults == [DEFAULT_PAD_TOKEN_ID]


def _real_sampling(index: SourceIndex) -> dict[str, Any]:
    """`Sampler`, `cumsum` and `mask_padded_logits` of the wheel, compiled from its source with
    the Neuron SDK's names stubbed: their CPU paths (`on_cpu=True`) need none of them."""
    tree = index.modules[SAMPLING]
    wanted = [
        node
        for node in tree.body
        if isinstance(node, ast.ClassDef | ast.FunctionDef)
        and node.name in ("Sampler", "cumsum", "mask_padded_logits")
    ]
    namespace: dict[str, Any] = {"torch": torch, "logger": logging.getLogger("sampling")}
    stubs = ("nxd_argmax", "nxd_topk", "parallel_state", "hardware", "nki_cumsum")
    namespace.update(dict.fromkeys((*stubs, "get_platform_target", "nki_jit", "rand_like")))
    namespace["NxDNeuronConfig"] = object
    exec(compile(ast.Module(wanted, type_ignores=[]), SAMPLING, "exec"), namespace)
    return namespace


def test_fake_samples_as_the_wheels_sampler(index: SourceIndex) -> None:
    """Same logits, parameters and uniform draws: the same tokens, batch-wide top-p included."""
    real = _real_sampling(index)
    generator = torch.Generator().manual_seed(0)
    for case in range(40):
        batch, max_topk = 1 + case % 5, (0, 8, 50)[case % 3]
        logits = torch.randn(batch, 64, generator=generator) * (1 + case % 4)
        top_k = torch.randint(1, (max_topk or 64) + 1, (batch,), generator=generator).float()
        top_p = torch.rand(batch, generator=generator).clamp(min=0.05)
        top_p[::2] = 1.0
        temperature = torch.rand(batch, generator=generator) + 0.3
        temperature[::3] = 1.0
        params = torch.stack([top_k, top_p, temperature], dim=1)
        config = SimpleNamespace(max_topk=max_topk, tp_degree=1)
        sampler = real["Sampler"](config, do_sample=True, on_cpu=True)
        torch.manual_seed(case)
        chosen = sampler._multinomial_sample(logits.clone(), params, dim=1, rank_id=None)
        torch.manual_seed(case)
        uniform = torch.rand_like(torch.zeros(batch, 1))
        assert device_sample(logits, params, max_topk, uniform).tolist() == chosen.tolist()
    assert real["Sampler"](SimpleNamespace(max_topk=8), on_cpu=True).IGNORED_LOGITS_VALUE == (
        IGNORED_LOGIT
    )


def test_fake_pads_the_vocabulary_as_the_wheel_masks_it(index: SourceIndex) -> None:
    mask_padded_logits = _real_sampling(index)["mask_padded_logits"]
    logits = torch.randn(2, 1, 10)
    padded = torch.nn.functional.pad(logits, (0, padded_vocab(10, 4) - 10))
    # Host sampling gathers the lm_head output on rank 0 of a world of 1 (`modeling_decoder`).
    masked = mask_padded_logits(padded, torch.tensor(0), 1, pad_size=2)
    fake = torch.nn.functional.pad(logits, (0, 2), value=torch.finfo(torch.float32).min)
    assert torch.equal(masked, fake)


def test_llama_exports_sample_on_the_device_whatever_the_tensor_parallel_degree(
    index: SourceIndex,
) -> None:
    """What the README says: Llama's `_get_neuron_config` always turns on-device sampling on;
    only Qwen2 and Qwen3 turn it off with continuous batching at tensor parallel degree 2."""
    models = "optimum.neuron.models.inference"
    llama_config = _function(
        index, f"{models}.llama.modeling_llama", "LlamaNxDModelForCausalLM._get_neuron_config"
    )
    keywords = {
        k.arg: ast.unparse(k.value)
        for node in ast.walk(llama_config)
        if isinstance(node, ast.Call)
        for k in node.keywords
    }
    assert keywords["on_device_sampling"] == "True"
    for model in ("qwen2", "qwen3"):
        source = ast.unparse(index.modules[f"{models}.{model}.modeling_{model}"])
        assert "if continuous_batching and tensor_parallel_size == 2:" in source
        assert "on_device_sampling = False" in source
