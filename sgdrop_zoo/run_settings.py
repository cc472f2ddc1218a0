"""The settings of a training run: what the recipe builds once from its arguments and stores in its checkpoints.

``train/main.py`` builds a ``RunSettings`` from its command line before any process changes an argument (the batch
size, say, becomes per process under DDP); its checkpoint (``checkpoint.RecipeCheckpoint``) stores ``to_dict()`` and
reads it back with ``from_dict``, so no library module knows the recipe's command-line names.
"""
import dataclasses
from typing import Any, Optional

from .pretrained import check_model_args
from .sgdrop import REGULARIZERS, SGDROP_SETTINGS, SGDropCfg

__all__ = ['RUN_SETTINGS_VERSION', 'RunSettings']

# the version of the stored settings; a checkpoint of another version is refused by name
RUN_SETTINGS_VERSION = 2
# the settings that define a run beyond the model: a resume that changed one would continue another run
_RUN_DEFINING = ('regularizer', 'image_size', 'train_transform', 'optimizer', 'train_subset', 'train_subset_per_class',
                 'holdout_per_class')


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What trained a checkpoint.

    Args:
        arch: The timm model name.
        model_kwargs: Its architecture arguments.
        regularizer: 'sgdrop', or one of the paper's baselines on the same latent features ('dropout', 'none').
        sgdrop: The SGDrop settings as given (a rho curriculum included); ``sgdrop_cfg`` is what the run trains with.
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
    sgdrop: SGDropCfg
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

    @property
    def sgdrop_cfg(self) -> SGDropCfg:
        """The SGDrop settings the run trains with: its own for SGDrop, those of the paper's baseline otherwise."""
        return self.sgdrop.of_regularizer(self.regularizer)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a checkpoint stores them, with their version (the SGDrop settings among the others)."""
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self) if field.name != 'sgdrop'}
        return {'version': RUN_SETTINGS_VERSION, **fields, **self.sgdrop.to_dict()}

    @classmethod
    def from_dict(cls, stored: Any, path: Any) -> 'RunSettings':
        """The settings a recipe checkpoint (read from ``path``) stores, as ``to_dict`` wrote them.

        Raises:
            ValueError: They are missing, of another version, or out of range; in one line naming ``path``.
        """
        if not isinstance(stored, dict) or stored.get('version') != RUN_SETTINGS_VERSION:
            versioned = isinstance(stored, dict) and 'version' in stored
            found = f'run settings of version {stored["version"]!r}' if versioned else 'no run settings'
            raise ValueError(f'{path}: {found}, not those of version {RUN_SETTINGS_VERSION} that this sgdrop-zoo '
                             f'writes; train it again with this version of train/main.py')
        names = {field.name for field in dataclasses.fields(cls)} - {'sgdrop'} | set(SGDROP_SETTINGS)
        if set(stored) - {'version'} != names:
            raise ValueError(f'{path}: its run settings are not complete ({sorted(names - set(stored))} missing); '
                             f'pass an intact checkpoint')
        check_model_args(stored['model_kwargs'], path)
        if stored['regularizer'] not in REGULARIZERS:
            raise ValueError(f"{path}: its run settings name the regularizer {stored['regularizer']!r}, not one of "
                             f"{', '.join(REGULARIZERS)}; pass a checkpoint that train/main.py wrote")
        try:
            sgdrop = SGDropCfg.from_dict({name: stored[name] for name in SGDROP_SETTINGS})
        except (TypeError, ValueError) as e:
            raise ValueError(f'{path}: its run settings hold an SGDrop setting out of range ({e}); pass a checkpoint '
                             f'that train/main.py wrote') from None
        return cls(sgdrop=sgdrop, **{name: stored[name] for name in names if name not in SGDROP_SETTINGS})

    def run_defining(self) -> dict[str, Any]:
        """The settings that define the run beyond the model, by name, with the number of epochs and the SGDrop
        settings its regularizer trains with (plain values)."""
        return {**{name: getattr(self, name) for name in (*_RUN_DEFINING, 'epochs')}, **self.sgdrop_cfg.to_dict()}

    def changed_run_settings(self, other: 'RunSettings') -> list[str]:
        """The names of the run-defining settings that ``other`` changes: a resume that changed one would continue
        another run (the number of epochs counts only for a rho curriculum, which spreads over them)."""
        mine, theirs = self.run_defining(), other.run_defining()
        curriculum = self.sgdrop_cfg.sgdrop_rho_end is not None
        return [name for name in mine if mine[name] != theirs[name] and (name != 'epochs' or curriculum)]
