"""What a user opens (layer 5: reads the evaluate stage's folders, the store and the SAEs; imports no stage).

* :mod:`~pipeline.report.markdown`: ``report.md``, one table of every SAE's budget, held-out statistics and
  SAEBench metrics, from the rows (:mod:`~pipeline.report.rows`), the generated notes
  (:mod:`~pipeline.report.notes`) and the plots (:mod:`~pipeline.report.plots`);
* :mod:`~pipeline.report.dashboards`: feature dashboards (top contexts, quantile samples, histograms, logit
  effects) as static HTML;
* :mod:`~pipeline.report.index_page`: ``index.html``, the report and every dashboard behind one page;
* :mod:`~pipeline.report.escape`: what those pages may show (text from outside escaped for markdown, a
  Content-Security-Policy that forbids scripts on every page).
"""
