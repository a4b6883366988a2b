"""Comparing compressed models: throughput, the benchmark, reading run folders, run provenance, and what
compression changed in a model's behaviour (`behaviour.compare_runs`, predictions cached by `predictions`)."""
