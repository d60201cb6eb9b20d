"""Measuring candidates: the evaluator, its executors (local processes or a Ray cluster), multi-fidelity
evaluation, the prefix cache, measured metrics, and measurements prepared by model name."""
