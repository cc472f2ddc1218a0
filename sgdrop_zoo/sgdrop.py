"""Saliency-Guided Dropout (SGDrop)

Paper: `The Overfocusing Bias of Convolutional Neural Networks: A Saliency-Guided Regularization Approach`
    - https://arxiv.org/abs/2409.17370

A classifier is split into an encoder ``forward_features`` (latent features z) and a head ``forward_head``.
During training, for an input x with true label y:

    A = ReLU(d logit_y / d z) * z            (attribution, computed by the EMA network or the online one)
    A = ReLU(d logit_y / d z * z)            (``sgdrop_attribution_relu='product'``, for signed latents)
    mask = 0 where A is in the sample's top-rho share, 1 elsewhere
    loss = cross_entropy(head(z * mask), y)

With a reference r (``sgdrop_reference``), z is replaced by z - r in the attribution and a dropped feature is set to
r instead of 0: ``'zero'`` (the paper's, r = 0) or ``'channel_mean'`` (r = the mean over the channels of z at the
sample's spatial position), which a head that normalises over channels cannot evade by shifting every feature.

At inference nothing changes: an SGDrop model is its base architecture. Graph capture treats it as one in both
modes: torch.fx symbolic tracing, torch.jit tracing and torch.export run the base ``forward``, and
``torch.jit.script`` compiles the base class (SGDrop's training step needs Python: autograd and the EMA network).

Mask rule, exact (``saliency_mask``): with N latent features per sample, k = floor(rho * N) (rho * N is rounded to
6 decimals first so that e.g. 0.29 * 100 gives 29, not 28). t is the k-th largest attribution of the sample. A
feature is dropped when its attribution is >= t and > 0. So ties at t are all dropped (the count can exceed k only
through exact ties), a feature with zero or negative attribution is never dropped, and k = 0 drops nothing.

EMA (``ema`` attribution): a copy of the whole network taken at the first SGDrop forward, updated by
``update_ema()`` after each optimizer step with timm's ``ModelEmaV3``. The n-th update uses
``decay_n = min(decay, (n - 1) / (n + 9))``: the first update copies the weights and the average warms up over the
first few hundred steps. Without that warmup a slow EMA barely moves early on, the mask becomes a near-fixed function
of (x, y), and the online network learns to read the label from the position of the zeros.

Where the ReLU goes (``sgdrop_attribution_relu``): the paper's ``'gradient'`` rule ReLU(d logit_y / d z) * z cannot
select a negative feature, since its attribution is <= 0 there. On a non-negative latent (VGG and ResNet: z is the
output of a ReLU) it equals ``'product'``, ReLU(d logit_y / d z * z); on a signed latent (ConvNeXt: z is the residual
stream, normalised only inside the head) ``'product'`` also selects the negative features whose sign raises the class
score, which a network trained with the paper's rule can otherwise route its evidence through, out of the mask's
reach.

Attribution source (``sgdrop_attribution``): ``'ema'`` runs the EMA network's encoder and head on the input (the
paper's), ``'online'`` the online network's head on the online latent, and ``'ema_head'`` the EMA network's head on the
online latent: the EMA's averaged head without a second encoder pass, which costs most of ``'ema'``'s step time.

Diagnostics (``sgdrop_step_stats``): each train-mode forward with a target records, per sample, the share of the
sample's positive attribution that the mask removed, the share of its latent features at or below zero, the mask's
true-class logit drop (the online head's true-class logit on the unmasked latent minus on the masked one, both in
eval mode) and the clean true-class logit margin over the runner-up class, as detached device tensors, so that a
training loop can average them without reading them back every step. A network cannot game the logit drop: an evaded
or empty mask shows a drop near zero, whatever the attribution says.
"""
import contextlib
import copy
import dataclasses
import enum
import functools
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import _symbolic_trace as fx_symbolic_trace
from timm.utils import ModelEmaV3, unwrap_model

__all__ = [
    'AttributionRelu', 'AttributionSource', 'LatentReference', 'LinearRhoSchedule', 'MODEL_SGDROP_SETTINGS',
    'PAPER_NAME', 'REGULARIZERS', 'SGDROP_SETTINGS', 'STEP_STAT_NAMES', 'SGDropCfg', 'SaliencyGuidedDropout',
    'add_sgdrop', 'dropped_attribution_share', 'is_sgdrop_model', 'latent_attribution', 'latent_reference',
    'nonpositive_share', 'saliency_mask', 'true_class_logit_drop',
]

# the paper, as timm's pretrained cfgs name it (paper_name, paper_ids)
PAPER_NAME = 'The Overfocusing Bias of Convolutional Neural Networks: A Saliency-Guided Regularization Approach'
DEFAULT_RHO = 0.01
DEFAULT_EMA_DECAY = 0.999
# ModelEmaV3 warmup 1 - (1 + t / gamma) ** -power with gamma 10, power 1 gives decay (n - 1) / (n + 9) at update n.
EMA_WARMUP_GAMMA = 10.0
EMA_WARMUP_POWER = 1.0
# what a run trains with: SGDrop, or one of the paper's baselines on the same latent features
REGULARIZERS = ('sgdrop', 'dropout', 'none')
# the per-sample diagnostics of every train-mode forward with a target, by name (``sgdrop_step_stats``)
STEP_STAT_NAMES = ('dropped_attribution_share', 'nonpositive_feature_share', 'true_class_logit_drop',
                   'clean_logit_margin')


class AttributionSource(str, enum.Enum):
    """Which weights compute the attribution map."""
    EMA = 'ema'
    ONLINE = 'online'
    EMA_HEAD = 'ema_head'  # the EMA network's head on the online latent


class LatentReference(str, enum.Enum):
    """What a latent feature is attributed against and set to when dropped."""
    ZERO = 'zero'
    CHANNEL_MEAN = 'channel_mean'


class AttributionRelu(str, enum.Enum):
    """Where the attribution's ReLU applies: to the gradient (the paper's rule) or to gradient times feature."""
    GRADIENT = 'gradient'
    PRODUCT = 'product'


def _check_rho(rho: float, name: str = 'rho') -> float:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)):
        raise TypeError(f'{name} must be a float in [0, 1), got {type(rho).__name__}.')
    if not 0.0 <= rho < 1.0 or math.isnan(rho):
        raise ValueError(
            f'{name} must be in [0, 1) (the share of latent features dropped per sample; the paper uses 0.01), '
            f'got {rho}.')
    return float(rho)


def _check_rho_end(rho: Optional[float], name: str) -> Optional[float]:
    return None if rho is None else _check_rho(rho, name)


def _check_rate(rate: float, name: str) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f'{name} must be a float in [0, 1), got {rate!r}.')
    return float(rate)


def _check_choice(choice_type: type[enum.Enum]) -> Callable[[Any, str], Any]:
    def check(value: Any, name: str) -> Any:
        try:
            return choice_type(value)
        except ValueError:
            choices = ', '.join(repr(member.value) for member in choice_type)
            raise ValueError(f'Unknown {name} {value!r}: choose one of {choices}.') from None
    return check


_check_attribution = _check_choice(AttributionSource)
_check_attribution_relu = _check_choice(AttributionRelu)
_check_reference = _check_choice(LatentReference)


def _setting(default: Any, check: Callable[[Any, str], Any], doc: str) -> Any:
    return dataclasses.field(default=default, metadata={'check': check, 'doc': doc})


@dataclasses.dataclass(frozen=True)
class SGDropCfg:
    """The SGDrop settings, checked when made: the one list of them and of their rules.

    The names are those of the settings everywhere: the ``sgdrop_*`` models' constructor arguments, ``add_sgdrop``'s,
    the recipe's flags (``--sgdrop-rho``) and the keys of records, exports and checkpoints. A model holds one without a
    curriculum (``model_args()``); a record or a run holds the curriculum too.

    Raises:
        ValueError: A value out of its range, in one line naming the setting and its range.
        TypeError: A rho that is no number.
    """
    sgdrop_rho: float = _setting(DEFAULT_RHO, _check_rho,
                                 'Share of latent features dropped per sample, in [0, 1); the start of a curriculum. '
                                 '0 disables SGDrop.')
    sgdrop_rho_end: Optional[float] = _setting(None, _check_rho_end,
                                               'The end of a curriculum (LinearRhoSchedule), None for a fixed rho.')
    sgdrop_attribution: AttributionSource = _setting(
        AttributionSource.EMA, _check_attribution,
        "'ema' (the paper's), 'online' (the paper's \"w/o EMA\") or 'ema_head' (the EMA network's head on the online "
        "latent).")
    sgdrop_attribution_relu: AttributionRelu = _setting(
        AttributionRelu.GRADIENT, _check_attribution_relu,
        "'gradient' (the paper's, ReLU(d logit_y / d z) * z) or 'product' (ReLU(d logit_y / d z * z)).")
    sgdrop_reference: LatentReference = _setting(
        LatentReference.ZERO, _check_reference,
        "'zero' (the paper's) or 'channel_mean': what z is attributed against and a dropped feature set to.")
    sgdrop_ema_decay: float = _setting(DEFAULT_EMA_DECAY, _check_rate,
                                       'Decay of the attribution EMA after its warmup, in [0, 1).')
    latent_drop_rate: float = _setting(0.0, _check_rate,
                                       "Dropout on the same latent features (the paper's Dropout baseline), 0 = off.")

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, field.metadata['check'](getattr(self, field.name), field.name))

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> 'SGDropCfg':
        """The settings recorded by name (a record's, an export's or a checkpoint's); those not recorded get the
        method's defaults.

        Raises:
            TypeError: A name that is no SGDrop setting.
        """
        unknown = sorted(set(settings) - set(SGDROP_SETTINGS))
        if unknown:
            raise TypeError(f'{", ".join(unknown)}: no SGDrop setting; the settings are {", ".join(SGDROP_SETTINGS)}.')
        return cls(**settings)

    @classmethod
    def of_record(cls, section: dict[str, Any]) -> 'SGDropCfg':
        """What the ``sgdrop`` section of a ``hub_configs/`` record or a ``config.json`` trained with: the recorded
        settings (the method's defaults for those not recorded, as for plain timm weights) as its ``regularizer``
        trains (``of_regularizer``)."""
        recorded = {name: section[name] for name in SGDROP_SETTINGS if section.get(name) is not None}
        return cls(**recorded).of_regularizer(section.get('regularizer', 'sgdrop'))

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain values, by name, as records, exports and checkpoints store them."""
        return {name: value.value if isinstance(value, enum.Enum) else value
                for name, value in dataclasses.asdict(self).items()}

    def of_regularizer(self, regularizer: str) -> 'SGDropCfg':
        """The settings a run of ``regularizer`` trains with: 'sgdrop' without latent dropout, or one of the paper's
        baselines on the same latent, rho 0 with the online source ('dropout' keeps its rate, 'none' has none), which
        keeps no EMA copy of the weights that nothing would read.

        Raises:
            ValueError: ``regularizer`` is none of 'sgdrop', 'dropout', 'none'.
        """
        if regularizer == 'sgdrop':
            return dataclasses.replace(self, latent_drop_rate=0.0)
        if regularizer not in REGULARIZERS:
            raise ValueError(f"Unknown regularizer {regularizer!r}: choose one of {', '.join(REGULARIZERS)}.")
        return SGDropCfg(sgdrop_rho=0.0, sgdrop_attribution=AttributionSource.ONLINE,
                         latent_drop_rate=self.latent_drop_rate if regularizer == 'dropout' else 0.0)

    def rho_schedule(self, num_epochs: int) -> 'LinearRhoSchedule':
        """rho per epoch: the curriculum from ``sgdrop_rho`` to ``sgdrop_rho_end``, or ``sgdrop_rho`` throughout."""
        return LinearRhoSchedule(self.sgdrop_rho, self.sgdrop_rho_end, num_epochs)

    def model_args(self) -> dict[str, Any]:
        """Constructor arguments of a model that trains on where these settings ended, as plain values: a
        curriculum's model drops the rho it ended at."""
        ended = dataclasses.replace(self, sgdrop_rho=self.sgdrop_rho if self.sgdrop_rho_end is None
                                    else self.sgdrop_rho_end, sgdrop_rho_end=None)
        return {name: value for name, value in ended.to_dict().items() if name in MODEL_SGDROP_SETTINGS}


# the settings by name; a model drops one rho, so a curriculum's end is no model argument
SGDROP_SETTINGS = tuple(field.name for field in dataclasses.fields(SGDropCfg))
MODEL_SGDROP_SETTINGS = tuple(name for name in SGDROP_SETTINGS if name != 'sgdrop_rho_end')


def latent_reference(features: torch.Tensor, reference: Union[str, LatentReference]) -> Optional[torch.Tensor]:
    """The reference r of ``features`` (B, C, ...): None for 'zero', the mean over channels (dim 1) at each sample and
    spatial position, broadcastable to ``features``, for 'channel_mean'."""
    if _check_reference(reference, 'sgdrop_reference') is LatentReference.ZERO:
        return None
    if features.dim() not in (2, 4):
        raise ValueError(f"sgdrop_reference='channel_mean' needs a latent of shape (B, C) or (B, C, H, W), got "
                         f"{tuple(features.shape)}: use sgdrop_reference='zero' for this model.")
    return features.mean(1, keepdim=True)


def latent_attribution(
        head: Callable[[torch.Tensor], torch.Tensor],
        features: torch.Tensor,
        target: torch.Tensor,
        relu: Union[str, AttributionRelu] = AttributionRelu.GRADIENT,
        reference: Union[str, LatentReference] = LatentReference.ZERO,
) -> torch.Tensor:
    """Attribution of the true-class logit to each latent feature, ReLU(d logit_y / d z) * z (the paper's rule).

    The gradient is taken through ``head`` only, on a detached copy of ``features``: no graph reaches the encoder
    and no parameter gradient is accumulated (``torch.autograd.grad`` returns the input gradient alone).

    Args:
        head: Maps latent features to logits (a model's ``forward_head``). It must treat samples independently.
        features: Latent features z, shape (B, ...).
        target: True class indices, shape (B,).
        relu: 'gradient' for ReLU(d logit_y / d z) * (z - r), 'product' for ReLU(d logit_y / d z * (z - r)).
        reference: r: 'zero' (the paper's) or 'channel_mean' (``latent_reference``).

    Returns:
        Attribution map in float32 (or the latent's own wider dtype), with the shape and memory format of
        ``features``.
    """
    relu = _check_attribution_relu(relu, 'sgdrop_attribution_relu')
    # in float32 at least, even under autocast: bf16 attributions tie, and ties at the threshold drop more than k
    latent = features.detach()
    if latent.dtype in (torch.float16, torch.bfloat16):
        latent = latent.float()
    with torch.enable_grad(), torch.autocast(features.device.type, enabled=False):
        latent.requires_grad_(True)
        logits = head(latent)
        # Samples are independent, so the gradient of the summed true-class logits is the per-sample gradient.
        class_score = logits.gather(1, target.unsqueeze(1)).sum()
        grad, = torch.autograd.grad(class_score, latent)
    offset = latent.detach()
    r = latent_reference(offset, reference)
    if r is not None:
        offset = offset - r
    if relu is AttributionRelu.PRODUCT:
        return (grad * offset).clamp_min(0)
    return grad.clamp_min(0) * offset


def num_dropped_features(rho: float, num_features: int) -> int:
    """k = floor(rho * N), with rho * N rounded to 6 decimals so binary fractions do not lose one feature."""
    return math.floor(round(rho * num_features, 6))


def saliency_mask(attribution: torch.Tensor, rho: float) -> torch.Tensor:
    """Keep-mask of the SGDrop rule: False for the most salient rho share of each sample's features.

    See the module docstring for the exact rule (k = floor(rho * N), drop attribution >= k-th largest and > 0).

    Args:
        attribution: Attribution map, shape (B, ...).
        rho: Share of features to drop per sample, in [0, 1).

    Returns:
        Boolean tensor shaped like ``attribution``, True where the feature is kept.
    """
    return _saliency_mask(attribution, _check_rho(rho))


def _saliency_mask(attribution: torch.Tensor, rho: float) -> torch.Tensor:
    """``saliency_mask`` for a rho already checked, as the model's setting is: nothing is validated per step."""
    num_features = attribution[0].numel()
    k = num_dropped_features(rho, num_features)
    if k == 0:
        return torch.ones_like(attribution, dtype=torch.bool)
    # topk in float32: bf16 is not supported by every backend, and the comparison below must use the same values
    scores = attribution.float()
    kth_largest = scores.flatten(1).topk(k, dim=1, sorted=False).values.amin(dim=1)
    kth_largest = kth_largest.view(-1, *([1] * (attribution.dim() - 1)))
    dropped = (scores >= kth_largest) & (scores > 0)
    return ~dropped


def dropped_attribution_share(attribution: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per sample, the share of its positive attribution on the features ``keep`` drops (0 when it has none)."""
    positive = attribution.detach().float().clamp_min(0).flatten(1)
    total = positive.sum(1)
    dropped = (positive * (~keep).flatten(1)).sum(1)
    return torch.where(total > 0, dropped / total.clamp_min(torch.finfo(torch.float32).tiny), 0.0)


def nonpositive_share(features: torch.Tensor) -> torch.Tensor:
    """Per sample, the share of latent features at or below zero."""
    return (features.flatten(1) <= 0).float().mean(1)


def true_class_logit_drop(clean_logits: torch.Tensor, masked_logits: torch.Tensor, target: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the true-class logit on the unmasked latent minus on the masked one, and the clean true-class
    logit's margin over the runner-up class, in float32."""
    clean, masked = clean_logits.detach().float(), masked_logits.detach().float()
    index = target.unsqueeze(1)
    clean_true = clean.gather(1, index).squeeze(1)
    runner_up = clean.scatter(1, index, float('-inf')).amax(1)
    return clean_true - masked.gather(1, index).squeeze(1), clean_true - runner_up


class LinearRhoSchedule:
    """Curriculum for rho (paper section 4.5): linear from ``start`` at epoch 0 to ``end`` at the last epoch.

    Args:
        start: rho of the first epoch.
        end: rho of the last epoch; None keeps rho constant at ``start``.
        num_epochs: Number of training epochs.
    """

    def __init__(self, start: float, end: Optional[float] = None, num_epochs: int = 1):
        self.start = _check_rho(start, 'start rho')
        self.end = self.start if end is None else _check_rho(end, 'end rho')
        if num_epochs < 1:
            raise ValueError(f'num_epochs must be >= 1, got {num_epochs}.')
        self.num_epochs = num_epochs

    def __call__(self, epoch: int) -> float:
        if self.num_epochs == 1:
            return self.start
        progress = min(max(epoch, 0), self.num_epochs - 1) / (self.num_epochs - 1)
        return self.start + (self.end - self.start) * progress

    def __repr__(self) -> str:
        return f'{type(self).__name__}(start={self.start}, end={self.end}, num_epochs={self.num_epochs})'


def _is_capturing_graph() -> bool:
    """True while torch.fx symbolic tracing, torch.jit tracing or torch.export records the model as a graph.

    torch.compile is not graph capture here: a compiled model trains with SGDrop like the eager one.
    """
    if torch.jit.is_tracing():
        return True
    is_exporting = getattr(torch.compiler, 'is_exporting', None)  # torch >= 2.4
    if is_exporting is not None and is_exporting():
        return True
    # is_fx_symbolic_tracing leaves out torch.compile / export, which newer torch's is_fx_tracing reports and logs
    is_symbolic_tracing = getattr(fx_symbolic_trace, 'is_fx_symbolic_tracing', fx_symbolic_trace.is_fx_tracing)
    return is_symbolic_tracing()


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Puts a module in eval mode for a block, then restores each submodule's own mode."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


@dataclasses.dataclass
class _SGDropState:
    """What an SGDrop model holds besides its settings, kept outside the module tree: the EMA network must stay out of
    state_dict(), parameters() and DDP's broadcast."""
    ema: Optional[ModelEmaV3] = None
    ema_updates: int = 0  # update_ema() calls applied to the current EMA
    warned_no_target: bool = False
    step_stats: Optional[dict[str, torch.Tensor]] = None  # sgdrop_step_stats


class SaliencyGuidedDropout:
    """Mixin that adds SGDrop training to a timm classifier with ``forward_features`` / ``forward_head``.

    Put it first in the bases, ``class SGDropVGG(SaliencyGuidedDropout, VGG)``, or use ``add_sgdrop(model)`` on any
    built model. The state dict keeps exactly the base architecture's keys: the EMA network is held outside the
    module tree and saved with ``ema_state_dict()``.

    Behaviour of ``forward(x, target=None)``:
        - eval mode: the base model, ``target`` is ignored;
        - train mode with ``target``: logits of the SGDrop-masked latent features (and latent dropout if set);
        - train mode without ``target``: the base model (plus latent dropout if set), no SGDrop, and a one-time
          warning per model when ``sgdrop_rho > 0``;
        - while torch.fx, torch.jit or torch.export captures a graph: the base model in either mode, and
          ``torch.jit.script`` compiles the base class itself (see ``__prepare_scriptable__``).

    The SGDrop settings are ``SGDropCfg``'s, by the same names: constructor keywords (``sgdrop_rho=0.05``), read and
    set on the model (``model.sgdrop_rho = 0.02``, checked), or whole as ``model.sgdrop_cfg``.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        # checked before the network is built: a bad setting should not cost a full model init
        cfg = _pop_sgdrop_cfg(kwargs)
        super().__init__(*args, **kwargs)
        self._init_sgdrop(cfg)

    def _init_sgdrop(self, cfg: SGDropCfg) -> None:
        self._sgdrop_cfg = cfg
        self._sgdrop_state = _SGDropState()

    @property
    def sgdrop_cfg(self) -> SGDropCfg:
        """The model's SGDrop settings (a fixed rho: a curriculum sets ``sgdrop_rho`` each epoch)."""
        return self._sgdrop_cfg

    @sgdrop_cfg.setter
    def sgdrop_cfg(self, cfg: SGDropCfg) -> None:
        if not isinstance(cfg, SGDropCfg) or cfg.sgdrop_rho_end is not None:
            raise TypeError(f'sgdrop_cfg must be an SGDropCfg without sgdrop_rho_end, got {cfg!r}.')
        self._sgdrop_cfg = cfg

    def extra_repr(self) -> str:
        settings = ', '.join(f'{name}={value}' for name, value in self.sgdrop_cfg.model_args().items())
        base = super().extra_repr()
        return f'{base}, {settings}' if base else settings

    @property
    def ema_model(self) -> Optional[nn.Module]:
        """The EMA network used for attribution, or None before the first SGDrop step (and for 'online')."""
        ema = self._sgdrop_state.ema
        return None if ema is None else ema.module

    def _drop_ema(self) -> None:
        self._sgdrop_state.ema, self._sgdrop_state.ema_updates = None, 0

    # not traced by torch.compile: the EMA's deepcopy of the network would break a compiled step's graph apart
    @torch.compiler.disable
    def _ensure_ema(self) -> ModelEmaV3:
        state = self._sgdrop_state
        if state.ema is None:
            ema = ModelEmaV3(
                self,
                decay=self.sgdrop_ema_decay,
                use_warmup=True,
                warmup_gamma=EMA_WARMUP_GAMMA,
                warmup_power=EMA_WARMUP_POWER,
            )
            ema.module.requires_grad_(False)
            state.ema, state.ema_updates = ema, 0
        return state.ema

    @torch.no_grad()
    def update_ema(self) -> None:
        """Update the EMA network from the current weights; call it after each optimizer step.

        A no-op for 'online' attribution. The first call creates the EMA if no SGDrop forward has yet.
        """
        if self.sgdrop_attribution is AttributionSource.ONLINE:
            return
        ema = self._ensure_ema()
        ema.decay = self.sgdrop_ema_decay  # follow changes made to the setting after the EMA was created
        self._sgdrop_state.ema_updates += 1
        ema.update(self, step=self._sgdrop_state.ema_updates)

    @property
    def ema_updates(self) -> int:
        """Number of ``update_ema()`` calls applied to the current EMA."""
        return self._sgdrop_state.ema_updates

    def ema_state_dict(self) -> Optional[dict[str, Any]]:
        """EMA weights and update count, for checkpoints; None when there is no EMA yet."""
        ema = self.ema_model
        if ema is None:
            return None
        return {'num_updates': self.ema_updates, 'state_dict': ema.state_dict()}

    def load_ema_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        """Restore what ``ema_state_dict()`` returned (None clears the EMA)."""
        if state is None:
            self._drop_ema()
            return
        if set(state) != {'num_updates', 'state_dict'}:
            raise ValueError(
                f'Not an SGDrop EMA state: expected keys num_updates and state_dict, got {sorted(state)}.')
        num_updates = state['num_updates']
        if isinstance(num_updates, bool) or not isinstance(num_updates, int) or num_updates < 0:
            raise ValueError(f'Not an SGDrop EMA state: num_updates must be a count >= 0, got {num_updates!r}.')
        ema = self._ensure_ema()
        ema.module.load_state_dict(state['state_dict'])
        self._sgdrop_state.ema_updates = num_updates

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> nn.Module:
        # .to() / .cuda() / .half() must move the EMA network along with the model.
        super()._apply(fn, *args, **kwargs)
        # the base model's own __init__ may move it before _init_sgdrop has run
        state = getattr(self, '_sgdrop_state', None)
        if state is not None and state.ema is not None:
            state.ema._apply(fn, *args, **kwargs)
        return self

    def reset_classifier(self, num_classes: int, *args: Any, **kwargs: Any) -> None:
        super().reset_classifier(num_classes, *args, **kwargs)
        # A new head makes the averaged one meaningless; the EMA restarts from the new weights.
        self._drop_ema()

    def _check_target(self, x: torch.Tensor, target: Any) -> None:
        if not isinstance(target, torch.Tensor):
            raise TypeError(f'target must be a tensor of class indices, got {type(target).__name__}.')
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(
                f'target must hold integer class indices (torch.long), got {target.dtype}. SGDrop drops the '
                f'features salient for the true class, so soft or mixed labels need their hard labels here.')
        if target.dtype != torch.long:
            # the attribution gathers the true-class logits, and gather takes int64 indices only
            raise TypeError(f'target must be a torch.long tensor of class indices, got {target.dtype}: pass '
                            f'target.long().')
        if target.shape != (x.shape[0],):
            raise ValueError(
                f'target must have shape ({x.shape[0]},), one class index per image, got {tuple(target.shape)}.')
        if target.device != x.device:
            raise ValueError(f'target is on {target.device} but the images are on {x.device}: move it with .to().')
        if self.num_classes <= 0:
            raise ValueError('SGDrop needs a classifier head: this model has num_classes=0. '
                             'Call reset_classifier(num_classes) first.')
        # checked on the device, without reading the labels back: no host sync on a GPU (where it is a device-side
        # assert) and no graph break under torch.compile; on the CPU it raises here, with this message
        torch._assert_async(
            ((target >= 0) & (target < self.num_classes)).all(),
            f'target holds a class outside [0, {self.num_classes}) for this model: check the labels, or build the '
            f'model with num_classes set to the number of classes.')

    @property
    def sgdrop_step_stats(self) -> Optional[dict[str, torch.Tensor]]:
        """Per-sample diagnostics of the last train-mode forward with a target (None before the first one).

        Detached tensors of shape (B,), on the device of the batch:
            dropped_attribution_share: of the sample's positive attribution, the share the mask removed (0 when the
                sample has no positive attribution, and when rho is 0);
            nonpositive_feature_share: the share of its online latent features that are <= 0;
            true_class_logit_drop: the online head's true-class logit on the unmasked latent minus on the masked one
                (eval mode; 0 when rho is 0);
            clean_logit_margin: the true-class logit on the unmasked latent minus the largest other class's (without
                a mask, of the training logits).
        """
        return self._sgdrop_state.step_stats

    def saliency_keep_mask(self, x: torch.Tensor, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Keep-mask for the online ``features`` of ``x``, from the configured attribution source."""
        return self._saliency_keep_mask(x, features, target)[0]

    def _saliency_keep_mask(self, x: torch.Tensor, features: torch.Tensor, target: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """The keep-mask and the attribution map it was taken from."""
        if self.sgdrop_attribution is AttributionSource.ONLINE:
            attribution_net, attribution_features = self, features
        else:
            if getattr(self, '_is_replica', False):
                # nn.DataParallel's replicas share the model's __dict__, so every device would read the one EMA
                # network on the first device
                raise RuntimeError(
                    "SGDrop's EMA attribution does not run under nn.DataParallel: train with DistributedDataParallel "
                    "(torchrun; train/main.py does), or build the model with sgdrop_attribution='online'.")
            attribution_net = self._ensure_ema().module
            if self.sgdrop_attribution is AttributionSource.EMA:
                with torch.no_grad():
                    attribution_features = attribution_net.forward_features(x)
            else:
                attribution_features = features
        # Eval mode so dropout or batch statistics in the head neither randomise nor couple the attributions.
        with _eval_mode(attribution_net):
            attribution = latent_attribution(attribution_net.forward_head, attribution_features, target,
                                             self.sgdrop_attribution_relu, self.sgdrop_reference)
        return _saliency_mask(attribution, self.sgdrop_rho), attribution

    def forward(self, x: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits of ``x``; in train mode with ``target`` (class indices, shape (B,)) through the SGDrop mask."""
        if self.training and not _is_capturing_graph():
            return self._forward_train(x, target)
        return super().forward(x)

    def _forward_train(self, x: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        if target is None:
            self._warn_no_target()
        else:
            self._check_target(x, target)
        if target is None and self.latent_drop_rate == 0:
            return super().forward(x)
        features = self.forward_features(x)
        if target is not None:
            self._sgdrop_state.step_stats = stats = {
                # of the online features before the mask, whose zeros would count as non-positive
                'nonpositive_feature_share': nonpositive_share(features.detach())}
            if self.sgdrop_rho > 0:
                keep, attribution = self._saliency_keep_mask(x, features, target)
                unmasked, features = features, self._fill_dropped(features, keep)
                stats['dropped_attribution_share'] = dropped_attribution_share(attribution, keep)
                # one head forward of both latents (samples are independent): what the mask took from the true class
                with torch.no_grad(), _eval_mode(self):
                    clean_logits, masked_logits = self.forward_head(torch.cat([unmasked, features]).detach()).chunk(2)
                stats['true_class_logit_drop'], stats['clean_logit_margin'] = true_class_logit_drop(
                    clean_logits, masked_logits, target)
        if self.latent_drop_rate > 0:
            features = F.dropout(features, self.latent_drop_rate, training=True)
        logits = self.forward_head(features)
        if target is not None and self.sgdrop_rho == 0:
            # no mask: nothing dropped, and the margin of the training logits themselves (no extra head forward)
            no_drop = logits.new_zeros(logits.shape[0], dtype=torch.float32)
            stats.update(dropped_attribution_share=no_drop, true_class_logit_drop=no_drop,
                         clean_logit_margin=true_class_logit_drop(logits, logits, target)[1])
        return logits

    def _fill_dropped(self, features: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``features`` with the dropped ones set to the reference: 0 (the paper's), or the channel mean."""
        reference = latent_reference(features, self.sgdrop_reference)
        if reference is None:
            return features * keep.to(features.dtype)
        return torch.where(keep, features, reference)

    def _warn_no_target(self) -> None:
        # A warning, not an error: timm's feature extraction, timm utilities and BN recalibration run train-mode
        # forwards without labels on purpose. A training loop that forgets the labels silently trains the base model,
        # though, so say it once per model. A Python flag: no device sync, and graph capture never gets here.
        if self.sgdrop_rho == 0 or self._sgdrop_state.warned_no_target:
            return
        self._sgdrop_state.warned_no_target = True
        warnings.warn(
            f'{type(self).__name__} ran a train-mode forward without target, so SGDrop (sgdrop_rho='
            f'{self.sgdrop_rho}) was not applied. Pass the labels to train with it: model(x, target=y). '
            f'Forwards without labels (feature extraction, BN recalibration) are fine; this warning shows once '
            f'per model.',
            UserWarning,
            stacklevel=3,
        )

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script`` compiles: this model as an instance of its base architecture.

        The eval-mode model is its base, and the SGDrop training step (autograd through the head, the EMA network)
        cannot be TorchScript, so scripting gives the base model with the same parameters and buffers.
        """
        base = _base_architecture(type(self))
        scriptable = copy.copy(self)
        scriptable.__class__ = base
        # a copy of the child table: TorchScript writes prepared children back into it
        scriptable.__dict__['_modules'] = copy.copy(self._modules)
        for name in [name for name in scriptable.__dict__ if name.startswith('_sgdrop_')]:
            del scriptable.__dict__[name]
        return scriptable


def _sgdrop_setting(name: str) -> property:
    """``model.<name>``: the setting of the model's ``sgdrop_cfg``; setting it checks the value by ``SGDropCfg``'s
    rule and replaces the model's cfg."""
    def get(self: SaliencyGuidedDropout) -> Any:
        return getattr(self._sgdrop_cfg, name)

    def set_(self: SaliencyGuidedDropout, value: Any) -> None:
        self._sgdrop_cfg = dataclasses.replace(self._sgdrop_cfg, **{name: value})
    return property(get, set_, doc=SGDropCfg.__dataclass_fields__[name].metadata['doc'])


for _name in MODEL_SGDROP_SETTINGS:
    setattr(SaliencyGuidedDropout, _name, _sgdrop_setting(_name))


def _pop_sgdrop_cfg(kwargs: dict[str, Any]) -> SGDropCfg:
    """The SGDrop settings among a model's keyword arguments, taken out of them and checked."""
    if 'sgdrop_rho_end' in kwargs:
        raise TypeError('sgdrop_rho_end is no model argument: a model drops one rho, and a curriculum belongs to its '
                        'training (LinearRhoSchedule); SGDropCfg.model_args() gives the rho a curriculum ended at.')
    return SGDropCfg(**{name: kwargs.pop(name) for name in MODEL_SGDROP_SETTINGS if name in kwargs})


def _base_architecture(cls: type[nn.Module]) -> type[nn.Module]:
    """The class after ``SaliencyGuidedDropout`` in the MRO: ``ResNet`` for ``SGDropResNet``."""
    mro = cls.__mro__
    base = mro[mro.index(SaliencyGuidedDropout) + 1]
    if not (isinstance(base, type) and issubclass(base, nn.Module)) or base is nn.Module:
        raise TypeError(
            f'{cls.__name__} has no base architecture after SaliencyGuidedDropout in its bases: declare it as '
            f'class {cls.__name__}(SaliencyGuidedDropout, <timm model class>).')
    return base


@functools.lru_cache(maxsize=None)
def _sgdrop_class(base: type[nn.Module]) -> type[nn.Module]:
    return type(f'SGDrop{base.__name__}', (SaliencyGuidedDropout, base),
                {'__doc__': base.__doc__, '_sgdrop_base': base, '__reduce_ex__': _reduce_added_sgdrop})


def _reduce_added_sgdrop(self: nn.Module, protocol: int) -> tuple:
    # add_sgdrop's classes are made at run time, where pickle (torch.save(model)) cannot find them by name: an
    # instance unpickles as a new one of the class made for its base architecture, then takes its state
    return (_new_added_sgdrop, (type(self)._sgdrop_base,), *object.__reduce_ex__(self, protocol)[2:])


def _new_added_sgdrop(base: type[nn.Module]) -> nn.Module:
    cls = _sgdrop_class(base)
    return cls.__new__(cls)


def add_sgdrop(model: nn.Module, **settings: Any) -> nn.Module:
    """Give any built timm classifier SGDrop training, in place; weights and state-dict keys are unchanged.

    Args:
        model: A classifier with ``forward_features`` and ``forward_head`` (every timm CNN has them).
        **settings: ``SGDropCfg``'s settings by name but ``sgdrop_rho_end`` (``sgdrop_rho=0.05``,
            ``**cfg.model_args()``), the ``sgdrop_*`` models' constructor arguments; the others get their defaults.

    Returns:
        The same model object, now an instance of ``SaliencyGuidedDropout`` (it pickles, and ``torch.save(model)``
        loads back).

    Raises:
        TypeError: ``model`` has no timm-style encoder and head, or a keyword is no SGDrop setting.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f'add_sgdrop expects an nn.Module, got {type(model).__name__}.')
    missing = [name for name in ('forward_features', 'forward_head', 'num_classes') if not hasattr(model, name)]
    if missing:
        raise TypeError(
            f'{type(model).__name__} has no {", ".join(missing)}: SGDrop needs a timm-style classifier split into '
            f'forward_features (encoder) and forward_head (classifier).')
    cfg = _pop_sgdrop_cfg(settings)  # before any change
    if settings:
        raise TypeError(f'{", ".join(sorted(settings))}: no SGDrop setting; the settings are '
                        f'{", ".join(MODEL_SGDROP_SETTINGS)}.')
    if not isinstance(model, SaliencyGuidedDropout):
        model.__class__ = _sgdrop_class(type(model))
    model._init_sgdrop(cfg)
    return model


def is_sgdrop_model(model: nn.Module) -> bool:
    """True when ``model`` (or the model inside a DDP or torch.compile wrapper) trains with SGDrop."""
    return isinstance(unwrap_model(model), SaliencyGuidedDropout)
