"""dbksvd-pipeline: harvest LM activations, learn sparse dictionaries with DB-KSVD, score them with SAEBench.

Layers (each imports only those below it):
1. the algorithm: :mod:`pipeline.sparse_coding`, :mod:`pipeline.atom_update`, :mod:`pipeline.dbksvd`,
   :mod:`pipeline.dictionary` (tensors in, tensors out);
2. data/model side (model loading, text, activation store) and SAEBench side;
3. stages (``stages/``), thin Hydra wrappers over plain ``run(cfg)`` functions;
4. the orchestrator (``python -m pipeline``).
"""

__version__ = "0.1.0"
