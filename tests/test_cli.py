"""The sgdrop-zoo command line (sgdrop_zoo/cli.py)."""
from sgdrop_zoo.cli import main


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
