"""The converted stem under other number formats, memory formats and devices.

On the CPU (every run): bfloat16 autocast, channels-last, float64. On a CUDA GPU, only where torch sees one: the model
moved to the GPU, float16 autocast and channels-last there (marker `cuda`, part of `make test-gpu` with tests/test_gpu.py);
without a GPU these are skipped, saying so, and a CPU run promises nothing about CUDA. The skip itself, and its failure
where `CI_GPU=true`, are tested here on any machine."""
import copy, sys
from pathlib import Path
import pytest
import torch
from torchvision.models import resnet18
from fastai.vision.core import imagenet_stats
from fastai_gray.core import gray_stats
from fastai_gray.stem import update_first_layer


@pytest.fixture(scope='module')
def models():
    torch.manual_seed(0)
    m3 = resnet18(num_classes=10).eval()
    return m3, update_first_layer(copy.deepcopy(m3)).eval()


def rel(a, b): return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_bfloat16_autocast_on_cpu(models):
    _, m1 = models
    x = torch.randn(2, 1, 67, 91)
    with torch.no_grad():
        ref = m1(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = m1(x)
    assert y.dtype == torch.bfloat16
    assert rel(y, ref) < 5e-2


def test_channels_last_on_cpu(models):
    _, m1 = models
    x = torch.randn(2, 1, 67, 91)
    with torch.no_grad():
        ref = m1(x)
        cl = copy.deepcopy(m1).to('cpu', memory_format=torch.channels_last)
        y = cl(x.contiguous(memory_format=torch.channels_last))
    assert rel(y, ref) < 1e-5


def test_float64_on_cpu(models):
    "A float64 model converts in float64: the converted model matches the original to 1e-10, and `.double()` of a converted one runs"
    m3, m1 = models
    m3 = copy.deepcopy(m3).double()
    (m,), (s,) = gray_stats(imagenet_stats)
    g = torch.rand(1, 1, 45, 61, dtype=torch.float64)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in imagenet_stats)
    with torch.no_grad():
        y3 = m3((g.expand(-1, 3, -1, -1) - mean) / std)
        y1 = update_first_layer(copy.deepcopy(m3)).eval()((g - m) / s)
        assert copy.deepcopy(m1).double()((g - m) / s).dtype == torch.float64
    assert y1.dtype == torch.float64 and rel(y1, y3) < 1e-10


def test_cuda_tests_skip_without_a_gpu_except_with_ci_gpu(pytester, monkeypatch):
    "Where torch sees no GPU a `cuda` test is skipped, saying why, and the header says the run is on the CPU; CI_GPU=true fails it"
    pytester.makeconftest((Path(__file__).parent/'conftest.py').read_text())
    pytester.makeini('[pytest]\naddopts = -rs\nmarkers =\n    cuda: needs a CUDA GPU\n')
    pytester.makepyfile(test_gpu='import pytest\n\n@pytest.mark.cuda\ndef test_on_gpu(): pass\n\ndef test_other(): pass\n')
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')  # no GPU for torch in the subprocess, on any machine
    monkeypatch.delenv('CI_GPU', raising=False)
    res = pytester.runpytest_subprocess()
    res.assert_outcomes(passed=1, skipped=1)
    res.stdout.fnmatch_lines(['device: cpu (torch * sees no CUDA GPU): the `cuda` tests are skipped',
                              '*SKIPPED*no CUDA GPU: torch.cuda.is_available() is False here*make test-gpu*'])
    monkeypatch.setenv('CI_GPU', 'true')
    res = pytester.runpytest_subprocess()
    res.assert_outcomes(passed=1, errors=1)
    res.stdout.fnmatch_lines(['device: cpu * the `cuda` tests fail (CI_GPU=true)', '*no CUDA GPU*and CI_GPU=true asks for one*'])


@pytest.mark.cuda
def test_cuda_matches_cpu(models):
    "The converted model moved to the GPU gives the CPU's logits (float32; TF32 convolutions allowed, hence 1e-2)"
    _, m1 = models
    x = torch.randn(2, 1, 67, 91)
    with torch.no_grad(): ref, y = m1(x), copy.deepcopy(m1).cuda()(x.cuda())
    assert y.device.type == 'cuda' and rel(y.cpu(), ref) < 1e-2

@pytest.mark.cuda
def test_float16_autocast_and_channels_last_on_cuda(models):
    _, m1 = models
    x = torch.randn(2, 1, 67, 91)
    gpu = copy.deepcopy(m1).cuda().to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = m1(x)
        with torch.autocast('cuda', dtype=torch.float16): y = gpu(x.cuda().contiguous(memory_format=torch.channels_last))
    assert y.dtype == torch.float16
    assert rel(y.cpu(), ref) < 5e-2
