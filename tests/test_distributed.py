"""A gray learner, classifier (`gray_learner`) and U-Net (`gray_unet_learner`), trains under fastai's `distrib_ctx` across
2 CPU processes (torchrun, gloo backend) and ends with the same weights on both ranks: CPU only; NCCL and several GPUs are
not tested. Slow: two processes import fastai and train (16 to 25 s a task on 2 shared cores)."""
import os
import socket
import subprocess
import sys
from pathlib import Path
import pytest
import torch


@pytest.mark.slow
@pytest.mark.parametrize('task', ['classify', 'segment'])
def test_two_process_cpu_training_ends_identical_on_every_rank(tmp_path, task):
    torchrun = Path(sys.executable).parent/'torchrun'
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MPLBACKEND': 'Agg'}
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    res = subprocess.run([str(torchrun), '--nproc_per_node', '2', '--master_addr', '127.0.0.1', '--master_port', str(port),
                          str(Path(__file__).parent/'ddp_train.py'), str(tmp_path), task],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    trained = [torch.load(tmp_path/f'trained{r}.pth') for r in range(2)]
    loaded = [torch.load(tmp_path/f'loaded{r}.pth') for r in range(2)]
    assert trained[0].keys() == trained[1].keys()
    for key in trained[0]:
        assert torch.equal(trained[0][key], trained[1][key]), key
        assert torch.equal(loaded[0][key], trained[0][key]), key
        assert torch.equal(loaded[1][key], trained[0][key]), key
    assert any(k.endswith('offset.weight') for k in trained[0])  # the exact stem took part
