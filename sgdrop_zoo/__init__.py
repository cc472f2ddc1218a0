"""sgdrop-zoo: Saliency-Guided Dropout (arXiv 2409.17370) models for timm.

``import sgdrop_zoo`` registers the ``sgdrop_*`` models with timm's registry, so
``timm.create_model("sgdrop_resnet50", num_classes=10)`` works.
"""
from .models import *
from .sgdrop import (
    SGDROP_SETTINGS,
    AttributionRelu,
    AttributionSource,
    LatentReference,
    LinearRhoSchedule,
    SaliencyGuidedDropout,
    SGDropCfg,
    add_sgdrop,
    is_sgdrop_model,
    latent_attribution,
    saliency_mask,
)
from .task import SGDropClassificationTask

__version__ = '0.1.0'

__all__ = [
    'SGDROP_SETTINGS', 'AttributionRelu', 'AttributionSource', 'LatentReference', 'LinearRhoSchedule',
    'SGDropCfg', 'SGDropClassificationTask', 'SaliencyGuidedDropout', 'add_sgdrop', 'is_sgdrop_model',
    'latent_attribution', 'saliency_mask',
]
