"""Evaluation: retrieval metrics (`zsbir.eval.metrics`), binary hashing with ITQ
(`zsbir.eval.hashing`) and the papers' per-query reference loops, kept for
benchmarking only (`zsbir.eval.reference`).

Definitions follow docs/metrics.md. Import the submodules directly; this package
imports nothing heavy on its own.
"""
