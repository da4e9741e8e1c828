"""The exactness contract of `update_first_layer(init='exact')`.

A gray image `g` copied to 3 channels and normalized with `stats`, through the pretrained 3-channel model, gives the
same logits as `g` normalized with `gray_stats(stats)` through the converted 1-channel model: on real ImageNet weights
and real photos (relative logit error <= 1e-5, top-1 agreement 100%), and over an arch matrix with random weights at an
odd input size (<= 1e-4).
"""
import copy
import numpy as np
import pytest
import timm
import torch
from torchvision import models as tvm
from fastai.vision.models.xresnet import xresnet18
from fastai.vision.core import imagenet_stats

from fastai_gray.core import rel_error
from fastai_gray.stem import update_first_layer, rgb_and_gray
from fastai_gray.weights import lite0_checkpoint, LITE0_ARCH
from fastai_gray.bench.data import photo_crops as gray_photo_crops  # gray crops of scikit-image's bundled photos


def relative_errors(y1, y3):
    "Per-image relative logit error"
    return rel_error(y1, y3, dim=0).tolist()


@pytest.fixture(scope='module')
def lite0():
    model = timm.create_model(LITE0_ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=lite0_checkpoint()))
    return model.eval()


@pytest.mark.parametrize('which', ['timm', 'imagenet'])
def test_real_lite0_on_real_photos(lite0, which):
    "Lite0's own stats (0.5 for every channel) and ImageNet's per-channel stats, which most archs use"
    stats = (lite0.pretrained_cfg['mean'], lite0.pretrained_cfg['std']) if which == 'timm' else imagenet_stats
    gray = update_first_layer(copy.deepcopy(lite0), stats=stats).eval()
    g = gray_photo_crops()
    assert len(g) >= 40
    x3, x1 = rgb_and_gray(g, stats)
    with torch.no_grad(): y3, y1 = lite0(x3), gray(x1)
    errors = relative_errors(y1, y3)
    agreement = (y1.argmax(1) == y3.argmax(1)).float().mean().item()
    print(f'{len(g)} real gray crops: top-1 agreement {agreement:.1%}, max relative logit error {max(errors):.1e}')
    assert agreement == 1.0
    assert max(errors) <= 1e-5


def test_sum_recipes_are_not_exact_on_real_weights(lite0):
    """The same check fails for fastai's recipe (sum, raw pixels) and, with per-channel stats, for the sum plus gray
    normalization: the test tells exact from inexact. (With Lite0's uniform stats the sum plus gray normalization is
    exact already: there is nothing per-channel to fold.)"""
    summed = update_first_layer(copy.deepcopy(lite0), init='sum').eval()
    g = gray_photo_crops(per_photo=1)
    for stats, gray_normalized in [((lite0.pretrained_cfg['mean'], lite0.pretrained_cfg['std']), False),
                                   (imagenet_stats, False), (imagenet_stats, True)]:
        x3, x1 = rgb_and_gray(g, stats)
        with torch.no_grad(): y3, y1 = lite0(x3), summed(x1 if gray_normalized else g)
        assert np.mean(relative_errors(y1, y3)) > 0.1


def timm_model(name, **kw):
    return lambda: timm.create_model(name, num_classes=10, **kw)

ARCHS = {
    'resnet18': lambda: tvm.resnet18(num_classes=10),
    'resnet50': lambda: tvm.resnet50(num_classes=10),
    'vgg11_bn': lambda: tvm.vgg11_bn(num_classes=10),
    'alexnet': lambda: tvm.alexnet(num_classes=10),
    'densenet121': lambda: tvm.densenet121(num_classes=10),
    'squeezenet1_1': lambda: tvm.squeezenet1_1(num_classes=10),
    'xresnet18': lambda: xresnet18(n_out=10),
    'convnext_atto': timm_model('convnext_atto'),
    'efficientnet_b0': timm_model('efficientnet_b0'),
    'tf_efficientnet_lite0': timm_model('tf_efficientnet_lite0'),
    'vit_tiny_patch16_224': timm_model('vit_tiny_patch16_224', dynamic_img_size=True, dynamic_img_pad=True),
}


@pytest.mark.parametrize('arch', ARCHS)
def test_arch_matrix_exact_at_odd_size(arch):
    torch.manual_seed(0)
    model = ARCHS[arch]().eval()
    cfg = getattr(model, 'pretrained_cfg', None)
    stats = (cfg['mean'], cfg['std']) if cfg else imagenet_stats
    gray = update_first_layer(copy.deepcopy(model), stats=stats).eval()
    g = torch.rand(2, 1, 97, 131)
    x3, x1 = rgb_and_gray(g, stats)
    with torch.no_grad(): y3, y1 = model(x3), gray(x1)
    assert max(relative_errors(y1, y3)) <= 1e-4
