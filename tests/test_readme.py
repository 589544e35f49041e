"""The README's deploy commands, run as written (offline: `--dry-run` plans without calling AWS
or the hub, the way a user checks a command before running it)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"


def commands(prefix: str) -> list[list[str]]:
    """Every `bash` block line starting with `prefix`, continuation lines joined."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith(prefix):
                found.append(shlex.split(line, comments=True))
    return found


@pytest.mark.parametrize(
    "prefix", ["python -m deploy.sagemaker deploy", "python -m deploy.hf_endpoint"]
)
def test_readme_deploy_commands_plan_cleanly(prefix: str) -> None:
    (command,) = commands(prefix)
    result = subprocess.run(
        [sys.executable, *command[1:], "--dry-run"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "meta-llama/Llama-3.2-1B-Instruct" in result.stdout


def test_readme_export_command_parses() -> None:
    (command,) = commands("python -m deploy.export")
    from deploy.export import _parser

    args = _parser().parse_args(command[3:])
    assert args.s3_uri == "s3://my-bucket/llama-inf2" and args.num_cores == 2
