"""Progress meters of the training recipe: timm's ``AverageMeter`` on device tensors, summed over processes.

A training step adds its loss and accuracies to the meters as float64 tensors on the device, so that it never waits
for the GPU; they are read on the host only when a progress line is printed and at the end of the epoch.
"""
from collections.abc import Sequence

import torch
import torch.distributed as dist
from timm.utils import AverageMeter, accuracy

__all__ = ['ProgressMeter', 'all_reduce_meters', 'record_batch']


def record_batch(meters: Sequence[AverageMeter], output: torch.Tensor, target: torch.Tensor,
                 loss: torch.Tensor) -> None:
    """Add a batch's loss, Acc@1 and Acc@5 to `meters` without reading them on the host.

    The meters add float64 tensors on the device, read only when printed and at the end of the epoch, so that a step
    does not wait for the GPU (float64: sums over a whole ImageNet epoch stay exact to the image).
    """
    acc1, acc5 = accuracy(output, target, topk=(1, 5))
    for meter, value in zip(meters, (loss.detach(), acc1, acc5)):
        meter.update(value.double(), target.size(0))


def all_reduce_meters(meters: Sequence[AverageMeter], device: torch.device) -> None:
    """Sum each meter's sum and count over the processes, so that its average is over all their images."""
    # float64: the counts of large validation sets stay exact
    totals = torch.tensor([[float(meter.sum), meter.count] for meter in meters], dtype=torch.float64, device=device)
    dist.all_reduce(totals, dist.ReduceOp.SUM)
    for meter, (total, count) in zip(meters, totals.tolist()):
        meter.sum, meter.count = total, int(count)
        meter.avg = meter.sum / max(meter.count, 1)


class ProgressMeter:
    """Prints named meters every few batches and their averages at the end, on the main process only."""

    def __init__(self, num_batches: int, meters: dict[str, tuple[AverageMeter, str]], prefix: str = '',
                 enabled: bool = True):
        """`meters` maps each name to its meter and the format of its values, e.g. "6.3f"."""
        digits = len(str(num_batches))
        self.batch_fmtstr = f'[{{:{digits}d}}/{num_batches:{digits}d}]'
        self.meters = meters
        self.prefix = prefix
        self.enabled = enabled

    def display(self, batch: int) -> None:
        if self.enabled:
            entries = [self.prefix + self.batch_fmtstr.format(batch)]
            entries += [f'{name} {meter.val:{fmt}} ({meter.avg:{fmt}})' for name, (meter, fmt) in self.meters.items()]
            print('\t'.join(entries), flush=True)

    def display_summary(self, names: Sequence[str]) -> None:
        if self.enabled:
            averages = ' '.join(f'{name} {self.meters[name][0].avg:.3f}' for name in names)
            print(f' * {averages} ({self.meters[names[0]][0].count} images)', flush=True)
