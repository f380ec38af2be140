"""Every data source against small files made here; bad data gives one-line errors."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from conftest import fake_digits, fashion_system_dir, mnist_idx

from cfgdiff.data import folders, info, load_dataset, obtain, sources
from cfgdiff.data.batches import DeviceBatches
from cfgdiff.data.idx import idx_bytes, parse_idx
from cfgdiff.data.safe_pickle import safe_loads
from cfgdiff.errors import DataError


def test_idx_roundtrip_and_errors():
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(idx_bytes(a), "x"), a)
    with pytest.raises(DataError, match="bad magic"):
        parse_idx(b"\x01\x02\x03\x04", "f")
    with pytest.raises(DataError, match="has 39 bytes, expected 40"):
        parse_idx(idx_bytes(a)[:-1], "f")


def test_mnist_from_idx_folder(idx_dir, tmp_path):
    data_dir = tmp_path / "dd"
    ds = load_dataset("mnist", data_dir=idx_dir, split="train")
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (200, 1, 28, 28)
    assert ds.labels.dtype == torch.int64 and ds.num_classes == 10
    test = load_dataset("mnist", data_dir=idx_dir, split="test")
    assert len(test) == 50
    # cached under the data dir
    assert (idx_dir / "cache" / "mnist" / "meta.json").is_file()
    meta = info("mnist", idx_dir)
    assert meta["splits"]["train"]["counts"] == [20] * 10
    del data_dir


def test_idx_checksum_mismatch_names_file(idx_dir, monkeypatch):
    monkeypatch.setitem(sources.MNIST.sha256, "train_labels", "0" * 64)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz: SHA-256"):
        load_dataset("mnist", data_dir=idx_dir)


def test_corrupt_gzip_is_a_clear_error(idx_dir):
    p = idx_dir / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_dataset("mnist", data_dir=idx_dir)


def _fake_mnist_pickle():
    xs, ys = fake_digits(30, 0)
    xt, yt = fake_digits(10, 1)
    f = lambda x: x.reshape(len(x), -1).astype(np.float32) / 256  # noqa: E731
    obj = (
        (f(xs[:20]), ys[:20].astype(np.int64)),
        (f(xs[20:]), ys[20:].astype(np.int64)),
        (f(xt), yt.astype(np.int64)),
    )
    return gzip.compress(pickle.dumps(obj, protocol=2)), (xs, ys, xt, yt)


def test_pickle_source_gives_the_same_cache_as_idx(tmp_path, monkeypatch):
    data, (xs, ys, xt, yt) = _fake_mnist_pickle()
    pkl_dir = tmp_path / "p"
    pkl_dir.mkdir()
    (pkl_dir / "mnist.pkl.gz").write_bytes(data)
    monkeypatch.setattr(sources, "MNIST_PICKLE_SHA256", hashlib.sha256(data).hexdigest())
    idx_dir = mnist_idx(tmp_path / "i", monkeypatch, (xs, ys), (xt, yt))
    obtain("mnist", pkl_dir)
    obtain("mnist", idx_dir)
    for name in ("train_images.npy", "train_labels.npy", "test_images.npy", "test_labels.npy"):
        a = (pkl_dir / "cache" / "mnist" / name).read_bytes()
        b = (idx_dir / "cache" / "mnist" / name).read_bytes()
        assert a == b, name


def test_pickle_hash_is_checked_before_unpickling(tmp_path, monkeypatch):
    data, _ = _fake_mnist_pickle()
    (tmp_path / "mnist.pkl.gz").write_bytes(data)
    monkeypatch.setattr(sources, "MNIST_PICKLE_SHA256", "f" * 64)
    with pytest.raises(DataError, match="mnist.pkl.gz: SHA-256"):
        obtain("mnist", tmp_path)


class Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_refuses_code():
    payload = pickle.dumps(Evil(), protocol=2)
    with pytest.raises(DataError, match="posix.system is not allowed|os.system is not allowed"):
        safe_loads(payload, "evil.pkl")
    # plain numpy arrays are fine
    a = np.arange(5, dtype=np.int64)
    assert np.array_equal(safe_loads(pickle.dumps(a, protocol=2), "ok"), a)


def _cifar_archive(path, n_per_batch=4):
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {
            b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
            b"labels": list(rng.integers(0, 10, n_per_batch)),
        }
    with tarfile.open(path, "w:gz") as tar:
        for name, d in batches.items():
            raw = pickle.dumps(
                {k: (v if k == b"data" else [int(x) for x in v]) for k, v in d.items()}, protocol=2
            )
            info_ = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info_.size = len(raw)
            tar.addfile(info_, io.BytesIO(raw))
    return batches


def test_cifar_archive(tmp_path, monkeypatch):
    path = tmp_path / sources.CIFAR10_ARCHIVE
    batches = _cifar_archive(path)
    from cfgdiff.files import file_digest

    monkeypatch.setattr(sources, "CIFAR10_MD5", file_digest(path, "md5"))
    ds = load_dataset("cifar10", tmp_path, split="train")
    assert ds.images.shape == (20, 3, 32, 32) and ds.num_classes == 10
    first = batches["data_batch_1"][b"data"][0].reshape(3, 32, 32)
    assert np.array_equal(ds.images[0].numpy(), first)
    assert len(load_dataset("cifar10", tmp_path, split="test")) == 4


def test_cifar_bad_checksum(tmp_path):
    path = tmp_path / sources.CIFAR10_ARCHIVE
    _cifar_archive(path)
    with pytest.raises(DataError, match="cifar-10-python.tar.gz: md5"):
        load_dataset("cifar10", tmp_path)


def test_folder_dataset(folder_data):
    ds = load_dataset(f"folder:{folder_data}")
    assert ds.images.shape == (18, 1, 8, 8) and ds.class_names == ("class0", "class1", "class2")
    rgb = load_dataset(f"folder:{folder_data}", channels=3, image_size=16)
    assert rgb.images.shape == (18, 3, 16, 16)


def test_folder_decoding_is_announced_when_large(folder_data, monkeypatch):
    said = []
    load_dataset(f"folder:{folder_data}", log=said.append)
    assert said == []  # 18 images: nothing to wait for
    monkeypatch.setattr(folders, "LOG_DECODING_FROM", 10)
    load_dataset(f"folder:{folder_data}", image_size=16, log=said.append)
    assert said[0] == f"{folder_data}: decoding 18 images of 3 classes to 1x16x16"
    assert said[1].startswith(f"{folder_data}: decoded images cached in ") and len(said) == 2
    load_dataset(f"folder:{folder_data}", image_size=16, log=said.append)
    assert said[2].startswith(f"{folder_data}: 18 images as decoded before, from ")
    # a long decoding says how far it has got after each chunk (of 4 images here, with no
    # pause between lines)
    monkeypatch.setattr(folders, "LOG_PROGRESS_EVERY", 0.0)
    monkeypatch.setattr(folders, "DECODE_CHUNK", 4)
    said.clear()
    load_dataset(f"folder:{folder_data}", image_size=12, log=said.append)
    progress = [m for m in said if " images decoded (" in m]
    assert len(progress) == 4  # after images 4, 8, 12 and 16 of 18: none once it is done
    assert progress[0].startswith(f"{folder_data}: 4 of 18 images decoded (")
    assert progress[-1].startswith(f"{folder_data}: 16 of 18 images decoded (")
    assert progress[-1].endswith(" s left)")


def _decoding_refused(monkeypatch):
    """Make decoding a folder fail, so that a load that succeeds came from the cache."""

    def refuse(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(folders, "folder_dataset", refuse)
    monkeypatch.setattr(folders, "decode_folder", refuse)


def test_folder_decoded_once_then_read_from_cache(folder_data, tmp_path, monkeypatch):
    """The second load of a folder at a size reads the decoded images from the data directory,
    the same to the bit; another size or channel count is decoded (and cached) on its own."""
    dd = tmp_path / "dd"
    first = load_dataset(f"folder:{folder_data}", dd, image_size=16)
    rgb = load_dataset(f"folder:{folder_data}", dd, channels=3)
    _decoding_refused(monkeypatch)
    again = load_dataset(f"folder:{folder_data}", dd, image_size=16)
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    assert again.class_names == first.class_names
    assert torch.equal(load_dataset(f"folder:{folder_data}", dd, channels=3).images, rgb.images)
    with pytest.raises(AssertionError, match="decoded again"):  # not decoded at this size yet
        load_dataset(f"folder:{folder_data}", dd, image_size=12)
    with pytest.raises(AssertionError, match="decoded again"):  # another data directory
        load_dataset(f"folder:{folder_data}", tmp_path / "other", image_size=16)


@pytest.mark.parametrize("change", ["rewrite", "add", "remove", "move", "rename-class"])
def test_folder_cache_follows_the_files(folder_data, tmp_path, change):
    """Any change to the folder's images means decoding it again: the cache never gives stale
    pixels, labels or classes, and only the latest decoding of a folder at a size is kept."""
    from PIL import Image

    dd = tmp_path / "dd"
    load_dataset(f"folder:{folder_data}", dd)
    f = folder_data / "class1" / "2.png"
    if change == "rewrite":  # same size, same name, other pixels
        Image.fromarray(np.full((8, 8), 7, np.uint8), mode="L").save(f)
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1_000_000))
    elif change == "add":
        Image.fromarray(np.full((8, 8), 7, np.uint8), mode="L").save(f.with_name("new.png"))
    elif change == "remove":
        f.unlink()
    elif change == "move":
        f.rename(folder_data / "class2" / "moved.png")
    else:
        (folder_data / "class2").rename(folder_data / "zebra")
    want = folders.folder_dataset(folder_data, None, None)
    got = load_dataset(f"folder:{folder_data}", dd)
    assert np.array_equal(got.images.numpy(), want[0])
    assert np.array_equal(got.labels.numpy(), want[1]) and list(got.class_names) == want[2]
    (slot,) = (dd / "cache" / "folders").iterdir()
    assert len(list(slot.iterdir())) == 1  # the decoding of the earlier files is gone


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-meta", "meta-list", "meta-keys"])
def test_damaged_folder_cache_is_decoded_again(folder_data, tmp_path, damage):
    dd = tmp_path / "dd"
    # a copy: the loaded images are mapped from the file this test damages in place (cfgdiff
    # itself replaces a cache file by renaming a new one over it, which leaves mappings intact)
    want = load_dataset(f"folder:{folder_data}", dd).images.clone()
    (entry,) = (dd / "cache" / "folders").glob("*/*")
    images = entry / "images.npy"
    intact = hashlib.sha256(images.read_bytes()).hexdigest()
    if damage == "truncate":
        images.write_bytes(images.read_bytes()[:-10])
    elif damage == "flip":
        b = bytearray(images.read_bytes())
        b[-1] ^= 0xFF
        images.write_bytes(bytes(b))
    elif damage == "no-meta":
        (entry / "meta.json").unlink()
    elif damage == "meta-list":
        (entry / "meta.json").write_text("[1, 2]")
    else:  # right version and fingerprint, the rest missing
        meta = json.loads((entry / "meta.json").read_text())
        keep = ("version", "fingerprint")
        (entry / "meta.json").write_text(json.dumps({k: meta[k] for k in keep}))
    assert torch.equal(load_dataset(f"folder:{folder_data}", dd).images, want)
    assert hashlib.sha256(images.read_bytes()).hexdigest() == intact  # rewritten whole


def test_folder_cache_that_cannot_be_written_is_skipped(folder_data, tmp_path, monkeypatch):
    """No room on the disk (or a read-only data directory): the folder loads, decoded, the log
    says so once, and nothing partial is left behind."""
    from cfgdiff.data import folder_cache as data_mod
    from cfgdiff.data import mapped

    monkeypatch.setattr(data_mod, "FOLDER_CACHE_HEADROOM", 1 << 60)
    dd = tmp_path / "dd"
    said: list[str] = []
    ds = load_dataset(f"folder:{folder_data}", dd, log=said.append)
    assert ds.images.shape == (18, 1, 8, 8)
    assert len(said) == 1 and "decoded images not cached (" in said[0] and "MiB free" in said[0]
    assert not list((dd / "cache" / "folders").rglob("*.npy"))

    monkeypatch.setattr(data_mod, "FOLDER_CACHE_HEADROOM", 0)

    def no_space(path, write):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mapped, "atomic_write_with", no_space)
    said.clear()
    assert torch.equal(load_dataset(f"folder:{folder_data}", dd, log=said.append).images, ds.images)
    assert "No space left on device" in said[0]
    assert not list((dd / "cache" / "folders").rglob("*.npy"))


def test_folder_info_lists_caches_and_writes_none(folder_data, tmp_path, capsys, monkeypatch):
    from cfgdiff.cli import main

    dd = tmp_path / "dd"
    monkeypatch.setattr(folders, "LOG_DECODING_FROM", 10)  # as large folders are: said
    said: list[str] = []
    assert info(f"folder:{folder_data}", dd, log=said.append)["caches"] == []
    assert said == [f"{folder_data}: decoding 18 images of 3 classes to 1x8x8"]
    assert not (dd / "cache").exists()  # data info reads a folder, it does not cache it
    load_dataset(f"folder:{folder_data}", dd, image_size=16, channels=3)
    (c,) = info(f"folder:{folder_data}", dd)["caches"]
    assert c["shape"] == [18, 3, 16, 16] and c["bytes"] > 18 * 3 * 16 * 16
    assert main(["data", "info", f"folder:{folder_data}", "--data-dir", str(dd)]) == 0
    assert f"decoded at 3x16x16: {c['path']} (" in capsys.readouterr().out


def test_folder_errors(folder_data):
    from PIL import Image

    (folder_data / "empty").mkdir()
    with pytest.raises(DataError, match="empty has no images"):
        load_dataset(f"folder:{folder_data}")
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(folder_data / "empty" / "odd.png")
    with pytest.raises(DataError, match="odd.png: image is 9x9, expected 8x8"):
        load_dataset(f"folder:{folder_data}")
    assert load_dataset(f"folder:{folder_data}", image_size=8).images.shape[0] == 19
    (folder_data / "empty" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png: cannot read image"):
        load_dataset(f"folder:{folder_data}", image_size=8)
    with pytest.raises(DataError, match="not a directory"):
        load_dataset(f"folder:{folder_data}/nope")


def test_folder_image_modes(tmp_path):
    """What photo and scan folders hold: 16-bit grayscale scaled (not clipped) to 8 bits,
    gray+alpha counted as grayscale, EXIF orientation applied, and macOS '._' files and other
    hidden files skipped rather than failing the scan."""
    from PIL import Image

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    ramp16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040).astype(np.uint16)
    Image.fromarray(ramp16).save(a / "ramp16.png")
    assert Image.open(a / "ramp16.png").mode == "I;16"
    gray_alpha = np.full((8, 8, 2), 77, np.uint8)
    gray_alpha[..., 1] = 255  # opaque; transparency is tested below
    Image.fromarray(gray_alpha, "LA").save(b / "gray_alpha.png")
    (a / "._ramp16.png").write_bytes(b"\x00\x05\x16\x07" + bytes(100))  # AppleDouble
    (b / ".hidden.png").write_bytes(b"not a png")

    ds = load_dataset(f"folder:{tmp_path}")
    images = ds.images.numpy()
    assert images.shape == (2, 1, 8, 8)
    expect = np.round(ramp16.astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(images[0, 0], expect)
    assert images[0, 0].max() == 255 and len(np.unique(images[0, 0])) == 64
    assert (images[1] == 77).all()

    # a JPEG whose EXIF says "rotate 90° clockwise to display" (orientation 6) is read upright
    c = tmp_path / "c"
    c.mkdir()
    stored = np.zeros((8, 8, 3), np.uint8)
    stored[:, :2] = 255  # a white band on the left as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(c / "phone.jpg", exif=exif, quality=100)
    x = load_dataset(f"folder:{tmp_path}", channels=3).images[2].numpy().astype(float)
    assert x[:, :2, :].mean() > 200 and x[:, 2:, :].mean() < 40  # displayed: band along the top


def test_folder_transparency_is_composited_over_black(tmp_path):
    """What a PNG stores under alpha 0 is undefined (here a stray red); it is composited over
    black, so transparent backgrounds come out black and half-transparent pixels at half value."""
    from PIL import Image

    (tmp_path / "a").mkdir()
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255  # red everywhere, but only the centre is visible
    rgba[2:6, 2:6] = (200, 100, 50, 255)
    rgba[0, 0, 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a" / "sprite.png")
    x = load_dataset(f"folder:{tmp_path}").images[0].numpy()
    assert x.shape == (3, 8, 8)
    assert (x[:, 2:6, 2:6] == np.array([200, 100, 50])[:, None, None]).all()
    assert x[:, 6:, :].max() == 0 and x[:, 0, 1:].max() == 0
    assert x[0, 0, 0] == 128 and x[1:, 0, 0].max() == 0


def test_folder_non_square_is_centre_cropped(folder_data):
    """--image-size on a wide image keeps its centre square (no squashing): a 32x16 image whose
    outer quarters are white comes out all black at 16x16 and at 8x8."""
    from PIL import Image

    wide = np.zeros((16, 32), np.uint8)
    wide[:, :8] = wide[:, 24:] = 255
    Image.fromarray(wide).save(folder_data / "class0" / "zz_wide.png")
    for size in (16, 8):
        images = load_dataset(f"folder:{folder_data}", image_size=size).images
        assert images.shape == (19, 1, size, size)
        assert int(images[6].max()) == 0  # class0's 7th file, sorted by name


def test_folder_large_jpeg_decoded_small_matches_full_decode(tmp_path, monkeypatch):
    """Large JPEGs are decoded at reduced scale (draft) before the crop and resize; the pixels
    stay within a few levels of a full decode, centre crop and bicubic resize."""
    from PIL import Image, JpegImagePlugin

    decoded = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(im, mode, size, *args):
        out = draft(im, mode, size, *args)
        decoded.append(im.size)
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)

    (tmp_path / "a").mkdir()
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 256)[None, :, None] * np.ones((192, 1, 3))
    photo = (ramp + rng.normal(0, 20, (192, 256, 3))).clip(0, 255).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "a" / "photo.jpg", quality=90)
    for size, channels in ((16, 3), (40, 3), (16, 1)):
        got = load_dataset(f"folder:{tmp_path}", image_size=size, channels=channels).images[0]
        full = Image.open(tmp_path / "a" / "photo.jpg").convert("RGB" if channels == 3 else "L")
        full = full.crop((32, 0, 224, 192)).resize((size, size), Image.Resampling.BICUBIC)
        want = np.asarray(full, dtype=np.float64).reshape(size, size, channels).transpose(2, 0, 1)
        diff = np.abs(got.numpy().astype(np.float64) - want)
        assert diff.mean() < 1.5 and diff.max() <= 8, (size, channels, diff.mean(), diff.max())
    assert decoded == [(32, 24), (64, 48), (32, 24)]  # 1/8 and 1/4 of 256x192


def test_folder_decode_error_names_the_first_bad_file(folder_data):
    """Images are decoded on several threads; a truncated file (whose header reads fine) is
    reported by name, the first in sorted order, whichever thread meets it."""
    good = (folder_data / "class1" / "0.png").read_bytes()
    for name in ("3.png", "5.png"):
        (folder_data / "class1" / name).write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"class1/3\.png: cannot decode image"):
        load_dataset(f"folder:{folder_data}")


def test_unknown_dataset():
    with pytest.raises(DataError, match="`dataset` must be one of"):
        load_dataset("imagenet")


def test_device_batches_cover_each_epoch_and_resume():
    x = torch.arange(10, dtype=torch.uint8).reshape(10, 1, 1, 1)
    y = torch.arange(10)
    b = DeviceBatches(x, y, batch_size=4, seed=1, device="cpu")
    seen = torch.cat([b.next()[1] for _ in range(5)])  # 20 labels = 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10))
    assert sorted(seen[10:].tolist()) == list(range(10))
    state = b.state()
    after = [b.next()[1] for _ in range(3)]
    b2 = DeviceBatches(x, y, batch_size=4, seed=1, device="cpu")
    b2.load_state(state)
    assert all(
        torch.equal(p, q) for p, q in zip(after, [b2.next()[1] for _ in range(3)], strict=True)
    )
    xb, _ = b.next()
    assert xb.dtype == torch.float32 and xb.min() >= -1 and xb.max() <= 1


def test_device_batches_hflip_mirrors_about_half_and_resumes():
    """hflip: the same order as without it, each image either itself or its mirror (about half
    mirrored over 25 epochs), a fresh coin per epoch, and the same flips after a resume."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(10, 1, 3, 4, generator=g) * 255).to(torch.uint8)
    y = torch.arange(10)
    plain = DeviceBatches(x, y, batch_size=4, seed=1, device="cpu")
    b = DeviceBatches(x, y, batch_size=4, seed=1, device="cpu", hflip=True)
    as_float = x.float() / 127.5 - 1
    mirrored = []
    for _ in range(63):  # 252 images, batches spanning epoch boundaries included
        (xp, yp), (xf, yf) = plain.next(), b.next()
        assert torch.equal(yp, yf) and torch.equal(xp, as_float[yp])
        same = (xf == as_float[yf]).flatten(1).all(1)
        flipped = (xf == as_float[yf].flip(-1)).flatten(1).all(1)
        assert (same | flipped).all() and not (same & flipped).any()
        mirrored += flipped.tolist()
    assert 0.4 < sum(mirrored) / len(mirrored) < 0.6
    per_epoch = [sum(mirrored[e * 10 : e * 10 + 10]) for e in range(25)]
    assert len(set(per_epoch)) > 1  # a fresh coin each epoch, not one fixed mirror set

    state = b.state()
    after = [b.next()[0] for _ in range(4)]
    b2 = DeviceBatches(x, y, batch_size=4, seed=1, device="cpu", hflip=True)
    b2.load_state(state)
    assert all(torch.equal(p, b2.next()[0]) for p in after)


def test_fashion_mnist_from_system_dir(tmp_path, monkeypatch):
    """Debian's package location is searched; content checksums are of uncompressed data."""
    fashion_system_dir(tmp_path / "usr-share", monkeypatch, fake_digits(20, 0), fake_digits(10, 1))
    ds = load_dataset("fashion-mnist", tmp_path / "empty-data-dir")
    assert ds.class_names[0] == "T-shirt/top" and len(ds) == 20
    assert "usr-share" in info("fashion-mnist", tmp_path / "empty-data-dir")["source"]


def test_folder_info_from_headers(folder_data, tmp_path, capsys):
    """data info on a folder: classes, counts, sizes and modes; checksums where it loads as it is,
    else a note saying what training needs."""
    from PIL import Image

    from cfgdiff.cli import main

    meta = info(f"folder:{folder_data}")
    assert meta["class_names"] == ["class0", "class1", "class2"]
    assert meta["image_sizes"] == {"8x8": 18} and meta["modes"] == {"L": 18}
    train = meta["splits"]["train"]
    assert train["counts"] == [6, 6, 6] and train["shape"] == [18, 1, 8, 8]
    assert len(train["images_sha256"]) == 64 and "note" not in meta

    assert meta["skipped"] == []
    (folder_data / "class0" / "notes.txt").write_text("labels from the camera")
    (folder_data / "class2" / "._0.png").write_bytes(b"\x00\x05\x16\x07")
    Image.new("RGB", (10, 8)).save(folder_data / "class1" / "wide.png")
    meta = info(f"folder:{folder_data}")
    assert meta["skipped"] == [
        str(folder_data / "class0" / "notes.txt"),
        str(folder_data / "class2" / "._0.png"),
    ]
    assert meta["image_sizes"] == {"8x8": 18, "10x8": 1} and meta["modes"] == {"L": 18, "RGB": 1}
    assert meta["splits"]["train"] == {"counts": [6, 7, 6]}
    assert "pass `image_size`" in meta["note"]
    assert main(["data", "info", f"folder:{folder_data}"]) == 0
    out = capsys.readouterr().out
    assert "image sizes: 8x8 (18), 10x8 (1)" in out and "modes: L (18), RGB (1)" in out
    assert "class1=7" in out and "note: " in out and "--image-size" in out
    assert "skipped: 2 hidden or non-image files (" in out and "notes.txt" in out


def test_class_folder_names_are_safe_and_distinct():
    from cfgdiff.data.folders import class_folder_names

    names = ["T-shirt/top", "a\\b", ".hidden", "", "x", "x"]
    assert class_folder_names(names) == ["T-shirt_top", "a_b", "hidden_2", "_3", "x", "x_5"]
