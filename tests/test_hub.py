"""Publishing and loading through the Hugging Face Hub (sgdrop_zoo/hub.py, hub_files.py, pretrained.py,
model_card.py).

Downloads go to a real third-party server, olah, started on 127.0.0.1 in offline mode over a local git mirror.
Uploads go to tests/hub_test_server.py, a documented test double of the Hub's upload routes that commits into that
same mirror, so what is published is downloaded again by the real client through olah and compared bit for bit.
huggingface_hub reads HF_ENDPOINT and HF_HOME when it is imported, so every client call runs in a subprocess.
"""
import dataclasses
import json
import os
import re
import pickle
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import huggingface_hub
import pytest
import timm
import timm.models._builder
import timm.models._hub
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.models import save_for_hf

import sgdrop_zoo.pretrained
from sgdrop_zoo import is_sgdrop_model
from sgdrop_zoo.cli import main
from sgdrop_zoo.errors import OptionError
from sgdrop_zoo.export import save_export
from sgdrop_zoo.hub import load_sgdrop_model, publish_checkpoint
from sgdrop_zoo.loading import load_model
from sgdrop_zoo.model_card import render_model_card
from sgdrop_zoo.run_settings import RunSettings
from sgdrop_zoo.sgdrop import SGDropCfg
from sgdrop_zoo.hub_files import HubError, sha256_of_file
from sgdrop_zoo.pretrained import hub_configs_dir, load_hub_configs, packaged_hub_configs_dir, record_notes

from conftest import recipe_checkpoint
from hub_test_server import HubTestServer

REPO_ROOT = Path(__file__).resolve().parents[1]
ORG = 'sgdrop-test'
TINY_ARGS = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))  # a 62k-parameter convnext_tiny: 250 kB of weights
LABELS = ['cat', 'dog', 'bird']
SERVER_START_TIMEOUT_S = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f'olah exited with code {process.returncode}')
        try:
            socket.create_connection(('127.0.0.1', port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f'olah did not answer on 127.0.0.1:{port} within {SERVER_START_TIMEOUT_S} s')


def make_mirror_repo(mirrors: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """A repo olah serves: a git repository with one commit on main under ``mirrors/models/ORG/NAME``."""
    path = mirrors / 'models' / repo_id
    path.mkdir(parents=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    git = ['git', '-c', 'user.name=test', '-c', 'user.email=test@localhost', '-c', 'init.defaultBranch=main']
    for args in (['init', '-q'], ['add', '-A'], ['commit', '-q', '-m', 'add files']):
        subprocess.run(git + args, cwd=path, check=True, capture_output=True)


@pytest.fixture(scope='session')
def mirrors(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp('hub') / 'mirrors'


@pytest.fixture(scope='session')
def olah(mirrors: Path, tmp_path_factory) -> str:
    """olah on 127.0.0.1 serving ``mirrors`` offline; its URL. Stopped by its PID at the end of the session."""
    olah_cli = shutil.which('olah-cli', path=str(Path(sys.executable).parent)) or shutil.which('olah-cli')
    if olah_cli is None:
        pytest.skip('olah is not installed: pip install -e .[test]')
    work = tmp_path_factory.mktemp('olah')  # olah writes ./logs in its working directory
    (mirrors / 'models').mkdir(parents=True, exist_ok=True)
    port = _free_port()
    (work / 'olah.toml').write_text(textwrap.dedent(f"""
        [basic]
        host = "127.0.0.1"
        port = {port}
        repos-path = "{work / 'repos'}"
        mirror-scheme = "http"
        mirror-netloc = "127.0.0.1:{port}"
        mirror-lfs-netloc = "127.0.0.1:{port}"
        mirrors-path = ["{mirrors}"]

        [accessibility]
        offline = true
    """))
    process = subprocess.Popen([olah_cli, '-c', 'olah.toml'], cwd=work, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, process)
        yield f'http://127.0.0.1:{port}'
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope='session')
def upload_server(mirrors: Path) -> str:
    server = HubTestServer(mirrors).start()
    yield server.url
    server.stop()


def hub_env(endpoint: str, hf_home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'SGDROP_ZOO_'))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_DISABLE_XET='1', HF_HUB_DISABLE_TELEMETRY='1',
               HF_HUB_DISABLE_PROGRESS_BARS='1', HF_HUB_ETAG_TIMEOUT='10', HF_HUB_DOWNLOAD_TIMEOUT='10',
               PYTHONPATH=str(REPO_ROOT))
    env.update(extra)
    return env


def run_python(code: str, env: dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)


def run_cli(args: list, env: dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'sgdrop_zoo.cli', *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)


@pytest.fixture(scope='session')
def export_dir(tmp_path_factory) -> Path:
    """What train/main.py exports after training: model.safetensors + timm config.json, for a tiny SGDrop model."""
    torch.manual_seed(0)
    model = timm.create_model('sgdrop_convnext_tiny', num_classes=len(LABELS), sgdrop_rho=0.05,
                              sgdrop_attribution='ema', sgdrop_ema_decay=0.99, latent_drop_rate=0.0, **TINY_ARGS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, len(LABELS), (8,))
    for _ in range(3):
        loss = F.cross_entropy(model(images, target=labels), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.update_ema()
    out = tmp_path_factory.mktemp('run')
    training = dict(epoch=3, val_acc1=66.667, data='/data/tiny-pets', optimizer='sgd', lr=0.1, epochs=3)
    # the writer of the recipe's export
    save_export(model.eval(), out, LABELS, 32, 'resize', 'sgdrop', model.sgdrop_cfg, training)
    return out


@pytest.fixture(scope='session')
def published(export_dir: Path, upload_server: str, tmp_path_factory) -> dict:
    """The export published with the CLI to the upload test double; its hub_configs record."""
    env = hub_env(upload_server, tmp_path_factory.mktemp('hf-upload'), HF_TOKEN='hf_test_token')
    result = run_cli(['publish', str(export_dir), '--repo-id', f'{ORG}/convnext-tiny.pets', '--token-from-env'], env)
    assert result.returncode == 0, result.stderr
    assert 'hf_test_token' not in result.stdout + result.stderr
    return json.loads(result.stdout)


def test_publish_then_download_through_olah_is_bit_identical(published, export_dir, olah, tmp_path):
    assert published['hf_hub_id'].startswith(f'{ORG}/convnext-tiny.pets@')
    assert published['sha256'] == sha256_of_file(export_dir / 'model.safetensors')
    code = f"""
        import json, sys
        from huggingface_hub import hf_hub_download, list_repo_files
        repo = "{ORG}/convnext-tiny.pets"
        files = sorted(list_repo_files(repo, revision="main"))
        paths = {{name: hf_hub_download(repo, name) for name in ("model.safetensors", "config.json", "README.md")}}
        print(json.dumps(dict(files=files, paths=paths)))
    """
    result = run_python(code, hub_env(olah, tmp_path / 'hf'))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert [f for f in out['files'] if f != '.gitattributes'] == ['README.md', 'config.json', 'model.safetensors']
    assert Path(out['paths']['model.safetensors']).read_bytes() == (export_dir / 'model.safetensors').read_bytes()
    config = json.loads(Path(out['paths']['config.json']).read_text())
    assert config['architecture'] == 'convnext_tiny'
    assert not any(k.startswith('sgdrop') for k in config['model_args'])
    assert config['sgdrop']['architecture'] == 'sgdrop_convnext_tiny' and config['sgdrop']['sgdrop_rho'] == 0.05
    readme = Path(out['paths']['README.md']).read_text()
    assert 'library_name: timm' in readme and 'cat, dog, bird' in readme and 'tiny-pets' in readme


def test_plain_timm_loads_the_published_repo_without_sgdrop_zoo(published, export_dir, olah, tmp_path):
    code = f"""
        import sys, timm, torch
        model = timm.create_model("hf-hub:{ORG}/convnext-tiny.pets", pretrained=True).eval()
        assert not any(name.startswith("sgdrop_zoo") for name in sys.modules), "sgdrop_zoo was imported"
        print(type(model).__name__, model.num_classes, model.pretrained_cfg["label_names"])
        torch.save(model.state_dict(), "{tmp_path / 'loaded.pt'}")
    """
    result = run_python(code, hub_env(olah, tmp_path / 'hf', PYTHONPATH=''))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:2] == ['ConvNeXt', '3']
    expected = load_file(export_dir / 'model.safetensors')
    loaded = torch.load(tmp_path / 'loaded.pt', weights_only=True)
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_registry_tag_downloads_checks_and_adapts(published, export_dir, olah, tmp_path):
    configs = tmp_path / 'hub_configs'
    configs.mkdir()
    (configs / 'sgdrop_convnext_tiny.pets.json').write_text(json.dumps(published))
    code = f"""
        import json, timm, torch, sgdrop_zoo
        from safetensors.torch import load_file
        names = timm.list_models("sgdrop_*", pretrained=True)
        model = timm.create_model("sgdrop_convnext_tiny.pets", pretrained=True, **{TINY_ARGS!r}).eval()
        expected = load_file("{export_dir / 'model.safetensors'}")
        identical = all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
        adapted = timm.create_model("sgdrop_convnext_tiny.pets", pretrained=True, num_classes=5, **{TINY_ARGS!r})
        body_kept = all(torch.equal(adapted.state_dict()[k], v) for k, v in expected.items() if "head.fc" not in k)
        cfg = model.pretrained_cfg
        print(json.dumps(dict(names=names, identical=identical, body_kept=body_kept, head=adapted.num_classes,
                              rho=model.sgdrop_rho, cfg={{k: cfg[k] for k in ("hf_hub_id", "input_size", "mean",
                              "crop_pct", "crop_mode", "interpolation", "num_classes", "label_names")}})))
    """
    env = hub_env(olah, tmp_path / 'hf', SGDROP_ZOO_HUB_CONFIGS=str(configs))
    result = run_python(code, env)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out['names'] == ['sgdrop_convnext_tiny.pets']
    assert out['identical'] and out['body_kept'] and out['head'] == 5
    assert out['cfg'] == dict(hf_hub_id=published['hf_hub_id'], input_size=[3, 32, 32],
                              mean=list(published['mean']), crop_pct=1.0, crop_mode='squash',
                              interpolation='bilinear', num_classes=3, label_names=LABELS)
    # the cache now serves the tag offline, still checked
    offline = run_python(code, dict(env, HF_HUB_OFFLINE='1', HF_ENDPOINT='http://127.0.0.1:9'))
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)['identical']


def test_dry_run_writes_the_repo_folder_and_loads_locally(export_dir, tmp_path):
    target = tmp_path / 'dry'
    result = publish_checkpoint(export_dir, f'{ORG}/convnext-tiny.pets', dry_run_dir=target)
    assert result.commit is None and sorted(p.name for p in target.iterdir()) == [
        'README.md', 'config.json', 'model.safetensors']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['dry']  # no temporary folder left behind
    # what a repo holds is for everyone to read
    assert [oct(p.stat().st_mode & 0o777) for p in (target, *sorted(target.iterdir()))] == ['0o755'] + ['0o644'] * 3
    assert (target / 'model.safetensors').read_bytes() == (export_dir / 'model.safetensors').read_bytes()
    record = result.record
    assert record['architecture'] == 'sgdrop_convnext_tiny' and record['base_architecture'] == 'convnext_tiny'
    assert record['tag'] == 'pets' and record['dataset'] == 'tiny-pets' and record['label_names'] == LABELS
    assert record['metrics']['top1'] == 66.667 and '--evaluate' in record['metrics']['eval_command']
    plain = timm.create_model(f'local-dir:{target}', pretrained=True)
    assert type(plain).__name__ == 'ConvNeXt'
    from sgdrop_zoo.hub import load_sgdrop_model
    model = load_sgdrop_model(f'local-dir:{target}', num_classes=4)
    assert (model.sgdrop_rho, model.sgdrop_ema_decay) == (0.05, 0.99)
    assert model.num_classes == 4


def test_model_card_renders_checkpoint_facts(export_dir, tmp_path):
    record = publish_checkpoint(export_dir, f'{ORG}/convnext-tiny.pets', dry_run_dir=tmp_path / 'dry').record
    card = render_model_card([record], checkpoint=record)
    assert card.data.library_name == 'timm' and card.data.license == 'apache-2.0'
    assert card.data.datasets == ['tiny-pets'] and 'sgdrop' in card.data.tags
    text = card.text
    for fact in ('`convnext_tiny`', 'cat, dog, bird', '3x32x32', 'mean 0.485, 0.456, 0.406', 'rho=0.05',
                 'attribution=ema', record['sha256'], '66.667%', record['metrics']['eval_command'],
                 '@article{bertoin2024overfocusing', 'ResNet50', 'CNNs only'):
        assert fact in text, fact
    zoo = render_model_card([record]).text
    assert '| `sgdrop_convnext_tiny.pets` | SGDrop, rho 0.05 | `convnext_tiny` | tiny-pets | 32x32 | 66.67 |' in zoo
    # a rho curriculum is named by its two ends
    curriculum = dict(record, sgdrop=dict(record['sgdrop'], sgdrop_rho=0.0, sgdrop_rho_end=0.025))
    assert '| `sgdrop_convnext_tiny.pets` | SGDrop, rho 0 to 0.025 | `convnext_tiny` |' in \
        render_model_card([curriculum]).text


def test_model_card_says_which_checkpoint_of_a_pair_is_the_vanilla_twin(export_dir, tmp_path):
    record = publish_checkpoint(export_dir, f'{ORG}/convnext-tiny.pets', dry_run_dir=tmp_path / 'dry').record
    metrics = dict(record['metrics'], seed=1, seeds_top1={'0': 60.0, '1': 61.0}, vanilla_top1={'0': 58.0, '1': 59.0},
                   seeds_top1_mean=60.5, seeds_top1_std=0.71, vanilla_top1_mean=58.5, vanilla_top1_std=0.71)
    sgdrop = dict(record, twin='sgdrop_convnext_tiny.pets_vanilla', metrics=dict(metrics, method='sgdrop'))
    vanilla = dict(record, tag='pets_vanilla', twin='sgdrop_convnext_tiny.pets',
                   metrics=dict(metrics, method='vanilla', seeds_top1={'0': 58.0, '1': 59.0}))
    sgdrop_card = render_model_card([sgdrop], checkpoint=sgdrop).text
    assert 'Its vanilla twin, trained by the same recipe with the same\nseed without SGDrop, is ' \
           '`sgdrop_convnext_tiny.pets_vanilla`.' in sgdrop_card
    assert '- SGDrop, every seed of the study: seed 0: 60.00, seed 1: 61.00 (this checkpoint: seed 1, the median).' \
           in sgdrop_card
    assert '- The same training without SGDrop (vanilla): seed 0: 58.00, seed 1: 59.00.' in sgdrop_card
    vanilla_card = render_model_card([vanilla], checkpoint=vanilla).text
    assert '**without** SGDrop: the vanilla twin of\n`sgdrop_convnext_tiny.pets`' in vanilla_card
    assert 'with Saliency-Guided Dropout (SGDrop,' not in vanilla_card
    assert ('- Vanilla, every seed of the study: seed 0: 58.00, seed 1: 59.00 (this checkpoint: seed 1, the seed of '
            'its SGDrop twin).') in vanilla_card
    assert 'The same training without SGDrop' not in vanilla_card
    assert 'trained again' not in vanilla_card
    retrained = dict(sgdrop, metrics=dict(sgdrop['metrics'], top1_float32=60.2, cpu_capability='AVX2',
                                          rerun_of='results/x__sgdrop__seed1.json'))
    retrained_card = render_model_card([retrained], checkpoint=retrained).text
    assert ("- These weights were trained again with the study's command and seed 1 on a CPU with other kernels "
            "(AVX2), after the study's run was gone: a new run, whose own float32 top-1 is 60.20 (the study's run of "
            'seed 1: 61.00, `results/x__sgdrop__seed1.json`).') in retrained_card
    zoo = render_model_card([sgdrop, vanilla]).text.splitlines()
    rows = [line for line in zoo if line.startswith('| `sgdrop_convnext_tiny.pets')]
    assert [row.split(' | ')[:2] for row in rows] == [
        ['| `sgdrop_convnext_tiny.pets`', 'SGDrop, rho 0.05'],
        ['| `sgdrop_convnext_tiny.pets_vanilla`', 'vanilla twin of `sgdrop_convnext_tiny.pets`']]


def test_model_card_md_is_generated_from_hub_configs():
    records = load_hub_configs()
    assert (REPO_ROOT / 'MODEL_CARD.md').read_text(encoding='utf-8') == render_model_card(records).content
    assert hub_configs_dir().resolve() == (REPO_ROOT / 'hub_configs').resolve()


def test_hub_configs_errors_name_the_file(tmp_path, published):
    (tmp_path / 'bad.json').write_text('{"architecture": ')
    with pytest.raises(ValueError, match='bad.json: not valid JSON'):
        load_hub_configs(tmp_path)
    (tmp_path / 'bad.json').write_text(json.dumps({k: v for k, v in published.items() if k != 'sha256'}))
    with pytest.raises(ValueError, match=r'bad.json: missing or mistyped fields sha256'):
        load_hub_configs(tmp_path)
    # how the top-1 was measured is part of a record: timm's default center crop would measure another model
    (tmp_path / 'bad.json').write_text(json.dumps({k: v for k, v in published.items() if k != 'crop_mode'}))
    with pytest.raises(ValueError, match=r'bad.json: missing or mistyped fields crop_mode \(str\)'):
        load_hub_configs(tmp_path)
    for local_dir in ('../outside', '/etc', 'a/b', '..'):
        (tmp_path / 'bad.json').write_text(json.dumps(dict(published, local_dir=local_dir)))
        with pytest.raises(ValueError, match=f"bad.json: local_dir '{re.escape(local_dir)}' must name a folder of "
                                             f'hub_configs/ itself'):
            load_hub_configs(tmp_path)
    (tmp_path / 'bad.json').write_text(json.dumps(published))
    (tmp_path / 'copy.json').write_text(json.dumps(published))
    with pytest.raises(ValueError, match='already defined by'):
        load_hub_configs(tmp_path)


def test_download_faults_are_clear_and_leave_no_bad_file(published, olah, mirrors, tmp_path):
    record = dict(published, sha256='0' * 64)
    records = {
        'badsha': record,
        'norepo': dict(published, tag='norepo', hf_hub_id=f'{ORG}/does-not-exist'),
    }
    configs = tmp_path / 'hub_configs'
    configs.mkdir()
    for tag, rec in records.items():
        (configs / f'{tag}.json').write_text(json.dumps(dict(rec, tag=tag)))
    config = json.loads((mirrors / 'models' / ORG / 'convnext-tiny.pets' / 'config.json').read_text())
    weights = (mirrors / 'models' / ORG / 'convnext-tiny.pets' / 'model.safetensors').read_bytes()
    make_mirror_repo(mirrors, f'{ORG}/future', {'config.json': json.dumps(
        dict(config, architecture='sgdrop_future_net', sgdrop=dict(config['sgdrop'], architecture='sgdrop_future_net'))
    ).encode(), 'model.safetensors': weights})
    make_mirror_repo(mirrors, f'{ORG}/truncated', {'config.json': json.dumps(config).encode(),
                                                    'model.safetensors': weights[:len(weights) // 2]})
    marker = tmp_path / 'pickle-ran'

    class Exploit:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))

    make_mirror_repo(mirrors, f'{ORG}/pickled', {'config.json': json.dumps(config).encode(),
                                                  'pytorch_model.bin': pickle.dumps(Exploit())})
    code = f"""
        import json, pathlib, timm, sgdrop_zoo
        from sgdrop_zoo.hub import load_sgdrop_model
        from sgdrop_zoo.hub_files import HubError
        errors = {{}}
        for name in ("sgdrop_convnext_tiny.badsha", "sgdrop_convnext_tiny.norepo"):
            try:
                timm.create_model(name, pretrained=True, **{TINY_ARGS!r})
            except HubError as e:
                errors[name] = str(e)
        for repo in ("future", "truncated", "pickled"):
            try:
                load_sgdrop_model("hf-hub:{ORG}/" + repo)
            except HubError as e:
                errors[repo] = str(e)
        cached = [str(p) for p in pathlib.Path("{tmp_path / 'hf'}").rglob("model.safetensors")]
        print(json.dumps(dict(errors=errors, cached=cached)))
    """
    result = run_python(code, hub_env(olah, tmp_path / 'hf', SGDROP_ZOO_HUB_CONFIGS=str(configs)))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    errors = out['errors']
    assert 'has sha256' in errors['sgdrop_convnext_tiny.badsha'] and 'removed from the cache' in \
        errors['sgdrop_convnext_tiny.badsha']
    assert 'does not exist' in errors['sgdrop_convnext_tiny.norepo']
    assert '`import sgdrop_zoo`' in errors['future'] and 'upgrade' in errors['future']
    assert 'truncated or corrupt' in errors['truncated']
    assert 'has no model.safetensors' in errors['pickled'] and not marker.exists()
    # the rejected download is gone; the ones left are the intact or corrupt-at-source files of other repos
    assert not any('convnext-tiny.pets' in path for path in out['cached'])


def test_network_error_mid_download_is_retried_then_reported(published, olah, tmp_path):
    """A proxy in front of olah cuts every weights response halfway: huggingface_hub retries, then gives up."""
    code = f"""
        import http.client, threading, json, os, pathlib
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit
        upstream = urlsplit("{olah}")
        class Cut(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            def log_message(self, *args): pass
            def do_GET(self):
                conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=10)
                headers = {{k: v for k, v in self.headers.items() if k.lower() not in ("host", "range")}}
                conn.request(self.command, self.path, headers=headers)
                reply = conn.getresponse()
                body = reply.read() if self.command == "GET" else b""
                self.send_response(reply.status)
                for k, v in reply.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                length = reply.getheader("content-length") or str(len(body))
                self.send_header("Content-Length", length)
                self.end_headers()
                cut = self.command == "GET" and self.path.endswith("model.safetensors")
                self.wfile.write(body[:len(body) // 2] if cut else body)
                if cut:
                    self.close_connection = True
            do_HEAD = do_GET
        server = ThreadingHTTPServer(("127.0.0.1", 0), Cut)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        os.environ["HF_ENDPOINT"] = "http://127.0.0.1:%d" % server.server_address[1]
        import timm, sgdrop_zoo
        from sgdrop_zoo.hub_files import HubError
        try:
            timm.create_model("sgdrop_convnext_tiny.pets", pretrained=True, **{TINY_ARGS!r})
            print(json.dumps(dict(error=None)))
        except HubError as e:
            done = [str(p) for p in pathlib.Path("{tmp_path / 'hf'}").rglob("model.safetensors")]
            print(json.dumps(dict(error=str(e), complete=done)))
        server.shutdown()
    """
    configs = tmp_path / 'hub_configs'
    configs.mkdir()
    (configs / 'pets.json').write_text(json.dumps(published))
    result = run_python(code, hub_env(olah, tmp_path / 'hf', SGDROP_ZOO_HUB_CONFIGS=str(configs)))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out['error'] and 'failed after retries' in out['error']
    assert out['complete'] == []


def test_publish_name_collision_is_refused(published, export_dir, upload_server, mirrors, tmp_path):
    repo = mirrors / 'models' / ORG / 'convnext-tiny.pets'
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=repo, capture_output=True, text=True).stdout
    env = hub_env(upload_server, tmp_path / 'hf', HF_TOKEN='hf_test_token')
    result = run_cli(['publish', str(export_dir), '--repo-id', f'{ORG}/convnext-tiny.pets'], env)
    assert result.returncode == 2
    assert 'already holds a model.safetensors' in result.stderr and 'never replaced' in result.stderr
    assert subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=repo, capture_output=True, text=True).stdout == head


def test_publish_without_token_uploads_nothing(export_dir, monkeypatch, capsys):
    monkeypatch.delenv('HF_TOKEN', raising=False)
    with pytest.raises(HubError, match='needs a Hugging Face token'):
        publish_checkpoint(export_dir, f'{ORG}/x', token_from_env=True)
    assert main(['publish', str(export_dir), '--repo-id', f'{ORG}/x', '--token-from-env']) == 2
    assert 'HF_TOKEN is not set' in capsys.readouterr().err


def test_publish_to_an_unreachable_hub_fails_in_one_line(export_dir, tmp_path):
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(('127.0.0.1', 0))
        endpoint = f'http://127.0.0.1:{closed.getsockname()[1]}'
    result = run_cli(['publish', str(export_dir), '--repo-id', f'{ORG}/x', '--token-from-env'],
                     hub_env(endpoint, tmp_path / 'hf', HF_TOKEN='hf_test_token'))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'error: Publishing to {ORG}/x failed'), result.stderr
    assert 'Connection refused' in lines[0] and 'Nothing was committed' in lines[0]


def test_publish_rejects_bad_input_and_writes_nothing(export_dir, tmp_path):
    broken = tmp_path / 'broken'
    shutil.copytree(export_dir, broken)
    data = (broken / 'model.safetensors').read_bytes()
    (broken / 'model.safetensors').write_bytes(data[:len(data) // 2])
    out = tmp_path / 'out'
    out.mkdir()
    with pytest.raises(HubError, match='not a readable safetensors file'):
        publish_checkpoint(broken, f'{ORG}/x', dry_run_dir=out / 'dry')
    assert list(out.iterdir()) == []
    (broken / 'model.safetensors').unlink()
    with pytest.raises(HubError, match='no model.safetensors'):
        publish_checkpoint(broken, f'{ORG}/x', dry_run_dir=out / 'dry')
    with pytest.raises(OptionError, match=r'^dry_run_dir .* already exists; choose a new folder for the dry run\.$'):
        publish_checkpoint(export_dir, f'{ORG}/x', dry_run_dir=out)
    for repo_id in ('no-org', '../..', f'{ORG}/.', './x'):
        with pytest.raises(OptionError, match=f"^repo_id must be ORG/NAME, got '{re.escape(repo_id)}'"):
            publish_checkpoint(export_dir, repo_id, dry_run_dir=out / 'dry')
    assert list(out.iterdir()) == []


# what train/main.py stores in a checkpoint of a 2-class, 64 px SGDrop run
RUN_SETTINGS = RunSettings(arch='test_convnext', model_kwargs={}, regularizer='sgdrop', sgdrop=SGDropCfg(),
                           image_size=64, train_transform='resize', optimizer='adam', lr=1e-4, epochs=1, batch_size=64,
                           seed=0, data='/data/ab', train_subset=0, train_subset_per_class=0, holdout_per_class=0)


def test_publish_from_a_recipe_checkpoint(tmp_path, capsys):
    model = timm.create_model('test_convnext', num_classes=2)
    recipe_checkpoint(model, RUN_SETTINGS, ['a', 'b']).write(tmp_path / 'model_best.pth.tar')
    assert main(['publish', str(tmp_path / 'model_best.pth.tar'), '--repo-id', f'{ORG}/ab', '--dry-run',
                 '--output', str(tmp_path / 'dry')]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record['architecture'] == 'test_convnext' and record['input_size'] == [3, 64, 64]
    loaded = load_file(tmp_path / 'dry' / 'model.safetensors')
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    assert 'dataset_license' not in record  # not known unless given


def test_publish_records_the_datas_terms_for_the_card_and_timms_notes(tmp_path, capsys):
    model = timm.create_model('test_convnext', num_classes=2)
    recipe_checkpoint(model, RUN_SETTINGS, ['a', 'b']).write(tmp_path / 'model_best.pth.tar')
    assert main(['publish', str(tmp_path / 'model_best.pth.tar'), '--repo-id', f'{ORG}/ab', '--dry-run', '--output',
                 str(tmp_path / 'dry'), '--dataset-license', 'CC BY 4.0']) == 0
    record = json.loads(capsys.readouterr().out)
    assert record['dataset_license'] == 'CC BY 4.0'
    card = (tmp_path / 'dry' / 'README.md').read_text()
    assert '- **License:** apache-2.0 (the weights); the data: CC BY 4.0' in card
    assert record_notes(record) == ('Data: CC BY 4.0',)
    assert record_notes(dict(record, metrics=dict(record['metrics'], train_command='python train/main.py d'))) == (
        'Trained with: python train/main.py d', 'Data: CC BY 4.0')


@pytest.mark.parametrize('name, acc1, top1', [
    ('checkpoint.pth.tar', 41.25, 41.25),  # the last epoch's weights and their own top-1, not the best epoch's
    ('model_best.pth.tar', 50.0, 50.0),
])
def test_publish_records_the_top1_of_the_published_weights(tmp_path, capsys, name, acc1, top1):
    model = timm.create_model('test_convnext', num_classes=2)
    recipe_checkpoint(model, RUN_SETTINGS, ['a', 'b'], epoch=3, acc1=acc1).write(tmp_path / name)
    assert main(['publish', str(tmp_path / name), '--repo-id', f'{ORG}/ab', '--dry-run', '--output',
                 str(tmp_path / 'dry')]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record['metrics'].get('top1') == top1


@pytest.mark.parametrize('holdout, split, description', [
    (0, 'val', 'SGDrop (rho 0.01, ema attribution), ab, val top-1 50.0'),
    (100, 'dev', 'SGDrop (rho 0.01, ema attribution), ab, dev top-1 50.0'),
])
def test_publish_says_which_images_measured_the_top1(tmp_path, capsys, holdout, split, description):
    model = timm.create_model('test_convnext', num_classes=2)
    settings = dataclasses.replace(RUN_SETTINGS, holdout_per_class=holdout)
    recipe_checkpoint(model, settings, ['a', 'b']).write(tmp_path / 'model_best.pth.tar')
    assert main(['publish', str(tmp_path / 'model_best.pth.tar'), '--repo-id', f'{ORG}/ab', '--dry-run',
                 '--output', str(tmp_path / 'dry')]) == 0
    metrics = json.loads(capsys.readouterr().out)['metrics']
    # a dev-split figure says so, and its command measures the same images
    assert metrics['split'] == split
    assert metrics['eval_command'].endswith(' --train-transform resize' + (f' --holdout-per-class {holdout}'
                                                                           if holdout else ''))
    config = json.loads((tmp_path / 'dry' / 'config.json').read_text())
    assert config['pretrained_cfg']['description'] == description


def test_load_sgdrop_model_from_plain_timm_weights_uses_the_method_defaults(tmp_path):
    torch.manual_seed(0)
    plain = timm.create_model('resnet18', num_classes=3)
    save_for_hf(plain, tmp_path / 'plain', safe_serialization=True)
    model = load_sgdrop_model(f'local-dir:{tmp_path / "plain"}')
    assert is_sgdrop_model(model) and model.sgdrop_cfg.model_args()['sgdrop_rho'] == 0.01
    assert all(torch.equal(model.state_dict()[k], v) for k, v in plain.state_dict().items())


def _fail_on_network(monkeypatch) -> None:
    """Every way a load could reach out (huggingface_hub, timm's URL loader, a socket) raises instead."""
    def refuse(*args, **kwargs):
        raise AssertionError(f'network access: {args} {kwargs}')

    for module in (huggingface_hub, huggingface_hub.file_download, timm.models._hub, sgdrop_zoo.hub_files):
        monkeypatch.setattr(module, 'hf_hub_download', refuse)
    monkeypatch.setattr(timm.models._builder, 'load_state_dict_from_url', refuse)
    monkeypatch.setattr(socket.socket, 'connect', refuse)


def test_a_folder_is_the_only_source_of_its_weights(tmp_path, monkeypatch):
    torch.manual_seed(0)
    folder = tmp_path / 'own'
    save_for_hf(timm.create_model('test_convnext', num_classes=3), folder, safe_serialization=True)
    # a config that points timm at the weights of another repo, a URL and another file
    config = json.loads((folder / 'config.json').read_text())
    config['pretrained_cfg'].update(source='hf-hub', hf_hub_id='someone-else/other-weights',
                                    hf_hub_filename='pytorch_model.bin', url='http://127.0.0.1:9/other.pth',
                                    file=str(tmp_path / 'other.safetensors'))
    (folder / 'config.json').write_text(json.dumps(config))
    own = load_file(folder / 'model.safetensors')
    _fail_on_network(monkeypatch)
    for load in (lambda: load_sgdrop_model(f'local-dir:{folder}'), lambda: load_model(f'local-dir:{folder}'),
                 lambda: load_model(str(folder))):
        state_dict = load().state_dict()
        assert all(torch.equal(state_dict[k], v) for k, v in own.items())


def test_a_config_cannot_substitute_another_files_weights(tmp_path, monkeypatch):
    # the shipped SGDrop folder with a model_args key that would make timm load its vanilla twin's weights
    shipped = packaged_hub_configs_dir()
    folder = tmp_path / 'h'
    shutil.copytree(shipped / 'sgdrop_resnet10t.imagenette_128_ema_head', folder)
    twin = shipped / 'sgdrop_resnet10t.imagenette_128_ema_head_vanilla' / 'model.safetensors'
    config = json.loads((folder / 'config.json').read_text())
    _fail_on_network(monkeypatch)
    for key, value in (('checkpoint_path', str(twin)), ('pretrained', False), ('pretrained_cfg_overlay', {})):
        (folder / 'config.json').write_text(json.dumps(dict(config, model_args=dict(config['model_args'],
                                                                                   **{key: value}))))
        with pytest.raises(HubError, match=f'config.json: model_args holds {key}, which are no architecture '
                                           f'arguments'):
            load_sgdrop_model(f'local-dir:{folder}')
    # an argument the architecture does not take: one line, no raw TypeError
    (folder / 'config.json').write_text(json.dumps(dict(config, model_args=dict(config['model_args'], wings=2))))
    with pytest.raises(HubError, match=r'resnet10t does not take the model_args of its config or the keywords given '
                                       r'\(.*wings'):
        load_sgdrop_model(f'local-dir:{folder}')
    # the same rule for a record and for a recipe checkpoint's settings
    record = json.loads((shipped / 'sgdrop_resnet10t.imagenette_128_ema_head.json').read_text())
    record['model_args'] = {'checkpoint_path': str(twin)}
    (tmp_path / 'records').mkdir()
    (tmp_path / 'records' / 'r.json').write_text(json.dumps(record))
    with pytest.raises(ValueError, match='r.json: model_args holds checkpoint_path'):
        load_hub_configs(tmp_path / 'records')
    stored = dict(RUN_SETTINGS.to_dict(), model_kwargs={'checkpoint_path': str(twin)})
    with pytest.raises(ValueError, match='c.pth.tar: model_args holds checkpoint_path'):
        RunSettings.from_dict(stored, 'c.pth.tar')


def test_offline_a_missing_repo_and_a_missing_file_each_say_so(published, olah, mirrors, tmp_path):
    configs = tmp_path / 'hub_configs'
    configs.mkdir()
    (configs / 'pets.json').write_text(json.dumps(published))
    config = (mirrors / 'models' / ORG / 'convnext-tiny.pets' / 'config.json').read_bytes()
    make_mirror_repo(mirrors, f'{ORG}/config-only', {'config.json': config})
    code = f"""
        import json, timm, sgdrop_zoo
        from sgdrop_zoo.hub import load_sgdrop_model
        from sgdrop_zoo.hub_files import HubError
        errors = {{}}
        for name in ("convnext-tiny.pets", "no-such-repo", "config-only"):
            try:
                load_sgdrop_model("hf-hub:{ORG}/" + name)
            except HubError as e:
                errors[name] = str(e)
        try:
            timm.create_model("sgdrop_convnext_tiny.pets", pretrained=True, **{TINY_ARGS!r})
        except HubError as e:
            errors["tag"] = str(e)
        print(json.dumps(errors))
    """
    env = hub_env(olah, tmp_path / 'hf', SGDROP_ZOO_HUB_CONFIGS=str(configs))
    offline = run_python(code, dict(env, HF_HUB_OFFLINE='1'))
    assert offline.returncode == 0, offline.stderr
    errors = json.loads(offline.stdout)
    # a published repo, not downloaded yet: offline, not missing
    assert errors['convnext-tiny.pets'] == (
        f'config.json of {ORG}/convnext-tiny.pets@main is not in the local cache and HF_HUB_OFFLINE is set: unset it '
        f'to download from {olah}, or download it first (`hf download {ORG}/convnext-tiny.pets config.json`).')
    assert errors['no-such-repo'].startswith(f'config.json of {ORG}/no-such-repo@main is not in the local cache and '
                                             f'HF_HUB_OFFLINE is set')
    assert errors['tag'].startswith('sgdrop_convnext_tiny.pets: model.safetensors of ') and \
        'not in the local cache and HF_HUB_OFFLINE is set' in errors['tag']
    online = run_python(code, env)
    assert online.returncode == 0, online.stderr
    errors = json.loads(online.stdout)
    assert errors['no-such-repo'] == (f'repo {ORG}/no-such-repo does not exist on {olah} (or is private or gated: '
                                      f'log in with `hf auth login`).')
    assert errors['config-only'].startswith(f'{ORG}/config-only@main has no model.safetensors: it is not a '
                                            f'published SGDrop checkpoint')
    assert errors.keys() == {'no-such-repo', 'config-only'}  # the published repo and its tag load online
    assert not any('\n' in message for message in errors.values())


def _closed_port_endpoint() -> str:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(('127.0.0.1', 0))
        return f'http://127.0.0.1:{closed.getsockname()[1]}'


def test_an_unknown_or_unreachable_repo_fails_in_one_line(olah, small_data, tmp_path):
    code = f"""
        import sys, time
        time.sleep = lambda seconds: None  # huggingface_hub's backoff between its 5 retries, 23 s in all
        from sgdrop_zoo.cli import main
        sys.exit(main(["finetune", "--model", "hf-hub:{ORG}/no-such-repo", "--data", "{small_data}", "--output",
                       "{tmp_path / 'out'}"]))
    """
    endpoint = _closed_port_endpoint()
    for hub, message in ((olah, f'repo {ORG}/no-such-repo does not exist on {olah}'),
                         (endpoint, f'config.json of {ORG}/no-such-repo@main is not in the local cache and '
                                    f'{endpoint} cannot be reached')):
        result = run_python(code, hub_env(hub, tmp_path / 'hf'))
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f'error: hf-hub:{ORG}/no-such-repo: {message}'), lines
    assert not (tmp_path / 'out').exists()


def test_publish_dry_run_onto_a_read_only_folder_fails_in_one_line(export_dir, tmp_path, monkeypatch, capsys):
    read_only = tmp_path / 'read-only'
    read_only.mkdir()
    access = os.access  # as root, chmod would not stop a write: os.access answers for a read-only mount
    monkeypatch.setattr(os, 'access', lambda path, mode, **kwargs: Path(path) != read_only and access(path, mode,
                                                                                                     **kwargs))
    assert main(['publish', str(export_dir), '--repo-id', f'{ORG}/x', '--dry-run', '--output',
                 str(read_only / 'dry')]) == 2
    assert capsys.readouterr().err == (f'error: --output {read_only / "dry"}: {read_only} is not writable; pass a '
                                       f'folder you can write to.\n')
    assert list(read_only.iterdir()) == []


def test_publishs_command_line_names_its_flags_where_the_api_names_its_parameters(export_dir, tmp_path, capsys):
    # the same refusals as the API's above, worded with the flags that set them
    assert main(['publish', str(export_dir), '--repo-id', '../..', '--dry-run', '--output', str(tmp_path / 'a')]) == 2
    assert capsys.readouterr().err == "error: --repo-id must be ORG/NAME, got '../..'.\n"
    (tmp_path / 'taken').mkdir()
    assert main(['publish', str(export_dir), '--repo-id', f'{ORG}/x', '--dry-run', '--output',
                 str(tmp_path / 'taken')]) == 2
    assert capsys.readouterr().err == (f'error: --output {tmp_path / "taken"} already exists; choose a new folder for '
                                       f'the dry run.\n')
    # --output names the dry run's folder: without --dry-run it would be ignored and the checkpoint uploaded
    assert main(['publish', str(export_dir), '--repo-id', f'{ORG}/x', '--output', str(tmp_path / 'b')]) == 2
    assert capsys.readouterr().err == ('error: --output is the folder of a dry run: pass --dry-run with it, or leave '
                                       '--output out to upload.\n')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['taken']


def test_publish_dry_run_never_writes_into_hub_configs(export_dir, tmp_path, monkeypatch):
    configs = tmp_path / 'hub_configs'
    configs.mkdir()
    monkeypatch.setenv('SGDROP_ZOO_HUB_CONFIGS', str(configs))
    for folder in (configs, packaged_hub_configs_dir()):
        before = sorted(folder.iterdir())
        with pytest.raises(OptionError, match=r"^dry_run_dir .* is inside .*, the zoo's hub_configs/ folder"):
            publish_checkpoint(export_dir, f'{ORG}/x', dry_run_dir=folder / 'sgdrop_x.dry')
        assert sorted(folder.iterdir()) == before


def test_a_full_disk_during_a_dry_run_stops_in_one_line_and_leaves_nothing(export_dir, tmp_path, capsys,
                                                                          monkeypatch):
    import errno

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shutil, 'copyfile', full_disk)  # the weights' copy into the repo folder
    dry = tmp_path / 'out' / 'dry'
    assert main(['publish', str(export_dir), '--repo-id', f'{ORG}/x', '--dry-run', '--output', str(dry)]) == 2
    assert capsys.readouterr().err == (f'error: cannot write {dry} (No space left on device); nothing of it was '
                                       f'written: free some space there, or fix the folder\n')
    assert list((tmp_path / 'out').iterdir()) == []
