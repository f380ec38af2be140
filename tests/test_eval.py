"""eval / sweep / train-classifier end to end on a tiny checkpoint, plus their bad inputs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cfgdiff.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(big_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("evalrun") / "run"
    assert (
        main(
            [
                "train",
                "--dataset",
                f"folder:{big_folder}",
                "--preset",
                "tiny",
                "--out",
                str(out),
                "--steps",
                "10",
                "--no-progress",
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def judged(run, tmp_path_factory):
    """A data directory holding the run's folder judge (and the folder's decoded cache), trained
    once for the module: tests that are not about the judge start from a copy of it (a judge
    that does not fit their settings would still be trained again, as for a user)."""
    from cfgdiff.checkpoint import load_for_sampling
    from cfgdiff.metrics.evaluate import ReferenceOptions, build_reference

    dd = tmp_path_factory.mktemp("judged") / "dd"
    build_reference(load_for_sampling(run).cfg, 12, ReferenceOptions(data_dir=dd))
    return dd


def _dd(tmp_path, judged):
    """This test's own --data-dir, starting as a copy of the module's judged one."""
    return shutil.copytree(judged, tmp_path / "dd")


def test_eval_reports_every_metric_and_the_floor(run, judged, tmp_path, capsys):
    js = tmp_path / "e.json"
    rc = main(
        [
            "eval",
            "--checkpoint",
            str(run),
            "--scale",
            "2",
            "--n",
            "12",
            "--steps",
            "3",
            "--data-dir",
            str(_dd(tmp_path, judged)),
            "--json",
            str(js),
            "--precision",
            "fp32",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    for label in (
        "FID",
        "KID",
        "IS (classifier)",
        "precision",
        "recall",
        "class accuracy",
        "memorised",
        "real floor",
    ):
        assert label in out
    assert "class accuracy per class: c0 " in out  # by the folder's class names
    r = json.loads(js.read_text())
    for key in ("fid", "kid", "is", "precision", "recall", "class_accuracy", "memorisation"):
        assert key in r["generated"] and key in r["real_floor"]
    assert r["scale"] == 2 and r["n"] == 12
    assert r["device"] == "cpu" and "threads" in r["machine"]  # what the images/s was on


def test_sweep_writes_all_files(run, judged, tmp_path, capsys):
    out = tmp_path / "sw"
    rc = main(
        [
            "sweep",
            "--checkpoint",
            str(run),
            "--scales",
            "0,1,3",
            "--n",
            "12",
            "--steps",
            "3",
            "--out",
            str(out),
            "--data-dir",
            str(_dd(tmp_path, judged)),
            "--precision",
            "fp32",
        ]
    )
    assert rc == 0
    for name in (
        "sweep.csv",
        "sweep.json",
        "fid_vs_scale.png",
        "accuracy_vs_scale.png",
        "precision_recall_vs_scale.png",
        "fid_vs_is.png",
        "strip.png",
    ):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [r["scale"] for r in rows] == ["0.0", "1.0", "3.0", "real"]
    assert json.loads((out / "sweep.json").read_text())["scales"] == [0.0, 1.0, 3.0]
    table = capsys.readouterr().out.splitlines()
    first = next(i for i, x in enumerate(table) if x.split()[:2] == ["s", "w"])
    assert [x.split()[0] for x in table[first + 1 : first + 5]] == ["0", "1", "3", "real"]


def test_sweep_matches_separate_evals(run, judged, tmp_path):
    """Batching scales together gives the same metrics as one eval per scale."""
    out = tmp_path / "sw"
    dd = str(_dd(tmp_path, judged))
    common = [
        "--n",
        "12",
        "--steps",
        "3",
        "--data-dir",
        dd,
        "--precision",
        "fp32",
        "--batch-size",
        "7",
    ]
    assert (
        main(["sweep", "--checkpoint", str(run), "--scales", "1,3", "--out", str(out), *common])
        == 0
    )
    swept = json.loads((out / "sweep.json").read_text())["rows"]
    for row in swept:
        js = tmp_path / f"e{row['scale']}.json"
        assert (
            main(
                [
                    "eval",
                    "--checkpoint",
                    str(run),
                    "--scale",
                    str(row["scale"]),
                    "--json",
                    str(js),
                    *common,
                ]
            )
            == 0
        )
        single = json.loads(js.read_text())["generated"]
        assert single["class_accuracy"] == pytest.approx(row["class_accuracy"])
        assert single["fid"] == pytest.approx(row["fid"], rel=1e-4, abs=1e-6)


def test_reference_measures_memorisation_against_one_yardstick(run, judged, tmp_path, monkeypatch):
    """The training images' nearest-neighbour distances are computed once, with the reference
    (a sweep measures every scale and the floor against them); the reports are those that
    memorisation() gives computing them afresh each time."""
    from cfgdiff.checkpoint import load_for_sampling
    from cfgdiff.metrics import evaluate
    from cfgdiff.metrics.stats import memorisation

    cfg = load_for_sampling(run).cfg
    calls = []
    real = evaluate.train_nn_distances
    monkeypatch.setattr(
        evaluate, "train_nn_distances", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    ref = evaluate.build_reference(
        cfg, 12, evaluate.ReferenceOptions(data_dir=_dd(tmp_path, judged))
    )
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (12, 1, 8, 8), generator=g, dtype=torch.uint8) for _ in "ab"]
    labels = torch.arange(12) % 3
    kept = [evaluate.measure(ref, x, labels) for x in images] + [evaluate.floor(ref)]
    assert len(calls) == 1
    train = ref.train_pixels.float() / 255
    for x, report in zip([*images, ref.held_out.images], kept, strict=True):
        fresh = memorisation(x.float() / 255, train, ref.mirrored)
        assert report["memorisation_detail"] == fresh


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--dataset", "imagenet"], "--dataset must be one of"),
        (["--n", "1000"], "--n must be <= 60 for folder:"),
        (["--image-size", "16"], "--image-size 16: only for eval train-classifier"),
        (["--retrain"], "--retrain: only for eval train-classifier"),
        (["--dataset", "cifar10"], "has 3 channel(s); the checkpoint has 1"),
        (["--dataset", "FOLDER2"], "has 2 classes; the checkpoint has 3"),
    ],
)
def test_eval_bad_inputs(run, big_folder, tmp_path, extra, message, capsys, monkeypatch):
    if "cifar10" in extra:  # a synthetic CIFAR archive with a matching md5, so no download
        from test_data import _cifar_archive

        from cfgdiff.data import sources
        from cfgdiff.files import file_digest

        path = tmp_path / "dd" / sources.CIFAR10_ARCHIVE
        path.parent.mkdir(parents=True)
        _cifar_archive(path)
        monkeypatch.setattr(sources, "CIFAR10_MD5", file_digest(path, "md5"))
    if "FOLDER2" in extra:
        import shutil

        two = tmp_path / "two"
        for c in ("c0", "c1"):
            shutil.copytree(big_folder / c, two / c)
        extra = ["--dataset", f"folder:{two}"]
    rc = main(
        [
            "eval",
            "--checkpoint",
            str(run),
            "--scale",
            "2",
            "--n",
            "12",
            "--steps",
            "2",
            "--data-dir",
            str(tmp_path / "dd"),
            *extra,
        ]
    )
    assert rc == 2
    assert message in capsys.readouterr().err


def test_eval_requires_checkpoint_and_scale(capsys):
    assert main(["eval", "--scale", "3"]) == 2
    assert "--checkpoint is required" in capsys.readouterr().err
    assert main(["eval", "train-classifier"]) == 2
    assert "--dataset is required" in capsys.readouterr().err


def test_evaluation_during_training(big_folder, tmp_path):
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--dataset",
            f"folder:{big_folder}",
            "--preset",
            "tiny",
            "--out",
            str(out),
            "--steps",
            "10",
            "--eval-every",
            "5",
            "--eval-n",
            "12",
            "--no-progress",
            "--precision",
            "fp32",
            "--data-dir",
            str(tmp_path / "dd"),
        ]
    )
    assert rc == 0
    rows = list(csv.DictReader(open(out / "eval.csv")))
    assert [r["step"] for r in rows] == ["5", "10"]
    assert {"fid", "class_accuracy", "precision", "recall", "is"} <= set(rows[0])


def test_folder_reference_holds_out_enough_for_n(big_folder, judged, tmp_path):
    """A folder has no test split: the floor's held-out images are every 10th, or more of them
    when N needs it, down to halves (120 images: N up to 60), disjoint from the reference and
    drawn from every class."""
    import dataclasses

    from conftest import tiny_config

    from cfgdiff.metrics.evaluate import ReferenceOptions, build_reference

    cfg = dataclasses.replace(tiny_config(), dataset=f"folder:{big_folder}")
    dd = _dd(tmp_path, judged)
    for n in (12, 40, 60):
        ref = build_reference(cfg, n, ReferenceOptions(data_dir=dd))
        held = ref.held_out.images.flatten(1)
        assert len(held) == n and set(ref.held_out.labels.tolist()) == {0, 1, 2}
        reference = ref.train_pixels.flatten(1)
        assert len(reference) == 120 - n  # every 10th, 3rd and 2nd image held out
        assert not (held[:, None] == reference[None]).all(-1).any()


def test_eval_samples_from_npz_and_folder(run, judged, big_folder, tmp_path, capsys):
    """eval --samples measures images made elsewhere: the .npz and the folder that `sample`
    writes for the same settings give the same report; real images, labelled by class name,
    are judged as well as the real floor."""
    dd = ["--data-dir", str(_dd(tmp_path, judged)), "--dataset", f"folder:{big_folder}"]
    argv = ["sample", "--checkpoint", str(run), "--scale", "2", "--per-class", "6", "--steps", "3"]
    assert main([*argv, "--out", str(tmp_path / "s.npz")]) == 0
    assert main([*argv, "--out", str(tmp_path / "s")]) == 0
    reports = []
    for samples in ("s.npz", "s"):
        js = tmp_path / f"{samples}.json"
        assert main(["eval", "--samples", str(tmp_path / samples), *dd, "--json", str(js)]) == 0
        reports.append(json.loads(js.read_text()))
    # the same samples as guided-diffusion writes them: arr_0 NHWC, arr_1 labels
    import numpy as np

    with np.load(tmp_path / "s.npz") as z:
        np.savez(tmp_path / "adm.npz", z["images"].transpose(0, 2, 3, 1), z["labels"])
    js = tmp_path / "adm.json"
    assert main(["eval", "--samples", str(tmp_path / "adm.npz"), *dd, "--json", str(js)]) == 0
    reports.append(json.loads(js.read_text()))
    a, b, c = reports
    assert a["n"] == b["n"] == c["n"] == 18
    # equal inputs; float reductions may differ in the last bits between calls (memory alignment)
    for other in (b, c):
        for key in ("fid", "kid", "is", "precision", "recall", "class_accuracy", "memorisation"):
            assert other["generated"][key] == pytest.approx(a["generated"][key], rel=1e-6)
        assert other["generated"]["per_class_accuracy"] == a["generated"]["per_class_accuracy"]
    out = capsys.readouterr().out
    assert "18 samples from" in out and "class accuracy per class: c0" in out

    # real images, in folders named by class index: judged like the floor
    from PIL import Image

    real = tmp_path / "real"
    for c in range(3):
        (real / str(c)).mkdir(parents=True)
        for i in range(0, 40, 4):
            Image.open(big_folder / f"c{c}" / f"{i}.png").save(real / str(c) / f"{i}.png")
    js = tmp_path / "real.json"
    assert main(["eval", "--samples", str(real), *dd, "--json", str(js)]) == 0
    r = json.loads(js.read_text())
    assert r["n"] == 30 and r["class_accuracy"] == r["real_floor"]["class_accuracy"] == 1.0


@pytest.mark.parametrize(
    "make,extra,message",
    [
        ("npz", ["--checkpoint", "x"], "--samples: not with --checkpoint, --scale or --w"),
        ("npz", ["--n", "20"], "--samples: not with --n"),
        ("npz", ["--no-dataset"], "--samples: --dataset is required"),
        ("txt", [], "--samples must be an .npz file or a folder of class folders"),
        ("badnpz", [], "not an .npz with images and labels"),
        ("zebra", [], "classes ['zebra'] are not classes of the dataset (c0, c1, c2)"),
        ("few", [], "at least 10 samples are needed, got 3"),
        ("many", [], "the number of --samples must be <= 60 for folder:"),
        ("small", [], "must be square, 8 to 1024 pixels, with 1 or 3 channels, got 1x4x4"),
        ("wide", [], "must be square, 8 to 1024 pixels, with 1 or 3 channels, got 1x8x6"),
        ("mixed", [], "the images must all be one size, found 8x8 (0.png) and 10x8 (1.png)"),
    ],
)
def test_eval_samples_bad_inputs(big_folder, tmp_path, capsys, make, extra, message):
    import numpy as np

    x = np.zeros((3, 1, 8, 8), np.uint8)
    path = tmp_path / "s.npz"
    if make in ("npz", "few", "zebra", "many", "small", "wide"):
        n = {"many": 61, "npz": 12}.get(make, 3 if make == "few" else 12)
        x = np.zeros((n, 1, *{"small": (4, 4), "wide": (8, 6)}.get(make, (8, 8))), np.uint8)
        names = ["c0", "c1", "zebra"] if make == "zebra" else ["c0", "c1", "c2"]
        np.savez(path, images=x, labels=np.arange(n) % 3, class_names=np.array(names))
    elif make == "txt":
        path = tmp_path / "s.txt"
        path.write_text("hi")
    elif make == "mixed":  # a folder of samples of two sizes: not resized to one, refused
        from PIL import Image

        path = tmp_path / "mixed"
        (path / "c0").mkdir(parents=True)
        for i, w in enumerate((8, 10, 8, 10)):
            Image.new("L", (w, 8)).save(path / "c0" / f"{i}.png")
    else:
        path.write_bytes(b"not a zip")
    dd = ["--data-dir", str(tmp_path / "dd")]
    if "--no-dataset" not in extra:
        dd += ["--dataset", f"folder:{big_folder}"]
    extra = [e for e in extra if e != "--no-dataset"]
    assert main(["eval", "--samples", str(path), *dd, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_reference_for_a_run_recorded_with_a_relative_folder_path(
    big_folder, tmp_path, monkeypatch
):
    """A run recorded folder:RELATIVE (before paths were made absolute) and trained with
    --channels 3 is evaluated against --dataset folder:ABSOLUTE as its own data: converted to
    its 3 channels, not compared as another dataset of 1 channel."""
    import dataclasses

    from conftest import tiny_config

    from cfgdiff.metrics.evaluate import ReferenceOptions, build_reference

    monkeypatch.chdir(big_folder.parent)
    cfg = tiny_config()
    cfg = dataclasses.replace(
        cfg,
        dataset=f"folder:{big_folder.name}",
        model=dataclasses.replace(cfg.model, in_channels=3),
    )
    ref = build_reference(
        cfg, 12, ReferenceOptions(dataset=f"folder:{big_folder}", data_dir=tmp_path / "dd")
    )
    assert ref.held_out.images.shape[1] == 3


def test_evaluation_during_training_too_large_is_refused_before_training(
    big_folder, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = ["train", "--dataset", f"folder:{big_folder}", "--preset", "tiny", "--out", str(out)]
    argv += ["--eval-every", "5", "--eval-n", "61", "--data-dir", str(tmp_path / "dd")]
    assert main(argv) == 2
    assert "--eval-n must be <= 60 for folder:" in capsys.readouterr().err
    assert not out.exists()


def _train_and_eval(tmp_path, dataset, data_dir, train_extra, n):
    out = tmp_path / "run"
    common = ["--data-dir", str(data_dir), "--precision", "fp32"]
    argv = ["train", "--dataset", dataset, "--preset", "tiny", "--out", str(out), "--steps", "2"]
    assert main([*argv, "--no-progress", *common, *train_extra]) == 0
    js = tmp_path / "e.json"
    argv = ["eval", "--checkpoint", str(out), "--scale", "3", "--n", str(n), "--steps", "2"]
    assert main([*argv, "--json", str(js), *common]) == 0
    return json.loads(js.read_text())


def test_eval_of_a_model_trained_on_converted_mnist(idx_dir, tmp_path):
    """`train --channels 3 --image-size 16` on (synthetic) MNIST: eval reads the data as training
    did, and the judge stays the native 28x28 1-channel MNIST classifier."""
    r = _train_and_eval(tmp_path, "mnist", idx_dir, ["--channels", "3", "--image-size", "16"], 20)
    meta = json.loads((idx_dir / "classifiers" / "mnist-v2.json").read_text())
    assert (meta["image_size"], meta["in_channels"]) == (28, 1)
    assert r["dataset"] == "mnist" and r["n"] == 20
    assert len(r["real_floor"]["per_class_accuracy"]) == 10


def test_eval_of_a_folder_of_mixed_sizes(tmp_path):
    """Training reads a folder of mixed image sizes with --image-size; so does eval."""
    from PIL import Image

    root = tmp_path / "mixed"
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(40):
            a = (rng.random((8 + i % 3, 10)) * 60).astype(np.uint8)
            a[:, 2 * c + 1 : 2 * c + 4] = 255
            Image.fromarray(a).save(root / f"c{c}" / f"{i}.png")
    dataset, dd = f"folder:{root}", tmp_path / "dd"
    argv = ["eval", "train-classifier", "--dataset", dataset, "--data-dir", str(dd)]
    assert main(argv) == 2  # mixed sizes need --image-size
    assert main([*argv, "--image-size", "12"]) == 0
    meta = json.loads(next((dd / "classifiers").glob("*.json")).read_text())
    assert meta["image_size"] == 12
    # an 8x8 model of it is judged by that 12x12 classifier
    r = _train_and_eval(tmp_path, dataset, dd, ["--image-size", "8"], 10)
    assert r["n"] == 10 and len(r["generated"]["per_class_accuracy"]) == 3
    assert r["classifier_test_accuracy"] == meta["test_accuracy"]
    # and so are 8x8 samples made elsewhere: the folder is read at the samples' size
    x = np.random.default_rng(1).integers(0, 256, (12, 1, 8, 8), dtype=np.uint8)
    names = np.array(["c0", "c1", "c2"])
    np.savez(tmp_path / "s.npz", images=x, labels=np.arange(12) % 3, class_names=names)
    js = tmp_path / "s.json"
    argv = ["eval", "--samples", str(tmp_path / "s.npz"), "--dataset", dataset, "--json", str(js)]
    assert main([*argv, "--data-dir", str(dd)]) == 0
    assert json.loads(js.read_text())["n"] == 12


@pytest.mark.parametrize("command", ["eval", "sweep"])
def test_bad_options_are_refused_before_any_classifier_training(run, tmp_path, command, capsys):
    """Building the reference can train a classifier for minutes: options are checked first, and
    a refused sweep leaves no folder behind."""
    dd = tmp_path / "fresh-data-dir"
    argv = [command, "--checkpoint", str(run), "--n", "12", "--data-dir", str(dd)]
    argv += ["--scale", "3"] if command == "eval" else ["--out", str(tmp_path / "sw")]
    for bad, message in (
        (["--negative-class", "7"], "negative"),
        (["--steps", "5000"], "--steps must be in [1, 1000]"),
        (["--negative-prompt", "thin"], "--negative-prompt: only for text models"),
        (["--prompts", "p.txt"], "--prompts p.txt: only for text models"),
    ):
        assert main([*argv, *bad]) == 2
        assert message in capsys.readouterr().err
    assert not (dd / "classifiers").exists() and not (tmp_path / "sw").exists()


def test_the_sampler_grid_benchmark_judges_every_cell(run, judged, tmp_path, capsys):
    """bench/samplers.py --grid: a cell per sampler x steps x scale, each a sweep from the same
    noise, and the network evaluations each costs."""
    import sys

    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    try:
        import samplers as bench_samplers
    finally:
        sys.path.remove(str(bench))
    cells = bench_samplers.grid_table(
        run, ["ddim", "edm"], [2, 3], [1.0, 3.0], 12, "cpu", tmp_path / "g", _dd(tmp_path, judged)
    )
    assert [(c["sampler"], c["steps"], c["scale"]) for c in cells] == [
        (s, k, g) for s in ("ddim", "edm") for k in (2, 3) for g in (1.0, 3.0)
    ]
    # EDM: Heun steps after a first Euler step from above sigma_max, and an Euler last step
    assert [c["nfe"] for c in cells] == [2, 4, 3, 6, 2, 4, 4, 8]
    out = capsys.readouterr().out
    assert "real floor: FID" in out and "best FID: " in out
