"""Continual evaluation: the evaluator (when and what to measure) and pure metric functions."""
from cl.evaluation.evaluator import Evaluation, Evaluator
from cl.evaluation import metrics

__all__ = ["Evaluation", "Evaluator", "metrics"]
