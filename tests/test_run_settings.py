"""The recipe's checkpoint and the run settings it stores: one writer (write, to_dict), one reader (read, from_dict)."""
import dataclasses
from pathlib import Path

import pytest
import torch

from sgdrop_zoo.checkpoint import RecipeCheckpoint
from sgdrop_zoo.run_settings import RUN_SETTINGS_VERSION, RunSettings
from sgdrop_zoo.sgdrop import SGDropCfg

SGDROP = SGDropCfg(sgdrop_rho=0.0, sgdrop_rho_end=0.025, sgdrop_attribution='ema', sgdrop_attribution_relu='gradient',
                   sgdrop_reference='zero', sgdrop_ema_decay=0.999, latent_drop_rate=0.5)
SETTINGS = RunSettings(arch='sgdrop_vgg11', model_kwargs={'mlp_ratio': 0.03125}, regularizer='sgdrop', sgdrop=SGDROP,
                       image_size=128,
                       train_transform='resize', optimizer='adam', lr=1e-4, epochs=20, batch_size=64, seed=1,
                       data='../shared/data/imagenette', train_subset=0, train_subset_per_class=150,
                       holdout_per_class=100)


def test_a_checkpoint_gives_back_the_settings_it_stored():
    stored = SETTINGS.to_dict()
    assert stored['version'] == RUN_SETTINGS_VERSION == 2 and stored['holdout_per_class'] == 100
    assert RunSettings.from_dict(stored, 'c.pth.tar') == SETTINGS


@pytest.mark.parametrize('stored, message', [
    ({'arch': 'x'}, 'c.pth.tar: no run settings, not those of version 2'),
    (None, 'c.pth.tar: no run settings, not those of version 2'),
    (dict(SETTINGS.to_dict(), version=1), 'c.pth.tar: run settings of version 1, not those of version 2'),
    ({k: v for k, v in SETTINGS.to_dict().items() if k != 'seed'},
     r"c.pth.tar: its run settings are not complete \(\['seed'\] missing\)"),
    (dict(SETTINGS.to_dict(), regularizer='evil'),
     "c.pth.tar: its run settings name the regularizer 'evil', not one of sgdrop, dropout, none"),
    (dict(SETTINGS.to_dict(), sgdrop_rho_end=7.0),
     r'c.pth.tar: its run settings hold an SGDrop setting out of range \(sgdrop_rho_end must be in \[0, 1\)'),
    (dict(SETTINGS.to_dict(), sgdrop_reference='median'),
     "c.pth.tar: its run settings hold an SGDrop setting out of range \\(Unknown sgdrop_reference 'median'"),
])
def test_a_checkpoint_without_these_settings_is_refused_in_one_line(stored: dict, message: str):
    with pytest.raises(ValueError, match=message):
        RunSettings.from_dict(stored, 'c.pth.tar')


def test_a_checkpoint_stores_the_sgdrop_settings_by_their_names():
    stored = SETTINGS.to_dict()
    assert {name: stored[name] for name in ('sgdrop_rho', 'sgdrop_rho_end', 'sgdrop_attribution', 'latent_drop_rate')} \
        == dict(sgdrop_rho=0.0, sgdrop_rho_end=0.025, sgdrop_attribution='ema', latent_drop_rate=0.5)
    assert 'sgdrop' not in stored


def test_the_sgdrop_settings_each_regularizer_trains_with():
    # SGDrop: the settings as given without the latent dropout, the curriculum kept; its model drops where it ended
    assert SETTINGS.sgdrop_cfg == dataclasses.replace(SGDROP, latent_drop_rate=0.0)
    assert SETTINGS.sgdrop_cfg.model_args() == dict(sgdrop_rho=0.025, sgdrop_attribution='ema',
                                                    sgdrop_attribution_relu='gradient', sgdrop_reference='zero',
                                                    sgdrop_ema_decay=0.999, latent_drop_rate=0.0)
    # the baselines: rho 0, online (no EMA copy), the method's defaults; dropout keeps its rate
    dropout = dataclasses.replace(SETTINGS, regularizer='dropout')
    assert dropout.sgdrop_cfg.model_args() == dict(sgdrop_rho=0.0, sgdrop_attribution='online',
                                                   sgdrop_attribution_relu='gradient', sgdrop_reference='zero',
                                                   sgdrop_ema_decay=0.999, latent_drop_rate=0.5)
    assert dataclasses.replace(SETTINGS, regularizer='none').sgdrop_cfg.model_args()['latent_drop_rate'] == 0.0


def test_the_settings_a_resume_may_not_change():
    # SETTINGS is a curriculum, whose rho per epoch depends on the number of epochs; a fixed rho's does not
    assert SETTINGS.changed_run_settings(dataclasses.replace(SETTINGS, epochs=40, lr=1e-3, seed=2)) == ['epochs']
    fixed = dataclasses.replace(SETTINGS, sgdrop=dataclasses.replace(SGDROP, sgdrop_rho=0.01, sgdrop_rho_end=None))
    assert fixed.changed_run_settings(dataclasses.replace(fixed, epochs=40, lr=1e-3, seed=2)) == []
    changed = dataclasses.replace(SETTINGS, image_size=64, sgdrop=dataclasses.replace(SGDROP, sgdrop_rho_end=0.05),
                                  holdout_per_class=0)
    assert SETTINGS.changed_run_settings(changed) == ['image_size', 'holdout_per_class', 'sgdrop_rho_end']
    # a vanilla run has no SGDrop settings to keep
    vanilla = dataclasses.replace(SETTINGS, regularizer='none')
    assert vanilla.changed_run_settings(
        dataclasses.replace(vanilla, sgdrop=dataclasses.replace(SGDROP, sgdrop_rho=0.5))) == []


def _checkpoint() -> RecipeCheckpoint:
    generator = torch.Generator().manual_seed(0)
    return RecipeCheckpoint(
        epoch=3, acc1=41.25, best_acc1=50.0, best_epoch=2, class_names=['a', 'b'], settings=SETTINGS,
        state_dict={'fc.weight': torch.randn(2, 4, generator=generator)},
        sgdrop_ema={'fc.weight': torch.randn(2, 4, generator=generator)}, optimizer={'state': {}, 'param_groups': []},
        scheduler={'last_epoch': 3}, scaler={}, rng_state={'torch': torch.get_rng_state()})


def test_a_checkpoint_reads_back_what_it_wrote_and_only_its_fields(tmp_path: Path):
    checkpoint = _checkpoint()
    checkpoint.write(tmp_path / 'c.pth.tar')
    stored = torch.load(tmp_path / 'c.pth.tar', weights_only=True)
    # one key per field, the settings as to_dict writes them
    assert sorted(stored) == sorted(field.name for field in dataclasses.fields(RecipeCheckpoint))
    assert stored['settings'] == SETTINGS.to_dict()
    read = RecipeCheckpoint.read(tmp_path / 'c.pth.tar')
    assert (read.epoch, read.acc1, read.best_acc1, read.best_epoch, read.class_names, read.settings) == \
        (3, 41.25, 50.0, 2, ['a', 'b'], SETTINGS)
    assert torch.equal(read.state_dict['fc.weight'], checkpoint.state_dict['fc.weight'])
    assert torch.equal(read.sgdrop_ema['fc.weight'], checkpoint.sgdrop_ema['fc.weight'])
    assert torch.equal(read.rng_state['torch'], checkpoint.rng_state['torch'])
    assert (read.optimizer, read.scheduler, read.scaler) == ({'state': {}, 'param_groups': []}, {'last_epoch': 3}, {})


def test_a_checkpoint_missing_a_field_is_refused_by_name(tmp_path: Path):
    checkpoint = _checkpoint()
    checkpoint.write(tmp_path / 'c.pth.tar')
    stored = torch.load(tmp_path / 'c.pth.tar', weights_only=True)
    del stored['best_epoch'], stored['scaler']
    torch.save(stored, tmp_path / 'c.pth.tar')
    with pytest.raises(ValueError) as error:
        RecipeCheckpoint.read(tmp_path / 'c.pth.tar')
    assert str(error.value) == (f'{tmp_path / "c.pth.tar"}: not a checkpoint of train/main.py (no best_epoch, scaler); '
                                f'pass the checkpoint.pth.tar or model_best.pth.tar of a run.')


def test_a_released_checkpoint_holds_no_training_state():
    checkpoint = _checkpoint()
    checkpoint.release_state()
    assert (checkpoint.state_dict, checkpoint.sgdrop_ema, checkpoint.optimizer, checkpoint.scheduler,
            checkpoint.scaler) == ({}, None, {}, {}, {})
    assert checkpoint.epoch == 3 and checkpoint.settings == SETTINGS
