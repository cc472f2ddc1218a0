"""One export schema: what the recipe's writer (train/main.py, sgdrop-zoo publish) and finetune's write, the loader
reads back with the same SGDrop settings."""
import json
from pathlib import Path

import pytest
import timm
import torch

import sgdrop_zoo  # noqa: F401  (registers sgdrop_vgg_tiny)
from sgdrop_zoo.export import save_export, save_recipe_export
from sgdrop_zoo.hub import load_sgdrop_model
from sgdrop_zoo.run_settings import RunSettings
from sgdrop_zoo.sgdrop import SGDropCfg

ARGS = dict(arch='sgdrop_vgg_tiny', model_kwargs={}, data='../shared/data/x', image_size=32, train_transform='resize',
            optimizer='adam', lr=1e-4, epochs=2, batch_size=64, seed=0, train_subset=0, train_subset_per_class=0,
            holdout_per_class=0)
SGDROP = dict(sgdrop_rho=0.05, sgdrop_rho_end=None, sgdrop_attribution='ema', sgdrop_attribution_relu='gradient',
              sgdrop_reference='zero', sgdrop_ema_decay=0.99, latent_drop_rate=0.5)


@pytest.mark.parametrize('arch', ['sgdrop_vgg_tiny', 'resnet10t'])
@pytest.mark.parametrize('flags, expected', [
    (dict(regularizer='none'), dict(sgdrop_rho=0.0, sgdrop_attribution='online', latent_drop_rate=0.0)),
    (dict(regularizer='dropout'), dict(sgdrop_rho=0.0, sgdrop_attribution='online', latent_drop_rate=0.5)),
    (dict(regularizer='sgdrop'), dict(sgdrop_rho=0.05, sgdrop_attribution='ema', latent_drop_rate=0.0)),
    (dict(regularizer='sgdrop', sgdrop_attribution='online'),
     dict(sgdrop_rho=0.05, sgdrop_attribution='online', latent_drop_rate=0.0)),
    (dict(regularizer='sgdrop', sgdrop_rho=0.0, sgdrop_rho_end=0.025),
     dict(sgdrop_rho=0.0, sgdrop_attribution='ema', latent_drop_rate=0.0)),
    (dict(regularizer='sgdrop', sgdrop_attribution_relu='product'),
     dict(sgdrop_rho=0.05, sgdrop_attribution='ema', sgdrop_attribution_relu='product', latent_drop_rate=0.0)),
], ids=['vanilla', 'dropout', 'sgdrop_ema', 'sgdrop_online', 'curriculum', 'product'])
def test_recipe_export_round_trip(tmp_path: Path, arch: str, flags: dict, expected: dict):
    sgdrop = dict(SGDROP, **{k: v for k, v in flags.items() if k in SGDROP})
    expected = dict(dict(sgdrop_attribution_relu='gradient', sgdrop_reference='zero'), **expected)
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=3)
    settings = RunSettings(**ARGS, regularizer=flags['regularizer'], sgdrop=SGDropCfg(**sgdrop))
    save_recipe_export(model, tmp_path, settings, ['a', 'b', 'c'], epoch=2, val_acc1=50.0)
    config = json.loads((tmp_path / 'config.json').read_text())
    # the settings by their names; a baseline has no EMA, and the method's default decay
    curriculum = sgdrop['sgdrop_rho_end'] if flags['regularizer'] == 'sgdrop' else None
    decay = 0.99 if flags['regularizer'] == 'sgdrop' else 0.999
    assert config['sgdrop'] == dict(regularizer=flags['regularizer'], **expected, sgdrop_ema_decay=decay,
                                    sgdrop_rho_end=curriculum)
    loaded = load_sgdrop_model(f'local-dir:{tmp_path}')
    # a curriculum's export records both ends; the loaded model trains on with the rho it ended at
    ended_at = {'sgdrop_rho': 0.025} if curriculum else {}
    assert loaded.sgdrop_cfg.model_args() == dict(expected, sgdrop_ema_decay=decay, **ended_at)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_finetune_export_round_trip(tmp_path: Path):
    model = timm.create_model('sgdrop_vgg_tiny', num_classes=3, sgdrop_rho=0.02, sgdrop_attribution='online')
    save_export(model, tmp_path, ['a', 'b', 'c'], 32, 'resize', 'sgdrop', model.sgdrop_cfg, dict(mode='full'))
    assert load_sgdrop_model(f'local-dir:{tmp_path}').sgdrop_cfg.model_args() == model.sgdrop_cfg.model_args()


