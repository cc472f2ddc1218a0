"""Training curves of several runs on one figure, from the ``log.jsonl`` files of the recipe or ``finetune``.

    plot_runs(['runs/vanilla/log.jsonl', 'runs/sgdrop/log.jsonl'], 'curves.png')   # `sgdrop-zoo plot`

Validation top-1 per epoch, and the attribution area ratio per epoch when the logs hold ``val_area_ratio``. Files
only (matplotlib's ``Figure`` with its Agg canvas, no display), with the Okabe-Ito colorblind-safe palette.
"""
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.figure import Figure

from .errors import OptionError
from .run_files import read_log

__all__ = ['OKABE_ITO', 'plot_runs', 'read_curves']

OKABE_ITO = ('#0072B2', '#D55E00', '#009E73', '#CC79A7', '#E69F00', '#56B4E9', '#F0E442', '#000000')
PANELS = (('val_acc1', 'validation top-1 (%)'), ('val_area_ratio', 'attribution area ratio'))


def read_curves(path: Union[str, Path]) -> list[dict]:
    """The epoch records of a ``log.jsonl`` (``run_files.read_log``), each with the ``val_acc1`` a curve needs.

    Raises:
        RunFileError: There is no such log, or a record is not an epoch's.
        ValueError: The log is empty or a record holds no ``val_acc1``.
    """
    path = Path(path)
    records = read_log(path)
    if not records or any('val_acc1' not in r for r in records):
        raise ValueError(f'{path}: not a training log (each line needs epoch and val_acc1).')
    return records


def plot_runs(logs: Sequence[Union[str, Path]], output: Union[str, Path], labels: Optional[Sequence[str]] = None,
              width_px: int = 1200, height_px: int = 450, dpi: int = 100) -> Path:
    """Draw the runs' curves to ``output``, ``width_px`` x ``height_px`` pixels, in the format its suffix names (PNG,
    SVG, PDF or another that matplotlib writes).

    Args:
        logs: ``log.jsonl`` files or run folders.
        output: The image file.
        labels: Legend names; default: each log's folder name.
        width_px: Figure width.
        height_px: Figure height.
        dpi: Pixels per inch of the saved figure.
    """
    if labels is not None and len(labels) != len(logs):
        raise OptionError('{count} {labels} for {runs} logs: give one per log.', count=len(labels), runs=len(logs))
    if len(logs) > len(OKABE_ITO):
        raise ValueError(f'at most {len(OKABE_ITO)} runs per figure, got {len(logs)}.')
    # matplotlib names the format it cannot write only after drawing, and writes a suffix-less name as PNG
    formats = FigureCanvasBase.get_supported_filetypes()
    if Path(output).suffix.lower().lstrip('.') not in formats:
        raise OptionError('{output} {path}: name a file ending in one of {suffixes}.', path=output,
                          suffixes=', '.join(f'.{name}' for name in sorted(formats)))
    runs = [read_curves(log) for log in logs]
    labels = labels or [Path(log).parent.name if Path(log).is_file() else Path(log).name for log in logs]
    panels = [(key, title) for key, title in PANELS if any(key in r for run in runs for r in run)]
    figure = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, layout='constrained')
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axis, (key, title) in zip(axes, panels):
        for run, label, color in zip(runs, labels, OKABE_ITO):
            points = [(r['epoch'], r[key]) for r in run if r.get(key) is not None]
            if points:
                axis.plot(*zip(*points), marker='o', markersize=3, color=color, label=label)
        axis.set_xlabel('epoch')
        axis.set_ylabel(title)
        axis.grid(alpha=0.3)
        axis.legend()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=dpi)
    return output
