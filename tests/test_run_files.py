"""log.jsonl's one reader, `run_files.read_log`, and the resume's trim of it."""
import json
from pathlib import Path

import pytest

from sgdrop_zoo.run_files import RunFileError, append_log, keep_log_until, read_log

RECORDS = [{'epoch': 1, 'val_acc1': 10.5, 'lr': 0.1}, {'epoch': 2, 'val_acc1': 1 / 3, 'lr': float('nan')},
           {'epoch': 3, 'val_acc1': 30.0, 'lr': 1e-05}]


def test_read_log_gives_back_what_append_log_wrote_from_a_file_or_its_folder(tmp_path: Path):
    for record in RECORDS:
        append_log(tmp_path / 'log.jsonl', record)
    for path in (tmp_path / 'log.jsonl', tmp_path):
        records = read_log(path)
        assert [r['epoch'] for r in records] == [1, 2, 3]
        assert records[1]['val_acc1'] == 1 / 3 and records[1]['lr'] != records[1]['lr']  # NaN read back as NaN


def test_a_cut_last_line_is_left_out_and_any_other_bad_line_is_refused(tmp_path: Path):
    log = tmp_path / 'log.jsonl'
    log.write_text(json.dumps(RECORDS[0]) + '\n' + json.dumps(RECORDS[1])[:9])
    assert read_log(log) == [RECORDS[0]]
    for bad in ('{"epoch": "1"}', '{"epoch": true}', '[1]', '{"epoch": 1'):
        log.write_text(bad + '\n' + json.dumps(RECORDS[1]) + '\n')
        with pytest.raises(RunFileError, match=f'^{log}: line 1 is not an epoch record; delete or repair that line'):
            read_log(log)
    with pytest.raises(RunFileError, match=f'^{tmp_path / "none" / "log.jsonl"}: no such log'):
        read_log(tmp_path / 'none' / 'log.jsonl')


def test_keep_log_until_drops_later_epochs_and_a_cut_line_and_leaves_a_complete_log_untouched(tmp_path: Path):
    log = tmp_path / 'log.jsonl'
    lines = ''.join(json.dumps(r) + '\n' for r in RECORDS)
    log.write_text(lines)
    before = log.stat().st_mtime_ns
    keep_log_until(log, 3)
    assert log.read_text() == lines and log.stat().st_mtime_ns == before
    log.write_text(lines + '{"epoch": 4, "val')
    keep_log_until(log, 2)
    # byte for byte the lines append_log wrote for epochs 1 and 2
    assert log.read_text() == ''.join(json.dumps(r) + '\n' for r in RECORDS[:2])
