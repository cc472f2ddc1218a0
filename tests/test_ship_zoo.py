"""The pure parts of benchmarks/ship_zoo.py and transfer_zoo.py: which runs ship, under which tags, what probes."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest
import timm
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / 'benchmarks'
DATA = Path('../shared/data/imagenette')
sys.path.insert(0, str(BENCHMARKS))
import overhead  # noqa: E402, benchmarks/overhead.py
import reproduce  # noqa: E402, benchmarks/reproduce.py
import study  # noqa: E402, benchmarks/study.py
import ship_zoo  # noqa: E402, benchmarks/ship_zoo.py
import transfer_zoo  # noqa: E402, benchmarks/transfer_zoo.py


def run(method: str, seed: int, top1: float, arch: str = 'sgdrop_resnet10t', **extra) -> dict:
    return dict(arch=arch, method=method, seed=seed, final_val_acc1=top1, command=f'train {method} {seed}',
                final_eval_command=f'eval {method} {seed}', curve=[{'val_area_ratio': 0.25 + seed / 100}], **extra)


RUNS = [run('sgdrop', 0, 61.0), run('sgdrop', 1, 59.0), run('sgdrop', 2, 63.0),
        run('vanilla', 0, 60.0), run('vanilla', 1, 62.0), run('vanilla', 2, 58.0),
        run('sgdrop', 0, 30.0, arch='sgdrop_convnext_atto')]


def test_the_median_seed_ships_with_the_vanilla_run_of_the_same_seed():
    chosen, twin = ship_zoo.choose_pair(RUNS, 'sgdrop_resnet10t', 'sgdrop')
    # 59, 61, 63: seed 0 is the median, and the twin is vanilla seed 0 (60.0), not vanilla's own median (seed 0 too)
    assert (chosen['method'], chosen['seed'], twin['method'], twin['seed']) == ('sgdrop', 0, 'vanilla', 0)
    # two seeds: the lower middle one
    chosen, twin = ship_zoo.choose_pair(RUNS[1:3] + RUNS[3:6], 'sgdrop_resnet10t', 'sgdrop')
    assert (chosen['seed'], twin['seed'], twin['final_val_acc1']) == (1, 1, 62.0)
    # no vanilla run of that seed: no twin
    assert ship_zoo.choose_pair(RUNS, 'sgdrop_convnext_atto', 'sgdrop')[1] is None
    with pytest.raises(SystemExit, match='no sgdrop_product run of sgdrop_resnet10t'):
        ship_zoo.choose_pair(RUNS, 'sgdrop_resnet10t', 'sgdrop_product')


def test_the_pilot_rule_takes_the_best_last_epoch_dev_top1_and_the_paper_default_wins_a_tie():
    def pilot(top1: dict[str, float]) -> list[dict]:
        return [dict(arch='sgdrop_vgg11', method=method, final_val_acc1=acc1, final_val_count=1000)
                for method, acc1 in top1.items()]
    candidates = ['vanilla', 'sgdrop', 'sgdrop_curriculum']
    # one dev image more wins; vanilla is never a candidate, however high
    assert reproduce.pilot_choice(pilot({'vanilla': 50.4, 'sgdrop': 42.1, 'sgdrop_curriculum': 42.2}), 'sgdrop_vgg11',
                                  candidates) == 'sgdrop_curriculum'
    # 30.2 - 30.1 is 0.0999... in floating point: a whole dev image all the same
    assert reproduce.pilot_choice(pilot({'sgdrop': 30.1, 'sgdrop_curriculum': 30.2}), 'sgdrop_vgg11',
                                  candidates) == 'sgdrop_curriculum'
    assert reproduce.pilot_choice(pilot({'sgdrop_curriculum': 42.1, 'sgdrop': 42.1}), 'sgdrop_vgg11',
                                  candidates) == 'sgdrop'
    assert reproduce.pilot_choice(pilot({'sgdrop': 42.1, 'sgdrop_curriculum': 43.0}), 'sgdrop_vgg11',
                                  ['vanilla', 'sgdrop']) == 'sgdrop'
    with pytest.raises(SystemExit, match='^error: the pilot of sgdrop_vgg11 has no result of sgdrop_curriculum yet'):
        reproduce.pilot_choice(pilot({'vanilla': 50.4, 'sgdrop': 42.1}), 'sgdrop_vgg11', candidates)


def test_each_family_of_the_final_study_trains_and_ships_what_its_committed_pilots_chose():
    pilot = [json.loads(p.read_text()) for p in (study.RESULTS / 'reproduce_pilot128').glob('*__*__seed*.json')]
    method_pilot = reproduce.pilot_runs('pilot128v2', study.results_folder('pilot128v2'))
    final = study.PROTOCOLS['zoo128']
    final_runs = study.read_results(study.results_folder('zoo128'))
    assert sorted(final['ship']) == sorted(final['methods']) == sorted(final['ship_method'])
    for arch in final['ship']:
        chosen = [reproduce.pilot_choice(pilot, arch, study.PROTOCOLS['pilot128']['methods'][arch])]
        try:
            chosen.append(reproduce.method_pilot_choice(method_pilot, arch,
                                                        study.PROTOCOLS['pilot128v2']['candidate_order'][arch]))
        except SystemExit:  # the family's method pilot has not chosen yet
            pass
        # the final study runs every chosen method; a method pilot's choice ships once its study has every seed of
        # the protocol (a vanilla seed that runs later changes the records, not the weights); until then the family
        # keeps the first pilot's
        assert final['methods'][arch] == ['vanilla', *chosen], arch
        seeds = {method: {r['seed'] for r in final_runs if (r['arch'], r['method']) == (arch, method)}
                 for method in chosen}
        complete = [method for method in chosen[1:] if seeds[method] >= set(final['seeds'])]
        shipped = complete[-1] if complete else chosen[0]
        assert final['ship_method'][arch] == shipped, arch
        # a method pilot's choice ships new weights, under a tag of its own
        assert (arch in final.get('pair_tag', {})) == (shipped != chosen[0]), arch


def test_each_sgdrop_method_is_timed_by_the_overhead_of_the_weights_that_compute_its_attribution():
    ema = ['sgdrop', 'sgdrop_curriculum', 'sgdrop_product', 'sgdrop_rho0.05', 'sgdrop_rho0.1', 'sgdrop_curriculum0.1',
           'sgdrop_product_rho0.01', 'sgdrop_channel_mean_rho0.01', 'sgdrop_channel_mean_rho0.1']
    expected = {'vanilla': None, 'dropout': None, 'sgdrop_online': 'sgdrop_online_overhead',
                **{method: 'sgdrop_ema_overhead' for method in ema},
                **{f'{method}_ema_head': 'sgdrop_ema_head_overhead' for method in ema}}
    assert {method: study.step_overhead_figure(method) for method in study.METHODS} == expected
    # an ema_head method is its method with the one flag changed
    assert study.METHODS['sgdrop_curriculum_ema_head'] == ['--regularizer', 'sgdrop', '--sgdrop-rho', '0.0',
                                                               '--sgdrop-rho-end', 'RHO_END', '--sgdrop-attribution',
                                                               'ema_head']
    assert study.METHODS['sgdrop_rho0.1_ema_head'] == ['--regularizer', 'sgdrop', '--sgdrop-attribution',
                                                           'ema_head', '--sgdrop-rho', '0.1']


def method_pilot(runs: dict[str, tuple[float, float, Optional[float]]]) -> list[dict]:
    """Pilot results of sgdrop_convnext_atto on 1,000 dev images: method -> (top-1, share <= 0, logit drop)."""
    return [dict(arch='sgdrop_convnext_atto', method=method, final_val_acc1=acc1, final_val_count=1000,
                 final_nonpositive_feature_share=share, final_true_class_logit_drop=drop)
            for method, (acc1, share, drop) in runs.items()]


def test_the_method_pilot_rule_by_hand():
    order = ['sgdrop', 'sgdrop_product', 'sgdrop_channel_mean_rho0.1']
    runs = {'vanilla': (30.2, 0.498, None), 'sgdrop': (32.5, 0.993, None), 'sgdrop_product': (28.9, 0.502, None),
            'sgdrop_channel_mean_rho0.1': (31.0, 0.55, 0.8)}
    # sgdrop parks its features below zero (99.3% against 49.8%): not eligible, however high its top-1
    assert reproduce.method_pilot_choice(method_pilot(runs), 'sgdrop_convnext_atto', order, cheaper=False) == \
        'sgdrop_channel_mean_rho0.1'
    # within 0.5 points (5 of 1,000 dev images) the earlier candidate wins; 6 images apart the better one does
    close = dict(runs, sgdrop_product=(30.5, 0.502, None))
    assert reproduce.method_pilot_choice(method_pilot(close), 'sgdrop_convnext_atto', order, cheaper=False) == \
        'sgdrop_product'
    apart = dict(runs, sgdrop_product=(30.4, 0.502, None))
    assert reproduce.method_pilot_choice(method_pilot(apart), 'sgdrop_convnext_atto', order, cheaper=False) == \
        'sgdrop_channel_mean_rho0.1'
    # a mask that takes nothing from the true class is not eligible; a share 10.1 points above vanilla's neither
    no_drop = {**runs, 'sgdrop_channel_mean_rho0.1': (31.0, 0.55, 0.0)}
    assert reproduce.method_pilot_choice(method_pilot(no_drop), 'sgdrop_convnext_atto', order, cheaper=False) == \
        'sgdrop_product'
    parked = dict(no_drop, sgdrop_product=(28.9, 0.599, None))
    assert reproduce.method_pilot_choice(method_pilot(parked), 'sgdrop_convnext_atto', order, cheaper=False) == \
        'vanilla'
    # the ema_head run replaces its method within 0.5 points, not below
    with pytest.raises(SystemExit, match='chose sgdrop_channel_mean_rho0.1; its rule waits for '
                                         'sgdrop_channel_mean_rho0.1_ema_head'):
        reproduce.method_pilot_choice(method_pilot(runs), 'sgdrop_convnext_atto', order)
    for acc1, expected in ((30.5, 'sgdrop_channel_mean_rho0.1_ema_head'), (30.4, 'sgdrop_channel_mean_rho0.1')):
        cheaper = {**runs, 'sgdrop_channel_mean_rho0.1_ema_head': (acc1, 0.52, 0.7)}
        assert reproduce.method_pilot_choice(method_pilot(cheaper), 'sgdrop_convnext_atto', order) == expected
    with pytest.raises(SystemExit, match='has no result of sgdrop_channel_mean_rho0.1 yet'):
        reproduce.method_pilot_choice(method_pilot({k: v for k, v in runs.items() if k != order[-1]}),
                                      'sgdrop_convnext_atto', order)


def test_the_step_overhead_cell_is_signed_once():
    assert [reproduce.overhead_cell(share) for share in (0.334, 0.0029, -0.0079, None)] == ['+33%', '+0%', '-1%', '-']


def test_checkpoint_names_of_a_pair():
    protocol = dict(tag='imagenette_128', pair_tag={'sgdrop_convnext_atto': 'imagenette_128_channel_mean'})
    assert ship_zoo.checkpoint_names('sgdrop_vgg11', protocol) == (
        'sgdrop_vgg11.imagenette_128', 'sgdrop_vgg11.imagenette_128_vanilla')
    assert ship_zoo.checkpoint_names('sgdrop_convnext_atto', protocol) == (
        'sgdrop_convnext_atto.imagenette_128_channel_mean', 'sgdrop_convnext_atto.imagenette_128_channel_mean_vanilla')


def test_each_shipped_record_names_the_command_that_exports_it_under_its_own_tag():
    from sgdrop_zoo.pretrained import load_hub_configs
    for record in load_hub_configs():
        command = record['metrics']['ship_command'].split()
        assert command[:2] == ['python', 'benchmarks/ship_zoo.py']
        # the protocol fixes the tag and the results read
        options = dict(zip(command[2::2], command[3::2]))
        protocol = study.PROTOCOLS[options['--protocol']]
        names = ship_zoo.checkpoint_names(record['architecture'], protocol)
        assert f'{record["architecture"]}.{record["tag"]}' in names, record['tag']
        assert options['--archs'] == record['architecture']
        assert record['metrics']['results'].startswith(options['--results-dir'] + '/')


def test_study_metrics_by_hand():
    chosen, twin = ship_zoo.choose_pair(RUNS, 'sgdrop_resnet10t', 'sgdrop')
    metrics = ship_zoo.study_metrics(RUNS, chosen, 'sgdrop_resnet10t')
    # SGDrop seeds 61, 59, 63: mean 61, sample std 2; vanilla 60, 62, 58: mean 60, std 2; areas 0.25, 0.26, 0.27
    assert metrics == dict(top1_float32=61.0, seed=0, method='sgdrop', seeds_top1={'0': 61.0, '1': 59.0, '2': 63.0},
                           seeds_top1_mean=61.0, seeds_top1_std=2.0, vanilla_top1={'0': 60.0, '1': 62.0, '2': 58.0},
                           vanilla_top1_mean=60.0, vanilla_top1_std=2.0, area_ratio=0.26, vanilla_area_ratio=0.26,
                           train_command='train sgdrop 0', eval_command='eval sgdrop 0')
    # the twin's record carries its own method's seeds, and the diagnostics its run logged
    twin = dict(twin, final_dropped_attribution_share=None, final_nonpositive_feature_share=0.5)
    metrics = ship_zoo.study_metrics(RUNS[:3] + [twin] + RUNS[4:6], twin, 'sgdrop_resnet10t')
    assert (metrics['method'], metrics['seeds_top1'], metrics['final_nonpositive_feature_share']) == (
        'vanilla', {'0': 60.0, '1': 62.0, '2': 58.0}, 0.5)
    assert 'final_dropped_attribution_share' not in metrics


def test_each_protocol_measures_its_overhead_at_its_image_size_one_file_per_model_kwargs():
    assert study.overhead_commands('zoo128') == {
        'overhead.json': ['--models', 'sgdrop_resnet10t', 'sgdrop_convnext_atto', '--image-size', '128',
                          '--batch-size', '64', '--channels-last', '--warmup', '3', '--steps', '10'],
        'overhead_vgg11.json': ['--models', 'sgdrop_vgg11', '--model-kwargs', 'mlp_ratio=0.03125', '--image-size',
                                '128', '--batch-size', '64', '--channels-last', '--warmup', '3', '--steps', '10'],
    }
    # the files the 64 px zoo's table and records were made from
    for name in study.overhead_commands('zoo'):
        assert (study.RESULTS / 'zoo_cpu' / name).is_file()


def test_a_missing_overhead_result_names_the_command_that_makes_it(tmp_path: Path):
    (tmp_path / 'overhead.json').write_text(json.dumps({'command': 'python benchmarks/overhead.py', 'results': {
        'sgdrop_resnet10t': {'sgdrop_ema_overhead': 0.3}}}))
    with pytest.raises(SystemExit) as missing:
        study.read_overhead('zoo128', tmp_path)
    assert str(missing.value) == (f'error: {os.path.relpath(tmp_path / "overhead_vgg11.json", study.REPO)} is '
                                  'missing; measure it with python benchmarks/reproduce.py zoo128 --overhead')
    vgg_report = {'command': 'python benchmarks/overhead.py --models v', 'results': {
        'sgdrop_vgg11': {'sgdrop_ema_overhead': 0.6}}}
    (tmp_path / 'overhead_vgg11.json').write_text(json.dumps(vgg_report))
    assert study.read_overhead('zoo128', tmp_path) == {
        'sgdrop_resnet10t': {'sgdrop_ema_overhead': 0.3, 'command': 'python benchmarks/overhead.py'},
        'sgdrop_vgg11': {'sgdrop_ema_overhead': 0.6, 'command': 'python benchmarks/overhead.py --models v'}}


def test_the_transfer_probes_take_each_shipped_sgdrop_checkpoint_of_the_tag_with_its_twin():
    def record(arch: str, tag: str, method: str, twin: str = None) -> dict:
        return dict(architecture=arch, tag=tag, metrics=dict(method=method), **({'twin': twin} if twin else {}))

    records = [record('sgdrop_vgg11', 'imagenette_128', 'sgdrop', 'sgdrop_vgg11.imagenette_128_vanilla'),
               record('sgdrop_vgg11', 'imagenette_128_vanilla', 'vanilla', 'sgdrop_vgg11.imagenette_128'),
               record('sgdrop_resnet10t', 'imagenette_128', 'sgdrop', 'sgdrop_resnet10t.imagenette_128_vanilla'),
               record('sgdrop_convnext_atto', 'imagenette_128', 'sgdrop', 'sgdrop_convnext_atto.imagenette_128_x'),
               record('sgdrop_resnet10t', 'imagenette_64', 'sgdrop')]
    # resnet10t's twin is not shipped, convnext_atto names a missing one, the 64 px tag has none
    assert transfer_zoo.shipped_pairs(records, 'imagenette_128') == [
        ('sgdrop_vgg11.imagenette_128', 'sgdrop_vgg11.imagenette_128_vanilla')]
    with pytest.raises(SystemExit, match="no SGDrop checkpoint of tag 'imagenette_64' with a shipped vanilla twin"):
        transfer_zoo.shipped_pairs(records, 'imagenette_64')


def test_a_result_records_the_commit_its_run_started_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    committed = json.loads((BENCHMARKS / 'results' / 'reproduce_cpu' / 'sgdrop_cifar_cnn__sgdrop__seed0.json')
                           .read_text())
    head = {'commit': 'abc123'}
    monkeypatch.setattr(reproduce, 'git_commit', lambda: head['commit'])

    def train(command: list[str], **kwargs) -> None:
        output = Path(command[command.index('--output') + 1])
        output.mkdir(parents=True)
        (output / 'log.jsonl').write_text(''.join(json.dumps(line) + '\n' for line in committed['curve']))
        head['commit'] = 'def456'  # work committed while the run trains

    monkeypatch.setattr(reproduce, 'subprocess', SimpleNamespace(run=train))  # the recipe does not run
    config = dict(study.PROTOCOLS['cpu'], curve_val_subset=0)
    (tmp_path / 'results').mkdir()
    result = reproduce.train_one('cpu', config, 'DATA', 'sgdrop_cifar_cnn', 'sgdrop', 0, tmp_path / 'runs',
                                 tmp_path / 'results')
    assert result['git_commit'] == 'abc123' and result['curve'] == committed['curve']


def test_a_rerun_never_replaces_an_earlier_rerun_of_the_same_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    committed = json.loads((BENCHMARKS / 'results' / 'reproduce_cpu' / 'sgdrop_cifar_cnn__sgdrop__seed0.json')
                           .read_text())
    committed.pop('cpu_capability', None)  # unrecorded: a re-training that differs is a new run, not an error
    trained = [dict(committed['curve'][0], train_loss=1.0), *committed['curve'][1:]]

    def train(command: list[str], **kwargs) -> None:
        output = Path(command[command.index('--output') + 1])
        output.mkdir(parents=True, exist_ok=True)
        (output / 'log.jsonl').write_text(''.join(json.dumps(line) + '\n' for line in trained))

    monkeypatch.setattr(reproduce, 'subprocess', SimpleNamespace(run=train))  # the recipe does not run
    monkeypatch.setattr(reproduce, 'git_commit', lambda: 'abc123')
    config = dict(study.PROTOCOLS['cpu'], curve_val_subset=0)
    results = tmp_path / 'results'
    (results / study.RERUNS).mkdir(parents=True)
    (results / 'sgdrop_cifar_cnn__sgdrop__seed0.json').write_text(json.dumps(committed))
    earlier = results / study.RERUNS / 'sgdrop_cifar_cnn__sgdrop__seed0.json'
    earlier.write_text(json.dumps(dict(committed, curve=[dict(committed['curve'][0], train_loss=2.0),
                                                         *committed['curve'][1:]])))
    before = earlier.read_text()
    with pytest.raises(SystemExit, match=r'^error: sgdrop_cifar_cnn__sgdrop__seed0: .*reruns/sgdrop_cifar_cnn__sgdrop__'
                                         r'seed0.json holds an earlier re-training of this run, which this one is not '
                                         r"\(the re-trained run's epoch 1 gives train_loss 1.0, the earlier one 2.0\); "
                                         'it is kept: move it aside to record this one$'):
        reproduce.train_one('cpu', config, 'DATA', 'sgdrop_cifar_cnn', 'sgdrop', 0, tmp_path / 'runs', results, True)
    assert earlier.read_text() == before
    # the same re-training again is recorded over itself
    earlier.write_text(json.dumps(dict(committed, curve=trained)))
    result = reproduce.train_one('cpu', config, 'DATA', 'sgdrop_cifar_cnn', 'sgdrop', 0, tmp_path / 'runs', results,
                                 True)
    assert json.loads(earlier.read_text())['curve'] == result['curve'] == trained
    # with CPU kernels that neither the committed run nor the earlier re-training used, refused before training
    (results / 'sgdrop_cifar_cnn__sgdrop__seed0.json').write_text(json.dumps(dict(committed, cpu_capability='AVX2')))
    earlier.write_text(json.dumps(dict(committed, curve=trained, cpu_capability='ANOTHER')))
    monkeypatch.setattr(reproduce.torch.backends.cpu, 'get_cpu_capability', lambda: 'THIS')
    before = earlier.read_text()
    with pytest.raises(SystemExit, match=r"^error: sgdrop_cifar_cnn__sgdrop__seed0: .*reruns/sgdrop_cifar_cnn__sgdrop__"
                                         r"seed0.json holds an earlier re-training of this run, and this machine's "
                                         r"THIS CPU kernels are neither its nor the committed run's"):
        reproduce.train_one('cpu', config, 'DATA', 'sgdrop_cifar_cnn', 'sgdrop', 0, tmp_path / 'runs2', results, True)
    assert earlier.read_text() == before and not (tmp_path / 'runs2').exists()


def test_a_rerun_is_the_committed_run_to_the_bit_or_a_new_run_on_other_cpu_kernels():
    curve = [{'epoch': 1, 'train_loss': 2.3012345678, 'val_acc1': 20.1},
             {'epoch': 2, 'train_loss': 2.1012345678, 'val_acc1': 30.2}]
    committed = dict(final_val_acc1=62.90445858511955, final_train_acc1=99.4, final_masked_train_acc1=97.8,
                     curve=curve, img_per_s=56.0, cpu_capability='AVX512',
                     versions={'torch': '2.14.1', 'python': '3.11.7'})
    assert reproduce.check_rerun('r', dict(committed, img_per_s=70.0), committed)  # timings may differ
    last_bit = dict(committed, final_val_acc1=62.90445858511956)
    with pytest.raises(SystemExit, match=r'^error: r: the re-trained run gives final_val_acc1 62.90445858511956, the '
                                         r'committed result 62.90445858511955, with the same CPU kernels \(AVX512\) '
                                         'and torch; the recipe or its data changed since the committed run$'):
        reproduce.check_rerun('r', last_bit, committed)
    changed_curve = dict(committed, curve=[curve[0], dict(curve[1], val_acc1=30.3)])
    with pytest.raises(SystemExit, match="^error: r: the re-trained run's epoch 2 gives val_acc1 30.3, the committed "
                                         r'result 30.2, with the same CPU kernels'):
        reproduce.check_rerun('r', changed_curve, committed)
    # the same top-1 everywhere, but a loss in its tenth digit: not the same run (ship_zoo tells them apart by it)
    changed_loss = dict(committed, curve=[dict(curve[0], train_loss=2.3012345679), curve[1]])
    with pytest.raises(SystemExit, match="^error: r: the re-trained run's epoch 1 gives train_loss 2.3012345679, the "
                                         'committed result 2.3012345678, with'):
        reproduce.check_rerun('r', changed_loss, committed)
    with pytest.raises(SystemExit, match='^error: r: the re-trained run has 1 epochs, the committed result 2, with'):
        reproduce.check_rerun('r', dict(committed, curve=curve[:1]), committed)
    # other kernels, or a committed run that did not record them: a new run of the same command, not an error
    assert not reproduce.check_rerun('r', dict(last_bit, cpu_capability='AVX2'), committed)
    unrecorded = {key: value for key, value in committed.items() if key != 'cpu_capability'}
    assert not reproduce.check_rerun('r', changed_curve, unrecorded)
    # another torch is other kernels too
    assert not reproduce.check_rerun('r', dict(last_bit, versions={'torch': '2.15.0', 'python': '3.11.7'}), committed)


def test_the_run_folder_log_tells_whether_its_weights_are_the_study_run_or_its_rerun(tmp_path: Path):
    from sgdrop_zoo.run_files import append_log
    name = 'sgdrop_resnet10t__sgdrop__seed0'
    study_run = run('sgdrop', 0, 61.0, protocol='zoo128')
    study_run['curve'] = [dict(epoch=1, train_loss=2.2214962768554690, val_acc1=19.8)]
    rerun = dict(study_run, final_val_acc1=60.5, rerun_of=f'results/{name}.json',
                 curve=[dict(epoch=1, train_loss=2.2214983409245810, val_acc1=19.8)])
    runs_dir, results = tmp_path / 'runs', tmp_path / 'results'
    folder = runs_dir / name
    folder.mkdir(parents=True)
    append_log(folder / 'log.jsonl', dict(study_run['curve'][0], img_per_s=10.0))  # timings are not compared
    assert ship_zoo.result_of_folder(study_run, runs_dir, results, DATA) == (study_run, results / f'{name}.json')
    # the folder of a re-training with other kernels: only its rerun result describes it
    (folder / 'log.jsonl').unlink()
    append_log(folder / 'log.jsonl', rerun['curve'][0])
    with pytest.raises(SystemExit) as refused:
        ship_zoo.result_of_folder(study_run, runs_dir, results, DATA)
    # the command trains into the folders the study was read from, which are not reproduce.py's defaults here
    assert str(refused.value) == (
        f'error: {folder} holds another run than {os.path.relpath(results / f"{name}.json", study.REPO)}; move '
        'the folder aside, then train it again with python benchmarks/reproduce.py zoo128 --data '
        '../shared/data/imagenette --archs sgdrop_resnet10t --methods sgdrop --seeds 0 --rerun --runs-dir '
        f'{os.path.relpath(runs_dir)} --results-dir {os.path.relpath(results)}')
    (results / study.RERUNS).mkdir(parents=True)
    (results / study.RERUNS / f'{name}.json').write_text(json.dumps(rerun))
    assert ship_zoo.result_of_folder(study_run, runs_dir, results, DATA) == (
        rerun, results / study.RERUNS / f'{name}.json')
    # the study's own folders need no flags
    assert ship_zoo.rerun_command(study_run, DATA, study.runs_folder('zoo128'), study.results_folder('zoo128')) == (
        'python benchmarks/reproduce.py zoo128 --data ../shared/data/imagenette --archs sgdrop_resnet10t --methods '
        'sgdrop --seeds 0 --rerun')
    # its record carries the rerun's own figures and names the study's run; every seed stays the study's
    metrics = ship_zoo.study_metrics(RUNS, dict(rerun, cpu_capability='AVX2'), 'sgdrop_resnet10t')
    assert (metrics['top1_float32'], metrics['seeds_top1'], metrics['rerun_of'], metrics['cpu_capability']) == (
        60.5, {'0': 61.0, '1': 59.0, '2': 63.0}, f'results/{name}.json', 'AVX2')


def _data_root(tmp_path: Path) -> Path:
    for split in ('train', 'val'):
        (tmp_path / 'data' / split).mkdir(parents=True)
    return tmp_path / 'data'


def test_a_pair_without_its_vanilla_run_ships_nothing(tmp_path: Path, monkeypatch):
    _data_root(tmp_path)
    results = tmp_path / 'results'
    results.mkdir()
    method = study.PROTOCOLS['zoo128']['ship_method']['sgdrop_resnet10t']
    (results / f'sgdrop_resnet10t__{method}__seed2.json').write_text(json.dumps(run(method, 2, 63.0)))
    for name in study.overhead_commands('zoo128'):
        (results / name).write_text(json.dumps({'command': 'python benchmarks/overhead.py', 'results': {}}))
    before = sorted(p.name for p in (study.REPO / 'hub_configs').iterdir())
    monkeypatch.setattr(sys, 'argv', ['ship_zoo.py', '--data', str(tmp_path / 'data'), '--protocol', 'zoo128',
                                      '--results-dir', str(results), '--archs', 'sgdrop_resnet10t'])
    with pytest.raises(SystemExit) as missing:
        ship_zoo.main()
    assert str(missing.value) == (
        'error: no vanilla run of sgdrop_resnet10t with seed 2, the twin of the checkpoint to ship; run it with python '
        f'benchmarks/reproduce.py zoo128 --data {tmp_path / "data"} --archs sgdrop_resnet10t --methods vanilla '
        '--seeds 2')
    assert sorted(p.name for p in (study.REPO / 'hub_configs').iterdir()) == before


def test_a_pair_ships_whole_or_not_at_all(tmp_path: Path, monkeypatch):
    data = _data_root(tmp_path)
    results = tmp_path / 'results'
    results.mkdir()
    for method in (study.PROTOCOLS['zoo128']['ship_method']['sgdrop_resnet10t'], 'vanilla'):
        (results / f'sgdrop_resnet10t__{method}__seed0.json').write_text(json.dumps(run(method, 0, 60.0)))
    for name in study.overhead_commands('zoo128'):
        (results / name).write_text(json.dumps({'command': 'python benchmarks/overhead.py', 'results': {}}))
    prepared = []

    def prepare(name, run, runs, data, runs_dir, results_dir, overhead, twin, keep_weights, tmp):
        # the SGDrop checkpoint is ready; its twin's run folder is gone
        if run['method'] == 'vanilla':
            raise SystemExit(f'error: {name}: its checkpoint is missing')
        (tmp / 'model.safetensors').write_bytes(b'weights')
        prepared.append((name, twin))
        return {}

    monkeypatch.setattr(ship_zoo, 'prepare_checkpoint', prepare)
    before = {p.name: p.stat().st_mtime_ns for p in (study.REPO / 'hub_configs').iterdir()}
    monkeypatch.setattr(sys, 'argv', ['ship_zoo.py', '--data', str(data), '--protocol', 'zoo128', '--results-dir',
                                      str(results), '--archs', 'sgdrop_resnet10t'])
    name = f"sgdrop_resnet10t.{study.PROTOCOLS['zoo128']['pair_tag']['sgdrop_resnet10t']}"
    with pytest.raises(SystemExit, match=f'^error: {name}_vanilla: its checkpoint is missing$'):
        ship_zoo.main()
    assert prepared == [(name, f'{name}_vanilla')]
    # nothing of the pair was written, and no prepared folder was left behind
    assert {p.name: p.stat().st_mtime_ns for p in (study.REPO / 'hub_configs').iterdir()} == before


def test_a_folder_holding_files_ship_zoo_did_not_write_is_not_replaced(tmp_path: Path):
    folder = tmp_path / 'sgdrop_resnet10t.imagenette_128'
    ship_zoo.check_replaceable(folder)  # nothing there yet
    folder.mkdir()
    for name in ship_zoo.SHIPPED_FILES:
        (folder / name).write_text('an earlier shipping')
    ship_zoo.check_replaceable(folder)
    (folder / '.git').mkdir()
    (folder / 'notes.txt').write_text('mine')
    with pytest.raises(SystemExit) as refused:
        ship_zoo.check_replaceable(folder)
    assert str(refused.value) == (f'error: {folder} holds .git, notes.txt, which ship_zoo did not write; move them out '
                                  'of the folder, then ship again')


def test_a_run_already_shipped_is_found_by_its_result_and_its_weights_copied_under_a_new_tag(tmp_path: Path):
    results = study.results_folder('zoo128')
    # each shipped record names the result of its run, the study's or its re-training's
    records = {path.stem: json.loads(path.read_text()) for path in (study.REPO / 'hub_configs').glob('*.json')}
    for name, record in records.items():
        metrics = record['metrics']
        shipped_run = dict(arch=record['architecture'], method=metrics['method'], seed=metrics['seed'])
        assert ship_zoo.shipped_holder(shipped_run, results) == name
    assert ship_zoo.shipped_holder(dict(arch='sgdrop_resnet10t', method='vanilla', seed=7), results) is None
    name, holder = next((n, r) for n, r in records.items() if r['metrics']['method'] == 'vanilla')
    new_name = f"{name.split('.')[0]}.a_new_tag_vanilla"
    (tmp_path / 'out').mkdir()
    record, results_path = ship_zoo.reuse_shipped(new_name, name, tmp_path / 'out')
    shipped = study.REPO / 'hub_configs' / name / 'model.safetensors'
    assert (tmp_path / 'out' / 'model.safetensors').read_bytes() == shipped.read_bytes()
    assert (record['tag'], record['sha256']) == ('a_new_tag_vanilla', holder['sha256'])
    assert results_path == study.REPO / holder['metrics']['results']


def test_a_shipped_run_whose_folder_is_gone_names_keep_weights_and_an_unshipped_one_its_rerun(tmp_path: Path):
    results = study.results_folder('zoo128')
    name = 'sgdrop_vgg11.imagenette_128_ema_head_vanilla'
    record = json.loads((study.REPO / 'hub_configs' / f'{name}.json').read_text())
    shipped_run = dict(arch='sgdrop_vgg11', method='vanilla', seed=record['metrics']['seed'], protocol='zoo128')
    data = tmp_path / 'imagenette'
    for seed, expected in ((shipped_run['seed'], f'pass --keep-weights to ship the same weights, which {name} holds'),
                           (7, 'train it again with python benchmarks/reproduce.py zoo128 --data')):
        with pytest.raises(SystemExit) as refused:
            ship_zoo.prepare_checkpoint(name, dict(shipped_run, seed=seed), [], data, tmp_path / 'runs', results, {},
                                        'twin', False, tmp_path / 'out')
        source = tmp_path / 'runs' / f'sgdrop_vgg11__vanilla__seed{seed}' / 'checkpoint.pth.tar'
        assert str(refused.value).startswith(f'error: {name}: {source} is missing (run folders do not outlive their '
                                             f'session); {expected}')


def test_a_finished_probe_is_reused_only_for_the_shipped_weights_and_data(tmp_path: Path):
    path = tmp_path / 'sgdrop_resnet10t.imagenette_128__probe_seed0.json'
    assert transfer_zoo.finished_probe(path, 'a' * 64, '../shared/data/eurosat') is None
    probe = dict(checkpoint='sgdrop_resnet10t.imagenette_128', checkpoint_sha256='a' * 64,
                 data='../shared/data/eurosat', probe_final_val_acc1=41.0)
    path.write_text(json.dumps(probe))
    assert transfer_zoo.finished_probe(path, 'a' * 64, '../shared/data/eurosat') == probe
    for sha256, data in (('b' * 64, '../shared/data/eurosat'), ('a' * 64, '../shared/data/cifar10_subset')):
        with pytest.raises(SystemExit) as refused:
            transfer_zoo.finished_probe(path, sha256, data)
        assert str(refused.value) == (f'error: {os.path.relpath(path)} probed weights aaaaaaaaaaaa on '
                                      f'../shared/data/eurosat, not the shipped {sha256[:12]} on {data}; move it aside '
                                      'to probe again')


def test_the_probes_refuse_a_dataset_smaller_than_their_subsets_before_writing_anything(small_data: Path):
    before = sorted(study.RESULTS.iterdir())
    result = subprocess.run([sys.executable, 'benchmarks/transfer_zoo.py', '--data', str(small_data), '--tag',
                             'imagenette_128_never_shipped'], cwd=study.REPO, capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (1, '')
    assert result.stderr == (f'error: {small_data / "train" / "airplane"} holds 4 images; the probes take a fixed '
                             'subset of 100 training and 100 validation images per class: probe a dataset with at '
                             'least that many\n')
    assert sorted(study.RESULTS.iterdir()) == before


def test_every_committed_probe_measured_the_weights_shipped_now_or_a_retired_checkpoint():
    from sgdrop_zoo.pretrained import load_hub_configs
    sha256 = {f"{r['architecture']}.{r['tag']}": r['sha256'] for r in load_hub_configs()}
    retired = (study.REPO / 'hub_configs' / 'README.md').read_text(encoding='utf-8')
    probes = sorted(study.RESULTS.glob('transfer_imagenette_128*/*__probe_seed*.json'))
    assert {path.parent.name for path in probes} == {'transfer_imagenette_128', 'transfer_imagenette_128_channel_mean',
                                                     'transfer_imagenette_128_ema_head'}
    for path in probes:
        probe = json.loads(path.read_text())
        if probe['checkpoint'] in sha256:
            assert transfer_zoo.finished_probe(path, sha256[probe['checkpoint']], '../shared/data/eurosat') == probe
        else:  # kept as the study's history, with the commit that still holds the weights it probed
            assert f"| `{probe['checkpoint']}`" in retired, probe['checkpoint']


def test_the_overhead_benchmarks_vanilla_holds_no_ema_and_each_source_its_own():
    # the vanilla step is the recipe's --regularizer none: no EMA network built or updated, which would count part
    # of SGDrop's cost in the baseline
    args = SimpleNamespace(num_classes=3, model_kwargs={}, amp=False)
    images, target = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    ema_of = {}
    for variant, kwargs in overhead.VARIANTS.items():
        model = timm.create_model('sgdrop_resnet10t', num_classes=args.num_classes, **{'sgdrop_rho': 0.1, **kwargs})
        overhead.train_step(model.train(), torch.optim.SGD(model.parameters(), lr=1e-3), images, target, args.amp)
        ema_of[variant] = (model.sgdrop_rho, model.sgdrop_attribution.value, model.ema_updates,
                           model.ema_model is not None)
    assert ema_of == {'vanilla': (0.0, 'online', 0, False), 'sgdrop_ema': (0.1, 'ema', 1, True),
                      'sgdrop_online': (0.1, 'online', 0, False), 'sgdrop_ema_head': (0.1, 'ema_head', 1, True)}


def test_a_truncated_result_and_an_unknown_architecture_are_named(tmp_path: Path):
    (tmp_path / 'sgdrop_resnet10t__sgdrop__seed0.json').write_text('{"arch": ')
    with pytest.raises(SystemExit, match=r'sgdrop_resnet10t__sgdrop__seed0.json is not a run result \(Expecting'):
        study.read_results(tmp_path)
    result = subprocess.run([sys.executable, 'benchmarks/reproduce.py', 'zoo128', '--archs', 'sgdrop_resnet10',
                             '--table-only', '--results-dir', str(tmp_path / 'empty')], cwd=study.REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2 and not (tmp_path / 'empty').exists()
    assert result.stderr.strip().splitlines()[-1] == (
        'reproduce.py: error: --archs sgdrop_resnet10: not in the zoo128 protocol, whose architectures are '
        'sgdrop_resnet10t, sgdrop_convnext_atto, sgdrop_vgg11')
