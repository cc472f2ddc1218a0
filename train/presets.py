"""The recipe's presets (``presets.json``): named option defaults, and the rho each architecture family trains with.

``train/main.py --preset NAME`` applies them; the benchmark scripts read the families' rho from here, so that the
file has one reader.
"""
import json
from pathlib import Path

from sgdrop_zoo.sgdrop import DEFAULT_RHO

__all__ = ['PRESETS_PATH', 'load_presets', 'rho_for_arch']

PRESETS_PATH = Path(__file__).with_name('presets.json')


def load_presets() -> dict[str, dict]:
    """The presets by name (the file's ``_comment`` left out)."""
    with PRESETS_PATH.open() as f:
        return {name: preset for name, preset in json.load(f).items() if not name.startswith('_')}


def rho_for_arch(arch: str, preset: dict) -> float:
    """The rho of ``preset`` for ``arch``: the first of its ``sgdrop_rho_by_arch`` patterns that occurs in ``arch``,
    else the paper's default."""
    for pattern, rho in preset.get('sgdrop_rho_by_arch', []):
        if pattern in arch:
            return rho
    return DEFAULT_RHO
