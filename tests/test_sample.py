import pytest
import torch
from conftest import sample_with, tiny_config

from cfgdiff.errors import ConfigError


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp-2m", "dpmpp-2m-sde", "edm"])
def test_same_seed_same_images_regardless_of_batch_size(tiny_net, sampler):
    cfg = tiny_config()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 1])
    kw = dict(scale=2.5, sampler=sampler, steps=6, seed=11)
    whole = sample_with(tiny_net, cfg, labels, batch_size=7, **kw)
    for bs in (1, 3, 4):
        assert torch.equal(sample_with(tiny_net, cfg, labels, batch_size=bs, **kw), whole), bs
    other = sample_with(tiny_net, cfg, labels, batch_size=7, **{**kw, "seed": 12})
    assert not torch.equal(other, whole)
    assert whole.dtype == torch.uint8 and whole.shape == (7, 1, 8, 8)


def test_generate_validates(tiny_net):
    with pytest.raises(ConfigError, match=r"class labels must be in \[0, 2\]"):
        sample_with(tiny_net, tiny_config(), [3])
    with pytest.raises(ConfigError, match="`steps` must be in"):
        sample_with(tiny_net, tiny_config(), [0], steps=0)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp-2m"])
def test_static_batches_pad_without_changing_images(tiny_net, sampler):
    cfg = tiny_config()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 1])
    scales = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    kw = dict(scale=scales, sampler=sampler, steps=5, seed=3, batch_size=3)
    shapes = []

    def recording(x, t, y):
        shapes.append(x.shape[0])
        return tiny_net(x, t, y)

    padded = sample_with(recording, cfg, labels, static_batches=True, **kw)
    assert set(shapes) == {6}  # every pass 2 x 3 rows, the last batch of 1 padded to 3
    assert torch.equal(padded, sample_with(tiny_net, cfg, labels, **kw))
