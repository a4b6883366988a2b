"""Comparing compressed models: throughput measurement and the benchmark of every method under one protocol."""
