"""Data beyond RAM: caches read memory-mapped, folders decoded a chunk at a time straight into
their cache, and batches gathered from the map exactly as from memory."""

from __future__ import annotations

import hashlib
import tracemalloc

import numpy as np
import pytest
import torch
from conftest import write_shards

from cfgdiff.data import folders, load_dataset
from cfgdiff.data.batches import DeviceBatches
from cfgdiff.data.folder_cache import array_sha256
from cfgdiff.data.mapped import RowReader, file_sha256, open_mapped, write_npy
from cfgdiff.data.store import write_cache


def _mapped_from(t: torch.Tensor, path) -> bool:
    """Whether tensor `t`'s memory lies in a mapping of file `path` (Linux's /proc/self/maps)."""
    ptr = t.untyped_storage().data_ptr()
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path.resolve()):
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            if lo <= ptr < hi:
                return True
    return False


def rgb_folder(root, per_class: int, size: int = 32):
    """3 classes x per_class RGB PNGs of size x size, each image its own noise."""
    from PIL import Image

    rng = np.random.default_rng(1)
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(a, mode="RGB").save(root / f"class{c}" / f"{i:04d}.png")
    return root


def test_a_builtin_cache_is_mapped_not_copied(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (50, 1, 28, 28), dtype=np.uint8)
    y = np.arange(50) % 10
    write_cache(tmp_path, "mnist", {"train": (x, y)}, [str(i) for i in range(10)], "test")
    ds = load_dataset("mnist", tmp_path)
    assert np.array_equal(ds.images.numpy(), x) and np.array_equal(ds.labels.numpy(), y)
    assert _mapped_from(ds.images, tmp_path / "cache" / "mnist" / "train_images.npy")


def test_a_folder_is_decoded_in_chunks_into_its_cache_as_in_one_piece(tmp_path, monkeypatch):
    """Decoding a chunk at a time gives the array that one piece gives, to the bit, written to
    the cache file as np.save would write it (the same checksum), and read back mapped."""
    folder = rgb_folder(tmp_path / "f", 7)
    whole, labels, names = folders.folder_dataset(folder, None, None)
    monkeypatch.setattr(folders, "DECODE_CHUNK", 4)  # 21 images: 6 chunks, the last of 1
    dd = tmp_path / "dd"
    ds = load_dataset(f"folder:{folder}", dd)
    assert np.array_equal(ds.images.numpy(), whole) and np.array_equal(ds.labels.numpy(), labels)
    assert ds.class_names == tuple(names)
    (entry,) = (dd / "cache" / "folders").glob("*/*")
    assert file_sha256(entry / "images.npy") == array_sha256(whole)
    assert _mapped_from(ds.images, entry / "images.npy")
    again = load_dataset(f"folder:{folder}", dd)  # from the cache, mapped again
    assert torch.equal(again.images, ds.images)


def test_decoding_into_the_cache_holds_one_chunk_not_the_folder(tmp_path, monkeypatch):
    """The memory allocated while a folder is decoded into its cache does not grow with the
    folder's images: four times the images raise the peak by under a quarter of what they add
    (the rest is a few hundred bytes of listing per file), and the peak stays under half the
    images' size, where decoding whole holds them all (numpy reports its allocations to
    tracemalloc)."""
    monkeypatch.setattr(folders, "DECODE_CHUNK", 16)
    peaks, sizes = [], []
    for per_class in (40, 160):
        folder = rgb_folder(tmp_path / f"f{per_class}", per_class)
        tracemalloc.start()
        ds = load_dataset(f"folder:{folder}", tmp_path / f"dd{per_class}")
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        peaks.append(peak)
        sizes.append(ds.images.numel())
    assert sizes == [120 * 3 * 32 * 32, 480 * 3 * 32 * 32]
    assert peaks[1] - peaks[0] < (sizes[1] - sizes[0]) / 4, (peaks, sizes)
    assert peaks[1] < sizes[1] / 2, (peaks, sizes)


def test_a_bad_image_mid_folder_leaves_no_cache_and_names_the_file(tmp_path, monkeypatch):
    from cfgdiff.errors import DataError

    monkeypatch.setattr(folders, "DECODE_CHUNK", 4)
    folder = rgb_folder(tmp_path / "f", 7)
    bad = folder / "class2" / "0003.png"
    bad.write_bytes(bad.read_bytes()[:60])  # its header intact, its pixels cut off
    with pytest.raises(DataError, match=r"0003\.png: cannot decode image"):
        load_dataset(f"folder:{folder}", tmp_path / "dd")
    assert not list((tmp_path / "dd").rglob("*.npy")) and not list((tmp_path / "dd").rglob("*.tmp"))


def test_write_npy_streams_chunks_and_refuses_a_wrong_total(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (10, 3, 4, 4), dtype=np.uint8)
    digest = write_npy(tmp_path / "a.npy", a.shape, np.uint8, [a[:3], a[3:7], a[7:]])
    assert digest == array_sha256(a) == file_sha256(tmp_path / "a.npy")
    assert digest == hashlib.sha256(a.tobytes()).hexdigest()
    assert np.array_equal(open_mapped(tmp_path / "a.npy"), a)
    assert np.array_equal(np.load(tmp_path / "a.npy"), a)
    for bad in ([a[:3]], [a, a[:1]], [a[:, :2]]):
        with pytest.raises(ValueError):
            write_npy(tmp_path / "b.npy", a.shape, np.uint8, bad)
        assert list(tmp_path.iterdir()) == [tmp_path / "a.npy"]  # nothing partial left


@pytest.mark.parametrize("hflip", [False, True])
@pytest.mark.parametrize("part", [(0, 1), (1, 2)])
@pytest.mark.parametrize("how", ["map, ahead", "rows", "rows, ahead"])
def test_mapped_batches_are_the_device_batches_to_the_bit(tmp_path, hflip, part, how):
    """Batches gathered from the map, or read by row from its file (in the step, as on a CPU,
    or a batch ahead on a thread, as for a CUDA device) equal those drawn from memory, across
    epoch ends and a resume from a saved position (the batch gathered ahead for the old
    position is dropped)."""
    x = np.random.default_rng(2).integers(0, 256, (37, 3, 6, 6), dtype=np.uint8)
    write_npy(tmp_path / "x.npy", x.shape, np.uint8, [x])
    mapped = torch.from_numpy(open_mapped(tmp_path / "x.npy"))
    y = torch.arange(37) % 5
    kw = dict(batch_size=8, seed=3, device="cpu", hflip=hflip, part=part)
    rows = RowReader(tmp_path / "x.npy") if "rows" in how else None
    a = DeviceBatches(mapped, y, placement="mapped", ahead="ahead" in how, rows=rows, **kw)
    b = DeviceBatches(torch.from_numpy(x.copy()), y, placement="device", **kw)
    assert a.placement == "mapped" and b.placement == "device"
    for _ in range(12):  # past two epoch ends
        (xa, ya), (xb, yb) = a.next(), b.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    saved = a.state()
    a.next()
    a.load_state(saved)
    b.load_state(saved)
    for _ in range(3):
        (xa, ya), (xb, yb) = a.next(), b.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def _rss_file_kib() -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status")
                if line.startswith("RssFile"))  # fmt: skip


def test_rows_read_by_index_are_the_rows_and_leave_nothing_resident(tmp_path):
    """RowReader.take gives the file's rows in the order asked (repeats included) and maps
    nothing: 2,000 rows read at random from a 48 MiB file add under 4 MiB to the process's
    file-backed resident memory, whatever the kernel's page-cache folios."""
    x = np.random.default_rng(0).integers(0, 256, (4096, 3, 64, 64), dtype=np.uint8)
    write_npy(tmp_path / "x.npy", x.shape, np.uint8, [x])
    r = RowReader(tmp_path / "x.npy")
    assert (r.n, r.row, r.dtype) == (4096, (3, 64, 64), np.uint8)
    assert np.array_equal(r.take([5, 0, 5, 4095]), x[[5, 0, 5, 4095]])
    assert r.take([]).shape == (0, 3, 64, 64)
    with pytest.raises(IndexError, match=r"a row outside \[0, 4096\)"):
        r.take([4096])
    idx = np.random.default_rng(1).integers(0, 4096, 2000)
    r.take(idx[:10])  # the first call's own pages
    before = _rss_file_kib()
    got = r.take(idx)
    assert _rss_file_kib() - before < 4096
    assert np.array_equal(got, x[idx])
    with pytest.raises(ValueError, match="rows of"):
        DeviceBatches(torch.zeros(5, 3, 64, 64, dtype=torch.uint8), torch.zeros(5), 2, 0, "cpu",
                      placement="mapped", rows=r)  # fmt: skip


def test_a_cpu_run_says_where_its_data_is_read(tmp_path):
    from cfgdiff.data.batches import choose_placement

    place, words = choose_placement(torch.zeros(1000, 1, 28, 28, dtype=torch.uint8), "cpu")
    assert place == "mapped" and words.startswith("data: 1 MiB read where it lies")


# ----------------------------------------------------------------- WebDataset tar shards
def test_shards_decode_as_the_folder_they_were_made_from(tmp_path, monkeypatch):
    pytest.importorskip("webdataset")
    folder = rgb_folder(tmp_path / "f", 7)
    shards = write_shards(folder, tmp_path / "s", per_shard=5)  # 21 images: 5 tars
    whole, labels, names = folders.folder_dataset(folder, None, None)
    monkeypatch.setattr(folders, "DECODE_CHUNK", 4)
    said: list[str] = []
    ds = load_dataset(f"shards:{shards}", tmp_path / "dd", log=said.append)
    assert np.array_equal(ds.images.numpy(), whole) and np.array_equal(ds.labels.numpy(), labels)
    assert ds.class_names == tuple(names) and ds.name == f"shards:{shards}"
    assert said[0] == f"shards:{shards}: decoding 5 shards to 3x32x32"
    (entry,) = (tmp_path / "dd" / "cache" / "shards").glob("*/*")
    assert _mapped_from(ds.images, entry / "images.npy")
    # a brace pattern names the same shards; at another size they are decoded again
    small = load_dataset(
        f"shards:{shards}/train-{{0000..0004}}.tar", tmp_path / "dd", image_size=16
    )
    assert small.images.shape == (21, 3, 16, 16)
    # without classes.txt the classes are the numbers
    (shards / "classes.txt").unlink()
    assert load_dataset(f"shards:{shards}", tmp_path / "dd2").class_names == ("0", "1", "2")


def test_bad_shards_are_one_line_each(tmp_path):
    import io
    import tarfile

    pytest.importorskip("webdataset")
    from cfgdiff.errors import DataError

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="a folder with no .tar shards in it"):
        load_dataset(f"shards:{tmp_path / 'empty'}", tmp_path / "dd")
    with pytest.raises(DataError, match=r"x-1\.tar is not a file \(1 of 2 named shards missing\)"):
        (tmp_path / "x-0.tar").write_bytes(b"")
        load_dataset(f"shards:{tmp_path}/x-{{0..1}}.tar", tmp_path / "dd")
    (tmp_path / "nocls").mkdir()
    with tarfile.open(tmp_path / "nocls" / "a.tar", "w") as tar:
        info = tarfile.TarInfo("000.png")
        png = io.BytesIO()
        from PIL import Image

        Image.new("L", (8, 8)).save(png, format="PNG")
        info.size = len(png.getvalue())
        tar.addfile(info, io.BytesIO(png.getvalue()))
    with pytest.raises(DataError, match=r"000: a sample with no class \(\.cls\) and no caption"):
        load_dataset(f"shards:{tmp_path / 'nocls'}", tmp_path / "dd")
    assert not list((tmp_path / "dd").rglob("*.npy"))


def test_each_process_decodes_its_own_shards_and_the_join_is_one_process_cache(tmp_path):
    """Under torchrun each rank decodes shards rank, rank + world, ... into parts; the cache
    joined from them is the one a single process writes, byte for byte, and the parts go once
    joined. A damaged part is decoded again, not joined."""
    pytest.importorskip("webdataset")
    from cfgdiff.data import shards as shards_mod

    folder = rgb_folder(tmp_path / "f", 7, size=8)
    shards = write_shards(folder, tmp_path / "s", per_shard=4)  # 21 images: 6 tars
    one = load_dataset(f"shards:{shards}", tmp_path / "one")
    dd = tmp_path / "two"
    done = [shards_mod.decode_own_shards(str(shards), None, None, dd, (r, 2)) for r in (0, 1)]
    assert done == [3, 3]
    (parts,) = (dd / "cache" / "shards").glob("*/*.parts")
    assert sorted(p.name for p in parts.glob("*.npy")) == [f"{i:06d}.npy" for i in range(6)]
    assert shards_mod.decode_own_shards(str(shards), None, None, dd, (1, 2)) == 0  # done before
    said: list[str] = []
    two = load_dataset(f"shards:{shards}", dd, log=said.append)
    assert said[0].endswith("decoding 6 shards to 3x8x8 (6 decoded by the processes)")
    assert not parts.exists()
    (e1,), (e2,) = ((d / "cache" / "shards").glob("*/*") for d in (tmp_path / "one", dd))
    for name in ("images.npy", "labels.npy"):
        assert (e1 / name).read_bytes() == (e2 / name).read_bytes(), name
    assert torch.equal(one.images, two.images) and torch.equal(one.labels, two.labels)
    # a complete cache: nothing for any process to decode
    assert shards_mod.decode_own_shards(str(shards), None, None, dd, (0, 2)) == 0
    # a part damaged after it was written is decoded again by the joining process
    d3 = tmp_path / "three"
    shards_mod.decode_own_shards(str(shards), None, None, d3, (0, 1))
    (part,) = (d3 / "cache" / "shards").glob("*/*.parts/000002.npy")
    raw = bytearray(part.read_bytes())
    raw[-1] ^= 0xFF
    part.write_bytes(bytes(raw))
    said.clear()
    three = load_dataset(f"shards:{shards}", d3, log=said.append)
    assert said[0].endswith("(5 decoded by the processes)")
    assert torch.equal(three.images, one.images)


def test_shards_carry_captions_and_may_have_no_classes(tmp_path, capsys):
    """A sample's .txt is its caption (None where it has none, the data's order kept through a
    hold-out); shards without any .cls are one class, `image`; a run of either kind of shard
    resolves the same way from its cache."""
    pytest.importorskip("webdataset")
    from cfgdiff.errors import DataError

    folder = rgb_folder(tmp_path / "f", 4, size=8)  # 12 images
    caps = {0: "a red square", 5: "  café au lait  ", 11: "the last one"}
    shards = write_shards(folder, tmp_path / "s", per_shard=5, captions=caps)
    ds = load_dataset(f"shards:{shards}", tmp_path / "dd")
    want = [None] * 12
    want[0], want[5], want[11] = "a red square", "café au lait", "the last one"
    assert ds.captions == tuple(want) and ds.class_names == ("class0", "class1", "class2")
    again = load_dataset(f"shards:{shards}", tmp_path / "dd")  # from the cache
    assert again.captions == tuple(want)
    rest, held = ds.hold_out(3)
    assert held.captions == tuple(want[0::3]) and len(rest.captions) == 8
    from cfgdiff.cli import main

    assert main(["data", "info", f"shards:{shards}", "--data-dir", str(tmp_path / "dd")]) == 0
    assert "    with a caption: 3 images" in capsys.readouterr().out.splitlines()
    # captions without classes: one class
    only = write_shards(folder, tmp_path / "t", per_shard=5, classes_txt=False, cls=False,
                        captions={i: f"image {i}" for i in range(12)})  # fmt: skip
    ds = load_dataset(f"shards:{only}", tmp_path / "dd")
    assert ds.class_names == ("image",) and not ds.labels.any()
    assert ds.captions == tuple(f"image {i}" for i in range(12))
    # classes for some samples but not others, or a classes.txt without any .cls: one line
    mixed = write_shards(folder, tmp_path / "m", per_shard=5, cls=False,
                         captions={i: "x" for i in range(12)})  # fmt: skip
    with pytest.raises(DataError, match="names 3 classes, but no sample has a class"):
        load_dataset(f"shards:{mixed}", tmp_path / "dd")
    import shutil

    for p in sorted((tmp_path / "s").glob("*.tar"))[1:]:
        shutil.copy(p, tmp_path / "m" / p.name)  # shards 1 and 2 with .cls, shard 0 without
    with pytest.raises(DataError, match=r"sample 0 of .*train-0000.tar has no class \(\.cls\) "
                       r"where 7 others have one"):  # fmt: skip
        load_dataset(f"shards:{mixed}", tmp_path / "dd")
    assert not list((tmp_path / "dd" / "cache" / "shards").glob("*/*.parts"))


def test_a_run_on_shards_trains_and_resumes_exactly(tmp_path):
    """Training reads the shards' cache: a run resumed from its step-2 checkpoint ends with the
    weights of the run that went straight to step 4, to the bit."""
    pytest.importorskip("webdataset")
    import shutil

    from cfgdiff.cli import main

    folder = rgb_folder(tmp_path / "f", 6, size=8)
    shards = write_shards(folder, tmp_path / "s", per_shard=4)
    common = ["--dataset", f"shards:{shards}", "--preset", "tiny", "--sample-every", "0",
              "--no-progress", "--precision", "fp32", "--data-dir", str(tmp_path / "dd"),
              "--checkpoint-every", "2", "--keep", "5"]  # fmt: skip
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--out", str(a), "--steps", "4", *common]) == 0
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step-0000004")
    (b / "checkpoints" / "latest").unlink(missing_ok=True)
    assert main(["train", "--out", str(b), "--resume", "--data-dir", str(tmp_path / "dd"),
                 "--no-progress"]) == 0  # fmt: skip
    for name in ("model.safetensors", "ema.safetensors"):
        one, two = (r / "checkpoints" / "step-0000004" / name for r in (a, b))
        assert one.read_bytes() == two.read_bytes(), name


def test_a_dataset_whose_arrays_were_replaced_is_not_read_from_its_files(tmp_path):
    """A Dataset copied with other images (padded, converted) keeps `files` but is read, hashed
    and batched from its own arrays: mapped_files() is None, and a run's state draws batches
    of the new images."""
    import dataclasses

    from cfgdiff.presets import PRESETS, config_for_dataset
    from cfgdiff.train.state import TrainState, data_identity

    x = np.random.default_rng(0).integers(0, 256, (30, 1, 8, 8), dtype=np.uint8)
    write_cache(tmp_path, "mnist", {"train": (x, np.arange(30) % 10)}, list("abcdefghij"), "t")
    ds = load_dataset("mnist", tmp_path)
    assert ds.mapped_files() == ds.files is not None
    padded = dataclasses.replace(ds, images=torch.nn.functional.pad(ds.images, (2, 2, 2, 2)))
    assert padded.files == ds.files and padded.mapped_files() is None
    assert data_identity(padded) == data_identity(dataclasses.replace(padded, files=None))
    assert data_identity(padded) != data_identity(ds)
    cfg = config_for_dataset(PRESETS["tiny"], padded, "mnist")
    state = TrainState.create(cfg, padded, torch.device("cpu"), "fp32")
    xb, _ = state.batches.next()
    assert xb.shape[-1] == 12


def test_the_data_identity_reads_the_cache_files_and_equals_the_arrays(tmp_path):
    """A run's data identity (count and SHA-256 of images then labels) is read from the cache
    files, leaving the map's pages alone, and is the one the arrays in memory give; a held-out
    part is in memory and hashed as such."""
    import dataclasses

    from cfgdiff.train.state import data_identity

    x = np.random.default_rng(0).integers(0, 256, (30, 1, 8, 8), dtype=np.uint8)
    write_cache(tmp_path, "mnist", {"train": (x, np.arange(30) % 10)}, list("abcdefghij"), "t")
    ds = load_dataset("mnist", tmp_path)
    assert ds.files is not None and ds.files[0].name == "train_images.npy"
    assert data_identity(ds) == data_identity(dataclasses.replace(ds, files=None))
    rest, held = ds.hold_out(3)
    assert rest.files is None and held.files is None
    assert data_identity(held)["n"] == 10
    # at another size the images are converted in memory: no files to read
    assert load_dataset("mnist", tmp_path, image_size=16).files is None
