"""Print a run's planned memory before renting a GPU: the store on disk and each stage's largest GPU tensors, on
one GPU and on 8 torchrun ranks, at the config's real sizes. Loads no model, downloads nothing, runs no stage.

    python -m stages.plan experiment=gemma2b_paper
    python -m stages.plan experiment=pythia160m_paper dictionary.n_atoms=4096 --json plan.json

Takes the overrides ``python -m pipeline`` takes (one run, no ``-m``) and composes ``conf/`` with Hydra's compose
API, so nothing is written under ``output_root``; ``--json PATH`` also writes the plan as JSON. The sizes and what
they leave out: :mod:`pipeline.runs.plan`; the model shapes: :mod:`pipeline.data.architectures`. Not a stage the
orchestrator runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.runs.config import register_configs
from pipeline.runs.plan import Plan, plan_run, render

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: list[str]):
    """``conf/config.yaml`` composed with ``overrides`` (schema checks included), as ``python -m pipeline``
    would compose it, without Hydra's run folder."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def plan(overrides: list[str]) -> Plan:
    """The plan of the config ``overrides`` compose to."""
    return plan_run(compose(overrides))


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    out = None
    if "--json" in args:
        i = args.index("--json")
        out = Path(args[i + 1])
        del args[i : i + 2]
    try:
        p = plan(args)
    except ValueError as exc:
        print(f"plan: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(render(p))
    if out is not None:
        out.write_text(json.dumps(p.as_dict(), indent=1) + "\n")
        print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
