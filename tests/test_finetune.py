"""Fine-tuning (linear probe and full) on a tiny ImageFolder, CPU, sgdrop_vgg_tiny at 32 px."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models import save_for_hf

import sgdrop_zoo  # noqa: F401  (registers sgdrop_vgg_tiny, which the local-dir configs name)
import sgdrop_zoo.finetune as finetune_module
from sgdrop_zoo import cli
from sgdrop_zoo.data import DatasetError
from sgdrop_zoo.errors import OptionError
from sgdrop_zoo.finetune import finetune
from sgdrop_zoo.checkpoint import RecipeCheckpoint
from sgdrop_zoo.loading import load_model, split_encoder_head
from sgdrop_zoo.pretrained import HUB_CONFIGS_ENV, hub_configs_dir, packaged_hub_configs_dir
from sgdrop_zoo.run_files import RunFileError, check_output_is_not_source
from sgdrop_zoo.run_settings import RunSettings
from sgdrop_zoo.sgdrop import SGDropCfg

from conftest import SMALL_CLASSES, folder_held_by_another_process, make_image_folder, recipe_checkpoint

ARCH = 'sgdrop_vgg_tiny'
RUN = dict(epochs=1, batch_size=4, image_size=32, progress=False, workers=0)


@pytest.fixture(scope='module')
def source_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 'pretrained' encoder: a random sgdrop_vgg_tiny with 5 classes, exported as the recipe exports."""
    folder = tmp_path_factory.mktemp('source')
    torch.manual_seed(1)
    model = timm.create_model(ARCH, num_classes=5)
    save_for_hf(model, folder, model_config=dict(label_names=list('abcde')), safe_serialization=True)
    return folder


def _changed(before: dict, after: dict, keys: set) -> set:
    return {k for k in keys if not torch.equal(before[k], after[k])}


def test_linear_probe_freezes_the_encoder_and_trains_a_new_head(small_data: Path, source_dir: Path, tmp_path: Path):
    metrics = finetune(str(source_dir), small_data, tmp_path, mode='linear-probe', **RUN)
    before, after = load_file(source_dir / 'model.safetensors'), load_file(tmp_path / 'model.safetensors')
    _, head_params = split_encoder_head(timm.create_model(ARCH, num_classes=3), 32)
    encoder_keys = set(after) - head_params
    assert encoder_keys and head_params <= set(after)
    assert not _changed(before, after, encoder_keys)  # every encoder tensor bit-identical
    assert after['head.fc.weight'].shape[0] == 3 and before['head.fc.weight'].shape[0] == 5
    assert _changed(before, after, head_params - {'head.fc.weight', 'head.fc.bias'})  # the pre-logits MLP trained
    assert metrics['mode'] == 'linear-probe' and metrics['classes'] == list(SMALL_CLASSES)
    assert metrics['trainable_params'] < metrics['total_params']
    log = [json.loads(line) for line in (tmp_path / 'log.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in log] == [1] and 0 <= log[0]['val_acc1'] <= 100
    assert json.loads((tmp_path / 'metrics.json').read_text())['val_acc1'] == metrics['val_acc1']


def test_a_linear_probe_encodes_each_image_once_and_logs_what_its_export_measures(
        small_data: Path, source_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    encoded = []

    def load_counting(name: str) -> torch.nn.Module:
        model = load_model(name)
        forward_features = model.forward_features
        model.forward_features = lambda x: encoded.append(x.shape[0]) or forward_features(x)
        return model

    monkeypatch.setattr(finetune_module, 'load_model', load_counting)
    metrics = finetune(str(source_dir), small_data, tmp_path / 'probe', mode='linear-probe', **dict(RUN, epochs=3))
    # the encoder split's blank image, before and after the new head, then the 12 training and 6 val images once,
    # for all 3 epochs
    assert encoded == [1, 1] + [4] * 3 + [4, 2]
    # the val figures of the cached features are those of the exported model on the images
    log = [json.loads(line) for line in (tmp_path / 'probe' / 'log.jsonl').read_text().splitlines()]
    best = max(log, key=lambda r: r['val_acc1'])
    measured = finetune(str(tmp_path / 'probe'), small_data, tmp_path / 'eval', evaluate_only=True, **RUN)['val']
    assert (measured['acc1'], measured['count']) == (metrics['val_acc1'], 6) == (best['val_acc1'], best['val_count'])
    assert measured['loss'] == pytest.approx(best['val_loss'], rel=1e-6)


def test_full_finetuning_with_sgdrop_changes_encoder_and_head(small_data: Path, source_dir: Path, tmp_path: Path):
    finetune(str(source_dir), small_data, tmp_path, mode='full', sgdrop_rho=0.05, lr=1e-3, **RUN)
    before, after = load_file(source_dir / 'model.safetensors'), load_file(tmp_path / 'model.safetensors')
    assert _changed(before, after, {'features.0.weight', 'pre_logits.fc1.weight'}) == {
        'features.0.weight', 'pre_logits.fc1.weight'}
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['sgdrop']['regularizer'] == 'sgdrop' and config['sgdrop']['sgdrop_rho'] == 0.05


def test_output_loads_with_timm_local_dir(small_data: Path, tmp_path: Path):
    finetune(ARCH, small_data, tmp_path, mode='full', **RUN)
    model = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert model.num_classes == 3 and model.pretrained_cfg['label_names'] == list(SMALL_CLASSES)
    weights = load_file(tmp_path / 'model.safetensors')
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    # and it evaluates on the same classes without a new head
    metrics = finetune(str(tmp_path), small_data, tmp_path / 'eval', evaluate_only=True, **RUN)
    assert metrics['val']['count'] == 6


def test_evaluate_needs_the_checkpoint_classes(small_data: Path, source_dir: Path, tmp_path: Path):
    with pytest.raises(DatasetError, match='trained on classes .* fine-tune it first'):
        finetune(str(source_dir), small_data, tmp_path, evaluate_only=True, **RUN)


# what train/main.py stores in its checkpoints of a run of ARCH
RUN_SETTINGS = RunSettings(arch=ARCH, model_kwargs={}, regularizer='sgdrop', sgdrop=SGDropCfg(), image_size=32,
                           train_transform='resize',
                           optimizer='adam', lr=1e-4, epochs=1, batch_size=8, seed=0, data='data', train_subset=0,
                           train_subset_per_class=0, holdout_per_class=0)


def test_loads_recipe_checkpoints(tmp_path: Path):
    model = timm.create_model(ARCH, num_classes=2)
    path = tmp_path / 'model_best.pth.tar'
    recipe_checkpoint(model, RUN_SETTINGS, ['x', 'y']).write(path)
    loaded = load_model(str(path))
    assert loaded.pretrained_cfg['label_names'] == ['x', 'y']
    assert torch.equal(loaded.state_dict()['head.fc.weight'], model.state_dict()['head.fc.weight'])


def test_bad_inputs_say_what_to_do(small_data: Path, tmp_path: Path):
    with pytest.raises(ValueError, match='neither a file, a folder nor a timm model'):
        load_model('no_such_model')
    with pytest.raises(ValueError, match='mode must be one of'):
        finetune(ARCH, small_data, tmp_path, mode='probe', **RUN)
    empty_val = make_image_folder(tmp_path / 'empty_val', per_split=(('train', 1),))
    for name in SMALL_CLASSES:
        (empty_val / 'val' / name).mkdir(parents=True)
    with pytest.raises(DatasetError, match='holds no images'):
        finetune(ARCH, empty_val, tmp_path / 'out', **RUN)
    with pytest.raises(DatasetError, match='takes 1-channel images'):
        finetune('local-dir:' + str(_gray_model(tmp_path / 'gray')), small_data, tmp_path / 'out', **RUN)


def _gray_model(folder: Path) -> Path:
    save_for_hf(timm.create_model(ARCH, num_classes=3, in_chans=1), folder, model_args=dict(in_chans=1),
                safe_serialization=True)
    return folder


def test_never_writes_into_the_folder_it_reads_from(small_data: Path, source_dir: Path, tmp_path: Path):
    before = {p.name: p.read_bytes() for p in source_dir.iterdir()}
    for model in (str(source_dir), f'local-dir:{source_dir}'):
        with pytest.raises(ValueError, match='is the folder of the model .* is read from; choose another folder'):
            finetune(model, small_data, source_dir, **RUN)
    assert {p.name: p.read_bytes() for p in source_dir.iterdir()} == before


def test_subsets_per_class_are_fixed_and_balanced(small_data: Path, source_dir: Path, tmp_path: Path):
    metrics = finetune(str(source_dir), small_data, tmp_path, val_subset_per_class=1, train_subset_per_class=2, **RUN)
    assert metrics['val_count'] == len(SMALL_CLASSES)
    with pytest.raises(OptionError, match='^val_subset_per_class 3: class airplane of .* holds only 2 images; pass at '
                                          'most 2'):
        finetune(str(source_dir), small_data, tmp_path / 'b', val_subset_per_class=3, **RUN)
    with pytest.raises(ValueError, match='train_subset_per_class must be 0'):
        finetune(str(source_dir), small_data, tmp_path / 'c', train_subset_per_class=-1, **RUN)


def _truncated_checkpoint(path: Path) -> None:
    torch.save({'state_dict': {'w': torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:200])


NOT_CHECKPOINTS = {
    'text': lambda path: path.write_text('a text file\n'),
    'random': lambda path: path.write_bytes(bytes(range(256)) * 4),
    'truncated': _truncated_checkpoint,
    # a pathlib object, which weights_only refuses to unpickle
    'foreign_objects': lambda path: torch.save({'state_dict': {}, 'path': path}, path),
    # the same in the format of torch < 1.6, which is no zip archive but no less a torch.save file
    'legacy_foreign_objects': lambda path: torch.save({'state_dict': {}, 'path': path}, path,
                                                      _use_new_zipfile_serialization=False),
}


@pytest.mark.parametrize('kind', NOT_CHECKPOINTS)
def test_a_file_that_is_no_checkpoint_fails_in_one_line(tmp_path: Path, kind: str):
    path = tmp_path / 'model_best.pth.tar'
    NOT_CHECKPOINTS[kind](path)
    with pytest.raises(ValueError) as error:
        load_model(str(path))
    message = str(error.value)
    reason = ('it holds objects other than tensors and plain data' if kind.endswith('foreign_objects')
              else 'truncated, or not written by torch.save')
    assert message == (f'{path}: not a readable checkpoint ({reason}); pass an intact checkpoint.pth.tar or '
                       f'model_best.pth.tar of a run.')
    # torch's advice to unpickle with weights_only=False would run the file's code: never passed on
    assert 'weights_only' not in message
    # the epoch alone, read with the tensors mapped rather than loaded, is refused in the same words
    with pytest.raises(ValueError) as error:
        RecipeCheckpoint.read_epoch(path)
    assert str(error.value) == message


def _written(checkpoint: RecipeCheckpoint, path: Path) -> Path:
    checkpoint.write(path)
    return path


def test_a_legacy_checkpoint_of_plain_tensors_loads(tmp_path: Path):
    model = timm.create_model(ARCH, num_classes=2)
    path = tmp_path / 'model_best.pth.tar'
    stored = torch.load(_written(recipe_checkpoint(model, RUN_SETTINGS, ['x', 'y']), path), weights_only=True)
    torch.save(stored, path, _use_new_zipfile_serialization=False)
    loaded = load_model(str(path))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_folder_of_pickled_weights_is_refused_without_unpickling_advice(tmp_path: Path):
    folder = tmp_path / 'pickled'
    model = timm.create_model(ARCH, num_classes=3)
    save_for_hf(model, folder, safe_serialization=False)  # config.json + pytorch_model.bin
    torch.save(dict(model.state_dict(), path=folder), folder / 'pytorch_model.bin')  # and a foreign object
    for name in (str(folder), f'local-dir:{folder}'):
        with pytest.raises(ValueError) as error:
            load_model(name)
        message = str(error.value)
        assert message.startswith(f'{folder}: expected model.safetensors and config.json'), message
        # the advice to retry with weights_only=False would run the file's code: never passed on
        assert '\n' not in message and 'weights_only' not in message


def test_a_config_that_is_not_json_is_named(source_dir: Path, tmp_path: Path):
    folder = tmp_path / 'bad-config'
    folder.mkdir()
    (folder / 'model.safetensors').write_bytes((source_dir / 'model.safetensors').read_bytes())
    (folder / 'config.json').write_text('{"architecture": ')
    for name in (str(folder), f'local-dir:{folder}', str(folder / 'model.safetensors')):
        with pytest.raises(ValueError, match=rf'^{re.escape(str(folder / "config.json"))}: not valid JSON \('):
            load_model(name)


def test_bad_model_ids_fail_in_one_line(small_data: Path, tmp_path: Path):
    with pytest.raises(ValueError, match=rf'cannot load .*: {re.escape("Invalid pretrained tag (nosuchtag)")}'):
        load_model('sgdrop_vgg_tiny.nosuchtag')
    with pytest.raises(ValueError, match=rf'^{re.escape(str(tmp_path / "nowhere"))}: expected model.safetensors and '
                                         rf'config.json'):
        load_model(f'local-dir:{tmp_path / "nowhere"}')
    with pytest.raises(ValueError, match='batch_size must be at least 1'):
        finetune('sgdrop_vgg_tiny', small_data, tmp_path / 'out', **dict(RUN, batch_size=0))


def _hand_made_run(folder: Path) -> dict:
    """The files an earlier run left in ``folder``, by name."""
    folder.mkdir(parents=True)
    files = {'model.safetensors': b'weights', 'config.json': b'{}', 'log.jsonl': b'{"epoch": 1}\n'}
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return files


def test_never_replaces_an_earlier_run_unless_told(small_data: Path, source_dir: Path, tmp_path: Path):
    run = tmp_path / 'run'
    files = _hand_made_run(run)
    with pytest.raises(ValueError, match=r'already holds model\.safetensors, config\.json, log\.jsonl of an earlier '
                                         r'run; choose another folder, or pass overwrite=True to replace them\.$'):
        finetune(str(source_dir), small_data, run, **RUN)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == files
    metrics = finetune(str(source_dir), small_data, run, overwrite=True, **RUN)
    assert json.loads((run / 'metrics.json').read_text()) == metrics
    assert [json.loads(line)['epoch'] for line in (run / 'log.jsonl').read_text().splitlines()] == [1]
    assert load_file(run / 'model.safetensors')


def test_a_folder_in_use_by_another_fine_tune_is_refused(small_data: Path, source_dir: Path, tmp_path: Path):
    run = tmp_path / 'run'
    with folder_held_by_another_process(run) as pid:
        with pytest.raises(RunFileError, match=rf'^{re.escape(str(run))} is in use by another run or fine-tune \(pid '
                                               rf'{pid}\)'):
            finetune(str(source_dir), small_data, run, **RUN)
        assert sorted(p.name for p in run.iterdir()) == ['.sgdrop-zoo.lock']
    finetune(str(source_dir), small_data, run, **RUN)
    assert '.sgdrop-zoo.lock' not in [p.name for p in run.iterdir()]


@pytest.mark.parametrize('flags, message', [
    # the library's errors name the flags on the command line (--image-size, not image_size)
    (['--image-size', '0'], "--image-size must be from 1 to 4096 px, or unset for the model's, got 0."),
    (['--image-size', '-8'], "--image-size must be from 1 to 4096 px, or unset for the model's, got -8."),
    (['--image-size', '100000'], "--image-size must be from 1 to 4096 px, or unset for the model's, got 100000."),
    (['--lr', '-1'], '--lr must be positive, e.g. 0.001 for linear-probe, got -1.0.'),
    (['--sgdrop-rho', '2'], 'sgdrop_rho must be in [0, 1)'),
    (['--workers', '-1'], '--workers must be 0 or more, got -1.'),
    (['--batch-size', '0'], '--batch-size must be at least 1, got 0.'),
    (['--train-subset-per-class', '-2'], '--train-subset-per-class must be 0 (all images) or a number of images per '
                                         'class, got -2.'),
    (['--val-subset-per-class', '3'], '--val-subset-per-class 3: class airplane of VAL holds only 2 images; pass at '
                                      'most 2, or 0 for all.'),
])
def test_bad_settings_stop_in_one_line_before_any_work(capsys: pytest.CaptureFixture, small_data: Path,
                                                       source_dir: Path, tmp_path: Path, flags: list, message: str):
    output = tmp_path / 'out'
    assert cli.main(['finetune', '--model', str(source_dir), '--data', str(small_data), '--output', str(output),
                     *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    message = message.replace('VAL', str(small_data / 'val'))
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], lines
    assert not output.exists()


def test_an_output_that_is_a_file_or_unwritable_stops_in_one_line(capsys: pytest.CaptureFixture, small_data: Path,
                                                                   source_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch):
    (tmp_path / 'file').write_text('notes\n')
    for command in ('finetune', 'saliency'):
        assert cli.main([command, '--model', str(source_dir), '--data', str(small_data), '--output',
                         str(tmp_path / 'file')]) == 2
        assert capsys.readouterr().err == f'error: --output {tmp_path / "file"} is a file; pass a folder.\n'
    assert (tmp_path / 'file').read_text() == 'notes\n'
    # as root every folder is writable, so the permission check is what answers here
    monkeypatch.setattr(os, 'access', lambda path, mode: Path(path) != tmp_path)
    assert cli.main(['finetune', '--model', str(source_dir), '--data', str(small_data), '--output',
                     str(tmp_path / 'new')]) == 2
    assert capsys.readouterr().err == (f'error: --output {tmp_path / "new"}: {tmp_path} is not writable; pass a folder '
                                       f'you can write to.\n')


def _shipped_copy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[str, Path]:
    """A copy of the shipped hub_configs/ folder of one tag, made the zoo's with SGDROP_ZOO_HUB_CONFIGS."""
    tag = 'sgdrop_resnet10t.imagenette_128_ema_head'
    configs = tmp_path / 'hub_configs'
    configs.mkdir()
    shutil.copytree(hub_configs_dir() / tag, configs / tag)
    monkeypatch.setenv(HUB_CONFIGS_ENV, str(configs))
    return tag, configs / tag


def test_never_writes_into_the_shipped_folder_of_a_tag(capsys: pytest.CaptureFixture, small_data: Path,
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    tag, shipped = _shipped_copy(monkeypatch, tmp_path)
    before = {p.name: p.read_bytes() for p in shipped.iterdir()}
    monkeypatch.chdir(shipped.parent)
    spellings = [(tag, shipped), (tag, Path(tag)), (f'local-dir:{shipped}', shipped),
                 (str(shipped / 'model.safetensors'), Path('..') / 'hub_configs' / tag)]
    for command, flags in (('finetune', ['--epochs', '1', '--overwrite']), ('saliency', ['--overwrite'])):
        for model, output in spellings:
            assert cli.main([command, '--model', model, '--data', str(small_data), '--output', str(output),
                             *flags]) == 2
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f'error: --output {output} is inside '), lines
            assert 'hub_configs/ folder of shipped checkpoints' in lines[0]
    assert {p.name: p.read_bytes() for p in shipped.iterdir()} == before


def test_never_writes_into_the_packaged_hub_configs(tmp_path: Path):
    packaged = packaged_hub_configs_dir()
    tag_folder = packaged / 'sgdrop_resnet10t.imagenette_128_ema_head'
    (tmp_path / 'link').symlink_to(tag_folder)
    for output in (tag_folder, packaged, packaged / 'new-run', tmp_path / 'link', packaged / '..' / packaged.name):
        for model in ('sgdrop_resnet10t.imagenette_128_ema_head', ARCH, f'local-dir:{tag_folder}'):
            with pytest.raises(ValueError, match=r"is inside .*, the zoo's hub_configs/ folder"):
                check_output_is_not_source(model, output)


def test_an_unreachable_hf_hub_id_fails_in_one_line(small_data: Path, tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith('HF_')}
    result = subprocess.run(
        [sys.executable, '-m', 'sgdrop_zoo.cli', 'finetune', '--model', 'hf-hub:sgdrop-zoo/no-such-repo', '--data',
         str(small_data), '--output', str(tmp_path / 'out')],
        env=dict(env, HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf_home')), capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    # offline is said to be offline, with what to do, not that the repo is missing
    assert len(lines) == 1 and lines[0].startswith('error: hf-hub:sgdrop-zoo/no-such-repo: config.json of '
                                                   'sgdrop-zoo/no-such-repo@main is not in the local cache and '
                                                   'HF_HUB_OFFLINE is set: unset it'), lines
    assert not (tmp_path / 'out').exists()


def test_a_full_disk_during_the_export_stops_in_one_line(capsys: pytest.CaptureFixture, small_data: Path,
                                                         source_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')

    monkeypatch.setattr(safetensors.torch, 'save_file', full_disk)
    output = tmp_path / 'out'
    assert cli.main(['finetune', '--model', str(source_dir), '--data', str(small_data), '--output', str(output),
                     '--epochs', '1', '--image-size', '32', '--workers', '0']) == 2
    # after the training's progress bar, one line
    assert capsys.readouterr().err.splitlines()[-1] == (
        f'error: cannot write {output / "model.safetensors"} (Error while serializing: I/O error: No space left on '
        f'device (os error 28)); nothing of the export was written: free some space there, or fix the folder')
    assert not (output / 'model.safetensors').exists() and not (output / 'config.json').exists()
    assert not list(output.glob('.export.*'))
