"""dbksvd-pipeline: harvest LM activations, learn sparse dictionaries with DB-KSVD, score them with SAEBench.

The layers, each a sub-package importing only those below it (import-linter's contracts in ``pyproject.toml``,
``lint-imports`` in CI, also forbid import cycles and any import of a stage from the library):

0. :mod:`pipeline.utils`: atomic writes, devices, typed config nodes, optional tracking;
1. :mod:`pipeline.core`: the algorithm, tensors in and out (codes, coders, atom update, learner, Matryoshka,
   ``Dictionary``, the fit's spend record);
2. :mod:`pipeline.data` (models, text, harvest, activation store, loader) and :mod:`pipeline.saes` (the
   dictionary as an SAE, sae-lens export and load, held-out statistics), independent of each other;
3. :mod:`pipeline.baselines`: SAEs trained by sae-lens on the store, matched to the fit's budget;
4. :mod:`pipeline.evals`: SAEBench only (one runner per metric in a registry, the SAEs an evaluation runs,
   RAVEL's local data, the judge);
5. :mod:`pipeline.report`: ``report.md``, its plots, the feature dashboards and the index page;
6. :mod:`pipeline.runs`: the config schema, the run layout and torchrun launches;
7. the stages (``stages/``: one plain ``run(cfg)`` each, no stage imports another) and the orchestrator
   (``stages/orchestrator.py``, run by ``python -m pipeline``). The library never imports a stage.

The public API::

    from pipeline import learn_dictionary, Dictionary, encode
    D = learn_dictionary(Y, n_atoms=4096, k=32)      # Y: (n, d) tensor or an iterable of (b, d) batches
"""

from pipeline.core.coders import encode, gram
from pipeline.core.codes import Codes
from pipeline.core.dictionary import CoderSettings, Dictionary
from pipeline.core.learner import fit_dictionary, learn_dictionary
from pipeline.core.learner_config import PAPER_SCHEDULE, LearnerConfig
from pipeline.core.synthetic import planted_problem, recovered_fraction
from pipeline.data.store import ActivationStore

__version__ = "0.1.0"

__all__ = [
    "ActivationStore",
    "Codes",
    "CoderSettings",
    "Dictionary",
    "LearnerConfig",
    "PAPER_SCHEDULE",
    "encode",
    "fit_dictionary",
    "gram",
    "learn_dictionary",
    "planted_problem",
    "recovered_fraction",
]
