"""The paper presets' planned memory, written for the README's figures: ``python -m stages.plan`` on both presets.

Not a measurement: :func:`pipeline.runs.plan.plan_run` sizes each stage's largest GPU tensors from the composed
preset and the model's published shapes (:mod:`pipeline.data.architectures`), for 1 GPU and 8 torchrun ranks,
with nothing loaded. ``benchmarks/bench_gpu_check.py`` measures the peaks on a GPU. Deterministic: re-running it
rewrites the same file unless a preset, a default or the plan's terms changed (``tests/stages/test_plan.py`` checks
that the committed file is current).

Usage: python benchmarks/bench_preset_plan.py [--out benchmarks/results_preset_plan.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.runs.plan import GPUS, LEFT_OUT  # noqa: E402
from stages.plan import plan  # noqa: E402

#: The presets planned, as ``experiment=`` values.
PRESETS = ("gemma2b_paper", "pythia160m_paper")
OUT = ROOT / "benchmarks" / "results_preset_plan.json"


def preset_plans() -> dict[str, Any]:
    """``{preset: Plan.as_dict()}`` for :data:`PRESETS`, with the GPU sizes and what the plan leaves out."""
    doc: dict[str, Any] = {"what": "planned memory (bytes) of the paper presets; an estimate, not a measurement"}
    doc["gpus_bytes"] = dict(GPUS)
    doc["left_out"] = list(LEFT_OUT)
    for preset in PRESETS:
        doc[preset] = plan([f"experiment={preset}"]).as_dict()
    return doc


def render_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    args.out.write_text(render_json(preset_plans()), encoding="utf-8")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
