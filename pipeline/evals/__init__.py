"""Layer 2, the evaluation side: SAE wrappers, sae-lens I/O, the baselines, SAEBench runners and the report.

Imports the algorithm and data layers and :mod:`pipeline.utils`; never :mod:`pipeline.runs` or the stages.

* :mod:`~pipeline.evals.config`: the typed ``eval`` config node (``EvalConfig``, ``parse_eval_config``,
  ``validate_eval_config``);
* :mod:`~pipeline.saes.dictionary_sae`: a dictionary as an SAEBench SAE (``DictionarySAE``);
  :mod:`~pipeline.saes.sae_lens_io`: its sae-lens export (stock ``matching_pursuit``) and exact loader;
  :mod:`~pipeline.baselines`: SAE baselines of six architectures trained by sae-lens's own trainer under a
  budget (steps, samples, time, converged) matched to the dictionary's fit (``baselines.compare``), saved as
  plain sae-lens folders;
* :mod:`~pipeline.evals.sae_records`: the SAEs an evaluation runs (``SAERecord``);
  :mod:`~pipeline.saes.heldout`: their held-out L0 / FVU / dead fraction and coherence;
* :mod:`~pipeline.evals.metrics`: one runner per SAEBench metric, in a registry, and the loop that runs them
  (``metrics.positions``: core on the positions the fit used);
  :mod:`~pipeline.evals.saebench_patches`: pointing SAEBench at the loaded model and local data;
  :mod:`~pipeline.evals.labelled_data`: the labelled passages for sparse probing / SCR / TPP;
* :mod:`~pipeline.evals.results`: the evaluate folder's layout; :mod:`~pipeline.report.markdown`: ``report.md``
  (its rows :mod:`~pipeline.report.rows`, notes :mod:`~pipeline.report.notes`, plots
  :mod:`~pipeline.report.plots`).
"""
