"""dbksvd-pipeline: harvest LM activations, learn sparse dictionaries with DB-KSVD, score them with SAEBench.

The layers, each a sub-package importing only those below it (``tests/test_layers.py`` enforces it):

0. :mod:`pipeline.utils`: atomic writes, devices;
1. :mod:`pipeline.core`: the algorithm (codes, coders, atom update, learner, Matryoshka, ``Dictionary``);
2. :mod:`pipeline.data` (models, text, harvest, activation store, loader) and :mod:`pipeline.evals` (SAE
   wrappers, sae-lens I/O, the baseline, SAEBench metric runners, report), which may use ``data``;
3. :mod:`pipeline.runs`: the config schema and the run layout;
4. the stages (``stages/``: one plain ``run(cfg)`` each, no stage imports another) and the orchestrator
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
