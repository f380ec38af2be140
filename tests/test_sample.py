import pytest
import torch
from conftest import tiny_config

from cfgdiff.errors import ConfigError
from cfgdiff.sample import generate


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp-2m"])
def test_same_seed_same_images_regardless_of_batch_size(tiny_net, sampler):
    cfg = tiny_config()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 1])
    kw = dict(scale=2.5, sampler=sampler, steps=6, seed=11)
    whole = generate(tiny_net, cfg, labels, batch_size=7, **kw)
    for bs in (1, 3, 4):
        assert torch.equal(generate(tiny_net, cfg, labels, batch_size=bs, **kw), whole), bs
    other = generate(tiny_net, cfg, labels, batch_size=7, **{**kw, "seed": 12})
    assert not torch.equal(other, whole)
    assert whole.dtype == torch.uint8 and whole.shape == (7, 1, 8, 8)


def test_generate_validates(tiny_net):
    with pytest.raises(ConfigError, match=r"class labels must be in \[0, 2\]"):
        generate(tiny_net, tiny_config(), [3])
    with pytest.raises(ConfigError, match="--steps must be in"):
        generate(tiny_net, tiny_config(), [0], steps=0)
