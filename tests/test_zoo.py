"""The zoo's shipped checkpoints (hub_configs/*.json and their Hub-repo folders): each must be intact, load by its tag
with no network, classify a fixed set of Imagenette validation images exactly as when it was exported, and load in
plain timm through ``local-dir:`` with identical logits.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch

from sgdrop_zoo.hub import publish_checkpoint
from sgdrop_zoo.hub_files import WEIGHTS_NAME, sha256_of_file
from sgdrop_zoo.pretrained import hub_configs_dir, load_hub_configs, retired_tag
from sgdrop_zoo.sgdrop import PAPER_NAME

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGENETTE_VAL = REPO_ROOT.parent / 'shared' / 'data' / 'imagenette' / 'val'
RECORDS = load_hub_configs()
NAMES = [f'{r["architecture"]}.{r["tag"]}' for r in RECORDS]
SHIPPED_BUDGET_MIB = 96  # all shipped weights together, in the working tree


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _offline_env(tmp_path: Path, **extra: str) -> dict:
    """No network and an empty Hugging Face cache, as on a fresh machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'SGDROP_ZOO_'))}
    return dict(env, HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'empty_hf_home'), **extra)


def test_an_unreadable_record_is_named_and_skipped(tmp_path: Path):
    records = tmp_path / 'hub_configs'
    shutil.copytree(hub_configs_dir(), records)
    (records / 'sgdrop_resnet10t.broken.json').write_text('{"architecture": ')
    result = _run("""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            import timm, sgdrop_zoo
        print(sorted(timm.list_models('sgdrop_*', pretrained=True)))
        print([str(w.message) for w in caught if w.category is sgdrop_zoo.pretrained.HubConfigWarning])
    """, _offline_env(tmp_path, SGDROP_ZOO_HUB_CONFIGS=str(records)))
    listed, warned = result.stdout.strip().splitlines()
    assert listed == str(sorted(NAMES))
    assert warned.startswith(f"['{records / 'sgdrop_resnet10t.broken.json'}: not valid JSON (") and \
        warned.endswith("Its tag is not registered; fix or remove the file.']")


def test_one_checkpoint_per_family_within_budget():
    assert sorted(timm.list_models('sgdrop_*', pretrained=True)) == sorted(NAMES)
    families = {name.split('.')[0].removeprefix('sgdrop_') for name in NAMES}
    for family in ('vgg', 'resnet', 'convnext'):
        assert any(f.startswith(family) for f in families), family
    total = sum((hub_configs_dir() / r['local_dir'] / WEIGHTS_NAME).stat().st_size for r in RECORDS)
    assert total <= SHIPPED_BUDGET_MIB * 2 ** 20


def test_twins_name_each_other_and_differ_only_by_sgdrop():
    by_name = dict(zip(NAMES, RECORDS))
    # a vanilla twin is shipped only beside its SGDrop checkpoint, and names it
    for name in (name for name in NAMES if name.endswith('_vanilla')):
        assert by_name[name].get('twin') == name.removesuffix('_vanilla'), name
    for name, record in by_name.items():
        if 'twin' not in record:
            continue
        twin = by_name[record['twin']]
        assert twin['twin'] == name
        vanilla, sgdrop = (record, twin) if name.endswith('_vanilla') else (twin, record)
        assert vanilla['tag'] == sgdrop['tag'] + '_vanilla'
        assert (vanilla['sgdrop']['regularizer'], sgdrop['sgdrop']['regularizer']) == ('none', 'sgdrop')
        # the same seed, architecture, data and preprocessing
        assert vanilla['metrics']['seed'] == sgdrop['metrics']['seed']
        for key in ('architecture', 'base_architecture', 'model_args', 'dataset', 'label_names', 'input_size', 'mean',
                    'std', 'crop_pct', 'interpolation', 'crop_mode'):
            assert vanilla.get(key) == sgdrop.get(key), (name, key)


def test_readme_zoo_table_lists_each_shipped_checkpoint_with_its_recorded_top1():
    readme = (REPO_ROOT / 'README.md').read_text(encoding='utf-8')
    block = readme.split('<!-- zoo -->')[1].split('<!-- /zoo -->')[0]
    rows = [line.split(' | ') for line in block.splitlines() if line.startswith('| `')]
    # checkpoint | method | input | top-1 (shipped) | ...: a retired or unlisted checkpoint fails here
    listed = {cells[0].removeprefix('| ').strip('`'): cells for cells in rows}
    assert len(listed) == len(rows) and sorted(listed) == sorted(NAMES)
    for name, record in zip(NAMES, RECORDS):
        assert listed[name][2] == f'{record["input_size"][1]} px', name
        assert listed[name][3] == f'{record["metrics"]["top1"]:.2f}', name


@pytest.mark.parametrize('record', RECORDS, ids=NAMES)
def test_tag_and_folder_loaders_give_the_settings_it_was_trained_with(record):
    from sgdrop_zoo.hub import load_sgdrop_model
    name = f'{record["architecture"]}.{record["tag"]}'
    # the record's settings are the model's own (a vanilla twin's record has rho 0), with the rho a curriculum ended at
    expected = {key: record['sgdrop'][key] for key in ('sgdrop_rho', 'sgdrop_attribution', 'sgdrop_ema_decay',
                                                        'latent_drop_rate')}
    if record['sgdrop']['regularizer'] == 'sgdrop' and record['sgdrop'].get('sgdrop_rho_end') is not None:
        expected['sgdrop_rho'] = record['sgdrop']['sgdrop_rho_end']
    for model in (timm.create_model(name, pretrained=True),
                  load_sgdrop_model(f'local-dir:{hub_configs_dir() / record["local_dir"]}')):
        assert {key: model.sgdrop_cfg.model_args()[key] for key in expected} == expected
    # what the caller passes still wins
    assert timm.create_model(name, pretrained=True, sgdrop_rho=0.2).sgdrop_rho == 0.2


@pytest.mark.parametrize('record', RECORDS, ids=NAMES)
def test_each_shipped_checkpoint_describes_itself(record):
    sgdrop, metrics = record['sgdrop'], record['metrics']
    if sgdrop['regularizer'] == 'none':
        method = 'Vanilla (no SGDrop)'
    else:
        end = sgdrop.get('sgdrop_rho_end')
        # the settings beyond the paper's defaults by name: ConvNeXt-Atto's product rule and channel-mean reference
        beyond = ''.join(f', {sgdrop[key]} {what}' for key, what, paper in (
            ('sgdrop_attribution_relu', 'rule', 'gradient'), ('sgdrop_reference', 'reference', 'zero'))
            if sgdrop.get(key, paper) != paper)
        method = (f"SGDrop (rho {sgdrop['sgdrop_rho']}{f' to {end}' if end is not None else ''}, "
                  f"{sgdrop['sgdrop_attribution']} attribution{beyond})")
    own = f", {record['dataset']}, {metrics['split']} top-1 {metrics['top1']}"
    config = json.loads((hub_configs_dir() / record['local_dir'] / 'config.json').read_text())
    name = f'{record["architecture"]}.{record["tag"]}'
    for description in (config['pretrained_cfg']['description'], timm.create_model(name).pretrained_cfg['description']):
        assert description.startswith(method) and description.endswith(own), (name, description)


@pytest.mark.parametrize('record', RECORDS, ids=NAMES)
def test_each_shipped_checkpoint_names_its_paper_licenses_and_training_command(record):
    # timm's fields: the paper, the weights' license and the data's terms, and the command that trained the weights
    paper = {'paper_ids': 'arXiv:2409.17370', 'paper_name': PAPER_NAME,
             'origin_url': 'https://arxiv.org/abs/2409.17370'}
    notes = [f"Trained with: {record['metrics']['train_command']}", f"Data: {record['dataset_license']}"]
    assert record['license'] == 'apache-2.0' and 'ImageNet' in record['dataset_license']
    assert record['metrics']['train_command'].startswith('python train/main.py ../shared/data/imagenette -a ')
    config = json.loads((hub_configs_dir() / record['local_dir'] / 'config.json').read_text())
    tag_cfg = timm.create_model(f'{record["architecture"]}.{record["tag"]}').pretrained_cfg
    for cfg in (config['pretrained_cfg'], tag_cfg):
        assert {key: cfg[key] for key in paper} == paper and cfg['license'] == 'apache-2.0'
        assert list(cfg['notes']) == notes
    card = (hub_configs_dir() / record['local_dir'] / 'README.md').read_text()
    assert f"- **License:** apache-2.0 (the weights); the data: {record['dataset_license']}" in card
    assert f"```bash\n{record['metrics']['train_command']}\n```" in card


def test_the_curriculum_tag_trains_on_with_the_rho_it_ended_at():
    # sgdrop_vgg11.imagenette_128_ema_head was trained with rho growing from 0 to 0.025: fine-tuned in a plain loop, it
    # drops floor(0.025 * 8192) = 204 of the 512 x 4 x 4 latent features of each 128 px image (not the 0 it started at)
    torch.manual_seed(0)
    model = timm.create_model('sgdrop_vgg11.imagenette_128_ema_head', pretrained=True).train()
    images, target = torch.randn(2, 3, 128, 128), torch.tensor([0, 5])
    features = model.forward_features(images)
    assert features[0].numel() == 8192 and model.sgdrop_rho == 0.025
    keep = model.saliency_keep_mask(images, features, target)
    assert (~keep).flatten(1).sum(1).tolist() == [204, 204]
    loss = torch.nn.functional.cross_entropy(model(images, target=target), target)
    loss.backward()
    assert (model.sgdrop_step_stats['true_class_logit_drop'] > 0).all()


@pytest.mark.parametrize('record', RECORDS, ids=NAMES)
def test_shipped_folder_is_a_hub_repo_pinned_by_its_record(record):
    folder = hub_configs_dir() / record['local_dir']
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', WEIGHTS_NAME]
    assert sha256_of_file(folder / WEIGHTS_NAME) == record['sha256']
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == record['base_architecture']
    assert config['sgdrop']['architecture'] == record['architecture']
    assert config['label_names'] == record['label_names']
    assert f'# {record["architecture"]}.{record["tag"]}' in (folder / 'README.md').read_text()
    # timm's own preprocessing of the tag is the record's
    cfg = timm.data.resolve_model_data_config(timm.create_model(f'{record["architecture"]}.{record["tag"]}'))
    assert cfg['input_size'] == tuple(record['input_size'])
    assert (cfg['crop_pct'], cfg['crop_mode'], cfg['interpolation']) == (
        record['crop_pct'], record['crop_mode'], record['interpolation'])


@pytest.mark.skipif(not IMAGENETTE_VAL.is_dir(), reason=f'shared data not found at {IMAGENETTE_VAL}')
def test_tags_load_offline_and_classify_the_check_images_as_recorded(tmp_path):
    # a fresh process: huggingface_hub reads HF_HUB_OFFLINE when it is imported
    code = f"""
        import json, timm, torch, torchvision
        import sgdrop_zoo
        val = torchvision.datasets.ImageFolder({str(IMAGENETTE_VAL)!r})
        order = torch.randperm(len(val), generator=torch.Generator().manual_seed(0)).tolist()
        counts = {{}}
        for name in timm.list_models('sgdrop_*', pretrained=True):
            model = timm.create_model(name, pretrained=True).eval()
            transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
            indices = sorted(order[:100])
            images = torch.stack([transform(val[i][0]) for i in indices])
            targets = torch.tensor([val.targets[i] for i in indices])
            with torch.no_grad():
                counts[name] = int((model(images).argmax(1) == targets).sum())
        print(json.dumps(counts))
    """
    counts = json.loads(_run(code, _offline_env(tmp_path)).stdout.splitlines()[-1])
    assert counts == {name: r['metrics']['check']['correct'] for name, r in zip(NAMES, RECORDS)}
    assert not any((tmp_path / 'empty_hf_home').rglob('*.safetensors'))  # nothing was downloaded


def test_plain_timm_loads_the_folders_with_identical_logits(tmp_path):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.save(images, tmp_path / 'images.pt')
    # every shipped folder names a plain timm architecture, with the arguments that rebuild it (vgg11's mlp_ratio)
    assert not any(r['base_architecture'].startswith('sgdrop_') for r in RECORDS)
    code = f"""
        import sys, timm, torch
        images = torch.load({str(tmp_path / 'images.pt')!r})
        for name, folder in {[(n, str(hub_configs_dir() / r['local_dir'])) for n, r in zip(NAMES, RECORDS)]!r}:
            model = timm.create_model('local-dir:' + folder, pretrained=True).eval()
            with torch.no_grad():
                torch.save(model(images), {str(tmp_path)!r} + '/' + name + '.pt')
        assert 'sgdrop_zoo' not in sys.modules
    """
    _run(code, _offline_env(tmp_path))
    for name in NAMES:
        model = timm.create_model(name, pretrained=True).eval()
        with torch.no_grad():
            assert torch.equal(torch.load(tmp_path / f'{name}.pt'), model(images)), name


def test_transformers_loads_the_folders_as_timm_models_with_identical_logits():
    from transformers import AutoModelForImageClassification
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    for record in RECORDS:
        folder = hub_configs_dir() / record['local_dir']
        # float32 as timm loads it (transformers would keep the file's float16); no kernels from the Hub
        model = AutoModelForImageClassification.from_pretrained(folder, dtype=torch.float32, use_kernels=False)
        assert type(model).__name__ == 'TimmWrapperForImageClassification'
        assert [model.config.id2label[i] for i in range(record['num_classes'])] == record['label_names']
        plain = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
        with torch.no_grad():
            assert torch.equal(model.eval()(pixel_values=images).logits, plain(images)), record['local_dir']


@pytest.mark.parametrize('record', RECORDS, ids=NAMES)
def test_tag_applies_and_records_its_architecture_arguments(record):
    """A tag builds its checkpoint's architecture (e.g. vgg11's narrow head), and a model fine-tuned from it records
    those arguments, so that its own export rebuilds it in plain timm."""
    model = timm.create_model(f'{record["architecture"]}.{record["tag"]}', pretrained=True, num_classes=3)
    assert model.num_classes == 3
    assert record['model_args'].items() <= timm.models.get_model_args(model).items()


def test_untagged_name_keeps_timms_architecture():
    """The narrow head is the tag's, not the architecture's: plain sgdrop_vgg11 is timm's vgg11."""
    with torch.device('meta'):
        assert timm.create_model('sgdrop_vgg11').pre_logits.fc1.out_channels == 4096
        assert timm.create_model('sgdrop_vgg11.imagenette_128_ema_head').pre_logits.fc1.out_channels == 128


def test_changed_or_missing_weights_are_refused(tmp_path):
    configs = tmp_path / 'hub_configs'
    shutil.copytree(hub_configs_dir(), configs)
    record = RECORDS[0]
    weights = configs / record['local_dir'] / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    # by its tag, then the folder by its path, to load or to publish, held to its record as its tag is; then the tag
    # once the weights are gone; one process for all, each refusal printed on a line of its own
    code = f"""
        import os, timm, sgdrop_zoo
        from sgdrop_zoo.hub import load_sgdrop_model, publish_checkpoint
        from sgdrop_zoo.loading import load_model
        from sgdrop_zoo.hub_files import HubError
        folder = {str(weights.parent)!r}
        for load in (lambda: timm.create_model({NAMES[0]!r}, pretrained=True), lambda: load_model(folder),
                     lambda: load_sgdrop_model('local-dir:' + folder),
                     lambda: publish_checkpoint(folder, 'me/x', dry_run_dir={str(tmp_path / 'dry')!r}),
                     lambda: os.remove({str(weights)!r}) or timm.create_model({NAMES[0]!r}, pretrained=True)):
            try:
                load()
            except HubError as e:
                print(e)
            else:
                raise SystemExit('took changed or missing weights')
    """
    changed = sha256_of_file(weights)
    out = _run(code, _offline_env(tmp_path, SGDROP_ZOO_HUB_CONFIGS=str(configs))).stdout.splitlines()
    assert len(out) == 5
    assert f'has sha256 {changed}, but its hub_configs/ record expects {record["sha256"]}' in out[0]
    assert all(f'has sha256 {changed}, but its hub_configs/ record' in line for line in out[1:4])
    assert 'is missing and the checkpoint is not on the Hub' in out[4]
    assert not (tmp_path / 'dry').exists() and not weights.exists()


@pytest.mark.parametrize('record', RECORDS[:1], ids=NAMES[:1])
def test_shipped_folder_publishes_unchanged(record, tmp_path):
    folder = hub_configs_dir() / record['local_dir']
    result = publish_checkpoint(folder, f'sgdrop-zoo/{record["architecture"]}.{record["tag"]}',
                                dry_run_dir=tmp_path / 'dry', dataset=record['dataset'], tag=record['tag'])
    assert (tmp_path / 'dry' / WEIGHTS_NAME).read_bytes() == (folder / WEIGHTS_NAME).read_bytes()
    assert result.record['sha256'] == record['sha256']
    assert result.record['architecture'] == record['architecture']
    published = json.loads((tmp_path / 'dry' / 'config.json').read_text())
    assert published == json.loads((folder / 'config.json').read_text())


def test_a_retired_tag_says_what_replaced_it_and_which_commit_holds_it(capsys):
    from sgdrop_zoo.cli import main
    from sgdrop_zoo.loading import load_model
    with pytest.raises(ValueError) as refused:
        load_model('sgdrop_vgg11.imagenette_64')
    assert str(refused.value).startswith(
        'cannot load sgdrop_vgg11.imagenette_64: the tag was retired, replaced by `sgdrop_vgg11.imagenette_128` and '
        'its `_vanilla` twin; its files are in commit 8fa3644 of the repository (git checkout 8fa3644 -- '
        'hub_configs/sgdrop_vgg11.imagenette_64.json hub_configs/sgdrop_vgg11.imagenette_64).')
    assert main(['info', 'sgdrop_convnext_atto.imagenette_128']) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and 'the tag was retired' in lines[0] and 'commit 339bddd' in lines[0]
    # a shipped tag and a name that never was one are not retired
    assert retired_tag('sgdrop_vgg11.imagenette_128_ema_head') is None and retired_tag('sgdrop_vgg11.nothing') is None
