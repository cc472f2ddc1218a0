"""VGG with Saliency-Guided Dropout

VGG: `Very Deep Convolutional Networks for Large-Scale Image Recognition` - https://arxiv.org/abs/1409.1556
SGDrop: `The Overfocusing Bias of Convolutional Neural Networks: A Saliency-Guided Regularization Approach`
    - https://arxiv.org/abs/2409.17370

The architecture is timm's ``VGG`` unchanged, so weights load both ways with ``vgg11`` / ``vgg16`` / ``vgg16.tv_in1k``
(timm's ``mlp_ratio`` argument narrows the head for small data, and the export records it for plain timm).
``sgdrop_vgg_tiny`` is a small VGG (4 stages, 32-256 channels, mlp_ratio 0.0625: a 256-wide 7x7 first head layer) for
CPU-scale checkpoints and tests.
"""
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from timm.models.vgg import VGG, _filter_fn, cfgs

from ..pretrained import build_model_with_checked_weights, pretrained_cfgs
from ..sgdrop import PAPER_NAME, SaliencyGuidedDropout

__all__ = ['SGDropVGG']

model_cfgs = {
    **cfgs,
    'vgg_tiny': [32, 'M', 64, 'M', 128, 128, 'M', 256, 256, 'M'],
}


class SGDropVGG(SaliencyGuidedDropout, VGG):
    """timm ``VGG`` trained with Saliency-Guided Dropout on the last convolutional feature map."""


def _create_sgdrop_vgg(variant: str, pretrained: bool = False, **kwargs: Any) -> SGDropVGG:
    cfg = model_cfgs[variant.removeprefix('sgdrop_')]
    # VGG is one of few models with stride==1 features, hence 6 out_indices [0..5] for a 5-stage network.
    out_indices = kwargs.pop('out_indices', tuple(range(cfg.count('M') + 1)))
    return build_model_with_checked_weights(
        SGDropVGG,
        variant,
        pretrained,
        model_cfg=cfg,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        pretrained_filter_fn=_filter_fn,
        **kwargs,
    )


def _cfg(url: str = '', **kwargs: Any) -> dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'features.0', 'classifier': 'head.fc',
        'license': 'apache-2.0', 'paper_ids': 'arXiv:2409.17370', 'paper_name': PAPER_NAME,
        'origin_url': 'https://arxiv.org/abs/2409.17370',
        **kwargs,
    }


default_cfgs = generate_default_cfgs(pretrained_cfgs({
    'sgdrop_vgg11': _cfg(),
    'sgdrop_vgg16': _cfg(),
    'sgdrop_vgg_tiny': _cfg(input_size=(3, 64, 64), pool_size=(4, 4), crop_pct=1.0),
}))


@register_model
def sgdrop_vgg11(pretrained: bool = False, **kwargs: Any) -> SGDropVGG:
    """VGG 11-layer model (configuration "A") trained with SGDrop."""
    return _create_sgdrop_vgg('sgdrop_vgg11', pretrained=pretrained, **kwargs)


@register_model
def sgdrop_vgg16(pretrained: bool = False, **kwargs: Any) -> SGDropVGG:
    """VGG 16-layer model (configuration "D") trained with SGDrop."""
    return _create_sgdrop_vgg('sgdrop_vgg16', pretrained=pretrained, **kwargs)


@register_model
def sgdrop_vgg_tiny(pretrained: bool = False, **kwargs: Any) -> SGDropVGG:
    """Small 6-conv VGG (32-256 channels, MLP head at ratio 0.0625) trained with SGDrop, for CPU-scale runs."""
    model_args = dict(mlp_ratio=0.0625)
    return _create_sgdrop_vgg('sgdrop_vgg_tiny', pretrained=pretrained, **dict(model_args, **kwargs))
