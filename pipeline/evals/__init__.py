"""Layer 2, the evaluation side: SAE wrappers, sae-lens I/O, the baseline, SAEBench runners and the report.

Imports the algorithm and data layers and :mod:`pipeline.utils`; never the stages.
"""
