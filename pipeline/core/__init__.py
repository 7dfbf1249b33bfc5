"""Layer 1, the algorithm: tensors in, tensors out. No Hydra, no model, no I/O beyond saving a dictionary.

- :mod:`~pipeline.core.codes`: ``Codes``, sparse codes as ``indices (n, k)`` + ``values (n, k)``;
- :mod:`~pipeline.core.coders`: matching pursuit and Batch-OMP on the Gram matrix (``encode``);
- :mod:`~pipeline.core.atom_update`: the K-SVD sweep over shuffled atom batches;
- :mod:`~pipeline.core.rank1`: exact rank-1 refits of gathered blocks (on the block or its small Gram matrix);
- :mod:`~pipeline.core.lanczos`: Lanczos top singular vectors for the refits power steps cannot certify;
- :mod:`~pipeline.core.batched`: the batched matrix-vector product and row normalisation they share;
- :mod:`~pipeline.core.matryoshka`: nested atom groups and the residual cascade;
- :mod:`~pipeline.core.dictionary`: ``Dictionary`` (atoms + coder settings + history; save / load);
- :mod:`~pipeline.core.learner`: ``learn_dictionary`` / ``fit_dictionary``, the DB-KSVD loop, checkpoints;
- :mod:`~pipeline.core.learner_config`: ``LearnerConfig`` (every option, documented) and ``PAPER_SCHEDULE``;
- :mod:`~pipeline.core.batches`: the learner's sample batches (shuffled, or the reference's contiguous ones);
- :mod:`~pipeline.core.collective`: sums over samples across data-parallel ranks (``torch.distributed``);
- :mod:`~pipeline.core.validation`: input checks shared by the public functions;
- :mod:`~pipeline.core.synthetic`: planted problems (Aharon-Elad-Bruckstein) to test recovery on.
"""
