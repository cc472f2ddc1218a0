"""The training recipe's checkpoint: ``RecipeCheckpoint``, its one writer and one reader.

``train/main.py`` writes one per epoch (``checkpoint.pth.tar``, copied to ``model_best.pth.tar`` when best); resume,
the export, ``sgdrop-zoo publish`` and ``finetune`` read it back with ``RecipeCheckpoint.read``. On disk it is a dict
of tensors and plain data, read without executing pickled code.
"""
import dataclasses
import pickle
import zipfile
from pathlib import Path
from typing import Any, Optional

import timm
import torch
import torch.nn as nn

from .run_files import atomic_write
from .run_settings import RunSettings

__all__ = ['RecipeCheckpoint']


def _is_legacy_torch_save(path: Path) -> bool:
    """Whether ``path`` starts as the files of ``torch.save(..., _use_new_zipfile_serialization=False)`` do."""
    with open(path, 'rb') as f:
        head = f.read(64)
    # the legacy format begins with torch's magic number, pickled with the protocol of the save
    return any(head.startswith(pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=protocol))
               for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1))


def _read_torch_save(path: Path, mmap: bool = False) -> dict[str, Any]:
    """Read a dict written by ``torch.save``, tensors on the CPU, without executing pickled code; with ``mmap``, a
    file in torch's zip format has its tensors mapped rather than read.

    Raises:
        ValueError: The file is truncated, corrupt, not written by ``torch.save``, holds objects other than tensors
            and plain data, or holds no dict; in one line.
    """
    try:
        # weights_only: a checkpoint is data, and unpickling anything else would run its code; torch maps only its
        # zip format
        stored = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001, a truncated zip, foreign classes, a file that is no checkpoint at all
        # torch's own messages run to many lines, and some end with advice to load with weights_only=False, which
        # would run the file's code
        if not zipfile.is_zipfile(path) and not _is_legacy_torch_save(path):  # the two formats of torch.save
            reason = 'truncated, or not written by torch.save'
        elif isinstance(e, pickle.UnpicklingError):
            reason = 'it holds objects other than tensors and plain data'
        else:
            reason = str(e).splitlines()[0].split('. ')[0] if str(e) else type(e).__name__
        raise ValueError(f'{path}: not a readable checkpoint ({reason}); pass an intact checkpoint.pth.tar or '
                         f'model_best.pth.tar of a run.') from e
    if not isinstance(stored, dict):
        raise ValueError(f'{path}: not a checkpoint (it holds a {type(stored).__name__}, not a dict); pass the '
                         f'checkpoint.pth.tar or model_best.pth.tar of a run.')
    return stored


@dataclasses.dataclass
class RecipeCheckpoint:
    """The state of a recipe run after an epoch.

    Args:
        epoch: The number of epochs finished.
        acc1: This epoch's validation top-1.
        best_acc1: The best validation top-1 of the run so far.
        best_epoch: The epoch (counted from 1) of ``best_acc1``.
        class_names: The dataset's classes, in label order.
        settings: What defines the run.
        state_dict: The model's weights.
        sgdrop_ema: The state of the attribution's EMA network, or None where the run holds none.
        optimizer: The optimizer's state.
        scheduler: The learning-rate scheduler's state.
        scaler: The gradient scaler's state.
        rng_state: The random generators' state (``run_files.get_rng_state``).
    """
    epoch: int
    acc1: float
    best_acc1: float
    best_epoch: int
    class_names: list[str]
    settings: RunSettings
    state_dict: dict[str, torch.Tensor]
    sgdrop_ema: Optional[dict[str, Any]]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    rng_state: dict[str, Any]

    def write(self, path: Path) -> None:
        """Write the checkpoint to ``path`` atomically: a kill at any moment leaves the previous file complete."""
        stored = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        stored['settings'] = self.settings.to_dict()
        atomic_write(path, lambda f: torch.save(stored, f))

    @classmethod
    def read(cls, path: Path) -> 'RecipeCheckpoint':
        """Read a checkpoint that ``write`` wrote.

        Raises:
            ValueError: The file is unreadable, not such a checkpoint, or holds settings this version cannot read;
                in one line naming ``path``.
        """
        stored = _read_torch_save(path)
        names = [field.name for field in dataclasses.fields(cls)]
        missing = [name for name in names if name not in stored]
        if missing:
            raise ValueError(f'{path}: not a checkpoint of train/main.py (no {", ".join(missing)}); pass the '
                             f'checkpoint.pth.tar or model_best.pth.tar of a run.')
        return cls(**{**{name: stored[name] for name in names},
                      'settings': RunSettings.from_dict(stored['settings'], path)})

    @classmethod
    def read_epoch(cls, path: Path) -> int:
        """The number of epochs a checkpoint that ``write`` wrote has finished, its tensors left unread.

        Raises:
            ValueError: The file is unreadable or not such a checkpoint; in one line naming ``path``.
        """
        stored = _read_torch_save(path, mmap=True)
        if not isinstance(stored.get('epoch'), int):
            raise ValueError(f'{path}: not a checkpoint of train/main.py (no epoch); pass the checkpoint.pth.tar or '
                             f'model_best.pth.tar of a run.')
        return stored['epoch']

    def build_model(self, path: Path) -> nn.Module:
        """The timm model of the checkpoint holding its weights, without SGDrop's training settings.

        Raises:
            ValueError: The weights do not fit the architecture the settings name; in one line naming ``path``.
        """
        arch, model_kwargs = self.settings.arch, self.settings.model_kwargs
        model = timm.create_model(arch, num_classes=len(self.class_names), **model_kwargs)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as e:
            raise ValueError(f'{path}: its state_dict does not fit {arch} with {len(self.class_names)} classes and '
                             f'arguments {model_kwargs} ({str(e)[:200]}).') from e
        return model

    def release_state(self) -> None:
        """Drop the training state once loaded into the model, so that its tensors are freed however many callers
        hold this checkpoint."""
        self.state_dict, self.sgdrop_ema, self.optimizer, self.scheduler, self.scaler = {}, None, {}, {}, {}
