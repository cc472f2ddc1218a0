"""The registered SGDrop families against timm's base architectures and timm's model API contract."""
import functools

import pytest
import timm
import torch
import torch.nn.functional as F

from sgdrop_zoo import latent_attribution, saliency_mask  # importing sgdrop_zoo registers the models

# SGDrop family -> the plain timm architecture it must equal, and a small test input size.
FAMILIES = {
    'sgdrop_vgg16': ('vgg16', 32),
    'sgdrop_resnet50': ('resnet50', 64),
    'sgdrop_convnext_tiny': ('convnext_tiny', 64),
}
ALL_MODELS = sorted(timm.list_models('sgdrop_*'))
NUM_CLASSES = 10


@functools.lru_cache(maxsize=None)
def _pair(name):
    """An SGDrop model and its base timm model holding the same weights (shared: tests must not modify them)."""
    base_name, _ = FAMILIES[name]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=NUM_CLASSES)
    base = timm.create_model(base_name, num_classes=NUM_CLASSES)
    base.load_state_dict(model.state_dict(), strict=True)
    return model, base


def _images(size, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator)


def test_registry_lists_the_families():
    assert {'sgdrop_vgg16', 'sgdrop_resnet50', 'sgdrop_convnext_tiny', 'sgdrop_vgg_tiny',
            'sgdrop_cifar_cnn'} <= set(ALL_MODELS)
    # an architecture without a hub_configs/ record has no pretrained tag (tests/test_zoo.py checks those with one)
    assert timm.list_models('sgdrop_resnet50*', pretrained=True) == []
    with pytest.raises(RuntimeError, match='No pretrained weights'):
        timm.create_model('sgdrop_resnet50', pretrained=True)


@pytest.mark.parametrize('name', FAMILIES)
def test_state_dict_keys_equal_base(name):
    model, base = _pair(name)
    assert list(model.state_dict()) == list(base.state_dict())
    # SGDrop weights load into the base model and base weights load into the SGDrop model, strictly
    base.load_state_dict(model.state_dict(), strict=True)
    fresh = timm.create_model(name, num_classes=NUM_CLASSES)
    fresh.load_state_dict(base.state_dict(), strict=True)
    fresh_state = fresh.state_dict()
    assert all(torch.equal(fresh_state[key], value) for key, value in base.state_dict().items())


@pytest.mark.parametrize('name', FAMILIES)
def test_eval_forward_is_bit_identical_to_base(name):
    model, base = _pair(name)
    x = _images(FAMILIES[name][1])
    model.eval()
    base.eval()
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
        # target is ignored at inference
        assert torch.equal(model(x, target=torch.tensor([1, 2])), base(x))


@pytest.mark.parametrize('name', FAMILIES)
def test_train_steps_reduce_loss_and_every_parameter_gets_a_gradient(name):
    size = FAMILIES[name][1]
    torch.manual_seed(0)
    # VGG-16's head, a 7x7 convolution to 4096 channels and a 1x1 one, is narrowed as the zoo's VGG-11 is: the same
    # layers at 1/32 of their 120M parameters, whose Adam steps would cost the suite most of this test's time
    kwargs = {'mlp_ratio': 0.03125} if name == 'sgdrop_vgg16' else {}
    model = timm.create_model(name, num_classes=NUM_CLASSES, sgdrop_rho=0.05, **kwargs).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = _images(size, batch=4)
    y = torch.tensor([0, 3, 5, 9])
    losses = []
    for step in range(4):
        loss = F.cross_entropy(model(x, target=y), y)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.grad is None]
            assert not missing, f'parameters without gradient: {missing}'
        optimizer.step()
        model.update_ema()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert model.ema_updates == 4
    # the EMA weights are not parameters of the model
    with torch.device('meta'):  # only the count is compared: no memory, no initialisation
        base = timm.create_model(FAMILIES[name][0])
    assert len(list(model.parameters())) == len(list(base.parameters()))


@pytest.mark.parametrize('name', ALL_MODELS)
def test_timm_model_contract(name):
    """The assertions of timm's tests/test_models.py (forward, default cfg, classifier reset) at a small size."""
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    size = 64
    x = _images(size)
    state_dict = model.state_dict()
    for key in ('input_size', 'pool_size', 'mean', 'std', 'crop_pct', 'interpolation', 'first_conv', 'classifier'):
        assert key in cfg, key
    assert state_dict[cfg['classifier'] + '.weight'].shape[0] == cfg['num_classes'] == model.num_classes
    assert state_dict[cfg['first_conv'] + '.weight'].shape[1] == 3
    assert model.get_classifier() is not None

    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, model.num_classes) and torch.isfinite(logits).all()
        features = model.forward_features(x)
        assert features.ndim == 4 and features.shape[1] == model.num_features
        pre_logits = model.forward_head(features, pre_logits=True)
        assert pre_logits.shape == (2, model.head_hidden_size)
        assert model.feature_info[-1]['num_chs'] == model.num_features
        assert features.shape[-1] == size // model.feature_info[-1]['reduction']

        model.reset_classifier(0)
        assert model.num_classes == 0
        pooled = model(x)
        assert pooled.shape == pre_logits.shape
        torch.testing.assert_close(pooled, pre_logits)

        model.reset_classifier(7)
        assert model(x).shape == (2, 7)
        assert model.get_classifier().weight.shape[0] == 7


@pytest.mark.parametrize('name', ALL_MODELS)
def test_features_only(name):
    model = timm.create_model(name, features_only=True).eval()
    x = _images(64)
    with torch.no_grad():
        outputs = model(x)
    assert len(outputs) == len(model.feature_info.channels())
    for out, channels, reduction in zip(outputs, model.feature_info.channels(), model.feature_info.reduction()):
        assert out.shape[1] == channels
        assert out.shape[-1] == 64 // reduction


@pytest.mark.parametrize('name', FAMILIES)
def test_forward_intermediates_match_base(name):
    model, base = _pair(name)
    if not hasattr(base, 'forward_intermediates'):
        pytest.skip(f'timm {timm.__version__} has no {type(base).__name__}.forward_intermediates (added in 1.0.31)')
    model.eval()
    base.eval()
    x = _images(FAMILIES[name][1])
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        base_final, base_intermediates = base.forward_intermediates(x)
    assert torch.equal(final, base_final)
    assert all(torch.equal(a, b) for a, b in zip(intermediates, base_intermediates))


def test_sgdrop_kwargs_reach_the_model():
    model = timm.create_model(
        'sgdrop_vgg_tiny', num_classes=3, sgdrop_rho=0.02, sgdrop_attribution='online', sgdrop_ema_decay=0.99)
    assert model.sgdrop_cfg.model_args() == dict(
        sgdrop_rho=0.02, sgdrop_attribution='online', sgdrop_attribution_relu='gradient', sgdrop_reference='zero',
        sgdrop_ema_decay=0.99, latent_drop_rate=0.0)
    with pytest.raises(ValueError, match="choose one of 'ema', 'online', 'ema_head'"):
        timm.create_model('sgdrop_vgg_tiny', sgdrop_attribution='EMA!')
    with pytest.raises(ValueError, match=r'sgdrop_rho must be in \[0, 1\)'):
        timm.create_model('sgdrop_resnet50', sgdrop_rho=1.5)


def test_pretrained_cfg_overlay_file_loads_base_weights(tmp_path):
    """A user starting from plain timm weights (e.g. vgg16.tv_in1k) loads them by file into the SGDrop model."""
    torch.manual_seed(1)
    base = timm.create_model('resnet50')
    path = tmp_path / 'resnet50.pth'
    torch.save(base.state_dict(), path)
    overlay = dict(file=str(path))
    model = timm.create_model('sgdrop_resnet50', pretrained=True, pretrained_cfg_overlay=overlay)
    state = model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in base.state_dict().items())
    # a different num_classes keeps the encoder and gets a new head, as timm does
    model = timm.create_model(
        'sgdrop_resnet50', pretrained=True, num_classes=NUM_CLASSES, pretrained_cfg_overlay=overlay)
    state = model.state_dict()
    assert state['fc.weight'].shape == (NUM_CLASSES, 2048)
    assert all(torch.equal(state[key], value) for key, value in base.state_dict().items() if not key.startswith('fc.'))


def test_bf16_autocast_and_channels_last():
    torch.manual_seed(0)
    model = timm.create_model(
        'sgdrop_resnet50', num_classes=NUM_CLASSES, sgdrop_rho=0.01, sgdrop_attribution='online').train()
    model = model.to(memory_format=torch.channels_last)
    x = _images(64, batch=4).to(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 3])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        features = model.forward_features(x)
        keep = model.saliency_keep_mask(x, features, y)
        reference = saliency_mask(latent_attribution(model.forward_head, features.contiguous(), y), 0.01)
        loss = F.cross_entropy(model(x, target=y), y)
    assert features.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(keep, reference)
    # 2048 x 2 x 2 features -> k = 40; bf16 ties can only add to it
    assert ((~keep).flatten(1).sum(dim=1) >= 40).all()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_compiled_eval_forward_matches_eager():
    model = timm.create_model('sgdrop_vgg_tiny', num_classes=NUM_CLASSES).eval()
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    x = _images(32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def _ddp_train_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    torch.manual_seed(rank)  # different initial weights per rank: DDP's broadcast must make them equal
    model = timm.create_model('sgdrop_vgg_tiny', num_classes=NUM_CLASSES, sgdrop_rho=0.05).train()
    ddp_model = DistributedDataParallel(model)
    optimizer = torch.optim.Adam(ddp_model.parameters(), lr=1e-3)
    x = _images(32, batch=4, seed=rank)
    y = torch.tensor([0, 1, 2, 3]) + rank
    for _ in range(2):
        loss = F.cross_entropy(ddp_model(x, target=y), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ddp_model.module.update_ema()
    torch.save({'model': model.state_dict(), 'ema': model.ema_state_dict()}, f'{out_dir}/rank{rank}.pt')
    dist.destroy_process_group()


def test_ddp_training_keeps_ranks_and_emas_in_sync(tmp_path):
    torch.multiprocessing.spawn(_ddp_train_worker, args=(str(tmp_path / 'init'), str(tmp_path)), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2))
    assert all(torch.equal(v, rank1['model'][k]) for k, v in rank0['model'].items())
    assert rank0['ema']['num_updates'] == rank1['ema']['num_updates'] == 2
    assert all(torch.equal(v, rank1['ema']['state_dict'][k]) for k, v in rank0['ema']['state_dict'].items())
    assert not all(torch.equal(v, rank0['ema']['state_dict'][k]) for k, v in rank0['model'].items())
