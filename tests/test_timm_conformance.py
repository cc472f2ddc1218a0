"""The sgdrop_* models against the checks of timm's own tests/test_models.py, and timm's behaviours against the bases.

The checks follow timm's test_model_forward, _backward, _default_cfgs, _forward_features, _forward_intermediates,
_forward_fx, _backward_fx, _forward_torchscript and _forward_fx_torchscript. The default-cfg check runs at each model's
default input size (it compares with pool_size), the others at 32 px to stay fast on a CPU. Only the small members
of each family run here: the large ones share their class and code path.
"""
import copy
import math
import warnings

import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import get_notrace_functions, get_notrace_modules
from timm.models.vgg import VGG
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

from sgdrop_zoo import add_sgdrop, is_sgdrop_model
from sgdrop_zoo.models.vgg import model_cfgs

# TorchScript is what timm's tests check, deprecated or not
pytestmark = pytest.mark.filterwarnings('ignore:.*torch.jit.script.* is deprecated:FutureWarning')

SMALL_MODELS = [
    'sgdrop_cifar_cnn', 'sgdrop_vgg_tiny', 'sgdrop_resnet10t', 'sgdrop_resnet18', 'sgdrop_convnext_atto',
    'sgdrop_convnext_femto',
]
# timm's EARLY_POOL_MODELS that the zoo builds on: the head has layers after the pooling, so disabling the pooling
# does not give the feature map's spatial size.
EARLY_POOL_MODELS = (VGG,)
NO_TARGET_WARNING = r'model\(x, target=y\)'


INPUT_SIZE = (3, 32, 32)


def _images(input_size, batch=1, seed=0):
    return torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(seed))


def _create_fx_model(model, train=False):
    """timm's test helper: trace with timm's leaf modules and functions, return the last node (the output)."""
    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(),
        autowrap_functions=get_notrace_functions(),
        param_shapes_constant=True,
    )
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    eval_return_nodes = [eval_nodes[-1]]
    train_return_nodes = [train_nodes[-1]]
    if train:
        tracer = NodePathTracer(**tracer_kwargs)
        graph = tracer.trace(model)
        graph_nodes = list(reversed(graph.nodes))
        output_node_names = [n.name for n in graph_nodes[0]._input_nodes.keys()]
        graph_node_names = [n.name for n in graph_nodes]
        output_node_indices = [-graph_node_names.index(node_name) for node_name in output_node_names]
        train_return_nodes = [train_nodes[ix] for ix in output_node_indices]
    return create_feature_extractor(
        model,
        train_return_nodes=train_return_nodes,
        eval_return_nodes=eval_return_nodes,
        tracer_kwargs=tracer_kwargs,
    )


def _no_target_warnings(records):
    return [r for r in records if 'without target' in str(r.message)]


def test_small_models_cover_every_family():
    """Every registered sgdrop_* model shares its model file (class and builder) with one of the small models."""
    def module_of(name):
        return timm.models.model_entrypoint(name).__module__

    assert {module_of(name) for name in timm.list_models('sgdrop_*')} == {module_of(name) for name in SMALL_MODELS}


@pytest.mark.parametrize('name', SMALL_MODELS)
def test_model_forward(name):
    model = timm.create_model(name).eval()
    x = _images(INPUT_SIZE)
    with torch.no_grad():
        outputs = model(x)
    assert outputs.shape == (1, model.num_classes)
    assert not torch.isnan(outputs).any()
    try:
        model.set_grad_checkpointing()
    except Exception:  # timm's test: a model without checkpointing raises
        pass
    else:
        with torch.no_grad():
            torch.testing.assert_close(model(x), outputs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', SMALL_MODELS)
def test_model_backward(name):
    model = timm.create_model(name, num_classes=42).train()
    x = _images(INPUT_SIZE, batch=2)
    num_params = sum(p.numel() for p in model.parameters())
    # timm's test calls the train-mode model without labels: the base model trains, and the model says so
    with pytest.warns(UserWarning, match=NO_TARGET_WARNING):
        outputs = model(x)
    outputs.mean().backward()
    assert sum(p.grad.numel() for p in model.parameters() if p.grad is not None) == num_params
    assert outputs.shape == (2, 42) and not torch.isnan(outputs).any()
    # and with labels, SGDrop's path
    model.zero_grad(set_to_none=True)
    outputs = model(x, target=torch.tensor([3, 41]))
    outputs.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing and outputs.shape == (2, 42) and not torch.isnan(outputs).any()


# every shipped tag too: its record sets the input size, at which timm's check compares the feature map with pool_size
@pytest.mark.parametrize('name', SMALL_MODELS + timm.list_models('sgdrop_*', pretrained=True))
def test_model_default_cfgs(name):
    model = timm.create_model(name).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    state_dict = model.state_dict()
    cfg = model.default_cfg
    assert cfg == model.pretrained_cfg
    pool_size = cfg['pool_size']
    spatial_axis = get_spatial_dim('NCHW')
    feat_axis = get_channel_dim('NCHW')
    x = _images(cfg['input_size'])

    with torch.no_grad():
        outputs = model.forward_features(x)
        outputs_pre = model.forward_head(outputs, pre_logits=True)
        assert (outputs.shape[spatial_axis[0]], outputs.shape[spatial_axis[1]]) == pool_size
        assert outputs.shape[feat_axis] == model.num_features
        assert outputs_pre.shape[1] == model.head_hidden_size

        # without the classifier: pooled, head_hidden_size wide
        model.reset_classifier(0)
        assert model.num_classes == 0
        outputs = model(x)
        assert outputs.ndim == 2 and outputs.shape[1] == model.head_hidden_size
        assert outputs.shape == outputs_pre.shape

        if not isinstance(model, EARLY_POOL_MODELS):
            # without classifier and pooling: the feature map
            model.reset_classifier(0, '')
            outputs = model(x)
            assert outputs.ndim == 4
            assert (outputs.shape[spatial_axis[0]], outputs.shape[spatial_axis[1]]) == pool_size
            model = timm.create_model(name, num_classes=0, global_pool='').eval()
            outputs = model(x)
            assert outputs.ndim == 4
            assert (outputs.shape[spatial_axis[0]], outputs.shape[spatial_axis[1]]) == pool_size

    for classifier in (cfg['classifier'],) if isinstance(cfg['classifier'], str) else cfg['classifier']:
        assert classifier + '.weight' in state_dict
    for first_conv in (cfg['first_conv'],) if isinstance(cfg['first_conv'], str) else cfg['first_conv']:
        assert first_conv + '.weight' in state_dict


@pytest.mark.parametrize('name', SMALL_MODELS)
@pytest.mark.parametrize('feature_cls', ['', 'getter', 'fx'])
def test_model_forward_features(name, feature_cls):
    """features_only with timm's default wrapper, the forward_intermediates getter and the FX graph extractor."""
    kwargs = dict(feature_cls=feature_cls) if feature_cls else {}
    model = timm.create_model(name, features_only=True, **kwargs).eval()
    assert not is_sgdrop_model(model)  # a feature extractor wraps the model, it does not train with SGDrop
    expected_channels = model.feature_info.channels()
    expected_reduction = model.feature_info.reduction()
    assert len(expected_channels) >= 3
    with torch.no_grad():
        outputs = model(_images(INPUT_SIZE))
    assert len(outputs) == len(expected_channels)
    for channels, reduction, out in zip(expected_channels, expected_reduction, outputs):
        assert out.shape[1] == channels and out.shape[0] == 1
        assert out.shape[2] <= math.ceil(INPUT_SIZE[1] / reduction) + 1
        assert out.shape[3] <= math.ceil(INPUT_SIZE[2] / reduction) + 1
        assert not torch.isnan(out).any()


@pytest.mark.parametrize('name', SMALL_MODELS)
def test_model_forward_intermediates(name):
    model = timm.create_model(name).eval()
    feature_info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    x = _images(INPUT_SIZE)
    with torch.no_grad():
        output, intermediates = model.forward_intermediates(x, output_fmt='NCHW')
        assert len(intermediates) == len(feature_info.channels()) >= 3
        for channels, reduction, out in zip(feature_info.channels(), feature_info.reduction(), intermediates):
            assert out.shape[1] == channels
            assert out.shape[2] <= math.ceil(INPUT_SIZE[1] / reduction) + 1
            assert out.shape[3] <= math.ceil(INPUT_SIZE[2] / reduction) + 1
        torch.testing.assert_close(output, model.forward_features(x))
        # stop_early and intermediates_only take the same blocks
        last_two = model.forward_intermediates(x, indices=2, stop_early=True, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(last_two, intermediates[-2:]))
        first = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        assert torch.equal(first[0], intermediates[0])
        try:
            model.set_grad_checkpointing()
        except Exception:  # timm's test: a model without checkpointing raises
            pass
        else:
            torch.testing.assert_close(model.forward_intermediates(x)[0], output, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', SMALL_MODELS)
def test_model_forward_fx(name):
    model = timm.create_model(name).eval()
    x = _images(INPUT_SIZE)
    with torch.inference_mode():
        outputs = model(x)
        fx_model = _create_fx_model(model)
        fx_outputs = torch.cat(tuple(fx_model(x).values()))
    assert torch.equal(fx_outputs, outputs)


@pytest.mark.parametrize('name', SMALL_MODELS)
def test_model_backward_fx(name):
    """A train-mode FX graph is the base model's training graph; tracing neither fails on nor warns about target."""
    model = timm.create_model(name, num_classes=42).train()
    num_params = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter('always')
        fx_model = _create_fx_model(model, train=True)
    assert not _no_target_warnings(records)
    outputs = torch.cat(tuple(fx_model(_images(INPUT_SIZE, batch=2)).values()))
    outputs.mean().backward()
    assert sum(p.grad.numel() for p in fx_model.parameters() if p.grad is not None) == num_params
    assert outputs.shape == (2, 42) and not torch.isnan(outputs).any()


@pytest.mark.parametrize('name', SMALL_MODELS)
def test_model_forward_torchscript(name):
    with timm.layers.set_scriptable(True):
        model = timm.create_model(name).eval()
    scripted = torch.jit.script(model)
    # TorchScript compiles the base architecture: the SGDrop mixin is left out, the weights are the model's
    assert scripted.original_name == type(model).__mro__[2].__name__
    assert is_sgdrop_model(model) and type(model).__name__.startswith('SGDrop')  # the model itself is unchanged
    x = _images(INPUT_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize('name', SMALL_MODELS)
def test_model_forward_fx_torchscript(name):
    with timm.layers.set_scriptable(True):
        model = timm.create_model(name).eval()
    x = _images(INPUT_SIZE)
    scripted = torch.jit.script(_create_fx_model(model))
    with torch.inference_mode():
        outputs = torch.cat(tuple(scripted(x).values()))
        assert torch.equal(outputs, model(x))


@pytest.mark.parametrize('name', ['sgdrop_cifar_cnn', 'sgdrop_resnet10t'])
def test_torch_export_is_the_base_model(name):
    model = timm.create_model(name, num_classes=5).eval()
    x = _images(INPUT_SIZE, batch=2)
    exported = torch.export.export(model, (x,)).module()
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x))
    # a train-mode export is the base training graph too: no SGDrop ops, no warning about the missing target
    model.train()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter('always')
        graph = torch.export.export(model, (x,)).graph
    assert not _no_target_warnings(records)
    assert not any('topk' in str(node.target) for node in graph.nodes)


def test_torchscript_and_fx_in_train_mode_do_not_warn():
    model = timm.create_model('sgdrop_cifar_cnn', sgdrop_rho=0.05).train()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter('always')
        torch.jit.script(model)
        torch.fx.symbolic_trace(model)
        torch.jit.trace(model, _images(INPUT_SIZE, batch=2), check_trace=False)
    assert not _no_target_warnings(records)
    # the mixin's state stays on the model: scripting worked on a copy
    assert model.sgdrop_rho == 0.05 and type(model).__name__ == 'SGDropCifarCNN'
    with pytest.warns(UserWarning, match=NO_TARGET_WARNING):
        model(_images(INPUT_SIZE, batch=2))


def test_add_sgdrop_model_scripts_and_traces_as_its_base():
    base = timm.create_model('resnet10t', num_classes=4).eval()
    model = add_sgdrop(copy.deepcopy(base), sgdrop_rho=0.05)
    x = _images(INPUT_SIZE, batch=2)
    with torch.no_grad():
        expected = base(x)
        assert torch.equal(torch.jit.script(model)(x), expected)
        assert torch.equal(torch.fx.symbolic_trace(model)(x), expected)


def test_cifar_cnn_pooling_choices():
    with pytest.raises(ValueError, match='num_classes=0'):
        timm.create_model('sgdrop_cifar_cnn', global_pool='')
    with pytest.raises(ValueError, match="'avg'"):
        timm.create_model('sgdrop_cifar_cnn', global_pool='max')
    model = timm.create_model('sgdrop_cifar_cnn').eval()
    x = _images((3, 64, 64))
    with torch.no_grad():
        logits = model(x)
        model.reset_classifier(0, '')
        assert model(x).shape == (1, 256, 8, 8) and model.head_hidden_size == 256
        with pytest.raises(ValueError, match='num_classes=0'):
            model.reset_classifier(10)
        # back to the pooled head: the MLP weights were kept, only the classifier is new
        model.reset_classifier(0, 'avg')
        assert model(x).shape == (1, 2048)
        assert torch.equal(model.forward_head(model.forward_features(x), pre_logits=True), model(x))
    assert logits.shape == (1, 10)


# --- SGDrop without a target ---

def test_missing_target_warns_once_per_model():
    x = _images(INPUT_SIZE, batch=2)
    models = [timm.create_model('sgdrop_cifar_cnn', sgdrop_rho=0.02).train() for _ in range(2)]
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter('always')
        for _ in range(3):
            for model in models:
                model(x)
    messages = [str(r.message) for r in _no_target_warnings(records)]
    assert len(messages) == 2, messages
    assert all('model(x, target=y)' in m and 'sgdrop_rho=0.02' in m for m in messages)
    assert all(issubclass(r.category, UserWarning) for r in _no_target_warnings(records))


@pytest.mark.parametrize('case', ['eval', 'rho_0', 'with_target', 'latent_dropout_rho_0'])
def test_no_warning_when_nothing_is_missing(case):
    rho = 0.0 if case.endswith('rho_0') else 0.02
    model = timm.create_model(
        'sgdrop_cifar_cnn', sgdrop_rho=rho, latent_drop_rate=0.1 if case.startswith('latent') else 0.0)
    model.train(case != 'eval')
    x = _images(INPUT_SIZE, batch=2)
    target = torch.tensor([1, 2]) if case == 'with_target' else None
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter('always')
        for _ in range(2):
            model(x, target=target)
    assert not _no_target_warnings(records)


# --- timm behaviours against the base models ---

def _vgg_tiny(**kwargs):
    return VGG(model_cfgs['vgg_tiny'], mlp_ratio=0.0625, **kwargs)


BASE_ARCHS = {'sgdrop_resnet10t': 'resnet10t', 'sgdrop_convnext_atto': 'convnext_atto', 'sgdrop_vgg_tiny': 'vgg11'}
BASES = {
    'sgdrop_resnet10t': lambda **kwargs: timm.create_model('resnet10t', **kwargs),
    'sgdrop_convnext_atto': lambda **kwargs: timm.create_model('convnext_atto', **kwargs),
    'sgdrop_vgg_tiny': _vgg_tiny,
}


def _pair(name, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=6, **kwargs)
    base = BASES[name](num_classes=6)
    base.load_state_dict(model.state_dict(), strict=True)
    return model, base


@pytest.mark.parametrize('name', BASES)
def test_eval_logits_and_intermediates_equal_base(name):
    model, base = _pair(name)
    model.eval()
    base.eval()
    x = _images(INPUT_SIZE, batch=2)
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
        assert torch.equal(model.forward_features(x), base.forward_features(x))
        for kwargs in (dict(), dict(indices=2), dict(indices=[0, -1], stop_early=True)):
            final, intermediates = model.forward_intermediates(x, **kwargs)
            base_final, base_intermediates = base.forward_intermediates(x, **kwargs)
            assert torch.equal(final, base_final)
            assert len(intermediates) == len(base_intermediates)
            assert all(torch.equal(a, b) for a, b in zip(intermediates, base_intermediates))


@pytest.mark.parametrize('name', BASES)
def test_timm_model_api_equals_base(name):
    model, base = _pair(name)
    for coarse in (False, True):
        assert model.group_matcher(coarse=coarse) == base.group_matcher(coarse=coarse)
    assert hasattr(model, 'no_weight_decay') == hasattr(base, 'no_weight_decay')
    if hasattr(base, 'no_weight_decay'):
        assert model.no_weight_decay() == base.no_weight_decay()
    assert model.get_classifier().weight.shape == base.get_classifier().weight.shape
    assert model.feature_info == base.feature_info
    # timm's optimizer factory builds the same parameter groups (weight decay split, layer-wise lr decay)
    groups = timm.optim.create_optimizer_v2(model, 'sgd', lr=0.1, weight_decay=0.05, layer_decay=0.8).param_groups
    base_groups = timm.optim.create_optimizer_v2(base, 'sgd', lr=0.1, weight_decay=0.05, layer_decay=0.8).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    base_names = {id(p): n for n, p in base.named_parameters()}

    def summary(param_groups, param_names):
        return [(g['lr_scale'], g['weight_decay'], [param_names[id(p)] for p in g['params']]) for g in param_groups]

    assert summary(groups, names) == summary(base_groups, base_names)


@pytest.mark.parametrize('name', BASES)
def test_pretrained_cfg_and_data_config(name):
    model = timm.create_model(name)
    cfg = model.pretrained_cfg
    assert model.default_cfg == cfg and cfg['architecture'] == name
    # the layer names timm's tools (in_chans / num_classes adaptation of weights) read match the base architecture's
    base_cfg = timm.models.get_pretrained_cfg(BASE_ARCHS[name]).to_dict()  # vgg11 stands for the VGG family
    for key in ('first_conv', 'classifier', 'mean', 'std'):
        assert cfg[key] == base_cfg[key], key
    for key in ('num_classes', 'input_size', 'pool_size', 'crop_pct', 'crop_mode', 'interpolation', 'license'):
        assert cfg.get(key) is not None, key
    # the paper, as timm's own tags name theirs
    assert (cfg['paper_ids'], cfg['origin_url']) == ('arXiv:2409.17370', 'https://arxiv.org/abs/2409.17370')
    assert cfg['paper_name'].startswith('The Overfocusing Bias of Convolutional Neural Networks')
    data_config = timm.data.resolve_data_config(model=model)
    assert data_config['input_size'] == cfg['input_size'] and data_config['crop_pct'] == cfg['crop_pct']


@pytest.mark.parametrize('name', ['sgdrop_resnet10t', 'sgdrop_convnext_atto'])
def test_grad_checkpointing_trains_like_base(name):
    """With gradient checkpointing on both, a train-mode step (rho 0: the base training step) matches the base."""
    model, base = _pair(name, sgdrop_rho=0.0)
    model.set_grad_checkpointing()
    base.set_grad_checkpointing()
    model.train()
    base.train()
    x = _images(INPUT_SIZE, batch=2)
    y = torch.tensor([0, 5])
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(base(x), y).backward()
    base_grads = dict(base.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, base_grads[n].grad)
    # and the SGDrop path runs under checkpointing
    model.sgdrop_rho = 0.05
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x, target=y), y).backward()
    assert all(p.grad is not None for p in model.parameters())
