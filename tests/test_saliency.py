"""Attribution area ratio, neuron coverage, Grad-CAM grid and training-curve plots, on CPU."""
import json
import shlex
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image
from timm.models import save_for_hf

import sgdrop_zoo  # noqa: F401  (registers sgdrop_vgg_tiny)
from sgdrop_zoo.cli import main as cli_main
from sgdrop_zoo.data import DatasetError
from sgdrop_zoo.errors import OptionError
from sgdrop_zoo.plots import plot_runs
from sgdrop_zoo.run_files import RunFileError
from sgdrop_zoo.saliency import (
    GRID_CELL_PX,
    attribution_area_ratio,
    check_grad_cam_support,
    grad_cam_maps,
    grid_figure,
    neuron_coverage,
    saliency_report,
)

from conftest import SMALL_CLASSES, make_image_folder


def test_area_ratio_of_a_hand_built_map():
    maps = torch.zeros(3, 4, 5)
    maps[0, 0, :3] = 4.0          # 3 pixels at the maximum
    maps[0, 1, 0] = 2.0           # exactly half the maximum: not above 0.5
    maps[0, 2, 0] = 2.5           # above
    maps[1] = 0.75                # constant: every pixel is the maximum
    # 4 of 20 pixels; an all-zero map attributes nothing
    assert torch.equal(attribution_area_ratio(maps), torch.tensor([4 / 20, 1.0, 0.0]))


class HandNet(nn.Module):
    """forward_features: conv (weights fixed) + ReLU; forward_head: mean pool + ReLU on a fixed linear layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(2, 3)
        self.head_act = nn.ReLU()
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.conv.bias.zero_()
            self.fc.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]]))
            self.fc.bias.zero_()

    def forward_features(self, x):
        return self.act(self.conv(x))

    def forward_head(self, z):
        return self.head_act(self.fc(z.mean((2, 3))))


def test_neuron_coverage_matches_a_hand_count():
    x = torch.tensor([[1.0, -2.0], [3.0, 0.0]]).view(1, 1, 2, 2)
    # channel 0 = relu(x): 2 of 4 positive; channel 1 = relu(-x): 1 of 4 positive -> z: 3 of 8
    # head: fc = [mean(ch0), -mean(ch0), 0] = [1, -1, 0] -> relu: 1 of 3 positive
    coverage = neuron_coverage(HandNet(), [(x, torch.tensor([0]))])
    assert coverage == {'global': (3 + 1) / (8 + 3), 'last_conv': 3 / 8}


def test_grad_cam_follows_the_class_evidence():
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 0, 0] = 1.0  # only one pixel carries class-0 evidence
    maps = grad_cam_maps(HandNet(), x, torch.tensor([0]))
    assert maps.shape == (1, 4, 4) and maps[0, 0, 0] == maps.max() > 0
    assert attribution_area_ratio(maps)[0] < 0.5


class MlpNet(nn.Module):
    """A classifier split into encoder and head, with no convolution."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4), nn.ReLU())
        self.fc = nn.Linear(4, 2)

    def forward_features(self, x):
        return self.encoder(x)

    def forward_head(self, z):
        return self.fc(z)


def test_no_conv_layer_is_a_clear_error():
    with pytest.raises(ValueError, match='no convolutional layer in its encoder'):
        check_grad_cam_support(MlpNet(), 8)


def test_saliency_report_json_table_and_grid(small_data: Path, tmp_path: Path):
    classes = ['airplane', 'automobile', 'bird']
    names = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        folder = tmp_path / f'model{seed}'
        save_for_hf(timm.create_model('sgdrop_vgg_tiny', num_classes=3), folder,
                    model_config=dict(label_names=classes), safe_serialization=True)
        names.append(str(folder))
    results = saliency_report(names, small_data, tmp_path / 'out', image_size=32, grid_images=3, workers=0)
    saved = json.loads((tmp_path / 'out' / 'saliency.json').read_text())
    assert saved == results and list(saved['models']) == names
    for metrics in saved['models'].values():
        assert metrics['images'] == 6 and 0 <= metrics['area_ratio'] <= 1 and 0 <= metrics['acc1'] <= 100
        assert 0 <= metrics['coverage_global'] <= 1 and 0 <= metrics['coverage_last_conv'] <= 1
    with Image.open(tmp_path / 'out' / 'saliency_grid.png') as grid:
        # input + 2 models, 3 rows, below the header of the models' names
        assert grid.size == (3 * 160, 3 * 160 + 72)


def test_saliency_report_fixed_subset_and_labels(small_data: Path, tmp_path: Path):
    folder = tmp_path / 'model'
    torch.manual_seed(0)
    save_for_hf(timm.create_model('sgdrop_vgg_tiny', num_classes=3), folder,
                model_config=dict(label_names=['airplane', 'automobile', 'bird']), safe_serialization=True)
    kwargs = dict(image_size=32, grid_images=2, workers=0, num_images=4)
    results = saliency_report([str(folder), str(folder)], small_data, tmp_path / 'a', labels=['first', 'second'],
                              **kwargs)
    assert list(results['models']) == ['first', 'second']
    first, second = results['models'].values()
    assert first == second and first['images'] == 4 and first['source'] == str(folder)
    # the subset is fixed: a second call measures the same images
    assert saliency_report([str(folder)], small_data, tmp_path / 'b', **kwargs)['models'][str(folder)] == first
    with pytest.raises(OptionError, match=r'^num_images 7 is more than the 6 images of .*; pass at most 6\.$'):
        saliency_report([str(folder)], small_data, tmp_path / 'c', **{**kwargs, 'num_images': 7})
    with pytest.raises(ValueError, match='one label per model'):
        saliency_report([str(folder)], small_data, tmp_path / 'c', labels=['a', 'b'], **kwargs)


def test_the_grid_is_titled_with_the_described_class_names(monkeypatch: pytest.MonkeyPatch, small_data: Path,
                                                          tmp_path: Path):
    folder = tmp_path / 'model'
    save_for_hf(timm.create_model('sgdrop_vgg_tiny', num_classes=3), folder, safe_serialization=True, model_config=dict(
        label_names=['airplane', 'automobile', 'bird'],
        label_descriptions={'airplane': 'airliner, jet', 'automobile': 'car', 'bird': 'songbird'}))
    titles = []
    monkeypatch.setattr(sgdrop_zoo.saliency, 'saliency_grid', lambda *args: titles.append(args[4]))
    saliency_report([str(folder)], small_data, tmp_path / 'out', image_size=32, grid_images=2, workers=0)
    # the first words of each description, in label order
    assert titles == [['airliner', 'car', 'songbird']]


def test_saliency_command_records_itself(small_data: Path, tmp_path: Path):
    folder = tmp_path / 'model'
    save_for_hf(timm.create_model('sgdrop_vgg_tiny', num_classes=3), folder,
                model_config=dict(label_names=['airplane', 'automobile', 'bird']), safe_serialization=True)
    argv = ['saliency', '--model', str(folder), '--data', str(small_data), '--output', str(tmp_path / 'out'),
            '--image-size', '32', '--grid-images', '2', '--workers', '0', '--label', 'a model']
    assert cli_main(argv) == 0
    saved = json.loads((tmp_path / 'out' / 'saliency.json').read_text())
    assert saved['command'] == shlex.join(['sgdrop-zoo', *argv])
    assert list(saved['models']) == ['a model']


def test_saliency_rejects_other_classes_and_empty_val(small_data: Path, tmp_path: Path):
    folder = tmp_path / 'five'
    save_for_hf(timm.create_model('sgdrop_vgg_tiny', num_classes=5), folder,
                model_config=dict(label_names=list('abcde')), safe_serialization=True)
    with pytest.raises(DatasetError, match='fine-tune it first'):
        saliency_report([str(folder)], small_data, tmp_path / 'out', image_size=32, workers=0)


def test_plot_runs_draws_accuracy_and_area(tmp_path: Path):
    logs = []
    for name, area in (('vanilla', 0.3), ('sgdrop', None)):
        (tmp_path / name).mkdir()
        log = tmp_path / name / 'log.jsonl'
        records = [dict(epoch=e, val_acc1=10.0 * e, **({'val_area_ratio': area / e} if area else {}))
                   for e in (1, 2, 3)]
        log.write_text(''.join(json.dumps(r) + '\n' for r in records))
        logs.append(log)
    path = plot_runs(logs, tmp_path / 'curves.png', width_px=800, height_px=300)
    with Image.open(path) as image:
        assert image.size == (800, 300)
    assert path.stat().st_size > 1000
    (tmp_path / 'bad.jsonl').write_text('{"loss": 1}\n{"epoch": 2}\n')
    with pytest.raises(RunFileError, match='bad.jsonl: line 1 is not an epoch record'):
        plot_runs([tmp_path / 'bad.jsonl'], tmp_path / 'bad.png')
    (tmp_path / 'no_top1.jsonl').write_text('{"epoch": 1}\n')
    with pytest.raises(ValueError, match='not a training log'):
        plot_runs([tmp_path / 'no_top1.jsonl'], tmp_path / 'bad.png')
    # settings matplotlib would judge only after drawing, or not at all (a name without a suffix is written as PNG)
    with pytest.raises(OptionError, match=r'^2 labels for 1 logs: give one per log\.$'):
        plot_runs(logs[:1], tmp_path / 'bad.png', labels=['a', 'b'])
    for name in ('bad.xyz', 'bad'):
        with pytest.raises(OptionError, match=f'^output {tmp_path / name}: name a file ending in one of .avif, .eps, '):
            plot_runs(logs, tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bad.jsonl', 'curves.png', 'no_top1.jsonl', 'sgdrop',
                                                          'vanilla']


def test_saliency_rejects_an_unknown_split_and_its_source_folder(small_data: Path, tmp_path: Path):
    folder = tmp_path / 'model'
    save_for_hf(timm.create_model('sgdrop_vgg_tiny', num_classes=3), folder,
                model_config=dict(label_names=list(SMALL_CLASSES)), safe_serialization=True)
    with pytest.raises(OptionError, match="has no 'foo' split; pass split as one of \\['train', 'val'\\]"):
        saliency_report([str(folder)], small_data, tmp_path / 'out', split='foo', image_size=32)
    with pytest.raises(ValueError, match='is the folder of the model'):
        saliency_report([str(folder)], small_data, folder, image_size=32)


def test_a_report_stopped_by_its_models_or_data_leaves_no_folder(small_data: Path, tmp_path: Path):
    folder = tmp_path / 'model'
    save_for_hf(timm.create_model('sgdrop_vgg_tiny', num_classes=3), folder,
                model_config=dict(label_names=list(SMALL_CLASSES)), safe_serialization=True)
    with pytest.raises(ValueError, match='is neither a file, a folder nor a timm model name'):
        saliency_report([str(tmp_path / 'nowhere')], small_data, tmp_path / 'a', image_size=32)
    with pytest.raises(OptionError, match='pass at most 6'):
        saliency_report([str(folder)], small_data, tmp_path / 'b', image_size=32, num_images=7)
    # one name, not a list of them, would be read letter by letter
    with pytest.raises(OptionError, match=f"^model_names must be a list of model names, got the string '{folder}'"):
        saliency_report(str(folder), small_data, tmp_path / 'c', image_size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model']


def test_saliency_never_replaces_an_earlier_report_unless_told(small_data: Path, tmp_path: Path):
    folder = tmp_path / 'model'
    save_for_hf(timm.create_model('sgdrop_vgg_tiny', num_classes=3), folder,
                model_config=dict(label_names=list(SMALL_CLASSES)), safe_serialization=True)
    output = tmp_path / 'out'
    output.mkdir()
    (output / 'saliency.json').write_text('{"earlier": true}\n')
    kwargs = dict(image_size=32, grid_images=2, workers=0)
    with pytest.raises(ValueError, match=r'already holds saliency\.json of an earlier run; choose another folder, or '
                                         r'pass overwrite=True to replace them\.$'):
        saliency_report([str(folder)], small_data, output, **kwargs)
    assert (output / 'saliency.json').read_text() == '{"earlier": true}\n'
    results = saliency_report([str(folder)], small_data, output, overwrite=True, **kwargs)
    assert json.loads((output / 'saliency.json').read_text()) == results


@pytest.mark.parametrize('setting, message', [
    (dict(batch_size=0), 'batch_size must be at least 1, got 0.'),
    (dict(grid_images=0), 'grid_images must be at least 1, got 0.'),
    (dict(workers=-1), 'workers must be at least 0, got -1.'),
    (dict(image_size=-32), 'image_size must be from 1 to 4096 px'),
    (dict(image_size=100000), 'image_size must be from 1 to 4096 px'),
])
def test_saliency_bad_settings_stop_before_any_work(small_data: Path, tmp_path: Path, setting: dict, message: str):
    with pytest.raises(ValueError, match=message.replace('.', r'\.')):
        saliency_report(['sgdrop_vgg_tiny'], small_data, tmp_path / 'out', **setting)
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('split', ['../outside/val', '/etc', 'val/../../outside/val', '..', 'val/', ''])
def test_split_must_be_a_folder_of_the_dataset_root(capsys: pytest.CaptureFixture, tmp_path: Path, split: str):
    root = make_image_folder(tmp_path / 'root')
    make_image_folder(tmp_path / 'outside')  # a dataset with the same classes, next to the root
    folder = tmp_path / 'model'
    save_for_hf(timm.create_model('sgdrop_vgg_tiny', num_classes=3), folder,
                model_config=dict(label_names=list(SMALL_CLASSES)), safe_serialization=True)
    output = tmp_path / 'out'
    assert cli_main(['saliency', '--model', str(folder), '--data', str(root), '--output', str(output), '--split',
                     split, '--image-size', '32', '--workers', '0']) == 2
    assert capsys.readouterr().err == (f'error: --split must be the name of a folder of the dataset root, such as val '
                                       f'or train, got {split!r}.\n')
    assert not output.exists()


def test_a_full_disk_stops_the_report_in_one_line_and_writes_no_part_of_it(capsys: pytest.CaptureFixture,
                                                                         small_data: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch):
    import errno
    import os
    folder = tmp_path / 'model'
    save_for_hf(timm.create_model('sgdrop_vgg_tiny', num_classes=3), folder,
                model_config=dict(label_names=['airplane', 'automobile', 'bird']), safe_serialization=True)

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, 'fsync', full_disk)  # the file's data reaches the disk here, or not
    output = tmp_path / 'out'
    assert cli_main(['saliency', '--model', str(folder), '--data', str(small_data), '--output', str(output),
                     '--image-size', '32', '--grid-images', '2', '--workers', '0']) == 2
    assert capsys.readouterr().err == (
        f'error: cannot write {output / "saliency_grid.png"} (No space left on device); the files written before it '
        f'are intact: free some space there, or fix the folder\n')
    assert list(output.iterdir()) == []


def test_every_title_of_the_grid_fits_its_column():
    # a zoo tag as the model's label and a long class description: each text stays inside its column, the models'
    # names above the first row's titles
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    maps = {'sgdrop_resnet10t.imagenette_128 on EuroSAT': torch.rand(2, 32, 32), 'vanilla twin': torch.rand(2, 32, 32)}
    predictions = {name: torch.tensor([0, 1]) for name in maps}
    names = ['gas pump gasoline pump petrol pump island dispenser', 'HerbaceousVegetation']
    figure = grid_figure(images, maps, predictions, torch.tensor([0, 0]), names)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    renderer = FigureCanvasAgg(figure).get_renderer()  # the renderer savefig uses for a PNG
    texts = [text for text in figure.texts] + [axis.title for axis in figure.axes]
    assert len(texts) == 2 + 2 * 3 and all(text.get_text() for text in texts)
    first_row_top = max(axis.title.get_window_extent(renderer).y1 for axis in figure.axes[:3])
    for text in texts:
        box = text.get_window_extent(renderer)
        column = int((box.x0 + box.x1) / 2 // GRID_CELL_PX)
        assert column * GRID_CELL_PX <= box.x0 and box.x1 <= (column + 1) * GRID_CELL_PX, text.get_text()
        assert box.y1 <= figure.bbox.height, text.get_text()
    assert all(text.get_window_extent(renderer).y0 >= first_row_top for text in figure.texts)
