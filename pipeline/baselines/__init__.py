"""SAE baselines trained the way the field trains them: sae-lens's own trainer on our activation batches.

* :mod:`~pipeline.baselines.config`: :class:`BaselineSpec` (architecture and hyperparameters, defaults
  from sae-lens's documentation / SAEBench's suites) and :class:`Budget` (steps, samples, time or plateau);
* :mod:`~pipeline.baselines.lens`: the spec as sae-lens configs, and a trained SAE's inference form;
* :mod:`~pipeline.baselines.batches`: our data as the trainer's provider of full batches;
* :mod:`~pipeline.baselines.train`: :func:`train_baseline` -> :class:`TrainedBaseline`;
* :mod:`~pipeline.baselines.io`: :func:`save_baseline` (a plain sae-lens folder + ``record.json``) and
  :func:`load_baseline` (plain ``sae_lens.SAE.load_from_disk``).

Example::

    spec = BaselineSpec("batchtopk", batch_size=1024)
    trained = train_baseline(Y, d_in=576, width=2048, k=32, spec=spec, budget=Budget("time", seconds=60),
                             heldout=Y_heldout)
    save_baseline(trained, "outputs/.../batchtopk")
"""

import importlib
from typing import Any

from pipeline.baselines.config import ARCHITECTURES, BaselineSpec, Budget

#: Names re-exported from the modules that import sae-lens (seconds to import), loaded on first use, so that
#: reading the config (``pipeline.baselines.config`` / ``compare``, every stage's config check) does not pay it.
_LAZY = {
    "load_baseline": "io",
    "load_record": "io",
    "save_baseline": "io",
    "BaselineRecord": "train",
    "TrainedBaseline": "train",
    "train_baseline": "train",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"pipeline.baselines.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'pipeline.baselines' has no attribute {name!r}")


__all__ = [
    "ARCHITECTURES",
    "BaselineRecord",
    "BaselineSpec",
    "Budget",
    "TrainedBaseline",
    "load_baseline",
    "load_record",
    "save_baseline",
    "train_baseline",
]
