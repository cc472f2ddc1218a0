"""Pretrained tags of the zoo: ``hub_configs/*.json`` -> timm ``default_cfgs``, and sha256-checked weights.

Each JSON file in ``hub_configs/`` describes one checkpoint (see ``hub_configs/README.md``). The model files merge them
into their ``default_cfgs`` with ``pretrained_cfgs()``, so ``timm.create_model("sgdrop_resnet10t.<tag>",
pretrained=True)`` finds ``model.safetensors`` in the record's ``local_dir`` (a Hub-repo folder shipped inside
``hub_configs/``) or, where that folder is absent, downloads it from the record's ``hf_hub_id``; either way
``build_model_with_checked_weights()`` refuses it unless its sha256 is the record's.

``SGDROP_ZOO_HUB_CONFIGS=/some/dir`` replaces the packaged ``hub_configs/`` (read once, when sgdrop_zoo is imported).
"""
import inspect
import json
import os
import warnings
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Union

import timm
import torch.nn as nn
from timm.models import build_model_with_cfg
from timm.models._builder import resolve_pretrained_cfg

from .hub_files import WEIGHTS_NAME, HubError, download_checked_weights, sha256_of_file
from .sgdrop import SGDropCfg

__all__ = [
    'HUB_CONFIGS_ENV', 'HubConfigWarning', 'build_model_with_checked_weights', 'check_model_args',
    'check_shipped_folder', 'checked_record_weights', 'checkpoint_description', 'hub_configs_dir', 'load_hub_configs',
    'local_weights', 'packaged_hub_configs_dir', 'pretrained_cfgs', 'record_notes', 'retired_tag', 'tag_folder',
]

HUB_CONFIGS_ENV = 'SGDROP_ZOO_HUB_CONFIGS'
REQUIRED_FIELDS = {
    'architecture': str, 'tag': str, 'dataset': str, 'num_classes': int, 'label_names': list,
    'input_size': list, 'mean': list, 'std': list, 'crop_pct': float, 'crop_mode': str, 'interpolation': str,
    'sgdrop': dict,
    'metrics': dict, 'sha256': str, 'license': str,
}
# where the weights are: at least one of them, each a string or null
LOCATION_FIELDS = ('hf_hub_id', 'local_dir')
# fields a record may leave out: the terms of the data that trained it
OPTIONAL_FIELDS = {'dataset_license': str}


# timm.create_model's own parameters, and the keywords timm's builder takes for itself: in a config's model_args they
# would choose the weights (checkpoint_path, pretrained_cfg, ...) or the model's form instead of its architecture
NOT_ARCHITECTURE_ARGS = frozenset(inspect.signature(timm.create_model).parameters) - {'kwargs'} | {
    'features_only', 'feature_cfg', 'feature_cls', 'pretrained_strict', 'kwargs_filter'}


def packaged_hub_configs_dir() -> Path:
    """The ``hub_configs/`` shipped with the package, whether or not ``$SGDROP_ZOO_HUB_CONFIGS`` replaces it."""
    installed = Path(__file__).parent / 'hub_configs'  # a wheel installs the top-level folder here
    return installed if installed.is_dir() else Path(__file__).parent.parent / 'hub_configs'  # a source checkout


def hub_configs_dir() -> Path:
    """The directory of checkpoint records: ``$SGDROP_ZOO_HUB_CONFIGS``, else the packaged ``hub_configs/``."""
    override = os.environ.get(HUB_CONFIGS_ENV)
    return Path(override) if override else packaged_hub_configs_dir()


def check_model_args(model_args: Any, source: Any) -> dict[str, Any]:
    """A config's, record's or run's ``model_args``: architecture arguments only, by name.

    Raises:
        ValueError: Not a mapping of names, or a name that is ``timm.create_model``'s own (``checkpoint_path``,
            ``pretrained``, ``pretrained_cfg_overlay``, ...); in one line naming ``source``.
    """
    if not isinstance(model_args, dict) or not all(isinstance(name, str) for name in model_args):
        raise ValueError(f'{source}: model_args must be a JSON object of architecture arguments, got '
                         f'{type(model_args).__name__}')
    chosen_elsewhere = sorted(set(model_args) & NOT_ARCHITECTURE_ARGS)
    if chosen_elsewhere:
        raise ValueError(f"{source}: model_args holds {', '.join(chosen_elsewhere)}, which are no architecture "
                         f"arguments (a model's weights are its own {WEIGHTS_NAME}); remove them")
    return model_args


def _check_record(record: Any, path: Path) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise ValueError(f'{path}: a hub config is one JSON object, got {type(record).__name__}.')
    problems = [
        f'{name} ({kind.__name__})' for name, kind in REQUIRED_FIELDS.items()
        if not isinstance(record.get(name), (int, float) if kind is float else kind)
    ]
    problems += [f'{name} (str or null)' for name in LOCATION_FIELDS
                 if not isinstance(record.get(name), (str, type(None)))]
    problems += [f'{name} ({kind.__name__})' for name, kind in OPTIONAL_FIELDS.items()
                 if name in record and not isinstance(record[name], kind)]
    if problems:
        raise ValueError(f'{path}: missing or mistyped fields {", ".join(problems)}; see hub_configs/README.md.')
    if not any(record.get(name) for name in LOCATION_FIELDS):
        raise ValueError(f'{path}: neither hf_hub_id nor local_dir says where the weights are; set at least one.')
    local_dir = record.get('local_dir')
    if local_dir and (Path(local_dir).is_absolute() or Path(local_dir).parts != (local_dir,) or local_dir == '..'):
        raise ValueError(f'{path}: local_dir {local_dir!r} must name a folder of hub_configs/ itself, as its tag '
                         f'does (e.g. "sgdrop_resnet10t.imagenette_128_ema_head").')
    if len(record['label_names']) != record['num_classes']:
        raise ValueError(f'{path}: {len(record["label_names"])} label_names for num_classes={record["num_classes"]}.')
    if len(record['sha256']) != 64:
        raise ValueError(f'{path}: sha256 must be the 64 hex digits of {WEIGHTS_NAME}.')
    check_model_args(record.get('model_args', {}), path)
    return record


class HubConfigWarning(UserWarning):
    """A checkpoint record of ``hub_configs/`` that cannot be used was skipped."""


def _read_records(directory: Path) -> Iterator[Union[dict[str, Any], ValueError]]:
    """Each ``*.json`` record of ``directory``, validated, in name order; in place of a file that is not valid JSON,
    lacks a field or repeats another file's ``architecture.tag``, the ValueError that says so, for the caller to raise
    or to skip."""
    seen = {}
    for path in sorted(directory.glob('*.json')):
        try:
            record = json.loads(path.read_text(encoding='utf-8'))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            yield ValueError(f'{path}: not valid JSON ({e}).')
            continue
        try:
            record = _check_record(record, path)
        except ValueError as e:
            yield e
            continue
        name = f'{record["architecture"]}.{record["tag"]}'
        if name in seen:
            yield ValueError(f'{path}: {name} is already defined by {seen[name]}; each tag needs its own name.')
            continue
        seen[name] = path
        yield record


def load_hub_configs(directory: Optional[Path] = None) -> list[dict[str, Any]]:
    """Read and validate every ``*.json`` checkpoint record of ``directory`` (default ``hub_configs_dir()``).

    Raises:
        ValueError: A file is not valid JSON, lacks a field, or repeats another file's ``architecture.tag``.
    """
    records = []
    for record in _read_records(Path(directory) if directory is not None else hub_configs_dir()):
        if isinstance(record, ValueError):
            raise record
        records.append(record)
    return records


@lru_cache(maxsize=None)
def _records() -> dict[str, dict[str, Any]]:
    """The usable records by ``architecture.tag``; one that is not is named in a warning and skipped, so that
    ``import sgdrop_zoo`` and the other tags keep working."""
    # read once per process: timm's registry is filled at import time and cannot follow later changes
    records = {}
    for record in _read_records(hub_configs_dir()):
        if isinstance(record, ValueError):
            warnings.warn(f'{record} Its tag is not registered; fix or remove the file.', HubConfigWarning,
                          stacklevel=2)
            continue
        records[f'{record["architecture"]}.{record["tag"]}'] = record
    return records


def local_weights(record: dict[str, Any]) -> Optional[Path]:
    """The ``model.safetensors`` of a record's ``local_dir`` (relative to ``hub_configs_dir()``), or None."""
    return hub_configs_dir() / record['local_dir'] / WEIGHTS_NAME if record.get('local_dir') else None


def tag_folder(name: str) -> Optional[Path]:
    """The ``hub_configs/`` folder that holds the weights of the zoo tag ``name`` (``arch.tag``), or None."""
    record = _records().get(name)
    weights = local_weights(record) if record is not None else None
    return weights.parent if weights is not None else None


def retired_tag(name: str) -> Optional[str]:
    """What became of the zoo tag ``name`` if it was retired: the row of the retired-tags table of the packaged
    ``hub_configs/README.md`` (the one place that lists them), in words; None for a tag that was never retired."""
    readme = packaged_hub_configs_dir() / 'README.md'
    for line in readme.read_text(encoding='utf-8').splitlines() if readme.is_file() else ():
        cells = [cell.strip() for cell in line.strip().strip('|').split('|')]
        if len(cells) == 3 and cells[0].split(' ')[0] == f'`{name}`':
            commit = cells[2]
            return (f'the tag was retired, replaced by {cells[1]}; its files are in commit {commit} of the '
                    f'repository (git checkout {commit} -- hub_configs/{name}.json hub_configs/{name})')
    return None


def checkpoint_description(sgdrop: dict[str, Any], dataset: str, top1: Optional[float], split: str) -> str:
    """What a checkpoint is, in timm's ``description`` field: its method and settings, its data and its top-1.

    Args:
        sgdrop: Its recorded SGDrop settings (a record's or a config's ``sgdrop`` section, with ``regularizer``).
        dataset: The dataset's name.
        top1: Its top-1 (%), or None when it is not known.
        split: The images that top-1 was measured on: 'val', or 'dev' for a split held out of the training folder.
    """
    regularizer = sgdrop.get('regularizer', 'sgdrop')
    if regularizer == 'sgdrop':
        end = sgdrop.get('sgdrop_rho_end')
        rho = f"rho {sgdrop['sgdrop_rho']}" + (f' to {end}' if end is not None else '')
        relu, reference = sgdrop.get('sgdrop_attribution_relu', 'gradient'), sgdrop.get('sgdrop_reference', 'zero')
        method = (f"SGDrop ({rho}, {sgdrop.get('sgdrop_attribution', 'ema')} attribution"
                  + (f', {relu} rule' if relu != 'gradient' else '')
                  + (f', {reference} reference' if reference != 'zero' else '') + ')')
    elif regularizer == 'none':
        method = 'Vanilla (no SGDrop)'
    else:
        method = f"Latent dropout {sgdrop.get('latent_drop_rate')} (no SGDrop)"
    return f'{method}, {dataset}' + (f', {split} top-1 {top1}' if top1 is not None else '')


def _record_to_cfg(record: dict[str, Any]) -> dict[str, Any]:
    """The pretrained_cfg fields a checkpoint record sets; its architecture's own cfg supplies the rest."""
    top1 = record['metrics'].get('top1')
    local = local_weights(record)
    return dict(
        hf_hub_id=record.get('hf_hub_id'),
        file=str(local) if local is not None else None,
        num_classes=record['num_classes'],
        label_names=tuple(record['label_names']),
        label_descriptions=record.get('label_descriptions'),
        input_size=tuple(record['input_size']),
        mean=tuple(record['mean']),
        std=tuple(record['std']),
        crop_pct=record['crop_pct'],
        interpolation=record['interpolation'],
        crop_mode=record['crop_mode'],
        license=record['license'],
        description=checkpoint_description(record['sgdrop'], record['dataset'], top1,
                                           record['metrics'].get('split', 'val')),
        notes=record_notes(record),
    )


def record_notes(record: dict[str, Any]) -> Optional[tuple[str, ...]]:
    """timm's ``notes`` of a checkpoint: the command that trained it and the terms of its data, where recorded."""
    command, terms = record['metrics'].get('train_command'), record.get('dataset_license')
    notes = (f'Trained with: {command}' if command else None, f'Data: {terms}' if terms else None)
    return tuple(note for note in notes if note) or None


def _pool_size(cfg: dict[str, Any], input_size: list[int]) -> tuple[int, int]:
    """The latent map's side at ``input_size``: the architecture's ``pool_size`` at its own input size, scaled."""
    return tuple(round(pool * side / arch_side) for pool, side, arch_side in zip(
        cfg['pool_size'], input_size[-2:], cfg['input_size'][-2:]))


def pretrained_cfgs(cfgs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A family's cfgs with the ``hub_configs/`` tags of its architectures.

    Used as ``default_cfgs = generate_default_cfgs(pretrained_cfgs({'sgdrop_vgg16': _cfg(), ...}))``. An
    architecture with published tags loses its untagged entry, so ``timm.list_models(pretrained=True)`` lists exactly
    the published checkpoints and the first tag is the default, as in timm; one without keeps it, without weights.

    Args:
        cfgs: The family's untagged cfgs keyed by architecture.
    """
    # a tag keeps its architecture's own fields (first_conv, ...) and takes the record's over them
    tagged = {
        name: {**cfgs[record['architecture']], **_record_to_cfg(record),
               'pool_size': _pool_size(cfgs[record['architecture']], record['input_size'])}
        for name, record in _records().items() if record['architecture'] in cfgs
    }
    published = {name.split('.')[0] for name in tagged}
    return {**{arch: cfg for arch, cfg in cfgs.items() if arch not in published}, **tagged}


def checked_record_weights(name: str, record: dict[str, Any]) -> Path:
    """The weights of a ``hub_configs/`` record, sha256-checked: its ``local_dir`` copy when present, else the Hub's.

    Both copies are the same bytes (the sha256 pins them), so the local one is used without any network access.

    Raises:
        HubError: The local copy has another sha256, or there is no local copy and the download fails.
    """
    local = local_weights(record)
    if local is not None and local.is_file():
        actual = sha256_of_file(local)
        if actual != record['sha256']:
            raise HubError(f'{name}: {local} has sha256 {actual}, but its hub_configs/ record expects '
                           f'{record["sha256"]}. The file was changed or damaged: restore it (git checkout) or '
                           f'reinstall sgdrop-zoo; do not use these weights.')
        return local
    if not record.get('hf_hub_id'):
        raise HubError(f'{name}: {local} is missing and the checkpoint is not on the Hub (its record has no '
                       f'hf_hub_id). Restore the folder (git checkout) or install sgdrop-zoo from a source checkout.')
    return download_checked_weights(name, record['hf_hub_id'], record['sha256'])


def check_shipped_folder(folder: Path) -> None:
    """A folder of ``hub_configs/`` that a record ships is loaded or published by path only with the weights its
    record pins, as its tag would be.

    Raises:
        HubError: The folder's weights have another sha256 than its record's.
    """
    folder = Path(folder).resolve()
    if folder.parent != hub_configs_dir().resolve():
        return
    for name, record in _records().items():
        if record.get('local_dir') == folder.name:
            checked_record_weights(name, record)


def build_model_with_checked_weights(
        model_cls: type[nn.Module],
        variant: str,
        pretrained: bool = False,
        **kwargs: Any,
) -> nn.Module:
    """``timm.models.build_model_with_cfg`` that checks the sha256 of weights a ``hub_configs/`` tag points at.

    The checked file is handed to timm as ``pretrained_cfg_overlay['file']``, so timm's own loading (safetensors,
    head adaptation when ``num_classes`` differs, filter function) runs unchanged. Weights named by the caller
    (``hf-hub:``, ``local-dir:``, a ``pretrained_cfg`` or an overlay with its own source) are loaded as timm loads them.

    A tag's architecture arguments (its record's ``model_args``, e.g. vgg11's narrow ``mlp_ratio``) and the SGDrop
    settings it was trained with (its record's ``sgdrop``) apply when its weights are loaded or the tag is named, as
    ``load_sgdrop_model`` applies those of ``config.json``; the caller's own keyword arguments win. The model records
    the architecture arguments, so that its exports rebuild it in plain timm.
    """
    # timm passes the tag of 'name.tag' as a string pretrained_cfg; a dict or PretrainedCfg is the caller's own
    tag_named = isinstance(kwargs.get('pretrained_cfg'), str)
    record_args = {}
    if pretrained or tag_named:
        overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
        own_source = not isinstance(kwargs.get('pretrained_cfg'), (str, type(None))) or any(
            overlay.get(key) is not None for key in ('source', 'file', 'url', 'state_dict', 'hf_hub_id'))
        cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), overlay)
        record = _records().get(f'{variant}.{cfg.tag}')
        if record is not None and not own_source:
            record_args = {key: value for key, value in record.get('model_args', {}).items() if key not in kwargs}
            kwargs.update(record_args)
            # the settings it was trained with, as load_sgdrop_model applies a config.json's
            kwargs.update({key: value for key, value in SGDropCfg.of_record(record['sgdrop']).model_args().items()
                           if key not in kwargs})
            if pretrained:
                overlay['file'] = str(checked_record_weights(f'{variant}.{cfg.tag}', record))
                kwargs['pretrained_cfg_overlay'] = overlay
    model = build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    if record_args:
        # timm's create_model adds its own keyword arguments to these
        model._model_args = dict(getattr(model, '_model_args', {}), **record_args)
    return model
