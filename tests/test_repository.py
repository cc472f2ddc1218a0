"""What the repository records for others: committed results, records and cards name no path of one machine."""
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# folders and files whose text others read: results with their commands, hub_configs records, cards, READMEs
RECORDED = ['benchmarks/results', 'hub_configs', 'README.md', 'MODEL_CARD.md', 'benchmarks/README.md',
            'train/README.md', 'train/presets.json']
BINARY_SUFFIXES = {'.png', '.safetensors'}
LOCAL_PATH = re.compile(r'(?<![\w.])/(?:work|root|tmp|home|Users|mnt|opt)/')


def recorded_files() -> list:
    files = []
    for name in RECORDED:
        path = REPO_ROOT / name
        files.extend(sorted(p for p in path.rglob('*') if p.is_file()) if path.is_dir() else [path])
    return [p for p in files if p.suffix not in BINARY_SUFFIXES]


@pytest.mark.parametrize('path', recorded_files(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_recorded_text_names_no_local_path(path: Path):
    text = path.read_text(encoding='utf-8')
    found = [text[max(0, m.start() - 40):m.end() + 40] for m in LOCAL_PATH.finditer(text)]
    assert not found, f'{path.relative_to(REPO_ROOT)} records local paths: {found}'
