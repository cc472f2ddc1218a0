"""The files of a training run in its ``--output`` folder, written so that a kill at any moment loses nothing.

Checkpoints are written to a temporary file of the same folder and renamed over the old one (``atomic_write``);
``log.jsonl`` gets one line per epoch, appended before the epoch's checkpoint (``append_log``, its one writer;
``read_log`` is its one reader), and a resumed run drops the lines of the epochs it trains again
(``keep_log_until``); what a killed write left behind is removed when the run starts again
(``remove_partial_writes``), and only that. A write the system refuses stops the run with one line. A checkpoint
holds the random state too (``get_rng_state``), so that a resumed run continues the interrupted one exactly.

The rules of every command's output, checked before any work (``check_output_folder`` and the others): it can be
written, it holds no earlier result unless told to replace it, and it is neither ``hub_configs/`` nor the folder the
command reads its model from.
"""
import contextlib
import fcntl
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Optional

import torch

from .errors import OptionError
from .hub_files import CONFIG_NAME, WEIGHTS_NAME
from .pretrained import hub_configs_dir, packaged_hub_configs_dir, tag_folder

__all__ = [
    'BEST_NAME', 'CHECKPOINT_NAME', 'LOCK_NAME', 'LOG_NAME', 'PARTIAL_WRITE_SUFFIX', 'RUN_FILES', 'RunFileError',
    'append_log', 'atomic_write', 'check_output_folder', 'check_output_is_not_source',
    'check_output_outside_hub_configs', 'check_writable_file', 'check_writable_folder', 'copy_file', 'epoch_record',
    'get_rng_state', 'hold_folder', 'keep_log_until', 'prepare_output', 'read_log', 'remove_partial_writes',
    'set_rng_state', 'write_error',
]

# the suffix of the temporary files and folders of an unfinished write (a run killed while writing one leaves it):
# only the writers of run files make such names, so only they are removed when the run resumes
PARTIAL_WRITE_SUFFIX = '.sgdrop-partial'
CHECKPOINT_NAME = 'checkpoint.pth.tar'
BEST_NAME = 'model_best.pth.tar'
LOG_NAME = 'log.jsonl'
# every file a run writes into its folder: another run's, found there, is never replaced unless asked to
RUN_FILES = (LOG_NAME, CHECKPOINT_NAME, BEST_NAME, WEIGHTS_NAME, CONFIG_NAME)
# held by the process that writes into a folder (hold_folder), and named with its pid
LOCK_NAME = '.sgdrop-zoo.lock'


class RunFileError(Exception):
    """A run file that cannot be written, or read back on resume; the message says what to do, in one line."""


@contextlib.contextmanager
def hold_folder(folder: Path) -> Iterator[None]:
    """Hold ``folder`` for this process while the block runs: another run or fine-tune into it is refused.

    An advisory lock (``flock``) on ``LOCK_NAME`` in the folder, which names the holder's pid. The system releases it
    when the process ends, however it ends, so a killed run leaves no lock to remove and resumes as before; a finished
    one removes the file.

    Raises:
        RunFileError: Another process holds the folder, or it cannot be created; in one line.
    """
    path = Path(folder) / LOCK_NAME
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors='replace').strip() or 'unknown'
                os.close(fd)
                raise RunFileError(f'{folder} is in use by another run or fine-tune (pid {holder}), which writes '
                                   f'there; wait for it to end, or write into another folder') from None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)  # the holder removed the file as this process opened it: lock the one that is there now
        os.ftruncate(fd, 0)
        os.write(fd, f'{os.getpid()}\n'.encode())
    except OSError as e:
        raise write_error(path, e) from e
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # still held: no other process can have taken it
        os.close(fd)


def write_error(path: Path, error: Exception, kept: str = 'the files written before it are intact') -> RunFileError:
    """The one-line error of a write that the system refused (a full disk, a lost mount), saying what is as it was
    (``kept``): the one writer of the message for every command that writes files."""
    # safetensors reports a refused write as its own error, with the system's reason in its message
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
    return RunFileError(f'cannot write {path} ({reason}); {kept}: free some space there, or fix the folder')


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write `path` with `write(file)` into a temporary file of its folder, then rename it over `path`.

    Raises:
        RunFileError: The system refused the write; `path` is as it was, and the temporary file is gone.
    """
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix=PARTIAL_WRITE_SUFFIX)
    except OSError as e:
        raise write_error(path, e) from e
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp makes the file private; a checkpoint is an ordinary output file
        os.replace(tmp_name, path)
    except BaseException as e:
        os.unlink(tmp_name)
        # torch.save reports a failed write as a RuntimeError raised while handling the OSError
        cause = e if isinstance(e, OSError) else e.__context__
        if isinstance(cause, OSError):
            raise write_error(path, cause) from e
        raise


def copy_file(source: Path, path: Path) -> None:
    """Copy `source` to `path` with ``atomic_write``."""
    with source.open('rb') as src:
        atomic_write(path, lambda f: shutil.copyfileobj(src, f))


def prepare_output(output: Path, remove_previous_run: bool) -> None:
    """Create `output`, remove what a killed write left there, and the files of the run it replaces if asked to."""
    output.mkdir(parents=True, exist_ok=True)
    remove_partial_writes(output)
    if remove_previous_run:
        # the replaced run's files go now, so that none of them can pass for this run's
        for name in RUN_FILES:
            (output / name).unlink(missing_ok=True)


def remove_partial_writes(output: Path) -> None:
    """Remove what a run killed while writing a checkpoint, the log or the export left; the previous files are intact.

    Only names that the recipe's writers make are removed (``atomic_write``'s and ``save_export``'s), nothing of a
    user's that happens to look temporary.
    """
    for name in RUN_FILES:
        for partial in output.glob(f'.{name}.*{PARTIAL_WRITE_SUFFIX}'):
            if partial.is_file() and not partial.is_symlink():
                partial.unlink()
    for partial in output.glob(f'.export.*{PARTIAL_WRITE_SUFFIX}'):
        if partial.is_dir() and not partial.is_symlink():
            shutil.rmtree(partial)


def epoch_record(epoch: int, train_metrics: dict[str, float], val_metrics: dict[str, float],
                 clean_metrics: Optional[dict[str, float]], area_ratio: Optional[float], lr: float, sgdrop_rho: float,
                 epoch_time: float, regularizer: str) -> dict[str, Any]:
    """The recipe's log.jsonl line of the epoch `epoch` (counted from 0); train/README.md lists its fields."""
    return {
        'epoch': epoch + 1,
        'train_loss': train_metrics['loss'],
        'train_acc1': train_metrics['acc1'],
        'train_clean_acc1': clean_metrics['acc1'] if clean_metrics else None,
        # the SGDrop diagnostics of the training forwards (README, "Diagnostics")
        'train_dropped_attribution_share': train_metrics['dropped_attribution_share']
        if regularizer == 'sgdrop' else None,
        'train_nonpositive_feature_share': train_metrics['nonpositive_feature_share'],
        # the mask's true-class logit drop, and that drop as a share of the clean true-class margin over the
        # runner-up (a ratio of the epoch's means: a sample's own margin can be near zero or negative)
        'train_true_class_logit_drop': train_metrics['true_class_logit_drop'] if regularizer == 'sgdrop' else None,
        'train_clean_logit_margin': train_metrics['clean_logit_margin'],
        'train_logit_drop_share': train_metrics['true_class_logit_drop'] / train_metrics['clean_logit_margin']
        if regularizer == 'sgdrop' and train_metrics['clean_logit_margin'] > 0 else None,
        'val_loss': val_metrics['loss'],
        'val_acc1': val_metrics['acc1'],
        'val_acc5': val_metrics['acc5'],
        'val_count': val_metrics['count'],
        # only when measured, so that plots draw no empty area-ratio panel for the runs without it
        **({'val_area_ratio': area_ratio} if area_ratio is not None else {}),
        'lr': lr,
        'sgdrop_rho': sgdrop_rho,
        'img_per_s': train_metrics['count'] / epoch_time,
        'epoch_time_s': epoch_time,
    }


def append_log(log_path: Path, record: dict[str, Any]) -> None:
    """Append `record` to `log_path` as one JSON line, on disk when it returns.

    Raises:
        RunFileError: The system refused the write.
    """
    # a line cut short by a failed write is dropped when the run is resumed (read_log)
    try:
        with log_path.open('a') as f:
            f.write(json.dumps(record) + '\n')
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise write_error(log_path, e) from e


def read_log(path: Path) -> list[dict[str, Any]]:
    """The epoch records of a `log.jsonl` (or of the one in the folder `path`); an incomplete last line (a run killed
    while appending it, before that epoch's checkpoint) is left out, since that epoch is trained again.

    Raises:
        RunFileError: There is no such log, or a line before the last one is not an epoch record.
    """
    log_path = path / LOG_NAME if path.is_dir() else path
    if not log_path.is_file():
        raise RunFileError(f'{log_path}: no such log; pass the {LOG_NAME} of a run (or its output folder)')
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            record = None
        epoch = record.get('epoch') if isinstance(record, dict) else None
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            # not JSON, or no whole-number "epoch"
            raise RunFileError(f'{log_path}: line {number} is not an epoch record; delete or repair that line, then '
                               f'resume again')
        records.append(record)
    return records


def keep_log_until(log_path: Path, last_epoch: int) -> None:
    """Drop the log lines of epochs after `last_epoch`, which the run is about to train (again)."""
    if not log_path.exists():
        return
    # append_log's json.dumps of a record read back gives its line again, floats included
    kept = [json.dumps(record) for record in read_log(log_path) if record['epoch'] <= last_epoch]
    if kept != log_path.read_text().splitlines():
        atomic_write(log_path, lambda f: f.write(''.join(line + '\n' for line in kept).encode()))


def get_rng_state() -> dict[str, Any]:
    """The state of the random generators a run draws from (Python's, torch's, CUDA's), for its checkpoint."""
    state = {'python': random.getstate(), 'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a state of ``get_rng_state``: its CUDA part where it has one, on the GPUs both it and this machine
    have (a run saved on 8 GPUs resumes on 1)."""
    random.setstate(state['python'])
    torch.set_rng_state(state['torch'])
    if torch.cuda.is_available() and 'cuda' in state:
        for index, cuda_state in enumerate(state['cuda'][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def _check_creatable(output: Path, kind: str, parameter: str) -> None:
    """Raise OptionError unless this process can write ``output``, or create it in its nearest existing folder."""
    existing = output
    while not existing.exists():
        existing = existing.parent
    if existing != output and not existing.is_dir():
        raise OptionError('{' + parameter + '} {path}: {existing} is a file, so nothing can be created in it; pass '
                          'a {kind} in a folder.', path=output, existing=existing, kind=kind)
    if not os.access(existing, os.W_OK | (os.X_OK if existing.is_dir() else 0)):
        raise OptionError('{' + parameter + '} {path}: {existing} is not writable; pass a {kind} you can write to.',
                          path=output, existing=existing, kind=kind)


def check_writable_folder(output: Path, parameter: str = 'output') -> None:
    """Raise OptionError unless ``output`` is a folder, or can be created as one, that this process can write to;
    its message names the ``parameter`` that set ``output``."""
    if output.exists() and not output.is_dir():
        raise OptionError('{' + parameter + '} {path} is a file; pass a folder.', path=output)
    _check_creatable(output, 'folder', parameter)


def check_writable_file(output: Path, overwrite: bool) -> None:
    """Raise OptionError unless ``output`` can be created as a file this process can write to, or is one and
    ``overwrite`` lets it be replaced."""
    if output.is_dir():
        raise OptionError('{output} {path} is a folder; pass a file name.', path=output)
    if output.exists() and not overwrite:
        raise OptionError('{output} {path} exists; pass {overwrite} to replace it, or another file name.',
                          ('overwrite',), path=output)
    _check_creatable(output, 'file', 'output')


def check_output_folder(output: Path, files: tuple[str, ...], overwrite: bool) -> None:
    """Check, before any work, that ``output`` can take a command's ``files`` without losing an earlier result.

    Raises:
        OptionError: ``output`` is a file or not writable, or it holds some of ``files`` and ``overwrite`` is False.
    """
    check_writable_folder(output)
    previous = [name for name in files if (output / name).exists()]
    if previous and not overwrite:
        raise OptionError('{output} {path} already holds {previous} of an earlier run; choose another folder, or pass '
                          '{overwrite} to replace them.', ('overwrite',), path=output, previous=', '.join(previous))


def check_output_outside_hub_configs(output: Path, parameter: str = 'output') -> None:
    """Refuse to write into the zoo's ``hub_configs/``, naming the ``parameter`` that set ``output``: its folders
    are shipped checkpoints, pinned by sha256."""
    real_output = output.resolve()
    for folder in (packaged_hub_configs_dir().resolve(), hub_configs_dir().resolve()):
        if real_output == folder or folder in real_output.parents:
            raise OptionError('{' + parameter + "} {path} is inside {folder}, the zoo's hub_configs/ folder of shipped "
                              'checkpoints; choose a folder outside it.', path=output, folder=folder)


def _source_folder(model_name: str) -> Optional[Path]:
    """The local folder ``load_model`` reads ``model_name`` from, or None (a random init or an ``hf-hub:`` id)."""
    if model_name.startswith('hf-hub:'):
        return None
    source = Path(model_name.removeprefix('local-dir:'))
    if source.exists():
        return source if source.is_dir() else source.parent
    return tag_folder(model_name)


def check_output_is_not_source(model_name: str, output: Path) -> None:
    """Refuse to write into the folder a model is read from, or into ``hub_configs/``: files would be replaced.

    Folders are compared as real paths, so that no spelling of the source (a tag, ``local-dir:``, a relative path,
    a symlink) gets past.
    """
    check_output_outside_hub_configs(output)
    source_dir = _source_folder(model_name)
    if source_dir is not None and output.resolve() == source_dir.resolve():
        raise OptionError('{output} {path} is the folder of the model {model_name} is read from; choose another '
                          'folder, so that its files are not replaced.', path=output, model_name=model_name)
