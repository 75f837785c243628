"""Backbones and heads. Every backbone maps a float batch to features and
exposes `num_features`; `Classifier` adds a head that grows with the classes."""
from cl.models.classifier import Classifier, IncrementalClassifier
from cl.models.mlp import MLP
from cl.models.resnet import ReducedResNet18
from cl.models.timm_backbone import TimmBackbone

__all__ = ["Classifier", "IncrementalClassifier", "MLP", "ReducedResNet18", "TimmBackbone"]
