"""The files of a Hub-repo folder: their names, their download in one-line errors, and their sha256.

Every checkpoint the zoo writes, ships or loads is such a folder (``model.safetensors``, timm's ``config.json``);
``hub_download`` fetches one file of a Hub repo the way huggingface_hub does (``HF_ENDPOINT``, ``HF_HOME``,
``HF_HUB_OFFLINE``, its retries) and words each failure in one line that says what to do.
"""
import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from timm.models._hub import hf_split

__all__ = ['CONFIG_NAME', 'WEIGHTS_NAME', 'HubError', 'download_checked_weights', 'hub_download', 'sha256_of_file']

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'


class HubError(RuntimeError):
    """A checkpoint could not be published or loaded; the message says why and what to do."""


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _evict_from_cache(path: Path) -> None:
    """Remove a bad download from the huggingface_hub cache (the snapshot link and its blob), so a retry refetches."""
    blob = Path(path).resolve()
    Path(path).unlink(missing_ok=True)
    blob.unlink(missing_ok=True)


def _first_line(error: BaseException) -> str:
    """What an error says in its first line (huggingface_hub's run to several), or its type when it says nothing."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


@contextmanager
def _unlogged_retries() -> Iterator[None]:
    """Keep huggingface_hub's retry warnings (two lines per attempt) off the console; failures are reported once."""
    http_logger = logging.getLogger('huggingface_hub.utils._http')
    level = http_logger.level
    http_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        http_logger.setLevel(level)


def hub_download(repo_id: str, filename: str, revision: Optional[str] = None, name: Optional[str] = None,
                 hint: str = '', repo_exists: bool = False) -> Path:
    """``hf_hub_download`` of one file, with each failure in one line that says what to do.

    The download honours ``HF_ENDPOINT``, ``HF_HOME`` and ``HF_HUB_OFFLINE`` and retries as huggingface_hub does,
    without logging each retry.

    Args:
        repo_id: ``ORG/NAME``.
        filename: The file of the repo.
        revision: Branch, tag or commit; default: ``main``.
        name: The model the file is for, leading each message.
        hint: What to check when the repo or revision does not exist, appended to that message.
        repo_exists: Another file of the repo was downloaded: a "no such repo" answer means no such file.

    Raises:
        HubError: Offline or unreachable without a cached copy, no such repo, revision or file, or the download
            failed after retries.
    """
    lead = f'{name}: ' if name else ''
    where = f'{repo_id}@{revision or "main"}'
    endpoint = constants.ENDPOINT
    missing_file = (f'{lead}{where} has no {filename}: it is not a published SGDrop checkpoint (only safetensors '
                    f'weights are loaded, never pickled ones).')
    try:
        with _unlogged_retries():
            return Path(hf_hub_download(repo_id, filename, revision=revision))
    # before EntryNotFoundError, which it subclasses: the file may well be on the Hub, it could not be asked
    except LocalEntryNotFoundError as e:
        if isinstance(e.__cause__, OfflineModeIsEnabled) or constants.HF_HUB_OFFLINE:
            raise HubError(f'{lead}{filename} of {where} is not in the local cache and HF_HUB_OFFLINE is set: unset '
                           f'it to download from {endpoint}, or download it first (`hf download {repo_id} '
                           f'{filename}`).') from e
        raise HubError(f'{lead}{filename} of {where} is not in the local cache and {endpoint} cannot be reached '
                       f'({_first_line(e.__cause__ or e)}): check the connection (and HF_ENDPOINT), then retry.') from e
    except RevisionNotFoundError as e:
        raise HubError(f'{lead}{repo_id} has no revision {revision!r} on {endpoint}.{hint}') from e
    except RepositoryNotFoundError as e:
        # some servers answer a missing file of an existing repo as a missing repo
        if repo_exists:
            raise HubError(missing_file) from e
        raise HubError(f'{lead}repo {repo_id} does not exist on {endpoint} (or is private or gated: log in with '
                       f'`hf auth login`).{hint}') from e
    except EntryNotFoundError as e:
        raise HubError(missing_file) from e
    except Exception as e:  # noqa: BLE001, HTTP errors and the transport errors of huggingface_hub's HTTP client
        raise HubError(f'{lead}downloading {filename} of {where} from {endpoint} failed after retries '
                       f'({_first_line(e)}). Retry later; nothing was kept in the cache.') from e


def download_checked_weights(name: str, hf_hub_id: str, sha256: str) -> Path:
    """Download ``model.safetensors`` of ``hf_hub_id`` ("org/name" or "org/name@revision") and check its sha256.

    Args:
        name: The model name the weights are for, used in error messages.
        hf_hub_id: Hub repo, optionally pinned to a revision.
        sha256: Expected hex digest of the file.

    Raises:
        HubError: What ``hub_download`` raises, or the digest differs; a file with the wrong digest is removed from
            the cache.
    """
    repo_id, revision = hf_split(hf_hub_id)
    path = hub_download(repo_id, WEIGHTS_NAME, revision, name=name, hint=' Check hf_hub_id in its hub_configs/ file.')
    actual = sha256_of_file(path)
    if actual != sha256:
        _evict_from_cache(path)
        raise HubError(f'{name}: {WEIGHTS_NAME} from {repo_id}@{revision or "main"} on {constants.ENDPOINT} has sha256 '
                       f'{actual}, but hub_configs/ expects {sha256}. The download was corrupt or the repo changed; it '
                       f'was removed from the cache. Retry, and if it persists, report it: do not use these weights.')
    return path
