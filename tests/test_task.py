"""The timm.task training task for SGDrop models (sgdrop_zoo/task.py) against the same steps done by hand."""
import copy

import pytest
import timm
import torch
import torch.nn as nn

from sgdrop_zoo import SGDropClassificationTask


def _batches(num_steps=3):
    generator = torch.Generator().manual_seed(0)
    for _ in range(num_steps):
        yield torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 10, (4,), generator=generator)


def test_task_matches_the_manual_sgdrop_loop():
    torch.manual_seed(0)
    by_hand = timm.create_model('sgdrop_cifar_cnn', sgdrop_rho=0.05).train()
    with_task = copy.deepcopy(by_hand)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(by_hand.parameters(), lr=0.05, momentum=0.9)
    task = SGDropClassificationTask(with_task, criterion=criterion, verbose=False)
    task_optimizer = torch.optim.SGD(task.parameters(), lr=0.05, momentum=0.9)
    for x, y in _batches():
        # by hand: the labels go to the model, and the EMA follows each optimizer step
        loss = criterion(by_hand(x, target=y), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        by_hand.update_ema()

        result = task(x, y)
        task_optimizer.zero_grad()
        result['loss'].backward()
        task_optimizer.step()
        task.update_ema()
        assert torch.equal(result['loss'], loss)

    assert with_task.ema_updates == by_hand.ema_updates == 3
    for (name, p), q in zip(by_hand.state_dict().items(), with_task.state_dict().values()):
        assert torch.equal(p, q), name
    for (name, p), q in zip(by_hand.ema_model.state_dict().items(), with_task.ema_model.state_dict().values()):
        assert torch.equal(p, q), name


def test_task_also_updates_its_evaluation_ema():
    torch.manual_seed(0)
    model = timm.create_model('sgdrop_cifar_cnn', sgdrop_rho=0.05, sgdrop_attribution='online').train()
    task = SGDropClassificationTask(model, verbose=False)
    task.setup_ema(decay=0.0)  # decay 0: the evaluation EMA is a copy of the latest weights
    optimizer = torch.optim.SGD(task.parameters(), lr=0.05)
    for x, y in _batches(num_steps=1):
        task(x, y)['loss'].backward()
        optimizer.step()
        task.update_ema()
    ema = task.get_trainable_module(ema=True).module
    assert all(torch.equal(p, q) for p, q in zip(ema.state_dict().values(), model.state_dict().values()))


def test_task_rejects_a_plain_model_and_soft_targets():
    with pytest.raises(TypeError, match='add_sgdrop'):
        SGDropClassificationTask(timm.create_model('resnet10t', num_classes=3), verbose=False)
    task = SGDropClassificationTask(timm.create_model('sgdrop_cifar_cnn').train(), verbose=False)
    with pytest.raises(TypeError, match='hard labels'):
        task(torch.randn(2, 3, 32, 32), torch.full((2, 10), 0.1))
