"""Backbones and heads. Every backbone maps a float batch to features and
exposes `num_features`; `Classifier` adds a head that grows with the classes."""
from cl.models.causal_lm import CausalLM
from cl.models.classifier import Classifier, IncrementalClassifier
from cl.models.mlp import MLP
from cl.models.mobilenet import MobileNetV2
from cl.models.pretrained_cnn import EfficientNetLite0, TorchvisionResNet
from cl.models.resnet import ReducedResNet18
from cl.models.timm_backbone import TimmBackbone

__all__ = ["CausalLM", "Classifier", "IncrementalClassifier", "MLP", "MobileNetV2", "ReducedResNet18", "TimmBackbone", "TorchvisionResNet",
           "EfficientNetLite0"]
