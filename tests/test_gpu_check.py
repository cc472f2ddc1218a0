"""benchmarks/gpu_check.py --smoke: every stage of the GPU check runs on the CPU at toy sizes with sound figures."""
import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_every_stage_on_the_cpu(tmp_path: Path):
    output = tmp_path / 'gpu_check_smoke.json'
    result = subprocess.run([sys.executable, 'benchmarks/gpu_check.py', '--smoke', '--output', str(output)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    stages = report['stages']
    assert list(stages) == ['eval_equals_timm', 'step_overhead', 'host_syncs', 'exact_k_autocast', 'recipe',
                            'compile']
    assert not [name for name, stage in stages.items() if 'skipped' in stage or 'error' in stage]
    families = ['sgdrop_resnet10t', 'sgdrop_convnext_atto', 'sgdrop_vgg11']
    assert {name: stages['eval_equals_timm'][name] for name in families} == {
        name: {'float32': True, 'bf16_channels_last': True} for name in families}
    assert all(stages['step_overhead'][name]['weights_finite'] for name in families)
    # k = floor(0.01 N) of the 32 px latents, 1 x 1 maps of 512 (ResNet-10-T, VGG-11) and 320 (ConvNeXt-Atto) channels
    assert {name: stages['exact_k_autocast'][name] for name in families} == {
        'sgdrop_resnet10t': {'k': 5, 'dropped': [5] * 8}, 'sgdrop_convnext_atto': {'k': 3, 'dropped': [3] * 8},
        'sgdrop_vgg11': {'k': 5, 'dropped': [5] * 8}}
    recipe = stages['recipe']
    assert recipe['cpu_evaluate_val_acc1'] == recipe['logged_val_acc1'] and recipe['resumed_ok']
    assert recipe['epochs_after_resume'] == [1, 2, 3]
    assert stages['host_syncs']['in_memory']['steps'] == stages['host_syncs']['imagefolder']['steps'] == 2
    assert stages['compile']['graph_breaks'] > 0 and stages['compile']['loss_finite']
    assert report['versions']['torch'] and report['command'].startswith('python benchmarks/gpu_check.py --smoke')
