"""Publish SGDrop checkpoints to the Hugging Face Hub, and load them back for further training.

A published repo holds ``model.safetensors``, a timm ``config.json`` whose ``architecture`` is the base timm model
(``vgg16``, ``resnet50``, ``convnext_tiny``), so plain timm loads it with ``timm.create_model("hf-hub:ORG/NAME",
pretrained=True)``, and a ``README.md`` rendered from the zoo's model card template. The SGDrop settings are kept in
``config.json["sgdrop"]`` (ignored by timm) and ``load_sgdrop_model()`` rebuilds the SGDrop model from them.

    publish_checkpoint('runs/vgg16', 'my-org/sgdrop_vgg16.imagenette')     # what `sgdrop-zoo publish` runs
"""
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import timm
import torch
import torch.nn as nn
from huggingface_hub import HfApi
from huggingface_hub.utils import get_token
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import OptionError
from .export import (
    measured_split,
    read_config,
    save_recipe_export,
    sgdrop_settings,
    to_published_config,
    write_config,
)
from .model_card import render_model_card
from .hub_files import CONFIG_NAME, WEIGHTS_NAME, HubError, hub_download, sha256_of_file
from .pretrained import check_shipped_folder
from .checkpoint import RecipeCheckpoint
from .run_files import check_output_outside_hub_configs, check_writable_folder, write_error
from .sgdrop import SGDropCfg, add_sgdrop

__all__ = [
    'PublishResult', 'hub_config_record', 'load_sgdrop_model', 'prepare_hub_folder',
    'publish_checkpoint',
]

README_NAME = 'README.md'
DEFAULT_LICENSE = 'apache-2.0'
# pretrained_cfg fields that tell timm where to load weights from; a config's own are never followed
WEIGHT_SOURCE_FIELDS = ('source', 'file', 'url', 'hf_hub_id', 'hf_hub_filename', 'state_dict', 'custom_load')


@dataclasses.dataclass
class PublishResult:
    """Where a checkpoint went: the repo (or dry-run folder), the commit, and its ``hub_configs/`` record."""
    repo_id: str
    location: str
    commit: Optional[str]
    record: dict[str, Any]


def _export_checkpoint(path: Path, folder: Path) -> dict[str, Any]:
    """Write the recipe's export (``model.safetensors`` + ``config.json``) of a ``*.pth.tar`` checkpoint to ``folder``.

    Returns:
        The exported config.
    """
    try:
        checkpoint = RecipeCheckpoint.read(path)
        model = checkpoint.build_model(path)
    except ValueError as e:
        raise HubError(str(e)) from e
    # the top-1 of the checkpoint's own epoch, not the run's best
    save_recipe_export(model, folder, checkpoint.settings, checkpoint.class_names, checkpoint.epoch, checkpoint.acc1)
    return read_config(folder / CONFIG_NAME)


def _copy_export(source: Path, folder: Path) -> dict[str, Any]:
    """Copy the recipe's export folder (``model.safetensors`` + ``config.json``) into ``folder``."""
    missing = [name for name in (WEIGHTS_NAME, CONFIG_NAME) if not (source / name).is_file()]
    if missing:
        raise HubError(f'{source}: no {" or ".join(missing)}. Pass the output folder of train/main.py (it exports '
                       f'both at the end of training) or its model_best.pth.tar.')
    try:
        config = read_config(source / CONFIG_NAME)
    except ValueError as e:
        raise HubError(str(e)) from e
    shutil.copyfile(source / WEIGHTS_NAME, folder / WEIGHTS_NAME)
    return config


def _eval_command(architecture: str, training: dict[str, Any]) -> Optional[str]:
    if not training.get('data'):
        return None
    command = f'python train/main.py {training["data"]} -a {architecture} --resume model_best.pth.tar --evaluate'
    if training.get('image_size'):
        command += f' --image-size {training["image_size"]}'
    if training.get('train_transform'):
        command += f' --train-transform {training["train_transform"]}'
    if training.get('holdout_per_class'):
        command += f' --holdout-per-class {training["holdout_per_class"]}'
    return command



def _check_weights(folder: Path, config: dict[str, Any]) -> None:
    """Check that the weights are an intact safetensors file that the base architecture loads exactly."""
    try:
        state_dict = load_file(folder / WEIGHTS_NAME)
    except (SafetensorError, OSError) as e:
        raise HubError(f'{WEIGHTS_NAME} is not a readable safetensors file (truncated or corrupt?): {e}. '
                       f'Export it again with train/main.py.') from e
    architecture = config['architecture']
    if not timm.is_model(architecture):
        raise HubError(f'config.json names architecture {architecture!r}, which is not registered: upgrade timm or '
                       f'sgdrop-zoo.')
    arguments = {'num_classes': config['num_classes'], **config.get('model_args', {})}
    with torch.device('meta'):
        model = timm.create_model(architecture, **arguments)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        raise HubError(f"{WEIGHTS_NAME} does not load into {architecture} with the config's model_args: "
                       f'{str(e)[:300]}') from e


def hub_config_record(config: dict[str, Any], sha256: str, hf_hub_id: str, dataset: str, tag: str,
                      license: str = DEFAULT_LICENSE, dataset_license: Optional[str] = None) -> dict[str, Any]:
    """The ``hub_configs/`` record of a published config: add it as ``hub_configs/<arch>.<tag>.json``."""
    pretrained_cfg = config['pretrained_cfg']
    training = config.get('training') or {}
    metrics = {}
    if training.get('val_acc1') is not None:
        metrics = dict(top1=round(float(training['val_acc1']), 3), split=measured_split(training),
                       eval_command=_eval_command(config['sgdrop']['architecture'], training))
    label_names = config.get('label_names') or [str(i) for i in range(config['num_classes'])]
    return dict(
        architecture=config['sgdrop']['architecture'],
        base_architecture=config['architecture'],
        tag=tag,
        hf_hub_id=hf_hub_id,
        dataset=dataset,
        num_classes=config['num_classes'],
        label_names=list(label_names),
        **({'label_descriptions': config['label_descriptions']} if config.get('label_descriptions') else {}),
        input_size=list(pretrained_cfg['input_size']),
        mean=list(pretrained_cfg['mean']),
        std=list(pretrained_cfg['std']),
        crop_pct=pretrained_cfg['crop_pct'],
        # how the checkpoint's top-1 was measured: 'squash' for a model trained on resized images
        crop_mode=pretrained_cfg['crop_mode'],
        interpolation=pretrained_cfg['interpolation'],
        model_args={k: v for k, v in config.get('model_args', {}).items() if k not in ('num_classes', 'in_chans')},
        sgdrop={k: v for k, v in config['sgdrop'].items() if k != 'architecture'},
        metrics=metrics,
        sha256=sha256,
        license=license,
        **({'dataset_license': dataset_license} if dataset_license else {}),
    )


def prepare_hub_folder(
        source: Union[str, Path],
        folder: Union[str, Path],
        repo_id: str,
        dataset: Optional[str] = None,
        tag: Optional[str] = None,
        license: str = DEFAULT_LICENSE,
        label_descriptions: Optional[dict[str, str]] = None,
        dataset_license: Optional[str] = None,
) -> dict[str, Any]:
    """Write the repo contents of a checkpoint (``model.safetensors``, ``config.json``, ``README.md``) to ``folder``.

    Args:
        source: The recipe's output folder (``model.safetensors`` + ``config.json``) or a ``*.pth.tar`` checkpoint.
        folder: An existing, empty folder.
        repo_id: The Hub repo it is meant for, ``ORG/NAME``; named in the model card.
        dataset: Dataset name for the card; default: the last part of the training data path.
        tag: Pretrained tag for ``hub_configs/``; default: the repo name after its last '.', else the dataset.
        license: License of the weights (a Hub license id).
        label_descriptions: Human-readable class names by label name, recorded in ``config.json`` as timm does.
        dataset_license: The terms of the data that trained it, for the record and the card.

    Returns:
        The checkpoint's ``hub_configs/`` record, with ``hf_hub_id=repo_id``.
    """
    source, folder = Path(source), Path(folder)
    if source.is_dir():
        check_shipped_folder(source)
        config = _copy_export(source, folder)
    elif source.is_file():
        config = _export_checkpoint(source, folder)
    else:
        raise HubError(f'{source}: no such checkpoint file or folder.')
    try:
        config = to_published_config(config, label_descriptions)
    except ValueError as e:
        raise HubError(str(e)) from e
    _check_weights(folder, config)
    training = config.get('training') or {}
    dataset = dataset or (Path(training['data']).name if training.get('data') else None)
    if not dataset:
        raise OptionError('{source}: the config does not say which dataset trained it: pass its name as {dataset}.',
                          source=source)
    name = repo_id.split('/')[-1]
    tag = tag or (name.rsplit('.', 1)[-1] if '.' in name else dataset.lower())
    write_config(config, folder)
    record = hub_config_record(config, sha256_of_file(folder / WEIGHTS_NAME), repo_id, dataset, tag, license,
                               dataset_license)
    render_model_card([record], checkpoint=record).save(folder / README_NAME)
    return record


def _resolve_token(token_from_env: bool) -> str:
    token = os.environ.get('HF_TOKEN') if token_from_env else get_token()
    if not token:
        where = 'HF_TOKEN is not set' if token_from_env else 'no HF_TOKEN and no `hf auth login` token'
        raise HubError(f'Uploading needs a Hugging Face token with write access: {where}. Set HF_TOKEN or run '
                       f'`hf auth login`, or write the folder locally with a dry run.')
    return token


def _upload(api: HfApi, folder: Path, repo_id: str, revision: Optional[str], private: bool) -> tuple[str, str]:
    """Create the repo (and branch) if needed and upload ``folder``; a target that holds weights is never replaced."""
    target = f'branch {revision!r} of {repo_id}' if revision else repo_id
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        if api.file_exists(repo_id, WEIGHTS_NAME, revision=revision):
            raise OptionError('{target} already holds a {weights}: published weights are never replaced (hub_configs/ '
                              'pins their sha256). Choose another {repo_id} or a new {revision}.', target=target,
                              weights=WEIGHTS_NAME)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                   commit_message='Add SGDrop checkpoint')
    except (HubError, OptionError):
        raise
    # HTTP errors, the transport errors of huggingface_hub's HTTP client (no OSError since it left requests for
    # httpx) and failed LFS uploads, which it wraps in RuntimeError
    except Exception as e:  # noqa: BLE001
        cause = f' ({e.__cause__})' if e.__cause__ and str(e.__cause__) != str(e) else ''
        raise HubError(f'Publishing to {target} failed after retries: {e}{cause}. Nothing was committed; run the same '
                       f'command again once the Hub is reachable.') from e
    return commit.oid, commit.commit_url


def publish_checkpoint(
        source: Union[str, Path],
        repo_id: str,
        revision: Optional[str] = None,
        private: bool = False,
        token_from_env: bool = False,
        dry_run_dir: Optional[Union[str, Path]] = None,
        dataset: Optional[str] = None,
        tag: Optional[str] = None,
        license: str = DEFAULT_LICENSE,
        dataset_license: Optional[str] = None,
) -> PublishResult:
    """Publish an SGDrop checkpoint as a new Hub repo (or a new branch of one), or write it locally.

    The token comes from ``HF_TOKEN`` (only, with ``token_from_env``) or the huggingface_hub login; it is never
    printed or written. Nothing is uploaded before the folder is complete and its weights checked.

    Args:
        source: The recipe's output folder or a ``*.pth.tar`` checkpoint.
        repo_id: ``ORG/NAME``.
        revision: Branch to create and publish to; default: the new repo's ``main``.
        private: Create a private repo.
        token_from_env: Read the token from ``HF_TOKEN`` only.
        dry_run_dir: Write the repo folder here instead of uploading; it must not exist yet.
        dataset: Dataset name for the card (see ``prepare_hub_folder``).
        tag: Pretrained tag for ``hub_configs/`` (see ``prepare_hub_folder``).
        license: License of the weights.
        dataset_license: The terms of the data that trained it, for the record and the card.

    Returns:
        Where it went and its ``hub_configs/`` record (``hf_hub_id`` pinned to the commit after an upload).
    """
    if repo_id.count('/') != 1 or not all(part and part.strip('.') for part in repo_id.split('/')):
        # '.' and '..' are path steps, not names: ../.. would write the dry run two folders up
        raise OptionError('{repo_id} must be ORG/NAME, got {value!r}.', value=repo_id)
    if dry_run_dir is not None:
        dry_run_dir = Path(dry_run_dir)
        if dry_run_dir.exists():
            raise OptionError('{dry_run_dir} {path} already exists; choose a new folder for the dry run.',
                              path=dry_run_dir)
        check_output_outside_hub_configs(dry_run_dir, 'dry_run_dir')
        check_writable_folder(dry_run_dir, 'dry_run_dir')
        dry_run_dir.parent.mkdir(parents=True, exist_ok=True)
        # built next to its destination and renamed into place, so a failure leaves no partial folder
        try:
            with tempfile.TemporaryDirectory(dir=dry_run_dir.parent, prefix=f'.{dry_run_dir.name}.') as tmp:
                record = prepare_hub_folder(source, tmp, repo_id, dataset=dataset, tag=tag, license=license,
                                            dataset_license=dataset_license)
                Path(tmp).chmod(0o755)  # a repo folder, for everyone to read (TemporaryDirectory creates it private)
                os.replace(tmp, dry_run_dir)
                Path(tmp).mkdir()  # TemporaryDirectory removes its path on exit
        except OSError as e:  # a full disk
            raise write_error(dry_run_dir, e, 'nothing of it was written') from e
        return PublishResult(repo_id, str(dry_run_dir), None, record)

    token = _resolve_token(token_from_env)
    with tempfile.TemporaryDirectory(prefix='sgdrop-publish.') as tmp:
        record = prepare_hub_folder(source, tmp, repo_id, dataset=dataset, tag=tag, license=license,
                                    dataset_license=dataset_license)
        api = HfApi(token=token, library_name='sgdrop-zoo')
        commit, url = _upload(api, Path(tmp), repo_id, revision, private)
    record['hf_hub_id'] = f'{repo_id}@{commit}'
    return PublishResult(repo_id, url, commit, record)


def load_sgdrop_model(model_id: str, pretrained: bool = True, **kwargs: Any) -> nn.Module:
    """Rebuild a published SGDrop model, with the SGDrop settings it was trained with, for further training.

    Only ``config.json`` and ``model.safetensors`` are read: no pickle from a download is ever loaded. A folder's
    weights are its own and only a ``hf-hub:`` id reaches the network, whatever source the config's
    ``pretrained_cfg`` names. The EMA used for attribution is not published; it restarts from the loaded weights at
    the first SGDrop step.

    Args:
        model_id: ``hf-hub:ORG/NAME[@REVISION]`` or ``local-dir:PATH`` (a published or dry-run folder).
        pretrained: Load the weights (False: the architecture and settings only).
        **kwargs: ``timm.create_model`` arguments; they win over the recorded ones (e.g. ``num_classes``,
            ``sgdrop_rho``).
    """
    scheme, _, location = model_id.partition(':')
    if scheme == 'hf-hub':
        repo_id, _, revision = location.partition('@')
        config_path = hub_download(repo_id, CONFIG_NAME, revision or None)
        weights_path = hub_download(repo_id, WEIGHTS_NAME, revision or None, repo_exists=True) if pretrained else None
    elif scheme == 'local-dir':
        config_path, weights_path = Path(location) / CONFIG_NAME, Path(location) / WEIGHTS_NAME
        check_shipped_folder(Path(location))
    else:
        raise HubError(f'model_id must start with hf-hub: or local-dir:, got {model_id!r}.')
    try:
        config = read_config(config_path)
    except ValueError as e:
        raise HubError(str(e)) from e
    settings = sgdrop_settings(config)
    architecture = settings.get('architecture', config['architecture'])
    if not timm.is_model(architecture):
        raise HubError(f'{model_id} is a {architecture!r} model, which is not registered: `import sgdrop_zoo` '
                       f'before loading it, or upgrade sgdrop-zoo and timm if it is already imported.')
    sgdrop_args = SGDropCfg.of_record(settings).model_args()
    if architecture.startswith('sgdrop_'):
        model_args = {**config.get('model_args', {}), **sgdrop_args, **kwargs}
    else:
        model_args = {**config.get('model_args', {}), **kwargs}
    # the weights are the file named above: the config could point timm at another repo, a URL or another file
    pretrained_cfg = {key: value for key, value in config['pretrained_cfg'].items() if key not in WEIGHT_SOURCE_FIELDS}
    pretrained_cfg['label_names'] = config.get('label_names')
    overlay = dict(file=str(weights_path)) if pretrained else None
    try:
        model = timm.create_model(architecture, pretrained=pretrained, pretrained_cfg=pretrained_cfg,
                                  pretrained_cfg_overlay=overlay, **model_args)
    except SafetensorError as e:
        raise HubError(f'{WEIGHTS_NAME} of {model_id} is truncated or corrupt ({e}); delete it from the cache '
                       f'(`hf cache rm`) and download it again.') from e
    except TypeError as e:
        # an argument the architecture does not take, from the config's model_args or the keywords
        raise HubError(f'{model_id}: {architecture} does not take the model_args of its config or the keywords '
                       f'given ({e}); remove that argument') from e
    if architecture.startswith('sgdrop_'):
        return model
    return add_sgdrop(model, **sgdrop_args)

