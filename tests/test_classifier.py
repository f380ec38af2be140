"""The judge (metrics/classifier.py): the shipped judges, deterministic training, recipes, the
step floor and shift, folder judges that follow their folder, and caching."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cfgdiff.cli import main
from cfgdiff.data import Dataset
from cfgdiff.metrics.classifier import Recipe, train_classifier

pytestmark = pytest.mark.slow


def test_train_classifier_command(big_folder, tmp_path, capsys):
    rc = main(
        [
            "eval",
            "train-classifier",
            "--dataset",
            f"folder:{big_folder}",
            "--data-dir",
            str(tmp_path / "dd"),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "sha256" in out


@pytest.mark.parametrize("dataset,floor", [("mnist", 0.99), ("fashion-mnist", 0.91)])
def test_shipped_judges_are_the_current_recipes(dataset, floor):
    """The judges in the package are whole (their weights hash to their meta's SHA-256) and were
    made by today's recipe and version: a change of either must ship judges trained again
    (`cfgdiff eval train-classifier --dataset NAME --retrain`)."""
    from cfgdiff.data import DATASETS
    from cfgdiff.metrics.classifier import CLASSIFIER_VERSION, _same_recipe, shipped_judge

    net, meta = shipped_judge(dataset)
    assert meta["dataset"] == dataset
    assert meta["version"] == CLASSIFIER_VERSION and _same_recipe(meta, DATASETS[dataset].judge)
    assert (meta["in_channels"], meta["image_size"], meta["num_classes"]) == (1, 28, 10)
    assert meta["test_accuracy"] >= floor and not net.training
    assert shipped_judge("cifar10") is None  # trained on first use (no archive here to train it)


def _mnist_judged_by_the_shipped_one(d, monkeypatch, wrong: int):
    """Synthetic MNIST whose 1000 test labels are the shipped judge's own predictions, `wrong`
    of them changed: the shipped judge scores 1 - wrong/1000 on it."""
    from conftest import fake_digits, mnist_idx

    from cfgdiff.metrics.classifier import predict, shipped_judge

    net, _ = shipped_judge("mnist")
    xt, _ = fake_digits(1000, 5)
    yt = predict(net, torch.from_numpy(xt)[:, None]).argmax(1).numpy().astype(np.uint8)
    yt[:wrong] = (yt[:wrong] + 1) % 10
    return mnist_idx(d, monkeypatch, fake_digits(200, 0), (xt, yt))


def _calls(monkeypatch, module, name: str) -> list:
    """A list that gains a 1 at each call of module.name, which still does its work."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_shipped_judge_on_the_split_it_was_measured_on_is_not_measured_again(
    tmp_path, monkeypatch, capsys
):
    """A test split whose SHA-256 is the one the shipped judge records (MNIST's own) gets the
    judge without 10,000 images through it; any other split is measured as before (the test
    below). Here a synthetic split stands for MNIST's: its digest is put in the meta."""
    import cfgdiff.metrics.classifier as clf
    from cfgdiff.data import load_dataset

    d = _mnist_judged_by_the_shipped_one(tmp_path / "d", monkeypatch, wrong=6)
    digest = clf.split_sha(load_dataset("mnist", d, split="test"))
    real = clf.shipped_judge
    monkeypatch.setattr(
        clf,
        "shipped_judge",
        lambda ds: (lambda n, m: (n, {**m, "test_split_sha256": digest}))(*real(ds)),
    )
    measured = _calls(monkeypatch, clf, "accuracy")
    notes: list[str] = []
    _, meta = clf.get_classifier("mnist", d, log=notes.append)
    assert measured == [] and meta["source"] == "shipped" and "test_accuracy_here" not in meta
    assert any("the one it was measured on" in n for n in notes)
    assert main(["eval", "train-classifier", "--dataset", "mnist", "--data-dir", str(d)]) == 0
    assert "the split it was measured on; shipped with cfgdiff" in capsys.readouterr().out
    assert clf.shipped_judge("mnist")[1]["test_split_sha256"] == digest
    other = clf.split_sha(load_dataset("mnist", d, split="train"))
    assert other != digest  # other images: another digest, so the judge would be measured
    assert real("mnist")[1]["test_split_sha256"] == (
        "a0863a96c44e5666edbb30c4071ee79ca0514c621e6349c5967fc78e7305c891"
    )  # MNIST's test split (10,000 images) as every source of cfgdiff's delivers it


def test_shipped_judge_is_used_where_it_scores_as_recorded(tmp_path, monkeypatch, capsys):
    """A test split on which the shipped judge scores its recorded 0.9937 (to 0.001) gets it,
    untrained, cached as shipped; one on which it scores otherwise (another MNIST) gets a judge
    trained on it; --retrain trains one even where the shipped judge fits."""
    import cfgdiff.metrics.classifier as clf

    fits = _mnist_judged_by_the_shipped_one(tmp_path / "fits", monkeypatch, wrong=6)  # 0.994
    trainings = _calls(monkeypatch, clf, "train_classifier")
    notes: list[str] = []
    _, meta = clf.get_classifier("mnist", fits, log=notes.append)
    assert trainings == [] and meta["source"] == "shipped"
    assert meta["test_accuracy_here"] == pytest.approx(0.994)
    assert meta["weights_sha256"] == clf.shipped_judge("mnist")[1]["weights_sha256"]
    assert any("shipped with cfgdiff (test accuracy 0.9940 here)" in n for n in notes)
    cached = json.loads((fits / "classifiers" / "mnist-v2.json").read_text())
    assert cached["source"] == "shipped"
    notes.clear()
    clf.get_classifier("mnist", fits, log=notes.append)  # now from the cache, silently
    assert notes == [] and trainings == []

    argv = ["eval", "train-classifier", "--dataset", "mnist", "--data-dir", str(fits)]
    assert main(argv) == 0
    assert "0.9940 on this test split; shipped with cfgdiff" in capsys.readouterr().out
    assert main([*argv, "--retrain"]) == 0 and trainings == [1]
    assert "trained in" in capsys.readouterr().out
    retrained = json.loads((fits / "classifiers" / "mnist-v2.json").read_text())
    assert "source" not in retrained and retrained["weights_sha256"] != cached["weights_sha256"]

    other = _mnist_judged_by_the_shipped_one(tmp_path / "other", monkeypatch, wrong=20)  # 0.98
    notes.clear()
    _, meta = clf.get_classifier("mnist", other, log=notes.append)
    assert trainings == [1, 1] and "source" not in meta
    assert any("scores 0.9800 on this test split, not 0.9937" in n for n in notes)


def test_classifier_training_is_deterministic():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(60, 1, 8, 8, generator=g) * 255).to(torch.uint8)
    y = torch.arange(60) % 3
    ds = Dataset("t", x, y, ("a", "b", "c"))
    a, _ = train_classifier(ds, ds, Recipe(epochs=2, batch_size=16, width=8))
    b, _ = train_classifier(ds, ds, Recipe(epochs=2, batch_size=16, width=8))
    assert all(
        torch.equal(p, q)
        for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_folder_judge_of_a_flip_trained_model_is_trained_with_flips(big_folder, tmp_path):
    """A model trained with --hflip says mirrored images are the same class: its folder judge is
    trained with flips, cached beside the plain one, and neither replaces the other."""
    import dataclasses

    from conftest import tiny_config

    from cfgdiff.metrics.classifier import classifier_path
    from cfgdiff.metrics.evaluate import ReferenceOptions, build_reference

    dd = tmp_path / "dd"
    plain = dataclasses.replace(tiny_config(), dataset=f"folder:{big_folder}")
    flipped = dataclasses.replace(plain, train=dataclasses.replace(plain.train, hflip=True))
    for cfg, flip in ((plain, False), (flipped, True)):
        said: list[str] = []
        assert (
            build_reference(
                cfg, 12, ReferenceOptions(data_dir=dd), log=said.append
            ).classifier_meta["flip"]
            is flip
        )
        assert any("classifier epoch" in m for m in said)  # trained
    for cfg, flip in ((plain, False), (flipped, True)):
        said = []
        assert (
            build_reference(
                cfg, 12, ReferenceOptions(data_dir=dd), log=said.append
            ).classifier_meta["flip"]
            is flip
        )
        assert not any("classifier" in m for m in said)  # loaded from its own cache
    for flip in (False, True):
        assert classifier_path(dd, f"folder:{big_folder}", flip).with_suffix(".json").is_file()


def test_classifier_judges_converted_images_in_its_own_space():
    """A 3-channel 16x16 model of a 1-channel 8x8 dataset is judged by converting its images to
    the classifier's size and channels, exactly as load_dataset converts data."""
    from cfgdiff.data import convert_images
    from cfgdiff.metrics.classifier import ClassifierFeatures, SmallCNN

    torch.manual_seed(0)
    net = SmallCNN(1, 3, width=8)
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    judge = ClassifierFeatures(net, image_size=8, channels=1)
    native = ClassifierFeatures(net)
    f, logits = judge(images)
    g, expected = native(convert_images(images, 8, 1))
    assert f.shape == (5, 32) and torch.equal(f, g) and torch.equal(logits, expected)
    with pytest.raises(RuntimeError):  # without the conversion the channels do not fit
        native(images)


def test_classifier_step_floor_and_shift():
    from cfgdiff.metrics.classifier import max_shift_for

    g = torch.Generator().manual_seed(0)
    ds = Dataset(
        "t",
        (torch.rand(32, 1, 8, 8, generator=g) * 255).to(torch.uint8),
        torch.arange(32) % 2,
        ("a", "b"),
    )

    def reported(min_steps: int) -> list[int]:
        """The epochs after which test accuracy was reported (2 steps per epoch)."""
        epochs: list[int] = []
        train_classifier(
            ds,
            ds,
            Recipe(epochs=3, min_steps=min_steps, batch_size=16, width=8),
            on_epoch=lambda e, a: epochs.append(e),
        )
        return epochs

    assert reported(0) == [1, 2, 3]
    assert reported(11) == [1, 2, 3, 4, 5, 6]  # a floor of 11 steps needs 6 epochs
    assert reported(80) == list(range(4, 41, 4))  # 40 epochs: test accuracy every 4th
    # the built-in datasets keep the shift of 2 their cached classifiers were trained with
    assert [max_shift_for(s) for s in (8, 16, 27, 28, 32, 64)] == [1, 1, 1, 2, 2, 4]


def test_small_folder_gets_a_trained_judge(tmp_path):
    """180 8x8 images in 3 classes: 3 epochs were 6 optimizer steps with shifts of 2 pixels,
    which left the judge at chance (0.33); the step floor and the 1-pixel shift train it."""
    from conftest import image_folder

    from cfgdiff.metrics.classifier import get_classifier

    folder = image_folder(tmp_path / "f", 60)
    _, meta = get_classifier(f"folder:{folder}", tmp_path / "dd")
    assert meta["test_accuracy"] >= 0.9
    assert (meta["min_steps"], meta["max_shift"]) == (300, 1)
    assert meta["epochs_trained"] == 150  # 162 training images: 2 steps per epoch


def test_classifier_of_an_earlier_recipe_is_trained_again(tmp_path):
    import json

    from conftest import image_folder

    from cfgdiff.metrics.classifier import _same_recipe, classifier_path, get_classifier

    name = f"folder:{image_folder(tmp_path / 'f', 6)}"
    _, meta = get_classifier(name, tmp_path / "dd")
    path = classifier_path(tmp_path / "dd", name).with_suffix(".json")
    old = {k: v for k, v in meta.items() if k not in ("min_steps", "max_shift")}
    path.write_text(json.dumps(old))  # as cached before the step floor
    notes: list[str] = []
    _, again = get_classifier(name, tmp_path / "dd", log=notes.append)
    assert any("earlier recipe" in n for n in notes)
    assert json.loads(path.read_text())["min_steps"] == 300 and again["min_steps"] == 300
    notes.clear()
    get_classifier(name, tmp_path / "dd", log=notes.append)  # now current: loaded, not trained
    assert notes == []
    # a cached MNIST classifier (recipe v2: no floor, shift 2 recorded nowhere) stays valid
    mnist_meta = {"epochs": 2, "flip": False, "image_size": 28}
    assert _same_recipe(mnist_meta, {"epochs": 2, "flip": False})
    assert not _same_recipe(mnist_meta, {"epochs": 3, "flip": False})


def test_folder_judge_follows_the_folders_classes_and_images(tmp_path):
    """The judge is cached by the folder's path: a class or an image added afterwards trains it
    again (before, a 3-class judge silently judged a 4-class model); another model size with
    the same images keeps it."""
    import shutil

    from conftest import image_folder

    from cfgdiff.metrics.classifier import get_classifier

    folder = image_folder(tmp_path / "f", 6)
    name, dd = f"folder:{folder}", tmp_path / "dd"
    _, meta = get_classifier(name, dd)
    assert meta["num_classes"] == 3
    notes: list[str] = []
    get_classifier(name, dd, log=notes.append, image_size=16)  # same images, another size
    assert notes == []
    shutil.copytree(folder / "class0", folder / "class3")
    _, meta = get_classifier(name, dd, log=notes.append)
    assert meta["num_classes"] == 4
    assert any("other classes or images" in n for n in notes)
    notes.clear()
    (folder / "class3" / "0.png").unlink()
    _, meta = get_classifier(name, dd, log=notes.append)
    assert any("other classes or images" in n for n in notes) and meta["num_classes"] == 4


def test_a_judge_that_cannot_be_cached_still_judges(big_folder, tmp_path):
    """A data directory where the judge cannot be saved (here: classifiers/ is a file): the
    evaluation goes on with the judge it trained, says it is not cached, and leaves no file."""
    from cfgdiff.metrics.classifier import get_classifier

    dd = tmp_path / "dd"
    dd.mkdir()
    (dd / "classifiers").write_text("not a folder")
    said: list[str] = []
    net, meta = get_classifier(f"folder:{big_folder}", dd, log=said.append)
    assert meta["test_accuracy"] > 0.9 and net(torch.zeros(2, 1, 8, 8)).shape == (2, 3)
    (note,) = [m for m in said if "not cached" in m]
    assert (
        note.startswith("the judge is not cached (")
        and "the next evaluation makes it again" in note
    )
    assert (dd / "classifiers").read_text() == "not a folder"
