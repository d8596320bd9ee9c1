"""The evidence runner (``benchmarks/evidence.py --quick``) end to end: every arm trains a tiny
MoE for a few steps from a shared warm start, in worker processes, and writes the summary layout
docs/evidence.md and the plots rely on. A second invocation resumes: every finished seed is read
back rather than run again, so the summary is the same."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("grpo", "grpo+R2", "grpo+R3", "gspo", "gspo_token", "gspo+R2", "grpo+bf16old", "gspo+bf16old")


def _run(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "evidence.py"),
            "--quick",
            "--out",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_quick_run_writes_the_summary_and_resumes(tmp_path: Path) -> None:
    first = _run(tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["arms"]) == set(ARMS)
    assert summary["setup"]["settings"]["minibatches"] == 4  # the paper's off-policy setting
    for arm, entry in summary["arms"].items():
        assert isinstance(entry["collapses"], int) and len(entry["seeds"]) == 1, arm
        seed = entry["seeds"][0]
        assert seed["steps"] == 3
        record = json.loads((tmp_path / seed["curves"]).read_text())
        history = record["history"]
        assert [m["step"] for m in history] == [1.0, 2.0, 3.0]
        last = history[-1]
        for key in ("reward", "clip_fraction", "seq_clip_fraction", "grad_norm", "token_ratio_var",
                    "seq_ratio_var", "heldout_accuracy"):  # fmt: skip
            assert key in last and math.isfinite(last[key]), (arm, key, last.get(key))
        # Routing metrics need a recorded routing: the π_old forward's, or R3's rollout routing.
        # The bf16-π_old arms skip the π_old forward and do not record rollout routing.
        if not arm.endswith("bf16old"):
            assert 0.0 <= last["routing_volatility"] <= last["tokens_rerouted"] <= 1.0, arm
        else:
            assert "routing_volatility" not in last, arm
        # π_old from the bf16 engine: no float32-vs-engine gap to measure; otherwise it is measured.
        assert ("engine_seq_logratio_abs" in last) != arm.endswith("bf16old"), arm
    assert (tmp_path / "curves.png").stat().st_size > 10_000

    again = _run(tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    resumed = json.loads((tmp_path / "summary.json").read_text())
    for arm in ARMS:
        assert resumed["arms"][arm]["seeds"] == summary["arms"][arm]["seeds"], arm
