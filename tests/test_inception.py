"""The FID Inception path without the 80 MB download: TF1 resize closed forms, and loading a
small TorchScript stand-in through the same verified-file code."""

from __future__ import annotations

import hashlib
import warnings

import pytest
import torch

from cfgdiff.errors import DataError
from cfgdiff.metrics import inception
from cfgdiff.metrics.inception import InceptionFeatures, inception_path, tf1_resize_bilinear


def test_tf1_resize_constant_and_ramp():
    x = torch.full((1, 3, 28, 28), 7.0)
    assert torch.allclose(tf1_resize_bilinear(x, 299), torch.full((1, 3, 299, 299), 7.0))
    # TF1 (align_corners=False, no half-pixel centres) samples src = dst * in / out, so a ramp
    # f(i) = i becomes g(j) = j * 28 / 299 until the last source pixel, then stays at 27.
    ramp = torch.arange(28.0).reshape(1, 1, 1, 28).expand(1, 1, 28, 28)
    out = tf1_resize_bilinear(ramp, 299)[0, 0, 0]
    j = torch.arange(299.0)
    assert torch.allclose(out, (j * 28 / 299).clamp(max=27), atol=1e-4)


class _Stub(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (3, 299, 299)
        return torch.cat(
            [x.mean((2, 3)), x.amin((1, 2, 3))[:, None], x.amax((1, 2, 3))[:, None]], 1
        )


def test_verified_load_and_preprocessing(tmp_path, monkeypatch):
    path = tmp_path / "stub.pt"
    with warnings.catch_warnings():  # TorchScript is deprecated in newer torch; still works
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(_Stub()).save(str(path))
    monkeypatch.setattr(inception, "SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    assert inception_path(tmp_path, path) == path
    feats, logits = InceptionFeatures(path)(
        torch.tensor([0, 255], dtype=torch.uint8).reshape(2, 1, 1, 1).expand(2, 1, 8, 8)
    )
    assert logits is None
    # uint8 0 -> -1, 255 -> 127/128 (the TF graph's (x - 128) / 128); grey repeated to RGB
    assert torch.allclose(feats[:, 3], torch.tensor([-1.0, 127 / 128]))
    assert torch.allclose(feats[:, 4], torch.tensor([-1.0, 127 / 128]))


def test_wrong_local_file_is_refused(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not the network")
    with pytest.raises(DataError, match="`inception` .*x.pt: SHA-256"):
        inception_path(tmp_path, bad)
    with pytest.raises(DataError, match="no such file"):
        inception_path(tmp_path, tmp_path / "missing.pt")
