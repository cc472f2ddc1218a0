"""The settings of a training run: what the recipe builds once from its arguments and stores in its checkpoints.

``train/main.py`` builds a ``RunSettings`` from its command line before any process changes an argument (the batch
size, say, becomes per process under DDP), stores ``to_dict()`` in every checkpoint as ``settings``, and reads it back
on resume. Everything that reads a recipe checkpoint (resume, export, ``sgdrop-zoo publish``, ``finetune``) goes
through ``RunSettings.from_checkpoint``, so no library module knows the recipe's command-line names.
"""
import dataclasses
from typing import Any, Optional

from .pretrained import check_model_args
from .sgdrop import check_sgdrop_settings

__all__ = ['RUN_SETTINGS_VERSION', 'RunSettings']

# the version of the stored settings; a checkpoint of another version is refused by name
RUN_SETTINGS_VERSION = 2
# the settings that define a run beyond the model: a resume that changed one would continue another run
_RUN_DEFINING = ('regularizer', 'image_size', 'train_transform', 'optimizer', 'train_subset', 'train_subset_per_class',
                 'holdout_per_class')
# the SGDrop settings among the run settings, checked by the method's own rule when a checkpoint is read
_SGDROP_SETTINGS = ('sgdrop_rho', 'sgdrop_rho_end', 'sgdrop_attribution', 'sgdrop_attribution_relu', 'sgdrop_reference',
                    'sgdrop_ema_decay', 'latent_drop_rate')
_OF_REGULARIZER = {
    'sgdrop': ('sgdrop_rho', 'sgdrop_rho_end', 'sgdrop_attribution', 'sgdrop_attribution_relu', 'sgdrop_reference',
               'sgdrop_ema_decay'),
    'dropout': ('latent_drop_rate',),
    'none': (),
}


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What trained a checkpoint.

    Args:
        arch: The timm model name.
        model_kwargs: Its architecture arguments.
        regularizer: 'sgdrop', or one of the paper's baselines on the same latent features ('dropout', 'none').
        sgdrop_rho: rho, or the curriculum's start.
        sgdrop_rho_end: The curriculum's end, or None for a fixed rho.
        sgdrop_attribution: 'ema', 'online' or 'ema_head'.
        sgdrop_attribution_relu: 'gradient' or 'product'.
        sgdrop_reference: 'zero' or 'channel_mean'.
        sgdrop_ema_decay: The attribution EMA's decay.
        latent_drop_rate: The dropout baseline's drop probability.
        image_size: The square side it was trained and validated at.
        train_transform: 'crop-flip' or 'resize'.
        optimizer: 'sgd' or 'adam'.
        lr: The initial learning rate.
        epochs: The number of epochs of the run.
        batch_size: The batch size of all processes together.
        seed: The seed, or None.
        data: The dataset root, as given.
        train_subset: Size of the fixed training subset (0: all images).
        train_subset_per_class: Images per class of the fixed class-balanced subset (0: off).
        holdout_per_class: Images per class held out of the training folder as the dev split (0: off).
    """
    arch: str
    model_kwargs: dict[str, Any]
    regularizer: str
    sgdrop_rho: float
    sgdrop_rho_end: Optional[float]
    sgdrop_attribution: str
    sgdrop_attribution_relu: str
    sgdrop_reference: str
    sgdrop_ema_decay: float
    latent_drop_rate: float
    image_size: int
    train_transform: str
    optimizer: str
    lr: float
    epochs: int
    batch_size: int
    seed: Optional[int]
    data: str
    train_subset: int
    train_subset_per_class: int
    holdout_per_class: int

    def to_dict(self) -> dict[str, Any]:
        """The settings as a checkpoint stores them, with their version."""
        return {'version': RUN_SETTINGS_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], path: Any) -> 'RunSettings':
        """The settings a recipe checkpoint (read from ``path``) stores.

        Raises:
            ValueError: It stores none, or settings of another version; in one line naming ``path``.
        """
        stored = checkpoint.get('settings')
        if not isinstance(stored, dict) or stored.get('version') != RUN_SETTINGS_VERSION:
            found = 'no run settings' if not isinstance(stored, dict) else f'run settings of version ' \
                                                                           f'{stored.get("version")!r}'
            raise ValueError(f'{path}: {found}, not those of version {RUN_SETTINGS_VERSION} that this sgdrop-zoo '
                             f'writes; train it again with this version of train/main.py')
        names = {field.name for field in dataclasses.fields(cls)}
        if set(stored) - {'version'} != names:
            raise ValueError(f'{path}: its run settings are not complete ({sorted(names - set(stored))} missing); '
                             f'pass an intact checkpoint')
        check_model_args(stored['model_kwargs'], path)
        if stored['regularizer'] not in _OF_REGULARIZER:
            raise ValueError(f"{path}: its run settings name the regularizer {stored['regularizer']!r}, not one of "
                             f"{', '.join(_OF_REGULARIZER)}; pass a checkpoint that train/main.py wrote")
        sgdrop = {name: stored[name] for name in _SGDROP_SETTINGS if stored[name] is not None}
        try:
            check_sgdrop_settings(**sgdrop)
        except (TypeError, ValueError) as e:
            raise ValueError(f'{path}: its run settings hold an SGDrop setting out of range ({e})') from None
        return cls(**{name: stored[name] for name in names})

    def sgdrop_model_args(self) -> dict[str, Any]:
        """The SGDrop constructor arguments of the run's regularizer; the paper's baselines have rho 0."""
        if self.regularizer == 'sgdrop':
            return dict(sgdrop_rho=self.sgdrop_rho, sgdrop_attribution=self.sgdrop_attribution,
                        sgdrop_attribution_relu=self.sgdrop_attribution_relu, sgdrop_reference=self.sgdrop_reference,
                        sgdrop_ema_decay=self.sgdrop_ema_decay,
                        latent_drop_rate=0.0)
        # online attribution keeps no EMA copy of the weights, which a run without SGDrop never reads
        return dict(sgdrop_rho=0.0, sgdrop_attribution='online', sgdrop_attribution_relu='gradient',
                    sgdrop_reference='zero',
                    sgdrop_ema_decay=self.sgdrop_ema_decay,
                    latent_drop_rate=self.latent_drop_rate if self.regularizer == 'dropout' else 0.0)

    def changed_run_settings(self, other: 'RunSettings') -> list[str]:
        """The names of the run-defining settings that ``other`` changes (those of this run's regularizer, and the
        number of epochs a rho curriculum spreads over)."""
        curriculum = self.regularizer == 'sgdrop' and self.sgdrop_rho_end is not None
        names = _RUN_DEFINING + _OF_REGULARIZER[self.regularizer] + (('epochs',) if curriculum else ())
        return [name for name in names if getattr(self, name) != getattr(other, name)]
