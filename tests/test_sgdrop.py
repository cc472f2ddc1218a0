"""The SGDrop method against hand-computed references (sgdrop_zoo/sgdrop.py)."""
import copy
import dataclasses
import io

import pytest
import timm
import torch
import torch.nn as nn

from sgdrop_zoo import AttributionSource, LinearRhoSchedule, SGDropCfg, add_sgdrop, is_sgdrop_model, saliency_mask
from sgdrop_zoo.sgdrop import (STEP_STAT_NAMES, dropped_attribution_share, latent_attribution, latent_reference,
                               nonpositive_share, num_dropped_features)

from conftest import RecordOps

# Head weight of the reference classifier: 3 classes, 4 latent features (a 2x1x2 map).
HEAD_WEIGHT = torch.tensor([
    [1., -1., 2., 0.],
    [0., 3., -2., 1.],
    [-1., 1., 1., 1.],
])
# Latent features of two samples (the encoder is a per-feature scale initialised to 1, so z = x) and their labels.
LATENT = torch.tensor([
    [2., 1., 3., 4.],
    [1., 5., 2., 0.],
]).view(2, 2, 1, 2)
LABELS = torch.tensor([0, 1])
# By hand: A = ReLU(W[y]) * z.
# sample 0, y=0: ReLU(W[0]) = [1, 0, 2, 0] -> A = [2, 0, 6, 0]
# sample 1, y=1: ReLU(W[1]) = [0, 3, 0, 1] -> A = [0, 15, 0, 0]
ATTRIBUTION = torch.tensor([
    [2., 0., 6., 0.],
    [0., 15., 0., 0.],
]).view(2, 2, 1, 2)
# rho = 0.5, N = 4 -> k = 2. Sample 0 drops features 0 and 2 (A = 6, 2). Sample 1 has one positive attribution and
# drops only feature 1: zero attributions are never dropped.
KEEP_RHO_HALF = torch.tensor([
    [False, True, False, True],
    [True, False, True, True],
]).view(2, 2, 1, 2)
# Logits of the masked features W @ (z * mask): sample 0 -> W @ [0, 1, 0, 4], sample 1 -> W @ [1, 0, 2, 0].
LOGITS_RHO_HALF = torch.tensor([
    [-1., 7., 5.],
    [5., -4., 1.],
])


class ReferenceClassifier(nn.Module):
    """Linear head on a 2x1x2 latent map; the encoder multiplies each feature by a learnable scale."""

    def __init__(self, head_weight: torch.Tensor = HEAD_WEIGHT):
        super().__init__()
        self.num_classes = head_weight.shape[0]
        self.scale = nn.Parameter(torch.ones(1, 2, 1, 2))
        self.fc = nn.Linear(4, self.num_classes, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(head_weight)

    def forward_features(self, x):
        return x * self.scale

    def forward_head(self, x, pre_logits=False):
        x = x.flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes):
        self.num_classes = num_classes
        self.fc = nn.Linear(4, num_classes, bias=False) if num_classes > 0 else nn.Identity()


def reference_model(rho=0.5, attribution='online', **kwargs):
    return add_sgdrop(ReferenceClassifier(), sgdrop_rho=rho, sgdrop_attribution=attribution, **kwargs).train()


def test_attribution_matches_hand_computation():
    model = ReferenceClassifier()
    attribution = latent_attribution(model.forward_head, LATENT, LABELS)
    assert torch.equal(attribution, ATTRIBUTION)


# A signed latent (ConvNeXt's is): features 1 and 3 of sample 0 and feature 2 of sample 1 are negative.
SIGNED_LATENT = torch.tensor([
    [2., -1., 3., -4.],
    [1., 5., -2., 0.],
]).view(2, 2, 1, 2)
# By hand, the paper's rule ReLU(W[y]) * z: sample 0 [1, 0, 2, 0] * z = [2, 0, 6, 0]; sample 1 [0, 3, 0, 1] * z =
# [0, 15, 0, 0]. The product rule ReLU(W[y] * z): sample 0 ReLU([2, 1, 6, 0]); sample 1 ReLU([0, 15, 4, 0]), so the
# negative features whose negative weight raises the class score (sample 0 feature 1, sample 1 feature 2) count.
SIGNED_ATTRIBUTION_GRADIENT = torch.tensor([[2., 0., 6., 0.], [0., 15., 0., 0.]]).view(2, 2, 1, 2)
SIGNED_ATTRIBUTION_PRODUCT = torch.tensor([[2., 1., 6., 0.], [0., 15., 4., 0.]]).view(2, 2, 1, 2)


def test_product_attribution_equals_the_papers_on_a_non_negative_latent():
    model = ReferenceClassifier()
    assert torch.equal(latent_attribution(model.forward_head, LATENT, LABELS, relu='product'), ATTRIBUTION)


def test_product_attribution_reaches_negative_features_of_a_signed_latent():
    model = ReferenceClassifier()
    gradient = latent_attribution(model.forward_head, SIGNED_LATENT, LABELS)
    product = latent_attribution(model.forward_head, SIGNED_LATENT, LABELS, relu='product')
    assert torch.equal(gradient, SIGNED_ATTRIBUTION_GRADIENT) and torch.equal(product, SIGNED_ATTRIBUTION_PRODUCT)
    # rho 0.5, k = 2: the paper's rule drops features 0, 2 and 1; the product rule 0, 2 and 1, 2
    keep = torch.tensor([[False, True, False, True], [True, False, False, True]]).view(2, 2, 1, 2)
    assert torch.equal(saliency_mask(product, 0.5), keep)
    model = reference_model(rho=0.5, sgdrop_attribution_relu='product')
    # W @ (z * keep): sample 0 W @ [0, -1, 0, -4] = [1, -7, -5]; sample 1 W @ [1, 0, 0, 0] = [1, 0, -1]
    assert torch.equal(model(SIGNED_LATENT.clone(), target=LABELS), torch.tensor([[1., -7., -5.], [1., 0., -1.]]))
    assert model.sgdrop_cfg.model_args()['sgdrop_attribution_relu'] == 'product'
    with pytest.raises(ValueError, match="Unknown sgdrop_attribution_relu 'sign': choose one of 'gradient', 'product'"):
        reference_model(sgdrop_attribution_relu='sign')


def test_step_diagnostics_match_hand_computation():
    # rho 0.25, k = 1. Paper's rule on LATENT: sample 0 drops its A = 6 of 2 + 6, sample 1 its 15 of 15; the latent
    # features at or below zero: none of sample 0, one of four of sample 1.
    model = reference_model(rho=0.25)
    model(LATENT.clone(), target=LABELS)
    stats = model.sgdrop_step_stats
    assert torch.equal(stats['dropped_attribution_share'], torch.tensor([0.75, 1.0]))
    assert torch.equal(stats['nonpositive_feature_share'], torch.tensor([0.0, 0.25]))
    # product rule on the signed latent: 6 of 2 + 1 + 6 and 15 of 15 + 4; two of four features <= 0 in each
    model = reference_model(rho=0.25, sgdrop_attribution_relu='product')
    model(SIGNED_LATENT.clone(), target=LABELS)
    stats = model.sgdrop_step_stats
    assert torch.allclose(stats['dropped_attribution_share'], torch.tensor([6 / 9, 15 / 19]))
    assert torch.equal(stats['nonpositive_feature_share'], torch.tensor([0.5, 0.5]))
    # rho 0 drops nothing; a sample without positive attribution has nothing to drop
    model = reference_model(rho=0.0)
    assert model.sgdrop_step_stats is None
    model(LATENT.clone(), target=LABELS)
    assert torch.equal(model.sgdrop_step_stats['dropped_attribution_share'], torch.zeros(2))
    no_positive = torch.zeros(1, 2, 1, 2)
    assert torch.equal(dropped_attribution_share(no_positive, no_positive != 0), torch.zeros(1))
    assert torch.equal(nonpositive_share(-LATENT), torch.ones(2))


def test_mask_matches_hand_computation():
    assert torch.equal(saliency_mask(ATTRIBUTION, 0.5), KEEP_RHO_HALF)
    # rho = 0.25 -> k = 1: only the top feature of each sample.
    expected = torch.tensor([[True, True, False, True], [True, False, True, True]]).view(2, 2, 1, 2)
    assert torch.equal(saliency_mask(ATTRIBUTION, 0.25), expected)


def test_forward_logits_match_hand_computation():
    model = reference_model(rho=0.5)
    logits = model(LATENT.clone(), target=LABELS)
    assert torch.equal(logits, LOGITS_RHO_HALF)


def test_ties_at_threshold_are_all_dropped():
    attribution = torch.tensor([[3., 3., 1., 0.]])
    # k = floor(0.25 * 4) = 1, threshold 3: both tied features go.
    assert saliency_mask(attribution, 0.25).tolist() == [[False, False, True, True]]


@pytest.mark.parametrize('rho, num_features, expected_k', [
    (0.01, 25088, 250),  # the paper's VGG16 example: 250.88 -> 250
    (0.25, 10, 2),  # 2.5 -> 2
    (0.29, 100, 29),  # 0.29 * 100 = 28.999999999999996 in floating point
    (0.01, 99, 0),  # below one feature: nothing dropped
    (0.0, 4096, 0),
])
def test_number_dropped_is_floor_of_rho_n(rho, num_features, expected_k):
    assert num_dropped_features(rho, num_features) == expected_k
    # distinct positive attributions: exactly k dropped per sample
    attribution = torch.randperm(num_features * 3).float().add(1).view(3, num_features)
    keep = saliency_mask(attribution, rho)
    assert (~keep).sum(dim=1).tolist() == [expected_k] * 3
    # and they are the k largest of each sample
    if expected_k:
        dropped_min = attribution.masked_fill(keep, float('inf')).amin(dim=1)
        kept_max = attribution.masked_fill(~keep, float('-inf')).amax(dim=1)
        assert torch.all(dropped_min > kept_max)


def test_non_positive_attribution_never_dropped():
    attribution = torch.tensor([[-5., 0., 0., 2.], [0., 0., 0., 0.], [-1., -2., -3., -4.]])
    keep = saliency_mask(attribution, 0.75)  # k = 3
    assert keep.tolist() == [[True, True, True, False], [True] * 4, [True] * 4]


def test_gradient_reaches_encoder_only_through_kept_features():
    model = reference_model(rho=0.5)
    x = LATENT.clone().requires_grad_(True)
    logits = model(x, target=LABELS)
    # The attribution pass must not leave gradients anywhere.
    assert all(p.grad is None for p in model.parameters())
    logits.sum().backward()
    column_sums = HEAD_WEIGHT.sum(dim=0)  # d(sum of logits)/dz for a kept feature
    expected = torch.where(KEEP_RHO_HALF, column_sums.view(1, 2, 1, 2), torch.zeros(()))
    assert torch.equal(x.grad, expected)
    # d/d scale = sum over the batch of z * column_sums at kept positions
    expected_scale_grad = (LATENT * expected).sum(dim=0, keepdim=True)
    assert torch.equal(model.scale.grad, expected_scale_grad)


def test_ema_attribution_uses_ema_weights_and_masks_online_features():
    # The EMA head ranks the features differently from the online head: the mask must follow the EMA.
    ema_weight = torch.tensor([
        [0., 1., 0., 1.],
        [1., 0., 0., 0.],
        [0., 0., 0., 0.],
    ])
    model = reference_model(rho=0.25, attribution='ema')
    ema_state = {'num_updates': 3, 'state_dict': {'scale': torch.ones(1, 2, 1, 2), 'fc.weight': ema_weight}}
    model.load_ema_state_dict(ema_state)
    logits = model(LATENT.clone(), target=LABELS)
    # EMA attributions: sample 0 (y=0) [0, 1, 0, 4] -> drop feature 3; sample 1 (y=1) [1, 0, 0, 0] -> drop feature 0
    masked = LATENT.flatten(1) * torch.tensor([[1., 1., 1., 0.], [0., 1., 1., 1.]])
    assert torch.equal(logits, masked @ HEAD_WEIGHT.T)
    assert model.ema_updates == 3
    # online attribution with the same weights picks other features
    online = reference_model(rho=0.25, attribution='online')
    assert not torch.equal(online(LATENT.clone(), target=LABELS), logits)


def test_ema_and_online_masks_differ_once_weights_move():
    torch.manual_seed(0)
    model = timm.create_model('sgdrop_cifar_cnn', num_classes=10, sgdrop_rho=0.05, sgdrop_attribution='ema').train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(8, 3, 32, 32)
    y = torch.arange(8)
    features = model.forward_features(x)
    # before any update the EMA is a copy of the online network: same masks
    assert torch.equal(model.saliency_keep_mask(x, features, y), _online_mask(model, x, features, y))
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x, target=y), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.update_ema()
    assert all(p.grad is None and not p.requires_grad for p in model.ema_model.parameters())
    assert not torch.equal(model.ema_model.fc.weight, model.fc.weight)
    features = model.forward_features(x)
    assert not torch.equal(model.saliency_keep_mask(x, features, y), _online_mask(model, x, features, y))


def _online_mask(model, x, features, y):
    online = copy.copy(model)
    online.sgdrop_attribution = AttributionSource.ONLINE
    return online.saliency_keep_mask(x, features, y)


def test_update_ema_arithmetic():
    decay = 0.5
    model = reference_model(attribution='ema', sgdrop_ema_decay=decay)
    weights = [torch.full_like(HEAD_WEIGHT, float(v)) for v in (1., 3., 7., 15.)]
    expected = None
    for n, w in enumerate(weights, start=1):
        with torch.no_grad():
            model.fc.weight.copy_(w)
        model.update_ema()
        # n-th update: decay_n = min(decay, (n - 1) / (n + 9)); the first copies the weights
        decay_n = min(decay, (n - 1) / (n + 9))
        expected = w.clone() if n == 1 else decay_n * expected + (1 - decay_n) * w
        assert model.ema_updates == n
        torch.testing.assert_close(model.ema_model.fc.weight, expected, rtol=1e-6, atol=0)
    # after warmup the cap holds: update 30 would use (29 / 39) > 0.5 -> 0.5
    model.load_ema_state_dict({'num_updates': 29, 'state_dict': model.ema_model.state_dict()})
    before = model.ema_model.fc.weight.clone()
    with torch.no_grad():
        model.fc.weight.zero_()
    model.update_ema()
    torch.testing.assert_close(model.ema_model.fc.weight, before * decay)


def test_update_ema_is_noop_for_online():
    model = reference_model(attribution='online')
    model(LATENT.clone(), target=LABELS)
    model.update_ema()
    assert model.ema_model is None and model.ema_state_dict() is None


def data_parallel_replica(model: nn.Module) -> nn.Module:
    """What nn.DataParallel runs on each GPU: a Module._replicate_for_data_parallel copy, which shares the model's
    __dict__, given parameters (here the model's own; replicate() gives each device's copies)."""
    replica = model._replicate_for_data_parallel()
    replica._parameters = dict(model._parameters)
    return replica


def test_data_parallel_replicas_refuse_ema_attribution_and_run_online():
    # the replicas would share the one EMA network of the first device
    replica = data_parallel_replica(reference_model(attribution='ema'))
    with pytest.raises(RuntimeError, match='does not run under nn.DataParallel: train with DistributedDataParallel'):
        replica(LATENT.clone(), target=LABELS)
    replica = data_parallel_replica(reference_model(attribution='online'))
    assert torch.equal(replica(LATENT.clone(), target=LABELS), LOGITS_RHO_HALF)


def test_ema_stays_out_of_state_dict_and_parameters_and_roundtrips():
    model = reference_model(attribution='ema')
    model(LATENT.clone(), target=LABELS)
    model.update_ema()
    assert list(model.state_dict()) == ['scale', 'fc.weight']
    assert len(list(model.parameters())) == 2
    state = copy.deepcopy(model.ema_state_dict())
    assert state['num_updates'] == 1 and list(state['state_dict']) == ['scale', 'fc.weight']
    restored = reference_model(attribution='ema')
    restored.load_ema_state_dict(state)
    assert restored.ema_updates == 1
    assert torch.equal(restored.ema_model.fc.weight, model.ema_model.fc.weight)


def test_eval_and_untargeted_train_forward_are_the_base_model():
    base = ReferenceClassifier()
    model = reference_model(rho=0.5)
    with pytest.warns(UserWarning, match=r'without target.*model\(x, target=y\)'):
        assert torch.equal(model(LATENT), base(LATENT))
    model.eval()
    assert torch.equal(model(LATENT, target=LABELS), base(LATENT))


def test_latent_dropout_baseline():
    torch.manual_seed(0)
    # identity head: the logits are the latent features that reach the head
    model = add_sgdrop(ReferenceClassifier(torch.eye(4)), sgdrop_rho=0.0, latent_drop_rate=0.5).train()
    out = model(torch.ones(4000, 2, 1, 2))
    assert 0.45 < out.eq(0).float().mean().item() < 0.55
    assert set(out.unique().tolist()) == {0.0, 2.0}  # inverted dropout scaling by 1 / (1 - p)
    model.eval()
    assert torch.equal(model(torch.ones(3, 2, 1, 2)), torch.ones(3, 4))


def test_linear_rho_schedule():
    schedule = LinearRhoSchedule(0.01, 0.05, num_epochs=5)
    assert [round(schedule(e), 10) for e in range(5)] == [0.01, 0.02, 0.03, 0.04, 0.05]
    assert schedule(7) == pytest.approx(0.05)
    constant = LinearRhoSchedule(0.02, num_epochs=80)
    assert {constant(e) for e in range(80)} == {0.02}
    with pytest.raises(ValueError, match='end rho'):
        LinearRhoSchedule(0.01, 1.5, num_epochs=3)


@pytest.mark.parametrize('rho', [1.0, -0.1, float('nan'), 2])
def test_bad_rho(rho):
    with pytest.raises(ValueError, match=r'\[0, 1\)'):
        reference_model(rho=rho)
    model = reference_model()
    with pytest.raises(ValueError, match=r'\[0, 1\)'):
        model.sgdrop_rho = rho


def test_bad_attribution_source():
    with pytest.raises(ValueError, match="choose one of 'ema', 'online'"):
        reference_model(attribution='gradcam')
    model = reference_model()
    with pytest.raises(ValueError, match="choose one of 'ema', 'online'"):
        model.sgdrop_attribution = 'gradcam'
    model.sgdrop_attribution = 'ema'
    assert model.sgdrop_attribution is AttributionSource.EMA


def test_ema_decay_setting_is_validated_and_followed():
    model = reference_model(attribution='ema', sgdrop_ema_decay=0.5)
    with pytest.raises(ValueError, match='sgdrop_ema_decay'):
        model.sgdrop_ema_decay = 1.0
    model.load_ema_state_dict({'num_updates': 100, 'state_dict': model.state_dict()})
    model.sgdrop_ema_decay = 0.25  # changed after the EMA exists: the next update uses it
    before = model.ema_model.fc.weight.clone()
    with torch.no_grad():
        model.fc.weight.zero_()
    model.update_ema()
    torch.testing.assert_close(model.ema_model.fc.weight, before * 0.25)


@pytest.mark.parametrize('target, error, message', [
    (torch.tensor([0.0, 1.0]), TypeError, 'integer class indices'),
    (torch.tensor([[0], [1]]), ValueError, r'shape \(2,\)'),
    (torch.tensor([0, 3]), RuntimeError, r'a class outside \[0, 3\) for this model'),
    (torch.tensor([-1, 0]), RuntimeError, r'a class outside \[0, 3\)'),
    ([0, 1], TypeError, 'tensor of class indices'),
    (torch.tensor([0, 1], dtype=torch.uint8), TypeError, r'torch.long tensor of class indices, got torch.uint8'),
])
def test_bad_target(target, error, message):
    model = reference_model()
    with pytest.raises(error, match=message):
        model(LATENT.clone(), target=target)


def test_a_bad_ema_state_leaves_the_ema_as_it_was():
    model = reference_model(attribution='ema')
    model(LATENT.clone(), target=LABELS)
    model.update_ema()
    before = copy.deepcopy(model.ema_state_dict())
    zeros = {name: torch.zeros_like(value) for name, value in before['state_dict'].items()}
    with pytest.raises(ValueError, match="num_updates must be a count >= 0, got 'many'"):
        model.load_ema_state_dict({'num_updates': 'many', 'state_dict': zeros})
    after = model.ema_state_dict()
    assert after['num_updates'] == before['num_updates'] == 1
    assert all(torch.equal(after['state_dict'][k], v) for k, v in before['state_dict'].items())


def test_headless_model_is_rejected():
    model = reference_model()
    model.reset_classifier(0)
    with pytest.raises(ValueError, match='num_classes=0'):
        model(LATENT.clone(), target=LABELS)


def test_add_sgdrop_rejects_non_timm_module():
    with pytest.raises(TypeError, match='forward_features'):
        add_sgdrop(nn.Linear(2, 2))


def test_add_sgdrop_with_bad_settings_leaves_the_model_untouched():
    model = ReferenceClassifier()
    with pytest.raises(ValueError, match='sgdrop_ema_decay'):
        add_sgdrop(model, sgdrop_ema_decay=1.5)
    assert type(model) is ReferenceClassifier


def test_the_settings_are_one_checked_object():
    cfg = SGDropCfg(sgdrop_rho=0.0, sgdrop_rho_end=0.025, sgdrop_attribution='ema_head', latent_drop_rate=0.5)
    assert cfg.sgdrop_attribution is AttributionSource.EMA_HEAD and cfg.sgdrop_rho == 0.0
    assert SGDropCfg.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()['sgdrop_attribution'] == 'ema_head'
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sgdrop_rho = 0.5
    with pytest.raises(TypeError, match='sgdrop_p: no SGDrop setting; the settings are sgdrop_rho, sgdrop_rho_end'):
        SGDropCfg.from_dict({'sgdrop_p': 0.1})
    with pytest.raises(ValueError, match=r'sgdrop_rho_end must be in \[0, 1\)'):
        SGDropCfg(sgdrop_rho_end=1.0)
    # a curriculum's model drops the rho it ended at; SGDrop runs without the dropout baseline's rate
    sgdrop = cfg.of_regularizer('sgdrop')
    assert sgdrop.model_args() == dict(sgdrop_rho=0.025, sgdrop_attribution=AttributionSource.EMA_HEAD,
                                       sgdrop_attribution_relu='gradient', sgdrop_reference='zero',
                                       sgdrop_ema_decay=0.999, latent_drop_rate=0.0)
    assert [sgdrop.rho_schedule(3)(epoch) for epoch in range(3)] == [0.0, 0.0125, 0.025]
    # the paper's baselines: rho 0 and no EMA to keep, whatever was recorded beside them
    assert cfg.of_regularizer('dropout') == SGDropCfg(sgdrop_rho=0.0, sgdrop_attribution='online', latent_drop_rate=0.5)
    assert cfg.of_regularizer('none') == SGDropCfg(sgdrop_rho=0.0, sgdrop_attribution='online')
    with pytest.raises(ValueError, match="Unknown regularizer 'mixup': choose one of sgdrop, dropout, none"):
        cfg.of_regularizer('mixup')
    # a record: its regularizer's settings, the defaults for what it does not record
    assert SGDropCfg.of_record({'regularizer': 'sgdrop', 'sgdrop_rho': 0.1, 'architecture': 'x'}) == \
        SGDropCfg(sgdrop_rho=0.1)


def test_a_model_holds_the_settings_and_checks_each_change():
    model = add_sgdrop(ReferenceClassifier(), sgdrop_rho=0.25)
    assert model.sgdrop_cfg == SGDropCfg(sgdrop_rho=0.25)
    model.sgdrop_attribution = 'online'
    assert model.sgdrop_cfg == SGDropCfg(sgdrop_rho=0.25, sgdrop_attribution='online')
    with pytest.raises(ValueError, match=r'sgdrop_rho must be in \[0, 1\)'):
        model.sgdrop_rho = 1.5
    assert model.sgdrop_rho == 0.25
    with pytest.raises(TypeError, match='sgdrop_rho_end is no model argument'):
        add_sgdrop(ReferenceClassifier(), sgdrop_rho_end=0.1)
    with pytest.raises(TypeError, match='sgdrop_cfg must be an SGDropCfg without sgdrop_rho_end'):
        model.sgdrop_cfg = SGDropCfg(sgdrop_rho_end=0.1)
    with pytest.raises(TypeError, match='sgdrop_p: no SGDrop setting'):
        add_sgdrop(ReferenceClassifier(), sgdrop_p=0.1)


def test_a_whole_model_made_by_add_sgdrop_saves_and_loads_back():
    model = add_sgdrop(timm.create_model('resnet10t', num_classes=3), sgdrop_rho=0.05, sgdrop_attribution='ema_head')
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    model.train()(x, target=y)
    model.update_ema()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert type(loaded) is type(model) and loaded.sgdrop_cfg == model.sgdrop_cfg and loaded.ema_updates == 1
    assert all(torch.equal(a, b) for a, b in zip(loaded.ema_model.state_dict().values(),
                                                 model.ema_model.state_dict().values()))
    torch.manual_seed(0)
    expected = model(x, target=y)
    torch.manual_seed(0)
    assert torch.equal(loaded(x, target=y), expected)


def test_add_sgdrop_on_a_plain_timm_model():
    base = timm.create_model('resnet18', num_classes=4)
    keys = list(base.state_dict())
    model = add_sgdrop(base, sgdrop_rho=0.05)
    assert model is base and is_sgdrop_model(model) and list(model.state_dict()) == keys
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    model.eval()
    reference = timm.create_model('resnet18', num_classes=4).eval()
    reference.load_state_dict(model.state_dict())
    assert torch.equal(model(x), reference(x))
    model.train()
    assert model(x, target=y).shape == (2, 4) and model.ema_model is not None


def test_is_sgdrop_model_unwraps():
    model = reference_model()
    assert is_sgdrop_model(model)
    assert is_sgdrop_model(torch.compile(model, backend='eager'))
    assert not is_sgdrop_model(ReferenceClassifier())


def test_reset_classifier_restarts_ema():
    model = reference_model(attribution='ema')
    model(LATENT.clone(), target=LABELS)
    model.update_ema()
    model.reset_classifier(5)
    assert model.ema_model is None and model.ema_updates == 0
    logits = model(LATENT.clone(), target=torch.tensor([4, 0]))
    assert logits.shape == (2, 5) and model.ema_model.fc.out_features == 5


def test_repr_shows_the_sgdrop_settings():
    model = reference_model(rho=0.25, attribution='online')
    settings = repr(model).splitlines()[1].strip()
    assert settings == ('sgdrop_rho=0.25, sgdrop_attribution=online, sgdrop_attribution_relu=gradient, '
                        'sgdrop_reference=zero, sgdrop_ema_decay=0.999, latent_drop_rate=0.0')


@pytest.mark.parametrize('attribution', ['ema', 'online'])
def test_training_forward_reads_nothing_back_to_the_host(attribution):
    # aten._local_scalar_dense is what .item(), int(), float() and bool() of a tensor run: on a GPU, a sync
    model = timm.create_model('sgdrop_resnet10t', num_classes=10, sgdrop_attribution=attribution).train()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    model(images, target=labels)  # builds the EMA network
    with RecordOps() as recorded:
        model(images, target=labels).sum().backward()
        model.update_ema()
    assert 'aten._assert_async.msg' in recorded.ops  # the label range is still checked, on the device
    assert not [op for op in recorded.ops if '_local_scalar_dense' in op or op.startswith('aten.item')]


def test_on_a_class_token_vit_only_class_token_features_can_be_dropped():
    # the head reads the class token alone, so no patch token gets a gradient, hence an attribution (README)
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=1, num_classes=5)
    add_sgdrop(model, sgdrop_rho=0.25, sgdrop_attribution='online').train()
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    features = model.forward_features(images)
    dropped = ~model.saliency_keep_mask(images, features, labels)
    assert features.shape == (2, 17, 192)  # the class token, then 4x4 patch tokens
    assert not dropped[:, 1:].any()
    assert (dropped[:, 0].sum(1) > 0).all()
    assert (dropped.flatten(1).sum(1) < num_dropped_features(0.25, features[0].numel())).all()


def test_true_class_logit_drop_matches_hand_computation():
    # rho 0.5 on LATENT, the paper's rule: clean logits W @ z are [7, 1, 6] (y=0) and [0, 11, 6] (y=1); the masked ones
    # LOGITS_RHO_HALF. Drop: 7 - (-1) = 8 and 11 - (-4) = 15; margin over the runner-up: 7 - 6 = 1 and 11 - 6 = 5.
    model = reference_model(rho=0.5)
    assert torch.equal(model(LATENT.clone(), target=LABELS), LOGITS_RHO_HALF)
    stats = model.sgdrop_step_stats
    assert torch.equal(stats['true_class_logit_drop'], torch.tensor([8., 15.]))
    assert torch.equal(stats['clean_logit_margin'], torch.tensor([1., 5.]))
    # no mask (rho 0): nothing dropped, the margin of the training logits themselves
    model = reference_model(rho=0.0)
    model(LATENT.clone(), target=LABELS)
    assert torch.equal(model.sgdrop_step_stats['true_class_logit_drop'], torch.zeros(2))
    assert torch.equal(model.sgdrop_step_stats['clean_logit_margin'], torch.tensor([1., 5.]))
    assert set(model.sgdrop_step_stats) == set(STEP_STAT_NAMES)


def test_an_evaded_mask_shows_no_logit_drop():
    # every feature <= 0: the paper's attribution has nothing to select, the mask is empty and the drop is zero
    model = reference_model(rho=0.5)
    model(-LATENT, target=LABELS)
    assert torch.equal(model.sgdrop_step_stats['true_class_logit_drop'], torch.zeros(2))
    assert torch.equal(model.sgdrop_step_stats['dropped_attribution_share'], torch.zeros(2))


# channel_mean on LATENT: channels (c0, c1) at positions (p0, p1). Sample 0: c0 = [2, 1], c1 = [3, 4], so r = [2.5, 2.5]
# and z - r = [-0.5, -1.5, 0.5, 1.5]; with W[0] = [1, -1, 2, 0], ReLU(W[0] * (z - r)) = [0, 1.5, 1, 0]. Sample 1:
# c0 = [1, 5], c1 = [2, 0], r = [1.5, 2.5], z - r = [-0.5, 2.5, 0.5, -2.5]; W[1] = [0, 3, -2, 1] gives [0, 7.5, 0, 0].
CHANNEL_MEAN_ATTRIBUTION = torch.tensor([[0., 1.5, 1., 0.], [0., 7.5, 0., 0.]]).view(2, 2, 1, 2)
# rho 0.25, k = 1: both samples drop feature 1 (c0 at p1), set to r = 2.5: z' = [2, 2.5, 3, 4] and [1, 2.5, 2, 0]
CHANNEL_MEAN_LOGITS = torch.tensor([[5.5, 5.5, 7.5], [2.5, 3.5, 3.5]])


def test_zero_reference_is_the_papers_map_and_mask():
    model = ReferenceClassifier()
    attribution = latent_attribution(model.forward_head, LATENT, LABELS, reference='zero')
    assert torch.equal(attribution, ATTRIBUTION)
    model = reference_model(rho=0.5, sgdrop_reference='zero')
    assert torch.equal(model(LATENT.clone(), target=LABELS), LOGITS_RHO_HALF)


def test_channel_mean_reference_matches_hand_computation():
    head = ReferenceClassifier().forward_head
    attribution = latent_attribution(head, LATENT, LABELS, relu='product', reference='channel_mean')
    assert torch.equal(attribution, CHANNEL_MEAN_ATTRIBUTION)
    reference = torch.tensor([[2.5, 2.5], [1.5, 2.5]]).view(2, 1, 1, 2)
    assert torch.equal(latent_reference(LATENT, 'channel_mean'), reference)
    assert latent_reference(LATENT, 'zero') is None
    model = reference_model(rho=0.25, sgdrop_attribution_relu='product', sgdrop_reference='channel_mean')
    assert torch.equal(model(LATENT.clone(), target=LABELS), CHANNEL_MEAN_LOGITS)
    # a linear head on a ReLU latent: the mask moves only features whose move to r lowers the true-class logit, by
    # exactly their attribution (clean 7 and 11, masked 5.5 and 3.5)
    assert torch.equal(model.sgdrop_step_stats['true_class_logit_drop'], torch.tensor([1.5, 7.5]))
    assert model.sgdrop_cfg.model_args()['sgdrop_reference'] == 'channel_mean'
    with pytest.raises(ValueError, match="Unknown sgdrop_reference 'median': choose one of 'zero', 'channel_mean'"):
        reference_model(sgdrop_reference='median')
    with pytest.raises(ValueError, match=r'needs a latent of shape \(B, C\) or \(B, C, H, W\), got \(2, 2, 2\)'):
        latent_reference(torch.ones(2, 2, 2), 'channel_mean')


class PoolNormHead(nn.Module):
    """ConvNeXt's head in small: global average pool, LayerNorm over channels, linear classifier."""

    def __init__(self, channels: int = 6, num_classes: int = 4):
        super().__init__()
        self.num_classes = num_classes
        self.norm = nn.LayerNorm(channels)
        self.fc = nn.Linear(channels, num_classes)

    def forward_features(self, x):
        return x

    def forward_head(self, x, pre_logits=False):
        x = self.norm(x.mean((2, 3)))
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_channel_mean_mask_ignores_an_offset_shared_by_the_channels_of_a_position():
    torch.manual_seed(0)
    model = add_sgdrop(PoolNormHead().double(), sgdrop_rho=0.25, sgdrop_attribution='online',
                       sgdrop_attribution_relu='product', sgdrop_reference='channel_mean').train()
    z = torch.randn(3, 6, 2, 2, dtype=torch.float64)
    target = torch.tensor([0, 1, 3])
    offset = 10 * torch.randn(3, 1, 2, 2, dtype=torch.float64)  # one constant per sample and position
    keep = model.saliency_keep_mask(z, z, target)
    assert (~keep).sum() == 3 * 6  # k = floor(0.25 * 24) = 6 per sample
    assert torch.equal(model.saliency_keep_mask(z + offset, z + offset, target), keep)
    assert torch.allclose(model(z + offset, target=target), model(z, target=target), atol=1e-10)
    # the paper's zero reference is not invariant: shifted below zero, its mask selects other features
    model.sgdrop_reference, model.sgdrop_attribution_relu = 'zero', 'gradient'
    assert not torch.equal(model.saliency_keep_mask(z - 20, z - 20, target), model.saliency_keep_mask(z, z, target))


def test_ema_head_attribution_is_the_ema_head_on_the_online_latent():
    # The EMA's encoder scale is 3 and its head EMA_WEIGHT; the online encoder scale is 1 (z = x) and its head
    # HEAD_WEIGHT. ema_head: ReLU(EMA_WEIGHT[y]) * z on the online z: sample 0 [0, 1, 0, 4], drops feature 3; sample 1
    # [1, 0, 0, 0], drops feature 0. The 'ema' source would attribute 3 z and pick the same features, so the EMA head
    # is told apart from the online head by the ranking, and the online latent from the EMA latent by the drop.
    ema_weight = torch.tensor([[0., 1., 0., 1.], [1., 0., 0., 0.], [0., 0., 0., 0.]])
    model = reference_model(rho=0.25, attribution='ema_head')
    model.load_ema_state_dict({'num_updates': 1, 'state_dict': {'scale': torch.full((1, 2, 1, 2), 3.),
                                                                 'fc.weight': ema_weight}})
    keep = torch.tensor([[1., 1., 1., 0.], [0., 1., 1., 1.]])
    assert torch.equal(model(LATENT.clone(), target=LABELS), (LATENT.flatten(1) * keep) @ HEAD_WEIGHT.T)
    # the dropped share is of the attribution on the online latent: 4 of 1 + 4, and 1 of 1
    assert torch.equal(model.sgdrop_step_stats['dropped_attribution_share'], torch.tensor([0.8, 1.0]))
    model.update_ema()
    assert model.ema_updates == 2


def test_ema_head_skips_the_ema_encoder():
    model = reference_model(rho=0.25, attribution='ema_head')
    model(LATENT.clone(), target=LABELS)
    calls = []
    model.ema_model.forward_features = lambda x: calls.append(x) or x
    model(LATENT.clone(), target=LABELS)
    assert calls == []
    model.sgdrop_attribution = 'ema'
    model(LATENT.clone(), target=LABELS)
    assert len(calls) == 1


@pytest.mark.parametrize('arch, model_kwargs, dtype', [
    ('sgdrop_resnet10t', {}, torch.bfloat16),
    ('sgdrop_convnext_atto', {}, torch.float32),  # its latent leaves a LayerNorm, in float32 under autocast
    ('sgdrop_vgg11', {'mlp_ratio': 0.03125}, torch.bfloat16),
])
def test_under_bf16_autocast_the_mask_drops_exactly_k(arch, model_kwargs, dtype):
    # bf16 attributions tie at the threshold (ResNet-10-T dropped 81 to 83 of k = 81 before they were taken in float32)
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=10, sgdrop_rho=0.01, sgdrop_attribution='online',
                              **model_kwargs).train()
    images, target = torch.randn(8, 3, 128, 128), torch.arange(8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        features = model.forward_features(images)
        keep = model.saliency_keep_mask(images, features, target)
    assert features.dtype == dtype
    k = num_dropped_features(0.01, features[0].numel())
    assert k == {'sgdrop_convnext_atto': 51}.get(arch, 81)
    assert (~keep).flatten(1).sum(1).tolist() == [k] * 8


def test_torch_compile_does_not_trace_the_copy_that_builds_the_ema():
    # the first SGDrop step builds the EMA network (a deepcopy of the model): traced, it added 3 graph breaks (and hit
    # dynamo's recompile limit); now a compiled first step breaks where a step with an EMA already built does
    from torch._dynamo.utils import counters
    images, target = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    breaks = []
    for ema_built in (True, False):
        torch.manual_seed(0)
        model = timm.create_model('sgdrop_resnet10t', num_classes=4, sgdrop_rho=0.1).train()
        if ema_built:
            model(images, target=target)
        torch._dynamo.reset()
        counters.clear()
        torch.compile(model, backend='eager')(images, target=target)
        breaks.append(sum(counters['graph_break'].values()))
        assert model.ema_model is not None
    torch._dynamo.reset()
    assert breaks[0] == breaks[1] > 0
