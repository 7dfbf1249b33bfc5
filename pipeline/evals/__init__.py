"""SAEBench, and only SAEBench (layer 4: reads the data, the SAEs and the baselines; imports no report or stage).

* :mod:`~pipeline.evals.config`: the typed ``eval`` config node (``EvalConfig``, ``parse_eval_config``,
  ``validate_eval_config``; no SAEBench import, so every stage's config check stays cheap);
* :mod:`~pipeline.evals.sae_records`: the SAEs an evaluation runs (``SAERecord``: the fitted dictionary, the
  sae-lens baselines, SAEBench's published suites);
* :mod:`~pipeline.evals.metrics`: one runner per SAEBench metric, in a registry, the loop that runs them and
  ``check_metric_configs`` (each metric's ``config:`` keys against SAEBench's own dataclass);
  ``metrics.positions``: core on the positions the fit used; ``metrics.shared_forwards``: core's LLM forwards
  reused across SAEs;
* :mod:`~pipeline.evals.saebench_patches`: pointing SAEBench at the loaded model and local data;
  :mod:`~pipeline.evals.labelled_data`: the labelled passages for sparse probing / SCR / TPP;
  :mod:`~pipeline.evals.ravel_data` and :mod:`~pipeline.evals.ravel_model`: RAVEL from local files;
  :mod:`~pipeline.evals.judge`: autointerp's judge at any OpenAI-compatible endpoint;
* :mod:`~pipeline.evals.results`: the evaluate folder's layout and SAEBench's result file names.
"""
