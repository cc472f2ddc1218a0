"""The sgdrop-zoo command line (sgdrop_zoo/cli.py)."""
import json
import os
from pathlib import Path

import pytest

from sgdrop_zoo import cli
from sgdrop_zoo.cli import main
from sgdrop_zoo.errors import OptionError


def test_models_lists_the_registered_families(capsys):
    assert main(['models']) == 0
    listed = capsys.readouterr().out.split()
    assert {'sgdrop_vgg16', 'sgdrop_resnet50', 'sgdrop_convnext_tiny', 'sgdrop_cifar_cnn'} <= set(listed)


def test_info_reports_latent_size_and_dropped_features(capsys):
    assert main(['info', 'sgdrop_cifar_cnn', '--sgdrop-rho', '0.01']) == 0
    out = capsys.readouterr().out
    assert '256x4x4 = 4096 features' in out  # 32 px input, three stride-2 pools
    assert 'dropped / sample: 40 at sgdrop_rho=0.01' in out


def test_info_rejects_bad_input(capsys):
    assert main(['info', 'resnet_nope']) == 2
    assert 'sgdrop-zoo models' in capsys.readouterr().err
    assert main(['info', 'sgdrop_cifar_cnn', '--sgdrop-rho', '1.5']) == 2
    assert r'[0, 1)' in capsys.readouterr().err


@pytest.mark.parametrize('flags, message', [
    (['--image-size', '-8'], '--image-size must be from 1 to 4096 px'),
    (['--image-size', '0'], '--image-size must be from 1 to 4096 px'),  # not the model's 32 px in disguise
    (['--image-size', '100000'], '--image-size must be from 1 to 4096 px'),
    (['--num-classes', '-3'], '--num-classes must be at least 1, got -3.'),
    (['--num-classes', '0'], '--num-classes must be at least 1, got 0.'),
])
def test_info_rejects_bad_sizes_in_one_line(capsys, flags, message):
    assert main(['info', 'sgdrop_cifar_cnn', *flags]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], lines
    assert captured.out == ''


def test_info_takes_the_largest_size_without_computing_it(capsys):
    assert main(['info', 'sgdrop_vgg16', '--image-size', '4096']) == 0
    # five stride-2 poolings: 4096 / 32 = 128
    assert 'latent map:       512x128x128 = 8388608 features' in capsys.readouterr().out


def test_info_says_when_the_image_is_too_small_for_the_model(capsys):
    assert main(['info', 'sgdrop_vgg16', '--image-size', '16']) == 2  # 16 px is 0 px after five poolings
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: --image-size 16 is too small for sgdrop_vgg16'), lines


def test_info_accepts_the_pretrained_tags_that_models_lists(capsys):
    assert main(['models']) == 0
    listed = capsys.readouterr().out
    assert 'sgdrop_resnet10t.imagenette_128_ema_head' in listed
    assert main(['info', 'sgdrop_resnet10t.imagenette_128_ema_head']) == 0
    out = capsys.readouterr().out
    # the tag's own input size (its hub_configs record), not the architecture's default 224 px: 128 / 32 = 4
    assert 'model:            sgdrop_resnet10t.imagenette_128_ema_head (SGDropResNet)' in out
    assert 'input:            3x128x128' in out and 'latent map:       512x4x4 = 8192 features' in out
    # a curriculum's tag: the rho its training ended at (0 to 0.025), and every setting it was trained with
    assert main(['info', 'sgdrop_vgg11.imagenette_128_ema_head']) == 0
    out = capsys.readouterr().out
    assert 'dropped / sample: 204 at sgdrop_rho=0.025' in out  # floor(0.025 * 512 * 4 * 4)
    assert ('settings:         sgdrop_rho=0.025, sgdrop_attribution=ema_head, sgdrop_attribution_relu=gradient, '
            'sgdrop_reference=zero, sgdrop_ema_decay=0.999, latent_drop_rate=0.0') in out


def test_programming_errors_keep_their_traceback(monkeypatch):
    def broken(records):
        raise TypeError('render() got an unexpected keyword argument')

    monkeypatch.setattr(cli, 'render_model_card', broken)
    with pytest.raises(TypeError, match='unexpected keyword argument'):
        main(['model-card'])


def _deny_writes(monkeypatch, folder: Path) -> None:
    """Make ``folder`` read-only to os.access (as root, chmod would not stop a write)."""
    access = os.access
    monkeypatch.setattr(os, 'access', lambda path, mode, **kwargs: Path(path) != folder and access(path, mode,
                                                                                                  **kwargs))


def test_plot_onto_a_read_only_or_folder_output_fails_in_one_line(capsys, monkeypatch, tmp_path):
    log = tmp_path / 'run' / 'log.jsonl'
    log.parent.mkdir()
    log.write_text(json.dumps(dict(epoch=1, val_acc1=50.0)) + '\n')
    read_only = tmp_path / 'read-only'
    read_only.mkdir()
    _deny_writes(monkeypatch, read_only)
    assert main(['plot', str(log), '--output', str(read_only / 'curves.png')]) == 2
    assert capsys.readouterr().err == (f'error: --output {read_only / "curves.png"}: {read_only} is not writable; '
                                       f'pass a file you can write to.\n')
    assert list(read_only.iterdir()) == []
    assert main(['plot', str(log), '--output', str(tmp_path / 'run')]) == 2
    assert capsys.readouterr().err == f'error: --output {tmp_path / "run"} is a folder; pass a file name.\n'
    assert main(['plot', str(log), '--output', str(tmp_path / 'curves.png')]) == 0
    assert (tmp_path / 'curves.png').stat().st_size > 1000
    capsys.readouterr()
    # an existing file is replaced only when asked to, by plot and model-card alike
    (tmp_path / 'curves.png').write_bytes(b'mine')
    (tmp_path / 'CARD.md').write_text('mine')
    for command in (['plot', str(log), '--output', str(tmp_path / 'curves.png')],
                    ['model-card', '--output', str(tmp_path / 'CARD.md')]):
        assert main(command) == 2
        assert capsys.readouterr().err == (f'error: --output {command[-1]} exists; pass --overwrite to replace it, or '
                                           f'another file name.\n')
    assert (tmp_path / 'curves.png').read_bytes() == b'mine' and (tmp_path / 'CARD.md').read_text() == 'mine'
    assert main(['plot', str(log), '--output', str(tmp_path / 'curves.png'), '--overwrite']) == 0
    assert (tmp_path / 'curves.png').stat().st_size > 1000
    capsys.readouterr()
    # the command line names the flags of the settings the API names by parameter
    assert main(['plot', str(log), '--output', str(tmp_path / 'a.png'), '--label', 'a', '--label', 'b']) == 2
    assert capsys.readouterr().err == 'error: 2 --label for 1 logs: give one per log.\n'
    assert main(['plot', str(log), '--output', str(tmp_path / 'a.xyz')]) == 2
    assert capsys.readouterr().err.startswith(f'error: --output {tmp_path / "a.xyz"}: name a file ending in one of ')
    assert not (tmp_path / 'a.png').exists() and not (tmp_path / 'a.xyz').exists()


def test_an_option_error_names_parameters_in_the_api_and_flags_on_the_command_line():
    error = OptionError('{output} {path} exists; pass {overwrite} to replace it, or choose another {dry_run_dir}.',
                        ('overwrite',), path='runs/{x}')
    # a value is printed as it is, braces included: it is never part of the template
    assert str(error) == 'output runs/{x} exists; pass overwrite=True to replace it, or choose another dry_run_dir.'
    assert error.for_command_line() == ('--output runs/{x} exists; pass --overwrite to replace it, or choose another '
                                        '--dry-run-dir.')
    assert error.for_command_line({'dry_run_dir': '--output'}) == ('--output runs/{x} exists; pass --overwrite to '
                                                                   'replace it, or choose another --output.')
    assert isinstance(error, ValueError)


def test_an_output_below_a_file_is_refused_in_one_line_by_every_command(capsys, tmp_path: Path):
    (tmp_path / 'notes').write_text('mine\n')
    log = tmp_path / 'log.jsonl'
    log.write_text(json.dumps(dict(epoch=1, val_acc1=50.0)) + '\n')
    for command, kind in ((['plot', str(log)], 'file'), (['model-card'], 'file'),
                          (['publish', str(tmp_path), '--repo-id', 'org/x', '--dry-run'], 'folder')):
        output = tmp_path / 'notes' / 'out'
        assert main([*command, '--output', str(output)]) == 2
        assert capsys.readouterr().err == (f'error: --output {output}: {tmp_path / "notes"} is a file, so nothing can '
                                           f'be created in it; pass a {kind} in a folder.\n')
    assert (tmp_path / 'notes').read_text() == 'mine\n'
