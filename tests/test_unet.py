import subprocess
import sys

import pytest
import torch

from cfgdiff.config import ModelConfig
from cfgdiff.errors import ConfigError
from cfgdiff.unet import UNet, _normal


@pytest.mark.parametrize(
    "channels,size,classes", [(1, 28, 10), (3, 32, 10), (1, 8, 3), (3, 16, 100)]
)
def test_shapes(channels, size, classes):
    mult = (1, 2, 2) if size % 4 == 0 else (1, 2)
    cfg = ModelConfig(
        in_channels=channels,
        image_size=size,
        num_classes=classes,
        base_channels=8,
        channel_mult=mult,
        num_res_blocks=1,
        attn_levels=(len(mult) - 1,),
        num_heads=2,
    )
    net = UNet(cfg)
    x = torch.randn(2, channels, size, size)
    y = torch.tensor([0, classes])  # a real label and the null label
    out = net(x, torch.tensor([0, 999]), y)
    assert out.shape == x.shape
    assert net.label_emb.num_embeddings == classes + 1


def test_output_depends_on_label_and_time():
    torch.manual_seed(0)
    cfg = ModelConfig(
        in_channels=1,
        image_size=8,
        num_classes=3,
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attn_levels=(1,),
        num_heads=2,
    )
    net = UNet(cfg)
    for p in net.parameters():  # move away from the zero-initialised output
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randn(1, 1, 8, 8)
    a = net(x, torch.tensor([10]), torch.tensor([0]))
    assert not torch.allclose(a, net(x, torch.tensor([10]), torch.tensor([3])))
    assert not torch.allclose(a, net(x, torch.tensor([500]), torch.tensor([0])))


def test_bad_configs():
    with pytest.raises(ConfigError, match="`image_size` must be.*got 30 .*`image_size` 28 or 32 "):
        ModelConfig(image_size=30, channel_mult=(1, 2, 2)).validate()
    with pytest.raises(ConfigError, match="got 6 .pass `image_size` 8 or 12 "):
        ModelConfig(image_size=6, channel_mult=(1, 2, 2)).validate()
    with pytest.raises(ConfigError, match="in_channels"):
        ModelConfig(in_channels=2).validate()
    with pytest.raises(ConfigError, match="attn_levels"):
        ModelConfig(attn_levels=(5,)).validate()


@pytest.mark.parametrize("shape", [(2, 3, 7, 7), (1, 8, 4, 5), (4, 16, 14, 14)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_upsample_nearest2x_is_interpolate_to_the_bit(shape, dtype, layout):
    """The expand + reshape form (kept because torch 2.13's CPU inductor loses the gradient of
    F.interpolate under bf16) computes exactly nearest-neighbour upsampling, values and gradient,
    and keeps the memory format as F.interpolate does (channels_last in, channels_last out)."""
    import torch.nn.functional as F

    from cfgdiff.layers import upsample_nearest2x

    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=layout).requires_grad_()
    ref = F.interpolate(x, scale_factor=2.0, mode="nearest")
    out = upsample_nearest2x(x)
    assert out.dtype == dtype and torch.equal(out, ref)
    assert out.is_contiguous(memory_format=layout) and ref.is_contiguous(memory_format=layout)
    g = torch.randn_like(ref)
    (grad_ref,) = torch.autograd.grad(ref, x, g)
    (grad,) = torch.autograd.grad(out, x, g)
    # eagerly the backward is F.interpolate's own kernel (_NearestUp2x): the same to the bit
    assert torch.equal(grad, grad_ref) and grad.is_contiguous(memory_format=layout)


def test_upsample_nearest2x_backward_under_compile_is_the_traced_sum(monkeypatch):
    """Under torch.compile the plain expand + reshape is traced (its backward, a sum, is what
    inductor differentiates correctly under bf16); eagerly the custom backward is used. Both
    give the exact adjoint of nearest upsampling (gradcheck in float64, double backward too)."""
    from cfgdiff import layers

    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert "NearestUp2x" in type(layers.upsample_nearest2x(x).grad_fn).__name__
    assert torch.autograd.gradcheck(layers.upsample_nearest2x, (x,))
    assert torch.autograd.gradgradcheck(layers.upsample_nearest2x, (x,))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = layers.upsample_nearest2x(x)
    assert "NearestUp2x" not in type(traced.grad_fn).__name__
    assert torch.autograd.gradcheck(layers.upsample_nearest2x, (x,))


@pytest.mark.parametrize("channels", [1, 3])
def test_patch_size_two_runs_the_first_level_at_half_resolution(channels):
    """patch_size 2: a 28x28 image is folded into 4 channels per pixel channel at 14x14 (pixel
    unshuffle), the levels run at 14 and 7, and the output is unfolded back to 28x28; each
    output pixel still depends on the input around it."""
    cfg = ModelConfig(
        in_channels=channels, image_size=28, base_channels=8, channel_mult=(1, 2),
        num_res_blocks=1, attn_levels=(1,), num_heads=2, patch_size=2,
    )  # fmt: skip
    net = UNet(cfg)
    assert net.conv_in.in_channels == net.conv_out.out_channels == 4 * channels
    seen = []
    net.mid[1].register_forward_hook(lambda mod, inp, out: seen.append(out.shape[-1]))
    torch.manual_seed(0)
    for p in net.parameters():  # move away from the zero-initialised output
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, channels, 28, 28, requires_grad=True)
    out = net(x, torch.tensor([0, 999]), torch.tensor([0, 10]))
    assert out.shape == x.shape and seen == [7]
    out[0, 0, 27, 27].backward()  # the bottom-right output pixel reaches back to the input
    assert x.grad[0, :, 26:, 26:].abs().sum() > 0 and x.grad[1].abs().sum() == 0


def test_patch_size_is_checked():
    with pytest.raises(ConfigError, match="`patch_size` must be 1, 2 or 4, got 3"):
        ModelConfig(patch_size=3).validate()
    # 28 = 2 x 14 but 14 is not divisible by 4 for three levels
    with pytest.raises(ConfigError, match="divisible by 8 for 3 levels of patch size 2, got 28"):
        ModelConfig(image_size=28, channel_mult=(1, 2, 2), patch_size=2).validate()
    # a config written before the field existed works on pixels
    assert ModelConfig().patch_size == 1


def test_initial_weights_are_randns_and_the_meta_count_draws_nothing():
    """The label embedding and the null text vector hold the numbers nn.Embedding's init and
    torch.randn draw for the seed, and counting a network's parameters on the meta device, as
    every command that reads a checkpoint does, imports neither torch._dynamo nor sympy (seconds
    each; a fresh interpreter, since other tests import them)."""
    torch.manual_seed(0)
    drawn = _normal(11, 32), _normal(16, over=4.0), torch.rand(3)
    torch.manual_seed(0)
    expected = torch.nn.Embedding(11, 32).weight, torch.randn(16) / 4.0, torch.rand(3)
    assert all(torch.equal(a, b) for a, b in zip(drawn, expected, strict=True))
    with torch.device("meta"):
        assert _normal(5).is_meta
    code = (
        "import sys, dataclasses\n"
        "from cfgdiff.checkpoint import check_network_size\n"
        "from cfgdiff.presets import PRESETS\n"
        "cfg = PRESETS['cpu-demo']\n"
        "text = dataclasses.replace(cfg.model, condition='text', text_dim=64)\n"
        "check_network_size(cfg, '.')\n"
        "check_network_size(dataclasses.replace(cfg, model=text), '.')\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
