"""The evaluation sharding rule, shared by the ImageFolder and the in-memory data paths, the in-memory loader, and
class-balanced subsets."""
import pytest
import torch
import torch.utils.data

from recipe_data import make_loader  # train/recipe_data.py
from sgdrop_zoo.data import DatasetError, InMemoryLoader, per_class_subset


@pytest.mark.parametrize('world_size', [1, 2, 3])
def test_both_data_paths_evaluate_each_image_once_on_the_same_process(world_size):
    # 7 one-pixel images whose value is their index, so a batch says which images it holds
    images = torch.arange(7, dtype=torch.uint8).view(7, 1, 1, 1)
    targets = torch.arange(7)
    seen_in_memory, seen_folder = [], []
    for rank in range(world_size):
        in_memory = InMemoryLoader(images, targets, batch_size=2, shuffle=False, mean=[0.0], std=[1 / 255], rank=rank,
                                   world_size=world_size, device=torch.device('cpu'))
        folder = make_loader(torch.utils.data.TensorDataset(images, targets), train=False, batch_size=2, workers=0,
                             rank=rank, world_size=world_size)
        in_memory_targets = [t for _, batch in in_memory for t in batch.tolist()]
        folder_targets = [t for _, batch in folder for t in batch.tolist()]
        # by hand: rank r of w takes r, r + w, r + 2w, ...
        assert in_memory_targets == folder_targets == list(range(rank, 7, world_size))
        assert len(in_memory) == len(folder)
        seen_in_memory += in_memory_targets
        seen_folder += folder_targets
    assert sorted(seen_in_memory) == sorted(seen_folder) == list(range(7))


def test_the_in_memory_loader_never_makes_the_host_wait_for_a_copy(monkeypatch: pytest.MonkeyPatch):
    # on a GPU a blocking host-to-device copy (the crops' parameters, drawn on the CPU) stalls the host every step;
    # the meta device stands in for the GPU here, to see every copy a batch makes and how
    images, targets = torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8), torch.arange(4)
    loader = InMemoryLoader(images, targets, 2, True, (0.5,) * 3, (0.5,) * 3, 0, 1, torch.device('meta'),
                            crop_flip_size=8)
    copies, to = [], torch.Tensor.to

    def recorded_to(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        moved = to(tensor, *args, **kwargs)
        if tensor.device.type == 'cpu' and moved.device.type == 'meta':
            copies.append(kwargs.get('non_blocking', False))
        return moved

    monkeypatch.setattr(torch.Tensor, 'to', recorded_to)
    assert [tuple(x.shape) for x, _ in loader] == [(2, 3, 8, 8), (2, 3, 8, 8)]
    # per batch: the images, the crops' parameters and the labels
    assert copies == [True] * 6


def test_a_per_class_subset_takes_each_class_first_images_in_order_among_those_not_held_out():
    targets = [0, 1, 0, 1, 0, 1, 2, 2, 2]
    order = [8, 0, 1, 2, 3, 4, 5, 6, 7]
    # by hand: class 0 in order is 0, 2, 4; class 1 is 1, 3, 5; class 2 is 8, 6, 7
    assert per_class_subset(order, targets, 2, ['a', 'b', 'c']) == [8, 0, 1, 2, 3, 6]
    # images held out before (order without them) cannot be taken, though the folder holds them
    without_held_out = [index for index in order if index not in {2, 4}]
    with pytest.raises(DatasetError, match=r'^2 images per class asked for, but class a has only 1; ask for at most 1'):
        per_class_subset(without_held_out, targets, 2, ['a', 'b', 'c'])
    # a class with no image in order at all is the smallest
    with pytest.raises(DatasetError, match='but class c has only 0'):
        per_class_subset([0, 1, 2, 3], targets, 1, ['a', 'b', 'c'])
