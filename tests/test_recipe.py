"""Tests of the training recipe train/main.py on CPU, on a tiny ImageFolder cut from ../shared/data/cifar10_subset.

Training runs go through the command line in subprocesses, as a user runs them; the bad-input checks call `main()`
in-process because they stop before any training.
"""
import contextlib
import errno
import functools
import importlib.util
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file
from torchvision import datasets, transforms

import sgdrop_zoo
from sgdrop_zoo.cli import main as cli_main
from sgdrop_zoo.saliency import attribution_area_ratio, grad_cam_maps

from conftest import RecordOps, folder_held_by_another_process

REPO_ROOT = Path(__file__).resolve().parents[1]
MAIN = REPO_ROOT / 'train' / 'main.py'
SHARED_DATA = REPO_ROOT.parent / 'shared' / 'data' / 'cifar10_subset'
TRAIN_PER_CLASS = 4
VAL_PER_CLASS = 3
# The smallest registered architecture at the dataset's native 32 px. The official random crop + flip stays on, so
# that the data order and the augmentation of a resumed run depend on the restored RNG state.
BATCH_SIZE = 20
TINY_RUN = ['-a', 'sgdrop_vgg_tiny', '--image-size', '32', '-b', str(BATCH_SIZE), '-j', '0', '--seed', '0',
            '--optimizer', 'adam', '--lr', '1e-3', '--train-eval-samples', '8', '-p', '100']
# At 32 px the latent map z is 2x2 and nearly every area ratio is 0 or 1; at 64 px (4x4) they spread over [0, 1], so
# that a wrong image, label or normalisation shows in the mean.
AREA_SIZE = 64
AREA_IMAGES = 8
AREA_RUN = [*TINY_RUN, '--image-size', str(AREA_SIZE)]


def load_recipe() -> Any:
    spec = importlib.util.spec_from_file_location('recipe_main', MAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


recipe = load_recipe()
# what a run without a launcher is: one process on the CPU (batch size and loader workers of TINY_RUN)
ONE_CPU_PROCESS = recipe.Process(device=torch.device('cpu'), rank=0, world_size=1, distributed=False,
                                 batch_size=BATCH_SIZE, workers=0)


def run_recipe(*args: str, timeout: float = 300, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run the recipe to its end and return its output: in this process (as `python train/main.py` would, without
    paying its start-up once more), or as the script of `launcher` (torchrun, or python itself)."""
    if not launcher:
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.chdir(REPO_ROOT), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                recipe.main(list(args))
                returncode = 0
            except SystemExit as e:
                returncode = e.code
        assert returncode == 0, f'{args} failed:\n{stdout.getvalue()[-3000:]}\n{stderr.getvalue()[-3000:]}'
        return subprocess.CompletedProcess(['train/main.py', *args], 0, stdout.getvalue(), stderr.getvalue())
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS='1')
    command = [*launcher, str(MAIN), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT)
    assert result.returncode == 0, f'{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
    return result


def read_log(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / 'log.jsonl').read_text().splitlines()]


def reported_val_acc1(stdout: str) -> float:
    line = next(line for line in stdout.splitlines() if line.startswith('=> val Acc@1'))
    return float(line.split()[3])


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 classes, 4 train and 3 val images each, plus one extra val image so 2 processes get unequal shards."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f'{SHARED_DATA} is missing: the recipe tests need the shared CIFAR-10 subset next to the repo')
    root = tmp_path_factory.mktemp('data')
    for split, per_class in (('train', TRAIN_PER_CLASS), ('val', VAL_PER_CLASS)):
        for class_dir in sorted((SHARED_DATA / split).iterdir()):
            (root / split / class_dir.name).mkdir(parents=True)
            extra = 1 if split == 'val' and class_dir.name == 'airplane' else 0
            for image in sorted(class_dir.iterdir())[:per_class + extra]:
                shutil.copy(image, root / split / class_dir.name / image.name)
    return root


@pytest.fixture(scope='module')
def num_val(data_dir: Path) -> int:
    return sum(1 for _ in (data_dir / 'val').rglob('*.jpg'))


@pytest.fixture(scope='module')
def one_epoch_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp('one_epoch')
    run_recipe(str(data_dir), *TINY_RUN, '--epochs', '1', '--output', str(output))
    return output


@pytest.fixture(scope='module')
def two_epoch_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    output = tmp_path_factory.mktemp('run')
    result = run_recipe(str(data_dir), *TINY_RUN, '--epochs', '2', '--output', str(output))
    return output, result.stdout


def test_two_epoch_run_writes_checkpoints_log_and_export(two_epoch_run: tuple[Path, str], data_dir: Path,
                                                         num_val: int):
    output, stdout = two_epoch_run
    classes = sorted(p.name for p in (data_dir / 'train').iterdir())

    checkpoint = torch.load(output / 'checkpoint.pth.tar', map_location='cpu', weights_only=True)
    # what a resume, the export and publish read, and nothing else
    assert set(checkpoint) == {'epoch', 'acc1', 'best_acc1', 'best_epoch', 'class_names', 'settings', 'state_dict',
                               'sgdrop_ema', 'optimizer', 'scheduler', 'scaler', 'rng_state'}
    assert checkpoint['epoch'] == 2 and checkpoint['settings']['arch'] == 'sgdrop_vgg_tiny'
    assert not any(key.startswith('module.') for key in checkpoint['state_dict'])
    assert checkpoint['sgdrop_ema']['num_updates'] == 2 * math.ceil(TRAIN_PER_CLASS * len(classes) / BATCH_SIZE)
    assert checkpoint['class_names'] == classes

    log = read_log(output)
    assert [record['epoch'] for record in log] == [1, 2]
    for record in log:
        assert {'train_loss', 'train_acc1', 'train_clean_acc1', 'val_acc1', 'val_acc5', 'lr', 'sgdrop_rho',
                'img_per_s', 'epoch_time_s'} <= set(record)
        assert record['val_count'] == num_val and record['sgdrop_rho'] == 0.01 and record['lr'] == 1e-3
        # vgg_tiny's latent is the output of a ReLU: some of it is exactly zero, none of it negative
        assert 0 < record['train_dropped_attribution_share'] <= 1
        assert 0 < record['train_nonpositive_feature_share'] < 1
    assert checkpoint['best_acc1'] == max(record['val_acc1'] for record in log)

    best = torch.load(output / 'model_best.pth.tar', map_location='cpu', weights_only=True)
    exported = load_file(output / 'model.safetensors')
    assert exported.keys() == best['state_dict'].keys()
    assert all(torch.equal(exported[k], best['state_dict'][k]) for k in exported)
    config = json.loads((output / 'config.json').read_text())
    assert config['architecture'] == 'sgdrop_vgg_tiny'
    assert config['num_classes'] == len(classes) and config['label_names'] == classes
    assert config['sgdrop']['sgdrop_rho'] == 0.01 and config['sgdrop']['sgdrop_attribution'] == 'ema'
    assert config['pretrained_cfg']['input_size'] == [3, 32, 32]

    assert f"best val Acc@1 {checkpoint['best_acc1']:.3f}" in stdout
    assert str(output / 'model_best.pth.tar') in stdout


@torch.no_grad()
def test_timm_eval_transform_of_the_export_reproduces_the_recipe_top1(two_epoch_run: tuple[Path, str],
                                                                       data_dir: Path, num_val: int):
    # 32 px with the crop-flip transform, where floor(32 / 0.875) = 36 and round(32 / 0.875) = 37 differ: timm's
    # evaluation of the export's config must be the recipe's own validation
    output, _ = two_epoch_run
    model = timm.create_model(f'local-dir:{output}', pretrained=True).eval()
    config = timm.data.resolve_model_data_config(model)
    assert (config['crop_pct'], config['crop_mode']) == (0.875, 'center')
    val = datasets.ImageFolder(data_dir / 'val', transform=timm.data.create_transform(**config))
    correct = sum(int(model(images).argmax(1).eq(targets).sum()) for images, targets in
                  torch.utils.data.DataLoader(val, batch_size=16))
    best = torch.load(output / 'model_best.pth.tar', map_location='cpu', weights_only=True)
    assert 100 * correct / num_val == pytest.approx(best['best_acc1'], abs=1e-3)


class RecordSecondStep:
    """Two batches; every op the training loop runs with the second one (no progress line: -p 1000) is recorded."""

    def __init__(self, batches: list):
        self.batches, self.recorded = batches, None

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        yield self.batches[0]
        with RecordOps() as self.recorded:
            yield self.batches[1]  # until the loop asks for the next batch


def test_a_training_step_reads_nothing_back_to_the_host():
    # aten._local_scalar_dense is what .item(), int(), float() and bool() of a tensor run: on a GPU, a sync
    args = recipe.parse_args(['data', *TINY_RUN, '-p', '1000'])
    model = recipe.create_model(args, num_classes=10)
    torch.manual_seed(0)
    loader = RecordSecondStep([(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(2)])
    # SGD: torch's Adam reads its step count, a CPU tensor by design and no GPU sync, with .item() on the CPU
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    no_autocast = functools.partial(torch.autocast, 'cpu', enabled=False)
    metrics = recipe.train(loader, model, model, nn.CrossEntropyLoss(), optimizer,
                           torch.amp.GradScaler('cpu', enabled=False), no_autocast, 0, ONE_CPU_PROCESS, args)
    ops = loader.recorded.ops
    # the whole step was recorded: the forward's label check, the backward, the momentum update
    assert {'aten._assert_async.msg', 'aten.convolution_backward.default'} <= set(ops)
    assert any(op.startswith('aten._foreach_add') or op.startswith('aten.add_') for op in ops)
    assert not [op for op in ops if '_local_scalar_dense' in op or op.startswith('aten.item')]
    assert 0 <= metrics['acc1'] <= 100 and metrics['count'] == 8


def test_holdout_validates_on_training_images_disjoint_from_the_trained_ones(data_dir: Path, tmp_path: Path):
    args = recipe.parse_args([str(data_dir), *TINY_RUN, '--holdout-per-class', '1', '--train-subset-per-class', '2',
                              '--train-eval-samples', '0', '--output', str(tmp_path)])
    recipe.check_inputs(args)
    model = recipe.create_model(args, num_classes=10)
    train_loader, val_loader, _, _ = recipe.build_loaders(args, ONE_CPU_PROCESS, model)
    targets = datasets.ImageFolder(data_dir / 'train').targets
    # by hand from the recipe's fixed order: the first 2 images of each class train, the last one is held out
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(0)).tolist()
    in_order = [[index for index in order if targets[index] == c] for c in range(10)]
    assert val_loader.dataset.indices == sorted(images[-1] for images in in_order)
    assert sorted(train_loader.dataset.indices) == sorted(index for images in in_order for index in images[:2])
    # the same training images as without the holdout
    args.holdout_per_class = 0
    assert train_loader.dataset.indices == recipe.build_loaders(args, ONE_CPU_PROCESS, model)[0].dataset.indices


def test_holdout_larger_than_a_class_is_refused_in_one_line(data_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit):
        recipe.main([str(data_dir), *TINY_RUN, '--holdout-per-class', '3', '--train-subset-per-class', '2',
                     '--output', str(tmp_path)])
    assert capsys.readouterr().err == ('error: --holdout-per-class 3 + --train-subset-per-class 2 needs 5 training '
                                       'images of each class, but class airplane has only 4; pass a smaller '
                                       '--holdout-per-class\n')
    assert not (tmp_path / 'log.jsonl').exists()


def test_model_kwargs_reach_the_export_and_plain_timm(data_dir: Path, tmp_path: Path):
    """timm's vgg11 with a narrow head (--model-kwargs mlp_ratio=...): its export and its published folder record the
    argument, so that plain timm, without sgdrop_zoo, rebuilds the same network and gives the same logits."""
    output = tmp_path / 'run'
    run_recipe(str(data_dir), *TINY_RUN, '-a', 'sgdrop_vgg11', '--model-kwargs', 'mlp_ratio=0.03125', '--epochs',
               '1', '--output', str(output))
    checkpoint = torch.load(output / 'checkpoint.pth.tar', map_location='cpu', weights_only=True)
    assert checkpoint['settings']['model_kwargs'] == {'mlp_ratio': 0.03125}
    # 128 = 4096 * 0.03125 output channels of the head's first layer, a 7x7 convolution over 512 channels
    assert checkpoint['state_dict']['pre_logits.fc1.weight'].shape == (128, 512, 7, 7)
    assert json.loads((output / 'config.json').read_text())['model_args']['mlp_ratio'] == 0.03125
    assert cli_main(['publish', str(output / 'checkpoint.pth.tar'), '--repo-id', 'org/vgg11', '--dry-run',
                     '--output', str(tmp_path / 'repo')]) == 0
    config = json.loads((tmp_path / 'repo' / 'config.json').read_text())
    assert config['architecture'] == 'vgg11' and config['model_args']['mlp_ratio'] == 0.03125
    images = torch.randn(2, 3, 32, 32)
    torch.save(images, tmp_path / 'images.pt')
    script = (f"import sys, timm, torch\n"
              f"model = timm.create_model('local-dir:{tmp_path / 'repo'}', pretrained=True).eval()\n"
              f"assert not any(name.startswith('sgdrop_zoo') for name in sys.modules)\n"
              f"torch.save(model(torch.load('{tmp_path / 'images.pt'}')), '{tmp_path / 'logits.pt'}')\n")
    subprocess.run([sys.executable, '-c', script], check=True, cwd=tmp_path, timeout=120)
    model = timm.create_model('sgdrop_vgg11', num_classes=checkpoint['state_dict']['head.fc.bias'].numel(),
                              mlp_ratio=0.03125).eval()
    model.load_state_dict(checkpoint['state_dict'])
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / 'logits.pt'), model(images))


@pytest.mark.parametrize('in_memory', [False, True], ids=['imagefolder', 'in_memory'])
def test_evaluate_reproduces_best_accuracy(two_epoch_run: tuple[Path, str], data_dir: Path, num_val: int,
                                           in_memory: bool):
    output, _ = two_epoch_run
    best = torch.load(output / 'model_best.pth.tar', map_location='cpu', weights_only=True)
    result = run_recipe(str(data_dir), *TINY_RUN, '--resume', str(output / 'model_best.pth.tar'), '--evaluate',
                        '--output', str(output / 'eval'), *(['--in-memory'] if in_memory else []))
    assert reported_val_acc1(result.stdout) == pytest.approx(best['best_acc1'], abs=1e-3)
    assert f'on {num_val} images' in result.stdout


def test_evaluate_writes_its_metrics_to_metrics_json_and_nothing_into_output(two_epoch_run: tuple[Path, str],
                                                                             data_dir: Path, num_val: int,
                                                                             tmp_path: Path):
    output, _ = two_epoch_run
    before = {p.name: p.read_bytes() for p in output.iterdir() if p.is_file()}
    metrics_path = tmp_path / 'final_val.json'
    result = run_recipe(str(data_dir), *TINY_RUN, '--resume', str(output / 'model_best.pth.tar'), '--evaluate',
                        '--output', str(output), '--metrics-json', str(metrics_path))
    metrics = json.loads(metrics_path.read_text())
    best = torch.load(output / 'model_best.pth.tar', map_location='cpu', weights_only=True)
    assert set(metrics) == {'acc1', 'acc5', 'loss', 'count', 'checkpoint', 'epoch'}
    assert (metrics['checkpoint'], metrics['epoch']) == (str((output / 'model_best.pth.tar').resolve()), best['epoch'])
    assert metrics['count'] == num_val and metrics['acc1'] == pytest.approx(best['acc1'], abs=1e-3)
    assert 0 <= metrics['acc1'] <= metrics['acc5'] <= 100 and 0 < metrics['loss'] < math.inf
    # the figures the evaluation printed
    assert f"=> val Acc@1 {metrics['acc1']:.3f} Acc@5 {metrics['acc5']:.3f} on {num_val} images" in result.stdout
    assert {p.name: p.read_bytes() for p in output.iterdir() if p.is_file()} == before
    assert oct(metrics_path.stat().st_mode & 0o777) == '0o644' and list(tmp_path.iterdir()) == [metrics_path]


def test_metrics_json_is_refused_before_any_work(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                                                 data_dir: Path, one_epoch_run: Path, tmp_path: Path):
    evaluate = ['--evaluate', '--resume', str(one_epoch_run / 'checkpoint.pth.tar'), '--output', str(one_epoch_run)]
    taken = tmp_path / 'taken.json'
    taken.write_text('{}')
    assert run_bad_input(capsys, str(data_dir), *evaluate, '--metrics-json', str(taken)) == (
        f'error: --metrics-json {taken} exists; an evaluation replaces no file: pass a new file name, or delete that '
        f'one')
    assert taken.read_text() == '{}'
    missing = tmp_path / 'nowhere' / 'metrics.json'
    assert run_bad_input(capsys, str(data_dir), *evaluate, '--metrics-json', str(missing)) == (
        f'error: --metrics-json {missing}: {tmp_path / "nowhere"} is not a folder you can write to; pass a file in one')
    (tmp_path / 'locked').mkdir(mode=0o500)
    if os.geteuid() == 0:  # root writes anywhere: the permission check is what answers here
        monkeypatch.setattr(os, 'access', lambda path, mode: Path(path) != tmp_path / 'locked')
    locked = tmp_path / 'locked' / 'metrics.json'
    assert run_bad_input(capsys, str(data_dir), *evaluate, '--metrics-json', str(locked)) == (
        f'error: --metrics-json {locked}: {tmp_path / "locked"} is not a folder you can write to; pass a file in one')
    message = run_bad_input(capsys, str(data_dir), '--output', str(tmp_path / 'run'), '--metrics-json',
                            str(tmp_path / 'metrics.json'))
    assert message == (f'error: --metrics-json {tmp_path / "metrics.json"} writes the metrics of --evaluate; pass '
                       f'--evaluate, or leave it out (a training run logs its metrics to log.jsonl in --output)')
    assert not (tmp_path / 'run').exists() and not (tmp_path / 'metrics.json').exists()


def assert_same_training_state(first: Path, second: Path) -> None:
    """The two checkpoints hold bit-identical weights, EMA weights and optimizer state."""
    a = torch.load(first, map_location='cpu', weights_only=True)
    b = torch.load(second, map_location='cpu', weights_only=True)
    assert a['epoch'] == b['epoch']
    assert a['state_dict'].keys() == b['state_dict'].keys()
    assert all(torch.equal(a['state_dict'][k], b['state_dict'][k]) for k in a['state_dict'])
    assert a['sgdrop_ema']['num_updates'] == b['sgdrop_ema']['num_updates']
    assert all(torch.equal(a['sgdrop_ema']['state_dict'][k], b['sgdrop_ema']['state_dict'][k])
               for k in a['sgdrop_ema']['state_dict'])
    for state_a, state_b in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_resume_gives_identical_weights(data_dir: Path, one_epoch_run: Path, two_epoch_run: tuple[Path, str],
                                        tmp_path: Path):
    shutil.copytree(one_epoch_run, tmp_path, dirs_exist_ok=True)
    run_recipe(str(data_dir), *TINY_RUN, '--epochs', '2', '--resume', str(tmp_path / 'checkpoint.pth.tar'),
               '--output', str(tmp_path))
    straight, _ = two_epoch_run
    assert_same_training_state(straight / 'checkpoint.pth.tar', tmp_path / 'checkpoint.pth.tar')
    assert read_log(straight) == [
        {**record, 'img_per_s': a['img_per_s'], 'epoch_time_s': a['epoch_time_s']}
        for a, record in zip(read_log(straight), read_log(tmp_path))]


# The recipe before it was split into the library modules of its plumbing: the same seed gives the same run, bit for
# bit, with either.
REFERENCE_COMMIT = 'df13ecb'
TIMING_FIELDS = ('img_per_s', 'epoch_time_s')
# what the recipe records since the reference commit, beside the same training: the mask's logit-drop diagnostics in
# the log, a run setting at its default, and in config.json the export's own description and its dev split's size
LOG_FIELDS_SINCE_REFERENCE = ('train_true_class_logit_drop', 'train_clean_logit_margin', 'train_logit_drop_share')
SETTINGS_SINCE_REFERENCE = {'sgdrop_reference': 'zero'}


def config_as_of_the_reference(config: dict) -> dict:
    """An export's config.json without what the recipe writes there since the reference commit."""
    pretrained_cfg = {k: v for k, v in config['pretrained_cfg'].items()
                      if k not in ('description', 'paper_name', 'origin_url')}
    training = {k: v for k, v in config['training'].items() if k != 'holdout_per_class'}
    sgdrop = {k: v for k, v in config['sgdrop'].items() if k not in SETTINGS_SINCE_REFERENCE}
    # num_classes: the config's own field, no longer also an architecture argument
    model_args = {k: v for k, v in config['model_args'].items()
                  if k not in SETTINGS_SINCE_REFERENCE and k != 'num_classes'}
    return dict(config, pretrained_cfg=pretrained_cfg, training=training, sgdrop=sgdrop, model_args=model_args)


@pytest.fixture(scope='module')
def reference_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files of REFERENCE_COMMIT, extracted from this clone's history."""
    if shutil.which('git') is None:
        pytest.fail(f'git is not installed: the reference run needs the recipe of commit {REFERENCE_COMMIT}')
    found = subprocess.run(['git', '-C', str(REPO_ROOT), 'rev-parse', '--verify', '--quiet',
                            f'{REFERENCE_COMMIT}^{{commit}}'], capture_output=True, text=True)
    if found.returncode != 0:
        pytest.fail(f'commit {REFERENCE_COMMIT} is not in the history of {REPO_ROOT} (a shallow clone?): the '
                    f'reference run needs it; fetch it with git fetch --unshallow')
    tree = tmp_path_factory.mktemp('reference')
    archive = subprocess.run(['git', '-C', str(REPO_ROOT), 'archive', found.stdout.strip()], capture_output=True,
                             check=True).stdout
    subprocess.run(['tar', '-x', '-C', str(tree)], input=archive, check=True)
    # an installed sgdrop_zoo found before PYTHONPATH would run the reference script on the current library
    imported = subprocess.run([sys.executable, '-c', 'import sgdrop_zoo; print(sgdrop_zoo.__file__)'], cwd=tree,
                              env=dict(os.environ, PYTHONPATH=str(tree)), capture_output=True, text=True, check=True)
    assert Path(imported.stdout.strip()).is_relative_to(tree), imported.stdout
    return tree


def assert_identical(a: Any, b: Any, where: str) -> None:
    """`a` and `b` are equal all the way down, tensors bit for bit (same dtype, shape and values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            assert_identical(a[key], b[key], f'{where}[{key!r}]')
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (item_a, item_b) in enumerate(zip(a, b)):
            assert_identical(item_a, item_b, f'{where}[{i}]')
    else:
        assert a == b, where


@pytest.mark.parametrize('in_memory', [False, True], ids=['imagefolder', 'in_memory'])
def test_a_seeded_run_is_that_of_the_reference_commit_bit_for_bit(reference_tree: Path, data_dir: Path,
                                                                 two_epoch_run: tuple[Path, str], tmp_path: Path,
                                                                 in_memory: bool):
    extra = ['--in-memory'] if in_memory else []
    reference = tmp_path / 'reference'
    command = [sys.executable, str(reference_tree / 'train' / 'main.py'), str(data_dir), *TINY_RUN, '--epochs', '2',
               '--output', str(reference), *extra]
    env = dict(os.environ, PYTHONPATH=str(reference_tree), OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '2'))
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=reference_tree)
    assert result.returncode == 0, f'{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
    if in_memory:
        current = tmp_path / 'current'
        run_recipe(str(data_dir), *TINY_RUN, '--epochs', '2', '--output', str(current), *extra)
    else:
        current, _ = two_epoch_run

    for name in ('checkpoint.pth.tar', 'model_best.pth.tar'):
        a = torch.load(reference / name, map_location='cpu', weights_only=True)
        b = torch.load(current / name, map_location='cpu', weights_only=True)
        for key in ('state_dict', 'sgdrop_ema', 'optimizer', 'rng_state'):
            assert_identical(a[key], b[key], f'{name}[{key!r}]')
        # the rest too; the reference stored its arguments, this version the run settings built from them, and no
        # longer the architecture twice nor the rho and schedule that nothing read
        assert set(a) - set(b) == {'args', 'arch', 'sgdrop_rho', 'rho_schedule'} and set(b) - set(a) == {'settings'}
        assert_identical({k: a[k] for k in sorted(b) if k != 'settings'},
                         {k: b[k] for k in sorted(b) if k != 'settings'}, name)
        assert a['arch'] == b['settings']['arch']
        settings = {k: v for k, v in b['settings'].items() if k != 'version'}
        assert {k: settings.pop(k) for k in SETTINGS_SINCE_REFERENCE} == SETTINGS_SINCE_REFERENCE
        assert_identical({k: a['args'][k] for k in settings}, settings, f'{name}[settings]')
    ignored = (*TIMING_FIELDS, *LOG_FIELDS_SINCE_REFERENCE)
    assert [{k: v for k, v in record.items() if k not in ignored} for record in read_log(reference)] == [
        {k: v for k, v in record.items() if k not in ignored} for record in read_log(current)]
    assert all(set(LOG_FIELDS_SINCE_REFERENCE) <= set(record) for record in read_log(current))
    assert (reference / 'model.safetensors').read_bytes() == (current / 'model.safetensors').read_bytes()
    assert config_as_of_the_reference(json.loads((reference / 'config.json').read_text())) == \
        config_as_of_the_reference(json.loads((current / 'config.json').read_text()))


def test_torchrun_two_processes_count_every_val_sample_once_in_memory(data_dir: Path, num_val: int, tmp_path: Path):
    # the ImageFolder data path under torchrun: the BatchNorm test below
    torchrun = (sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2')
    extra = ['--in-memory']
    result = run_recipe(str(data_dir), *TINY_RUN, '--epochs', '1', '--dist-url', 'env://', '--output',
                        str(tmp_path), *extra, launcher=torchrun)
    assert num_val % 2 == 1  # the two shards differ in size
    [record] = read_log(tmp_path)
    assert record['val_count'] == num_val
    assert result.stdout.count('=> creating model') == 1  # progress on rank 0 only

    checkpoint = torch.load(tmp_path / 'checkpoint.pth.tar', map_location='cpu', weights_only=True)
    assert not any(key.startswith('module.') for key in checkpoint['state_dict'])
    single = run_recipe(str(data_dir), *TINY_RUN, '--resume', str(tmp_path / 'checkpoint.pth.tar'), '--evaluate',
                        '--output', str(tmp_path / 'eval'), *extra)
    assert reported_val_acc1(single.stdout) == pytest.approx(record['val_acc1'], abs=1e-3)


def test_torchrun_without_dist_url_trains_one_batchnorm_model_across_its_processes(data_dir: Path, num_val: int,
                                                                                   tmp_path: Path):
    # no --dist-url: torchrun's environment is detected (two separate runs into one folder before); ResNet-10-T has
    # BatchNorm, whose statistics each process gathers on its own shard: averaged after every epoch, the logged
    # validation is that of the saved weights
    torchrun = (sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2')
    run = [*TINY_RUN, '-a', 'sgdrop_resnet10t', '--image-size', '32', '--sgdrop-rho', '0.05']
    result = run_recipe(str(data_dir), *run, '--epochs', '2', '--output', str(tmp_path), launcher=torchrun)
    assert result.stdout.count('=> creating model') == 1
    log = read_log(tmp_path)
    assert [record['epoch'] for record in log] == [1, 2]
    # the ImageFolder shards differ in size, and every validation image is counted once
    assert num_val % 2 == 1 and all(record['val_count'] == num_val for record in log)
    checkpoint = torch.load(tmp_path / 'checkpoint.pth.tar', map_location='cpu', weights_only=True)
    assert not any(key.startswith('module.') for key in checkpoint['state_dict'])
    run_recipe(str(data_dir), *run, '--resume', str(tmp_path / 'checkpoint.pth.tar'), '--evaluate', '--output',
               str(tmp_path / 'eval'), '--metrics-json', str(tmp_path / 'metrics.json'))
    single = json.loads((tmp_path / 'metrics.json').read_text())
    # the loss, which every image's logits move: each process validated its shard with the saved statistics
    assert single['count'] == log[-1]['val_count'] and single['acc1'] == pytest.approx(log[-1]['val_acc1'], abs=1e-3)
    assert single['loss'] == pytest.approx(log[-1]['val_loss'], rel=1e-5)


def test_a_resume_on_fewer_gpus_restores_the_random_state_of_those_it_has(monkeypatch: pytest.MonkeyPatch):
    from sgdrop_zoo.run_files import get_rng_state, set_rng_state
    state = dict(get_rng_state(), cuda=[torch.tensor([i], dtype=torch.uint8) for i in range(8)])  # saved on 8 GPUs
    restored = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda new_state, device: restored.append((int(new_state),
                                                                                                  device)))
    set_rng_state(state)
    assert restored == [(0, 0), (1, 1)]


@pytest.mark.parametrize('flags', [['--amp'], ['--compile', '--compile-backend', 'eager']], ids=['amp', 'compile'])
def test_the_recipe_trains_with_bf16_autocast_and_with_torch_compile(data_dir: Path, tmp_path: Path,
                                                                     flags: list[str]):
    run_recipe(str(data_dir), *TINY_RUN, '--epochs', '1', '--sgdrop-rho', '0.1', '--output', str(tmp_path), *flags)
    [record] = read_log(tmp_path)
    assert math.isfinite(record['train_loss']) and record['train_dropped_attribution_share'] > 0
    assert record['val_count'] == sum(1 for _ in (data_dir / 'val').rglob('*.jpg'))
    assert torch.load(tmp_path / 'checkpoint.pth.tar', map_location='cpu', weights_only=True)['sgdrop_ema'] is not None


def test_a_vanilla_run_holds_no_ema(data_dir: Path, tmp_path: Path):
    run_recipe(str(data_dir), *TINY_RUN, '--epochs', '1', '--regularizer', 'none', '--output', str(tmp_path))
    assert torch.load(tmp_path / 'checkpoint.pth.tar', map_location='cpu', weights_only=True)['sgdrop_ema'] is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_multiprocessing_distributed_on_cpu(data_dir: Path, tmp_path: Path, num_val: int):
    # a script of its own: the processes it spawns import the recipe by the path of __main__
    run_recipe(str(data_dir), *TINY_RUN, '--epochs', '1', '--multiprocessing-distributed', '--world-size', '1',
               '--rank', '0', '--dist-url', f'tcp://127.0.0.1:{free_port()}', '--output', str(tmp_path),
               launcher=(sys.executable,))
    assert read_log(tmp_path)[0]['val_count'] == num_val


def fixed_val_images(data_dir: Path, model: torch.nn.Module, size: int, count: int) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
    """The first `count` images of the seed-independent permutation of the val split, with the recipe's validation
    transform (resize, center crop, normalisation by the model's mean and std), built here from the files."""
    # timm's eval transform at crop_pct 0.875: the shorter side to floor(size / 0.875), then the center crop
    transform = transforms.Compose([
        transforms.Resize(math.floor(size / 0.875)), transforms.CenterCrop(size), transforms.ToTensor(),
        transforms.Normalize(model.pretrained_cfg['mean'], model.pretrained_cfg['std'])])
    val = datasets.ImageFolder(data_dir / 'val', transform=transform)
    indices = torch.randperm(len(val), generator=torch.Generator().manual_seed(0))[:count].tolist()
    return torch.stack([val[i][0] for i in indices]), torch.tensor([val[i][1] for i in indices])


def load_checkpoint_model(checkpoint_path: Path) -> torch.nn.Module:
    checkpoint = torch.load(checkpoint_path, map_location='cpu', weights_only=True)
    model = timm.create_model(checkpoint['settings']['arch'], num_classes=len(checkpoint['class_names']))
    model.load_state_dict(checkpoint['state_dict'])
    return model.eval()


def recomputed_area_ratio(checkpoint_path: Path, data_dir: Path) -> float:
    """The area ratio of a checkpoint's weights on the recipe's fixed validation images, computed from the files."""
    model = load_checkpoint_model(checkpoint_path)
    images, targets = fixed_val_images(data_dir, model, AREA_SIZE, AREA_IMAGES)
    return attribution_area_ratio(grad_cam_maps(model, images, targets)).mean().item()


@pytest.mark.parametrize('in_memory', [False, True], ids=['imagefolder', 'in_memory'])
def test_val_subset_validates_the_fixed_images(two_epoch_run: tuple[Path, str], data_dir: Path, in_memory: bool):
    output, _ = two_epoch_run
    subset = 13
    result = run_recipe(str(data_dir), *TINY_RUN, '--resume', str(output / 'checkpoint.pth.tar'), '--evaluate',
                        '--val-subset', str(subset), '--output', str(output / 'eval_subset'),
                        *(['--in-memory'] if in_memory else []))
    model = load_checkpoint_model(output / 'checkpoint.pth.tar')
    images, targets = fixed_val_images(data_dir, model, 32, subset)
    with torch.no_grad():
        expected = 100.0 * (model(images).argmax(1) == targets).sum().item() / subset
    assert f'on {subset} images' in result.stdout
    assert reported_val_acc1(result.stdout) == pytest.approx(expected, abs=1e-3)


@pytest.fixture(scope='module')
def area_ratio_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    output = tmp_path_factory.mktemp('area_ratio')
    result = run_recipe(str(data_dir), *AREA_RUN, '--epochs', '2', '--log-area-ratio', str(AREA_IMAGES), '--output',
                        str(output))
    return output, result.stdout


@pytest.mark.parametrize('launch', ['imagefolder', 'in_memory', 'torchrun'])
def test_log_area_ratio_matches_grad_cam_of_saved_weights(area_ratio_run: tuple[Path, str], data_dir: Path,
                                                          tmp_path: Path, launch: str):
    if launch == 'imagefolder':
        output, stdout = area_ratio_run
    else:
        # under torchrun rank 0 measures alone while rank 1 goes on; a collective inside would hang the run
        torchrun = (sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2')
        extra = ['--in-memory', '--epochs', '2'] if launch == 'in_memory' else ['--dist-url', 'env://', '--epochs', '1']
        output = tmp_path
        stdout = run_recipe(str(data_dir), *AREA_RUN, '--log-area-ratio', str(AREA_IMAGES), '--output', str(output),
                            *extra, launcher=torchrun if launch == 'torchrun' else ()).stdout
    log = read_log(output)
    assert all(0.0 <= record['val_area_ratio'] <= 1.0 for record in log)
    assert stdout.count(' * Area ratio ') == len(log)  # with the epoch's summary, by rank 0 only

    # the last checkpoint holds the weights the last epoch was measured with; model_best those of its own epoch
    for name in ('checkpoint.pth.tar', 'model_best.pth.tar'):
        epoch = torch.load(output / name, map_location='cpu', weights_only=True)['epoch']
        assert log[epoch - 1]['val_area_ratio'] == pytest.approx(recomputed_area_ratio(output / name, data_dir),
                                                                 abs=1e-6)


def test_log_area_ratio_leaves_training_unchanged(area_ratio_run: tuple[Path, str], data_dir: Path, tmp_path: Path):
    run_recipe(str(data_dir), *AREA_RUN, '--epochs', '2', '--output', str(tmp_path))
    measured, _ = area_ratio_run
    assert_same_training_state(measured / 'checkpoint.pth.tar', tmp_path / 'checkpoint.pth.tar')
    unmeasured = read_log(tmp_path)
    assert all('val_area_ratio' not in record for record in unmeasured)
    assert unmeasured == [
        {key: value for key, value in record.items() if key != 'val_area_ratio'} | {
            'img_per_s': plain['img_per_s'], 'epoch_time_s': plain['epoch_time_s']}
        for plain, record in zip(unmeasured, read_log(measured))]


SLOW_SAVE = """
import importlib.util, sys, time
from pathlib import Path
sys.path.insert(0, str(Path({main!r}).parent))
spec = importlib.util.spec_from_file_location("recipe_main", {main!r})
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)

class BlocksWhilePickled:
    # stands for the rest of a large checkpoint: torch.save has opened the file when it pickles this
    def __reduce__(self):
        Path({marker!r}).touch()
        time.sleep(60)
        return (int, (0,))

checkpoint = recipe.RecipeCheckpoint.read(Path({checkpoint!r}))
checkpoint.epoch += 1
checkpoint.rng_state["padding"] = BlocksWhilePickled()
recipe.save_checkpoint(checkpoint, True, Path({output!r}))
"""


def kill_once_marked(script: str, marker: Path, during: Any = None) -> None:
    """Run `script` in a Python process and SIGKILL it as soon as it has created `marker`, mid-write.

    Args:
        script: Python code that creates `marker`, then blocks in the middle of the write under test.
        marker: The file it creates.
        during: Called between the marker's appearance and the kill, to look at the write under way.
    """
    writer = subprocess.Popen([sys.executable, '-c', script], env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert writer.poll() is None, 'the writer exited before the write under test'
            assert time.time() < deadline, 'the writer never reached the write under test'
            time.sleep(0.05)
        if during is not None:
            during()
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.wait(timeout=30)
    assert writer.returncode == -signal.SIGKILL


def test_sigkill_during_checkpoint_write_keeps_previous_checkpoint(data_dir: Path, one_epoch_run: Path,
                                                                   two_epoch_run: tuple[Path, str], tmp_path: Path):
    shutil.copytree(one_epoch_run, tmp_path, dirs_exist_ok=True)
    checkpoint_path = tmp_path / 'checkpoint.pth.tar'
    before = checkpoint_path.read_bytes()
    best_before = (tmp_path / 'model_best.pth.tar').read_bytes()

    marker = tmp_path / 'writing'
    script = SLOW_SAVE.format(main=str(MAIN), marker=str(marker), checkpoint=str(checkpoint_path),
                              output=str(tmp_path))

    def writes_a_temporary_file() -> None:
        assert list(tmp_path.glob('.checkpoint.pth.tar.*.sgdrop-partial')), 'the write should be under way in a ' \
                                                                            'temporary file'

    kill_once_marked(script, marker, during=writes_a_temporary_file)

    assert checkpoint_path.read_bytes() == before
    assert (tmp_path / 'model_best.pth.tar').read_bytes() == best_before
    assert torch.load(checkpoint_path, map_location='cpu', weights_only=True)['epoch'] == 1
    # the killed run resumes from the last complete checkpoint
    run_recipe(str(data_dir), *TINY_RUN, '--epochs', '2', '--resume', str(checkpoint_path), '--output', str(tmp_path))
    assert [record['epoch'] for record in read_log(tmp_path)] == [1, 2]
    assert not list(tmp_path.glob('.*.sgdrop-partial')), "the resumed run removes the killed write's temporary file"
    assert_same_training_state(two_epoch_run[0] / 'checkpoint.pth.tar', checkpoint_path)


SLOW_BEST_COPY = """
import importlib.util, shutil, sys, time
from pathlib import Path
sys.path.insert(0, str(Path({main!r}).parent))
spec = importlib.util.spec_from_file_location("recipe_main", {main!r})
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)

def blocking_copy(src, dst):
    Path({marker!r}).touch()
    time.sleep(60)

checkpoint = recipe.RecipeCheckpoint.read(Path({checkpoint!r}))
checkpoint.epoch = checkpoint.best_epoch = 2
shutil.copyfileobj = blocking_copy  # save_checkpoint copies the new best checkpoint to model_best with it
recipe.save_checkpoint(checkpoint, True, Path({output!r}))
"""


def test_sigkill_while_copying_model_best_leaves_nothing_stale(data_dir: Path, one_epoch_run: Path, tmp_path: Path):
    shutil.copytree(one_epoch_run, tmp_path, dirs_exist_ok=True)
    checkpoint_path, best_path = tmp_path / 'checkpoint.pth.tar', tmp_path / 'model_best.pth.tar'
    marker = tmp_path / 'copying'
    kill_once_marked(SLOW_BEST_COPY.format(main=str(MAIN), marker=str(marker), checkpoint=str(checkpoint_path),
                                           output=str(tmp_path)), marker)
    # the fault: the checkpoint of the new best epoch is written, model_best still holds the previous best
    assert torch.load(checkpoint_path, map_location='cpu', weights_only=True)['best_epoch'] == 2
    assert torch.load(best_path, map_location='cpu', weights_only=True)['epoch'] == 1

    result = run_recipe(str(data_dir), *TINY_RUN, '--epochs', '2', '--resume', str(checkpoint_path), '--output',
                        str(tmp_path))
    assert f'{best_path} holds epoch 1, not the best epoch 2' in result.stdout
    assert best_path.read_bytes() == checkpoint_path.read_bytes()
    assert json.loads((tmp_path / 'config.json').read_text())['training']['epoch'] == 2
    assert not list(tmp_path.glob('.*.sgdrop-partial'))


def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_last_checkpoint(
        capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, data_dir: Path, one_epoch_run: Path,
        tmp_path: Path):
    run = tmp_path / 'run'
    shutil.copytree(one_epoch_run, run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    save = torch.save

    def save_onto_a_full_disk(state: Any, f: Any) -> None:
        class FullDisk(io.RawIOBase):
            written = 0

            def writable(self) -> bool:
                return True

            def write(self, data: Any) -> int:
                FullDisk.written += len(data)
                if FullDisk.written > 4096:
                    raise OSError(errno.ENOSPC, 'No space left on device')
                return f.write(data)
        save(state, FullDisk())

    monkeypatch.setattr(torch, 'save', save_onto_a_full_disk)
    with pytest.raises(SystemExit) as stopped:
        recipe.main([str(data_dir), *TINY_RUN, '--epochs', '2', '--output', str(run), '--resume',
                     str(run / 'checkpoint.pth.tar')])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f'error: cannot write {run / "checkpoint.pth.tar"} (No space left on device); the files written '
                     f'before it are intact: free some space there, or fix the folder (continue the run with --resume '
                     f'{run / "checkpoint.pth.tar"})']
    # the epoch-2 log line went first, as in a kill; the checkpoints are those of epoch 1, and no temporary file is left
    assert {name: data for name, data in before.items() if name != 'log.jsonl'} == {
        p.name: p.read_bytes() for p in run.iterdir() if p.name != 'log.jsonl'}
    assert [record['epoch'] for record in read_log(run)] == [1, 2]


def test_resume_keeps_a_model_best_its_checkpoint_cannot_replace(data_dir: Path, one_epoch_run: Path, tmp_path: Path):
    run = tmp_path / 'run'
    shutil.copytree(one_epoch_run, run)
    state = torch.load(run / 'checkpoint.pth.tar', map_location='cpu', weights_only=True)
    # an older checkpoint (epoch 2, best epoch 1) resumed beside the model_best of a later epoch
    torch.save(dict(state, epoch=2, best_epoch=1), run / 'checkpoint.pth.tar')
    torch.save(dict(state, epoch=9, best_epoch=9), run / 'model_best.pth.tar')
    best_before = (run / 'model_best.pth.tar').read_bytes()
    result = run_recipe(str(data_dir), *TINY_RUN, '--epochs', '2', '--output', str(run), '--resume',
                        str(run / 'checkpoint.pth.tar'))
    assert f'{run / "model_best.pth.tar"} holds epoch 9, not the best epoch 1' in result.stdout
    assert 'it is kept until this run has a better epoch' in result.stdout
    assert (run / 'model_best.pth.tar').read_bytes() == best_before


def test_sigkill_during_training_resumes_from_last_complete_epoch(data_dir: Path, tmp_path: Path):
    args = [str(data_dir), *TINY_RUN, '--epochs', '30', '--output', str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    run = subprocess.Popen([sys.executable, str(MAIN), *args], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / 'checkpoint.pth.tar').exists():
            assert run.poll() is None and time.time() < deadline, 'the run ended before its first checkpoint'
            time.sleep(0.05)
        time.sleep(0.5)  # into the next epoch, or its log line, or its checkpoint write: any moment will do
        run.send_signal(signal.SIGKILL)
    finally:
        run.wait(timeout=30)
    epoch = torch.load(tmp_path / 'checkpoint.pth.tar', map_location='cpu', weights_only=True)['epoch']
    assert 1 <= epoch < 30
    run_recipe(*args[:-4], '--epochs', str(epoch + 1), '--resume', str(tmp_path / 'checkpoint.pth.tar'),
               '--output', str(tmp_path))
    assert torch.load(tmp_path / 'checkpoint.pth.tar', map_location='cpu', weights_only=True)['epoch'] == epoch + 1
    # one log line per epoch, none repeated by the resumed run
    assert [record['epoch'] for record in read_log(tmp_path)] == list(range(1, epoch + 2))
    assert not list(tmp_path.glob('.*.sgdrop-partial'))


def run_bad_input(capsys: pytest.CaptureFixture, *args: str) -> str:
    """Runs main() in-process, checks it stops with exit code 2 before training, returns its one-line message."""
    with pytest.raises(SystemExit) as stopped, warnings.catch_warnings():
        warnings.simplefilter('error')  # a warning printed before the error would make it two lines
        recipe.main([*TINY_RUN, *args])
    assert stopped.value.code == 2
    captured = capsys.readouterr()
    assert '=> creating model' not in captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), captured.err
    return lines[0]


@pytest.mark.parametrize('flags, message', [
    (['--epochs', '0'], '--epochs 0: pass a positive number'),
    (['-b', '0'], '-b/--batch-size 0: pass a positive number'),
    (['-p', '0'], '-p/--print-freq 0: pass a positive number'),
    (['--image-size', '0'], '--image-size 0: pass a positive number'),
    (['--lr-step-size', '0'], '--lr-step-size 0: pass a positive number'),
    (['--lr', '-0.1'], '--lr -0.1: the learning rate must be a positive number'),
    (['--lr', 'inf'], '--lr inf: the learning rate must be a positive number'),
    (['--lr', 'nan'], '--lr nan: the learning rate must be a positive number'),
    (['--lr-gamma', 'nan'], '--lr-gamma nan: pass a positive factor'),
    (['--momentum', '-0.5'], '--momentum -0.5: pass a number in [0, 1)'),
    (['--wd', '-1'], '--wd -1.0: pass 0 or a positive number'),
    (['--wd', 'inf'], '--wd inf: pass 0 or a positive number'),
    (['--seed', '-1'], '--seed -1: pass a number in [0, 2**32)'),
    (['--image-size', '100000'], '--image-size 100000: larger than 4096 px'),
    (['-a', 'sgdrop_resnet10t.nope'], '--arch sgdrop_resnet10t.nope: no such pretrained tag; the tags of '
                                      'sgdrop_resnet10t are sgdrop_resnet10t.imagenette_128_ema_head, '
                                      'sgdrop_resnet10t.imagenette_128_ema_head_vanilla'),
    (['--pretrained'], '--pretrained: sgdrop_vgg_tiny has no pretrained weights; leave --pretrained out'),
    (['--model-kwargs', 'in_chans=1'], '--model-kwargs in_chans=1: the recipe reads every image as RGB, 3 channels'),
    (['--holdout-per-class', '-1'], '--holdout-per-class -1 is negative'),
    (['--evaluate'], '--evaluate needs weights to evaluate: pass --resume CHECKPOINT or --pretrained'),
    (['--evaluate', '--overwrite'], '--evaluate writes nothing, so --overwrite would only delete the run'),
    (['--sgdrop-rho-end', '2'], '--sgdrop-rho-end 2.0: sgdrop_rho_end must be in [0, 1)'),
    (['--regularizer', 'dropout', '--sgdrop-rho', '2'], '--sgdrop-rho 2.0: sgdrop_rho must be in [0, 1)'),
    (['--sgdrop-ema-decay', '1'], '--sgdrop-ema-decay 1.0: sgdrop_ema_decay must be a float in [0, 1)'),
    (['--latent-drop-rate', '1.5'], '--latent-drop-rate 1.5: latent_drop_rate must be a float in [0, 1)'),
    (['--dropout-p', '1.5'], '--latent-drop-rate 1.5: latent_drop_rate must be a float in [0, 1)'),
    (['--train-subset', '-20'], '--train-subset -20 is negative'),
    (['--train-subset-per-class', '-2'], '--train-subset-per-class -2 is negative'),
    (['--train-subset', '10', '--train-subset-per-class', '2'], '--train-subset and --train-subset-per-class both'),
    (['--start-epoch', '5', '--epochs', '1'], '--start-epoch 5 leaves nothing to train with --epochs 1'),
    (['--model-kwargs', 'sgdrop_rho=0.5'], '--model-kwargs sets sgdrop_rho, which the recipe sets from its own'),
    (['--model-kwargs', 'no_such_argument=1'], "--model-kwargs {'no_such_argument': 1}: sgdrop_vgg_tiny does not "
                                               "take them"),
    (['--model-kwargs', 'mlp_ratio=abc'], "--model-kwargs {'mlp_ratio': 'abc'}: sgdrop_vgg_tiny cannot be built with "
                                          "these values (invalid literal for int() with base 10:"),
])
def test_bad_arguments_stop_before_any_work(capsys: pytest.CaptureFixture, data_dir: Path, tmp_path: Path,
                                            flags: list[str], message: str):
    assert message in run_bad_input(capsys, str(data_dir), '--output', str(tmp_path / 'run'), *flags)
    assert not (tmp_path / 'run').exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the machines without a GPU')
def test_gpu_without_a_gpu(capsys: pytest.CaptureFixture, data_dir: Path, tmp_path: Path):
    message = run_bad_input(capsys, str(data_dir), '--output', str(tmp_path), '--gpu', '0')
    assert '--gpu 0: no CUDA GPU is visible; leave --gpu out' in message


def test_output_that_is_a_file_or_not_writable(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                                               data_dir: Path, tmp_path: Path):
    (tmp_path / 'file').write_text('')
    message = run_bad_input(capsys, str(data_dir), '--output', str(tmp_path / 'file'))
    assert message == f'error: --output {tmp_path / "file"} is a file; pass a folder.'
    (tmp_path / 'locked').mkdir(mode=0o500)
    if os.geteuid() == 0:  # root writes anywhere: the permission check is what answers here
        monkeypatch.setattr(os, 'access', lambda path, mode: Path(path) != tmp_path / 'locked')
    message = run_bad_input(capsys, str(data_dir), '--output', str(tmp_path / 'locked' / 'run'))
    assert message == (f'error: --output {tmp_path / "locked" / "run"}: {tmp_path / "locked"} is not writable; pass a '
                       f'folder you can write to.')


def test_overwrite_replaces_every_file_of_the_previous_run(data_dir: Path, two_epoch_run: tuple[Path, str],
                                                          tmp_path: Path):
    run = tmp_path / 'run'
    shutil.copytree(two_epoch_run[0], run)
    run_recipe(str(data_dir), *TINY_RUN, '--epochs', '1', '--seed', '1', '--output', str(run), '--overwrite')
    assert [record['epoch'] for record in read_log(run)] == [1]
    for name in ('checkpoint.pth.tar', 'model_best.pth.tar'):
        state = torch.load(run / name, map_location='cpu', weights_only=True)
        assert (state['epoch'], state['best_epoch'], state['settings']['seed']) == (1, 1, 1), name
    export = json.loads((run / 'config.json').read_text())
    assert export['training']['epoch'] == 1


def test_a_new_run_never_replaces_another_run(capsys: pytest.CaptureFixture, data_dir: Path, one_epoch_run: Path,
                                              tmp_path: Path):
    shutil.copytree(one_epoch_run, tmp_path / 'run')
    before = {p.name: p.read_bytes() for p in (tmp_path / 'run').iterdir() if p.is_file()}
    message = run_bad_input(capsys, str(data_dir), '--epochs', '1', '--output', str(tmp_path / 'run'))
    assert 'holds another run (log.jsonl, checkpoint.pth.tar, model_best.pth.tar' in message
    assert f"--resume {tmp_path / 'run' / 'checkpoint.pth.tar'}" in message and '--overwrite' in message
    assert {p.name: p.read_bytes() for p in (tmp_path / 'run').iterdir() if p.is_file()} == before


def test_a_run_killed_before_its_first_checkpoint_is_not_offered_as_a_resume(capsys: pytest.CaptureFixture,
                                                                             data_dir: Path, tmp_path: Path):
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'log.jsonl').write_text('')
    message = run_bad_input(capsys, str(data_dir), '--epochs', '1', '--output', str(tmp_path / 'run'))
    assert message == (f"error: --output {tmp_path / 'run'} holds another run (log.jsonl); choose a new --output, or "
                       'pass --overwrite to replace it')


def test_an_output_below_a_file_is_refused_in_one_line(capsys: pytest.CaptureFixture, data_dir: Path, tmp_path: Path):
    (tmp_path / 'notes').write_text('mine\n')
    message = run_bad_input(capsys, str(data_dir), '--epochs', '1', '--output', str(tmp_path / 'notes' / 'run'))
    assert message == (f"error: --output {tmp_path / 'notes' / 'run'}: {tmp_path / 'notes'} is a file, so nothing can "
                       'be created in it; pass a folder in a folder.')
    assert (tmp_path / 'notes').read_text() == 'mine\n'


def test_a_folder_in_use_by_another_run_is_refused(capsys: pytest.CaptureFixture, data_dir: Path, tmp_path: Path):
    run = tmp_path / 'run'
    with folder_held_by_another_process(run) as pid:
        assert run_bad_input(capsys, str(data_dir), '--epochs', '1', '--output', str(run)) == (
            f'error: {run} is in use by another run or fine-tune (pid {pid}), which writes there; wait for it to end, '
            f'or write into another folder')
        assert sorted(p.name for p in run.iterdir()) == ['.sgdrop-zoo.lock']
    # killed (-9), the holder left its lock file, which no longer holds the folder; a finished run removes it
    run_recipe(str(data_dir), *TINY_RUN, '--epochs', '1', '--output', str(run))
    assert sorted(p.name for p in run.iterdir()) == ['checkpoint.pth.tar', 'config.json', 'log.jsonl',
                                                    'model.safetensors', 'model_best.pth.tar']


def test_missing_data_folder(capsys: pytest.CaptureFixture, tmp_path: Path):
    message = run_bad_input(capsys, str(tmp_path / 'nowhere'))
    assert 'nowhere does not exist' in message and 'train/<class>/<image>' in message


def test_empty_data_folder(capsys: pytest.CaptureFixture, tmp_path: Path):
    assert 'train does not exist' in run_bad_input(capsys, str(tmp_path))
    (tmp_path / 'train').mkdir()
    (tmp_path / 'val').mkdir()
    assert 'has no class folders' in run_bad_input(capsys, str(tmp_path))
    (tmp_path / 'train' / 'cat').mkdir()
    (tmp_path / 'val' / 'cat').mkdir()
    assert 'holds no images' in run_bad_input(capsys, str(tmp_path))


def test_empty_or_hidden_class_folder(capsys: pytest.CaptureFixture, data_dir: Path, tmp_path: Path):
    shutil.copytree(data_dir, tmp_path / 'data')
    (tmp_path / 'data' / 'val' / 'zebra').mkdir()
    (tmp_path / 'data' / 'train' / 'zebra').mkdir()
    assert f"class folder {tmp_path / 'data' / 'train' / 'zebra'} holds no images" in run_bad_input(
        capsys, str(tmp_path / 'data'))
    for split in ('train', 'val'):
        (tmp_path / 'data' / split / 'zebra').rmdir()
    (tmp_path / 'data' / 'train' / '.ipynb_checkpoints').mkdir()
    message = run_bad_input(capsys, str(tmp_path / 'data'))
    assert f"{tmp_path / 'data' / 'train' / '.ipynb_checkpoints'} is a hidden folder" in message
    assert 'move it out of' in message


def test_class_in_train_but_not_in_val(capsys: pytest.CaptureFixture, data_dir: Path, tmp_path: Path):
    shutil.copytree(data_dir, tmp_path / 'data')
    shutil.rmtree(tmp_path / 'data' / 'val' / 'frog')
    message = run_bad_input(capsys, str(tmp_path / 'data'))
    assert "only in train: ['frog']" in message and 'needs a folder in both' in message


def test_unreadable_image(capsys: pytest.CaptureFixture, data_dir: Path, tmp_path: Path):
    shutil.copytree(data_dir, tmp_path / 'data')
    broken = tmp_path / 'data' / 'train' / 'cat' / 'broken.jpg'
    broken.write_bytes(b'not a jpeg')
    message = run_bad_input(capsys, str(tmp_path / 'data'))
    assert f'unreadable image {broken}' in message and 'delete or replace it' in message


@pytest.mark.parametrize('workers', ['0', '2'])
def test_image_cut_short_after_its_header_stops_the_run_in_one_line(data_dir: Path, tmp_path: Path, workers: str):
    """The header check before training passes it; decoding fails mid-epoch, in a DataLoader worker or not."""
    shutil.copytree(data_dir, tmp_path / 'data')
    cut = tmp_path / 'data' / 'train' / 'cat' / 'cut.jpg'
    whole = next((tmp_path / 'data' / 'train' / 'cat').iterdir()).read_bytes()
    cut.write_bytes(whole[:-50])
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, str(MAIN), str(tmp_path / 'data'), *TINY_RUN, '-j', workers, '--epochs',
                             '1', '--output', str(tmp_path / 'run')], capture_output=True, text=True, env=env,
                            timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 2, result.stderr
    assert '=> creating model' in result.stdout  # it failed in training, not in the checks before it
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'error: unreadable image {cut} (image file is truncated ('), lines
    assert lines[0].endswith('; delete or replace it and rerun')


def test_resume_with_other_model_kwargs(capsys: pytest.CaptureFixture, data_dir: Path, one_epoch_run: Path):
    message = run_bad_input(capsys, str(data_dir), '--epochs', '2', '--model-kwargs', 'mlp_ratio=0.125', '--resume',
                            str(one_epoch_run / 'checkpoint.pth.tar'), '--output', str(one_epoch_run))
    assert "was built with --model-kwargs {}, not {'mlp_ratio': 0.125}; pass the same --model-kwargs" in message


def test_resume_from_nothing(capsys: pytest.CaptureFixture, data_dir: Path, tmp_path: Path):
    message = run_bad_input(capsys, str(data_dir), '--resume', str(tmp_path / 'missing.pth.tar'))
    assert 'no such checkpoint file' in message


def test_resume_from_a_corrupt_checkpoint(capsys: pytest.CaptureFixture, data_dir: Path, tmp_path: Path):
    truncated = tmp_path / 'checkpoint.pth.tar'
    torch.save({'arch': 'sgdrop_vgg_tiny', 'state_dict': {'w': torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    message = run_bad_input(capsys, str(data_dir), '--resume', str(truncated))
    assert f'--resume {truncated}: not a readable checkpoint (truncated, or not written by torch.save)' in message
    assert message.endswith('pass an intact checkpoint.pth.tar or model_best.pth.tar of a run.')
    assert 'weights_only' not in message


def test_resume_from_another_architecture(capsys: pytest.CaptureFixture, data_dir: Path, one_epoch_run: Path,
                                          tmp_path: Path):
    other = tmp_path / 'checkpoint.pth.tar'
    checkpoint = torch.load(one_epoch_run / 'checkpoint.pth.tar', map_location='cpu', weights_only=True)
    torch.save(dict(checkpoint, settings=dict(checkpoint['settings'], arch='sgdrop_cifar_cnn')), other)
    message = run_bad_input(capsys, str(data_dir), '--resume', str(other))
    assert "holds a 'sgdrop_cifar_cnn' model, not 'sgdrop_vgg_tiny'" in message and '-a sgdrop_cifar_cnn' in message


def test_resume_from_a_checkpoint_of_weights_only(capsys: pytest.CaptureFixture, data_dir: Path, tmp_path: Path):
    weights = tmp_path / 'weights.pth.tar'
    torch.save({'arch': 'sgdrop_vgg_tiny', 'state_dict': {}}, weights)
    message = run_bad_input(capsys, str(data_dir), '--resume', str(weights), '--output', str(tmp_path))
    assert message == (f'error: --resume {weights}: not a checkpoint of train/main.py (no epoch, acc1, best_acc1, '
                       f'best_epoch, class_names, settings, sgdrop_ema, optimizer, scheduler, scaler, rng_state); '
                       f'pass the checkpoint.pth.tar or model_best.pth.tar of a run.')


@pytest.mark.parametrize('flags, message', [
    (['--regularizer', 'none'], 'was trained with --regularizer sgdrop, not none; pass --regularizer sgdrop'),
    (['--image-size', '48'], 'was trained with --image-size 32, not 48; pass --image-size 32 to continue it'),
    (['--optimizer', 'sgd'], 'was trained with --optimizer adam, not sgd'),
    (['--sgdrop-rho', '0.05'], 'was trained with --sgdrop-rho 0.01, not 0.05'),
    (['--sgdrop-attribution-relu', 'product'], 'was trained with --sgdrop-attribution-relu gradient, not product'),
])
def test_resume_refuses_a_changed_run_setting(capsys: pytest.CaptureFixture, data_dir: Path, one_epoch_run: Path,
                                              tmp_path: Path, flags: list[str], message: str):
    run = tmp_path / 'run'
    shutil.copytree(one_epoch_run, run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert message in run_bad_input(capsys, str(data_dir), '--epochs', '2', '--resume', str(run / 'checkpoint.pth.tar'),
                                    '--output', str(run), *flags)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_resume_keeps_the_schedule_of_a_curriculum(capsys: pytest.CaptureFixture, data_dir: Path, tmp_path: Path):
    # rho grows over --epochs: a resume with more epochs would change the rho of the epochs already trained
    run = tmp_path / 'run'
    curriculum = ['--sgdrop-rho', '0', '--sgdrop-rho-end', '0.05']
    run_recipe(str(data_dir), *TINY_RUN, '--epochs', '1', *curriculum, '--output', str(run))
    assert run_bad_input(capsys, str(data_dir), '--epochs', '2', *curriculum, '--resume',
                         str(run / 'checkpoint.pth.tar'), '--output', str(run)) == (
        f"error: --resume {run / 'checkpoint.pth.tar'} was trained with --epochs 1, not 2; pass --epochs 1 to continue "
        f'it, or start a new run in another --output')


def test_evaluate_on_a_dev_split_the_run_did_not_hold_out_is_refused(capsys: pytest.CaptureFixture, data_dir: Path,
                                                                    one_epoch_run: Path):
    resume = one_epoch_run / 'checkpoint.pth.tar'
    assert run_bad_input(capsys, str(data_dir), '--evaluate', '--holdout-per-class', '1', '--resume', str(resume),
                         '--output', str(one_epoch_run)) == (
        f'error: --evaluate --holdout-per-class 1: {resume} was trained with --holdout-per-class 0, so this dev split '
        f'holds images it trained on; pass --holdout-per-class 0 (val/)')


def test_resume_from_an_older_checkpoint_of_its_own_folder_is_refused(capsys: pytest.CaptureFixture, data_dir: Path,
                                                                      one_epoch_run: Path,
                                                                      two_epoch_run: tuple[Path, str], tmp_path: Path):
    # the folder's last checkpoint is epoch 2, its model_best.pth.tar epoch 1 (the same seeded run's first epoch)
    run = tmp_path / 'run'
    shutil.copytree(two_epoch_run[0], run)
    shutil.copyfile(one_epoch_run / 'checkpoint.pth.tar', run / 'model_best.pth.tar')
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert run_bad_input(capsys, str(data_dir), '--epochs', '3', '--resume', str(run / 'model_best.pth.tar'),
                         '--output', str(run)) == (
        f"error: --resume {run / 'model_best.pth.tar'} holds epoch 1, and {run / 'checkpoint.pth.tar'} of the same "
        f"run epoch 2, which training on from it would replace; resume from {run / 'checkpoint.pth.tar'}, or copy "
        f'model_best.pth.tar into a new --output to train on from it there')
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    # a last checkpoint that cannot be read cannot be judged: refused, naming it
    (run / 'checkpoint.pth.tar').write_text('not a checkpoint')
    assert run_bad_input(capsys, str(data_dir), '--epochs', '3', '--resume', str(run / 'model_best.pth.tar'),
                         '--output', str(run)) == (
        f"error: --resume {run / 'model_best.pth.tar'}: the run's last checkpoint cannot be read, so whether training "
        f"on would replace later epochs cannot be told; move it aside, or copy model_best.pth.tar into a new --output "
        f"({run / 'checkpoint.pth.tar'}: not a readable checkpoint (truncated, or not written by torch.save); pass an "
        f"intact checkpoint.pth.tar or model_best.pth.tar of a run.)")


def test_resume_never_writes_into_another_run(capsys: pytest.CaptureFixture, data_dir: Path, one_epoch_run: Path,
                                              two_epoch_run: tuple[Path, str], tmp_path: Path):
    other = tmp_path / 'other'
    shutil.copytree(two_epoch_run[0], other)
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    message = run_bad_input(capsys, str(data_dir), '--epochs', '2', '--resume',
                            str(one_epoch_run / 'checkpoint.pth.tar'), '--output', str(other))
    assert message == (f"error: --output {other} holds another run (log.jsonl, checkpoint.pth.tar, model_best.pth.tar, "
                       f"model.safetensors, config.json) than the resumed {one_epoch_run / 'checkpoint.pth.tar'}; "
                       f"resume into its own folder (--output {one_epoch_run}) or into a new one")
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before


def test_a_run_removes_only_the_temporary_files_it_made(data_dir: Path, one_epoch_run: Path, tmp_path: Path):
    # a user's hidden files that look temporary, beside a partial checkpoint write of a killed run
    (tmp_path / '.draft.tmp').write_text('draft')
    (tmp_path / '.notes.tmp').mkdir()
    (tmp_path / '.notes.tmp' / 'todo.txt').write_text('todo')
    (tmp_path / '.checkpoint.pth.tar.x1y2.sgdrop-partial').write_bytes(b'partial')
    run_recipe(str(data_dir), *TINY_RUN, '--epochs', '1', '--evaluate', '--resume',
               str(one_epoch_run / 'checkpoint.pth.tar'), '--output', str(tmp_path))
    assert (tmp_path / '.checkpoint.pth.tar.x1y2.sgdrop-partial').exists(), '--evaluate deletes nothing'
    run_recipe(str(data_dir), *TINY_RUN, '--epochs', '1', '--output', str(tmp_path))
    assert (tmp_path / '.draft.tmp').read_text() == 'draft'
    assert (tmp_path / '.notes.tmp' / 'todo.txt').read_text() == 'todo'
    assert not (tmp_path / '.checkpoint.pth.tar.x1y2.sgdrop-partial').exists()


def test_a_diverging_run_stops_in_one_line_and_exports_nothing(data_dir: Path, tmp_path: Path):
    # Adam moves every weight by about lr per step: at lr 1e30 the logits overflow by the second step
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, str(MAIN), str(data_dir), *TINY_RUN, '--lr', '1e30', '--epochs', '2',
                             '--output', str(tmp_path)], capture_output=True, text=True, timeout=300, env=env,
                            cwd=REPO_ROOT)
    assert result.returncode == 2
    assert result.stderr.strip() == ('error: the training loss is not finite from epoch 1, step 2 on: the weights have '
                                     'diverged, and nothing of this epoch was saved; start again with a lower --lr '
                                     'than 1e+30')
    assert not (tmp_path / 'model.safetensors').exists() and not (tmp_path / 'checkpoint.pth.tar').exists()


def test_a_run_that_diverges_in_its_last_step_exports_nothing(data_dir: Path, tmp_path: Path):
    # one step an epoch (40 images, batch 64): its loss is finite, the weights it leaves are not usable
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, str(MAIN), str(data_dir), *TINY_RUN, '-b', '64', '--lr', '1e30',
                             '--epochs', '1', '--output', str(tmp_path)], capture_output=True, text=True, timeout=300,
                            env=env, cwd=REPO_ROOT)
    assert result.returncode == 2
    assert result.stderr.strip() == ('error: the validation loss is not finite after epoch 1: the weights have '
                                     'diverged, and nothing of this epoch was saved; start again with a lower --lr '
                                     'than 1e+30')
    assert not (tmp_path / 'model.safetensors').exists() and not (tmp_path / 'checkpoint.pth.tar').exists()


def test_a_full_disk_during_the_export_stops_in_one_line(monkeypatch: pytest.MonkeyPatch, data_dir: Path,
                                                         one_epoch_run: Path, tmp_path: Path):
    import safetensors.torch
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')

    monkeypatch.setattr(safetensors.torch, 'save_file', full_disk)
    args = recipe.parse_args([str(data_dir), *TINY_RUN, '--output', str(tmp_path)])
    class_names = torch.load(one_epoch_run / 'checkpoint.pth.tar', map_location='cpu', weights_only=True)['class_names']
    with pytest.raises(recipe.RecipeError) as refused:
        recipe.export_for_hub(one_epoch_run / 'model_best.pth.tar', tmp_path, args, class_names)
    assert str(refused.value) == (f'cannot write {tmp_path / "model.safetensors"} (Error while serializing: I/O '
                                  f'error: No space left on device (os error 28)); nothing of the export was written: '
                                  f'free some space there, or fix the folder, then resume the run, which exports '
                                  f'again (the checkpoints are intact)')
    assert list(tmp_path.iterdir()) == []


def test_nothing_that_is_not_finite_is_exported(tmp_path: Path):
    from sgdrop_zoo.export import save_export
    model = timm.create_model('sgdrop_vgg_tiny', num_classes=3)
    with torch.no_grad():
        model.head.fc.weight[0, 0] = float('nan')
    with pytest.raises(ValueError, match='head.fc.weight holds NaN or infinite values'):
        save_export(model, tmp_path, ['a', 'b', 'c'], 32, 'resize', 'sgdrop', model.sgdrop_cfg, {})
    assert list(tmp_path.iterdir()) == []


def test_a_link_out_of_its_class_folder_is_refused(capsys: pytest.CaptureFixture, data_dir: Path, tmp_path: Path):
    data = tmp_path / 'data'
    shutil.copytree(data_dir, data)
    (data / 'train' / 'cat' / 'loop').symlink_to('..')
    message = run_bad_input(capsys, str(data), '--output', str(tmp_path / 'run'))
    assert message == (f"error: {data / 'train' / 'cat' / 'loop'} is a link to {(data / 'train').resolve()}, outside "
                       f"its class folder {data / 'train' / 'cat'}: ImageFolder would take what it leads to as images "
                       f"of this class; remove the link or copy the images in")
    (data / 'train' / 'cat' / 'loop').unlink()
    (data / 'train' / 'cat' / 'plane.jpg').symlink_to(next((data / 'train' / 'airplane').iterdir()))
    assert 'outside its class folder' in run_bad_input(capsys, str(data), '--output', str(tmp_path / 'run'))
    (data / 'train' / 'cat' / 'plane.jpg').unlink()
    # a loop that stays inside the class folder: a subfolder with a link to itself
    sub = data / 'train' / 'cat' / 'sub'
    sub.mkdir()
    for image in sorted((data / 'train' / 'cat').glob('*.jpg'))[:2]:
        image.rename(sub / image.name)
    (sub / 'loop').symlink_to('.')
    assert run_bad_input(capsys, str(data), '--output', str(tmp_path / 'run')) == (
        f'error: {sub / "loop"} is a link to {sub.resolve()}, a folder that holds it: ImageFolder would list its '
        f'images again and again; remove the link')
    assert not (tmp_path / 'run').exists()


def test_a_train_subset_larger_than_the_training_split_is_refused(data_dir: Path):
    from sgdrop_zoo.data import DatasetError
    from recipe_data import build_loaders  # train/recipe_data.py
    with pytest.raises(DatasetError, match='^100000 training images asked for, but the training split has only 40; '):
        build_loaders(data_dir, 32, 'resize', (0.5,) * 3, (0.5,) * 3, 8, 0, torch.device('cpu'), train_subset=100000)
    assert len(build_loaders(data_dir, 32, 'resize', (0.5,) * 3, (0.5,) * 3, 8, 0, torch.device('cpu'),
                             train_subset=40).train.dataset) == 40


def test_model_kwargs_used_only_in_the_forward_are_checked_before_any_work(capsys: pytest.CaptureFixture,
                                                                           data_dir: Path, tmp_path: Path):
    # ResNet's drop_rate is only read in its forward: the eval-mode forward on the meta device catches it
    message = run_bad_input(capsys, str(data_dir), '-a', 'sgdrop_resnet10t', '--model-kwargs', 'drop_rate=abc',
                            '--output', str(tmp_path / 'run'))
    assert message == ("error: --model-kwargs {'drop_rate': 'abc'}: sgdrop_resnet10t cannot be built with these "
                       "values (could not convert string to float: 'abc'); pass values of the types its arguments take")
    assert not (tmp_path / 'run').exists()


def test_log_area_ratio_beyond_the_val_split(capsys: pytest.CaptureFixture, data_dir: Path, num_val: int):
    message = run_bad_input(capsys, str(data_dir), '--log-area-ratio', str(num_val + 1))
    assert f'--log-area-ratio {num_val + 1} asks for more images than the {num_val}' in message
    assert f'pass at most {num_val}' in message
    assert 'is negative' in run_bad_input(capsys, str(data_dir), '--log-area-ratio', '-1')


def test_val_subset_beyond_the_val_split(capsys: pytest.CaptureFixture, data_dir: Path, num_val: int):
    message = run_bad_input(capsys, str(data_dir), '--val-subset', str(num_val + 1))
    assert f'--val-subset {num_val + 1} asks for more images than the {num_val}' in message
    assert 'is negative' in run_bad_input(capsys, str(data_dir), '--val-subset', '-1')
    message = run_bad_input(capsys, str(data_dir), '--val-subset', '5', '--log-area-ratio', '6')
    assert '--log-area-ratio 6 is larger than --val-subset 5' in message


def test_unknown_arch(capsys: pytest.CaptureFixture, data_dir: Path):
    with pytest.raises(SystemExit) as stopped:
        recipe.main([str(data_dir), *TINY_RUN, '-a', 'sgdrop_resnet5'])
    assert stopped.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: unknown --arch 'sgdrop_resnet5'") and 'sgdrop_resnet50' in message
    assert '\n' not in message


def test_presets_are_plain_data_and_command_line_wins():
    args = recipe.parse_args(['data', '--preset', 'lowdata', '-a', 'sgdrop_convnext_tiny'])
    assert (args.optimizer, args.lr, args.epochs, args.train_transform, args.sgdrop_rho) == (
        'adam', 1e-4, 80, 'resize', 0.1)
    assert recipe.parse_args(['data', '--preset', 'lowdata', '-a', 'sgdrop_vgg16']).sgdrop_rho == 0.01
    args = recipe.parse_args(['data', '--preset', 'lowdata', '--epochs', '3', '--sgdrop-rho', '0.02'])
    assert (args.epochs, args.sgdrop_rho) == (3, 0.02)
    official = recipe.parse_args([])
    assert (official.data, official.epochs, official.batch_size, official.lr, official.momentum,
            official.weight_decay, official.optimizer, official.lr_step_size, official.lr_gamma) == (
        'imagenet', 90, 256, 0.1, 0.9, 1e-4, 'sgd', 30, 0.1)


@pytest.mark.parametrize('regularizer, rho, drop_rate, attribution', [
    ('sgdrop', 0.01, 0.0, 'ema'),
    ('dropout', 0.0, 0.3, 'online'),
    ('none', 0.0, 0.0, 'online'),
])
@pytest.mark.parametrize('arch', ['sgdrop_vgg_tiny', 'resnet18'])
def test_regularizer_builds_the_paper_baselines_on_any_timm_arch(arch: str, regularizer: str, rho: float,
                                                                 drop_rate: float, attribution: str):
    args = recipe.parse_args(['data', '-a', arch, '--regularizer', regularizer, '--latent-drop-rate', '0.3'])
    model = recipe.create_model(args, num_classes=3)
    assert sgdrop_zoo.is_sgdrop_model(model)
    assert (model.sgdrop_rho, model.latent_drop_rate, model.sgdrop_cfg.model_args()['sgdrop_attribution']) == (
        rho, drop_rate, attribution)
    assert model.num_classes == 3


def test_env_dist_url_without_torchrun(capsys: pytest.CaptureFixture, data_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    assert 'start the script with torchrun' in run_bad_input(capsys, str(data_dir), '--dist-url', 'env://')


def test_resume_drops_an_incomplete_last_log_line(data_dir: Path, one_epoch_run: Path, tmp_path: Path):
    run = tmp_path / 'run'
    shutil.copytree(one_epoch_run, run)
    log = run / 'log.jsonl'
    log.write_text(log.read_text() + '{"epoch": 2, "train_lo')  # killed while appending epoch 2's line
    run_recipe(str(data_dir), *TINY_RUN, '--epochs', '2', '--output', str(run), '--resume',
               str(run / 'checkpoint.pth.tar'))
    assert [record['epoch'] for record in read_log(run)] == [1, 2]


def test_resume_refuses_a_log_line_whose_epoch_is_not_a_number(capsys: pytest.CaptureFixture, data_dir: Path,
                                                                one_epoch_run: Path, tmp_path: Path):
    run = tmp_path / 'run'
    shutil.copytree(one_epoch_run, run)
    record = read_log(run)[0]
    (run / 'log.jsonl').write_text(json.dumps(dict(record, epoch='1')) + '\n' + json.dumps(record) + '\n')
    message = run_bad_input(capsys, str(data_dir), '--epochs', '2', '--resume', str(run / 'checkpoint.pth.tar'),
                            '--output', str(run))
    assert message == (f'error: {run / "log.jsonl"}: line 1 is not an epoch record; delete or repair that line, '
                       f'then resume again')


def test_resume_names_a_damaged_log_line(capsys: pytest.CaptureFixture, data_dir: Path, one_epoch_run: Path,
                                         tmp_path: Path):
    run = tmp_path / 'run'
    shutil.copytree(one_epoch_run, run)
    log = run / 'log.jsonl'
    log.write_text('garbage\n' + log.read_text())
    message = run_bad_input(capsys, str(data_dir), '--epochs', '2', '--output', str(run), '--resume',
                            str(run / 'checkpoint.pth.tar'))
    assert f'{log}: line 1 is not an epoch record; delete or repair that line' in message


def test_resume_rebuilds_a_missing_model_best(data_dir: Path, one_epoch_run: Path, tmp_path: Path):
    run = tmp_path / 'run'
    shutil.copytree(one_epoch_run, run)
    (run / 'model_best.pth.tar').unlink()  # a run killed while copying it
    (run / 'model.safetensors').unlink()
    result = run_recipe(str(data_dir), *TINY_RUN, '--epochs', '2', '--output', str(run), '--resume',
                        str(run / 'checkpoint.pth.tar'))
    assert f"{run / 'model_best.pth.tar'} is missing" in result.stdout and 'copied again from' in result.stdout
    best = torch.load(run / 'model_best.pth.tar', map_location='cpu', weights_only=True)
    assert best['epoch'] in (1, 2) and (run / 'model.safetensors').exists()
    assert oct((run / 'checkpoint.pth.tar').stat().st_mode & 0o777) == '0o644'
    assert oct((run / 'model.safetensors').stat().st_mode & 0o777) == '0o644'
