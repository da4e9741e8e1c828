"""Property tests: the exactness contract of `ExactGrayConv` over random conv hyper-parameters, input sizes and stats."""
import torch
from torch import nn
from hypothesis import given, settings, strategies as st, HealthCheck
from timm.layers import Conv2dSame
from fastai_gray.core import rel_error
from fastai_gray.stem import ExactGrayConv, update_first_layer, rgb_and_gray

stds = st.floats(0.05, 3.0)
means = st.floats(-1.0, 2.0)
stats3 = st.tuples(st.tuples(means, means, means), st.tuples(stds, stds, stds))
stats1 = st.one_of(st.none(), st.tuples(st.tuples(means), st.tuples(stds)))


@st.composite
def convs(draw):
    "A random 3-input-channel conv and an input size it accepts"
    kh, kw = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    bias = draw(st.booleans())
    kind = draw(st.sampled_from(['int', 'same', 'timm_same']))
    mode = draw(st.sampled_from(['zeros', 'reflect', 'replicate', 'circular']))
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1          # effective kernel extent
    h = draw(st.integers(max(eh, ph + 1, 1), 40))
    w = draw(st.integers(max(ew, pw + 1, 1), 40))
    if kind == 'timm_same':
        conv = Conv2dSame(3, 5, (kh, kw), stride=(sh, sw), dilation=(dh, dw), bias=bias)
    elif kind == 'same':
        conv = nn.Conv2d(3, 5, (kh, kw), stride=1, padding='same', dilation=(dh, dw), bias=bias, padding_mode=mode)
    else:
        conv = nn.Conv2d(3, 5, (kh, kw), stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw), bias=bias, padding_mode=mode)
    return conv, (h, w)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(convs(), stats3, stats1, st.integers(0, 2**31 - 1))
def test_exact_for_any_conv_size_and_stats(conv_and_size, stats, input_stats, seed):
    conv, (h, w) = conv_and_size
    torch.manual_seed(seed)
    conv = conv.double()
    nn.init.normal_(conv.weight)
    stem = ExactGrayConv(conv, stats, input_stats).double()
    g = torch.rand(2, 1, h, w, dtype=torch.float64)
    x3, x1 = rgb_and_gray(g, stats, input_stats)
    y3, y1 = conv(x3), stem(x1)
    assert y1.shape == y3.shape
    assert rel_error(y1, y3) < 1e-9


@settings(max_examples=30, deadline=None)
@given(convs(), stats3)
def test_update_first_layer_accepts_every_plain_conv(conv_and_size, stats):
    "update_first_layer's own check (a random gray image through both layers) passes for every plain conv"
    conv, _ = conv_and_size
    model = update_first_layer(nn.Sequential(conv), stats=stats)
    assert isinstance(model[0], ExactGrayConv)
