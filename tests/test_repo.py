"""Repository contracts: CI runs README's commands verbatim; the console script and package metadata work."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_readme_install_and_test_commands_verbatim():
    commands = readme_commands()
    install = next(c for c in commands if "pip install" in c)
    test = next(c for c in commands if "pytest" in c)
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert install in ci_lines
    assert test in ci_lines
    assert "set -euo pipefail" in ci_lines  # a failing or empty (exit 5) pytest run fails CI
    assert not any("|| true" in line or "exit 0" in line for line in ci_lines)


def test_readme_main_job_command_points_at_existing_config():
    main_job = next(c for c in readme_commands() if "train.py fit" in c)
    config = re.search(r"--config (\S+)", main_job).group(1)
    assert (ROOT / config).is_file()


def test_pytest_markers_are_strict():
    text = (ROOT / "pyproject.toml").read_text()  # tomllib is 3.11+, the package supports 3.10
    assert re.search(r'^addopts = ".*--strict-markers', text, flags=re.M)
    assert re.search(r'^\s+"slow: ', text, flags=re.M)
    assert re.search(r'^\s+"gpu: ', text, flags=re.M)


def test_console_script_lists_models(capsys):
    out = subprocess.run(
        [sys.executable, "-m", "vision_attn.cli", "models", "va_vit*"], capture_output=True, text=True, check=True
    )
    assert "va_vit_tiny_patch4_32" in out.stdout.split()
    from vision_attn.cli import main  # the same dispatcher, in-process (a process costs ~10 s of imports)

    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
