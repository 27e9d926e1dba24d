"""Inference: per-datapoint importance weights from a model/guide pair, the one core every
bound is computed from (``weights``); the importance-weighted objectives IWAE and DReG
(``objectives``); the evaluator of log p(x) and the semi-supervised reports (``evaluate``).
"""
