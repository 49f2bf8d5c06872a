"""Evaluation and benchmarking: the shapes data set, the bundled models and their weights, training,
metrics, RISE, the evaluation harness and the speed benchmark. Application code: ``import lrpfx``
does not load it."""
