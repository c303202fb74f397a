"""Evaluation: suites of layouts, method presets, detectors, metrics, the bench runner and studies.

Entry points: ``saltdiff bench`` / ``saltdiff study`` (:mod:`saltdiff.eval.cli`) and
:func:`saltdiff.eval.bench.run_bench`.
"""
