"""EMA of the weights: the decay warm-up in closed form, and the batched update against the
per-tensor formula."""

import torch
from torch import nn

from cfgdiff.ema import EMA


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Conv2d(3, 2, 3)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("halfbuf", torch.zeros(5, dtype=torch.bfloat16))


def test_decay_warmup_closed_form():
    """From shadow s0 and a constant weight w: s_n = w + (s0 - w) * prod_i d_i."""
    net = Net()
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1.0)
    ema = EMA(net, decay=0.9)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(3.0)
    prod = 1.0
    for i in range(20):
        d = min(0.9, (1 + i) / (10 + i))
        assert ema.current_decay() == d
        ema.update(net)
        prod *= d
    expect = 3.0 + (1.0 - 3.0) * prod
    for k, _ in net.named_parameters():
        assert torch.allclose(ema.shadow[k], torch.full_like(ema.shadow[k], expect), atol=1e-6)


def test_batched_update_equals_the_per_tensor_formula_bit_for_bit():
    torch.manual_seed(0)
    net = Net()
    ema = EMA(net, decay=0.99)
    ref = {k: v.clone() for k, v in ema.shadow.items()}
    for step in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net.count += 1
            net.halfbuf.add_(torch.randn(5).to(torch.bfloat16))
        d = ema.current_decay()
        ema.update(net)
        for k, v in net.state_dict().items():
            if v.dtype.is_floating_point:
                ref[k].lerp_(v.float(), 1 - d)
            else:
                ref[k].copy_(v)
        for k in ref:
            assert torch.equal(ema.shadow[k], ref[k]), (step, k)
    assert int(ema.shadow["count"]) == 5 and ema.num_updates == 5
