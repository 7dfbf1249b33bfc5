"""SAEs and dictionaries as the SAE ecosystem sees them (layer 2, beside :mod:`pipeline.data`; imports the algorithm).

* :mod:`~pipeline.saes.dictionary_sae`: a fitted :class:`~pipeline.core.dictionary.Dictionary` as an SAEBench
  SAE (``DictionarySAE``: encode with the project's sparse coder, decode linearly);
  :mod:`~pipeline.saes.export_forms`: the forms a signed dictionary takes there (the ± split, or signed codes);
* :mod:`~pipeline.saes.sae_lens_io`: its export as a plain sae-lens folder (the stock ``matching_pursuit``
  architecture) and the exact loader back; :mod:`~pipeline.saes.stock_encoder`: how that stock encoder differs
  from the dictionary's coder, as structured records, and how closely it follows it on a sample;
* :mod:`~pipeline.saes.heldout`: any SAE's held-out L0 / FVU / dead fraction and its decoder's coherence.
"""
