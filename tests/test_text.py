"""The conditioning seam: class models unchanged, text models' shapes and null vector, captions
and the attributes they are made from, the encoder's checksum, negative prompts as the
reference with one forward pass per step."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from cfgdiff.config import ModelConfig, RunConfig
from cfgdiff.diffusion import drop_labels
from cfgdiff.errors import CheckpointError, ConfigError, DataError
from cfgdiff.layers import CrossAttention
from cfgdiff.presets import TEXT_TOKENS, encoder_fields, resolve_config
from cfgdiff.sampling.guidance import GUIDANCE_CONVENTION, Guidance, guided_denoiser
from cfgdiff.sampling.samplers import run_sampler
from cfgdiff.schedule import make_schedule
from cfgdiff.text.captions import (
    FOLDER_CAPTIONS,
    HELD_OUT_TEMPLATES,
    caption_set,
    dataset_captions,
    image_groups,
    measure_attributes,
    phrase,
    read_folder_captions,
)
from cfgdiff.text.embedding import TextConditions, check_encoder, embed_prompts
from cfgdiff.text.encoder import ENCODERS, encoder_available, load_encoder
from cfgdiff.unet import UNet

SMALL = dict(
    base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), image_size=8
)
needs_encoder = pytest.mark.skipif(
    not encoder_available(), reason="the `text` extra (wordllama) is not installed"
)


def text_model(dim: int = 6) -> ModelConfig:
    return ModelConfig(
        **SMALL, num_classes=3, condition="text", text_encoder="x", text_encoder_sha256="0" * 64,
        text_dim=dim,
    )  # fmt: skip


# --- the class path, unchanged


def test_class_model_is_bit_for_bit_what_it_was():
    """Digests written by the code before the text path existed (commit 9815b02): the class
    model's parameter names and initial values (so its draws from the global RNG), the next
    draw after it, and a forward pass."""
    torch.manual_seed(0)
    net = UNet(ModelConfig(**SMALL, num_classes=3))
    h = hashlib.sha256()
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(v.numpy().tobytes())
    assert h.hexdigest() == "b19778053974088d7edff702fd75768542bf58c170f0ccb661882834683f771e"
    assert torch.rand(1).item() == pytest.approx(0.8018503189086914, abs=0)
    for p in net.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    out = net(torch.randn(4, 1, 8, 8), torch.tensor([1, 10, 100, 500]), torch.tensor([0, 1, 2, 3]))
    assert out.double().sum().item() == pytest.approx(4.053664286439016, rel=1e-5)
    assert out.abs().double().sum().item() == pytest.approx(9.602326251966588, rel=1e-5)
    assert "label_emb.weight" in net.state_dict()
    assert not any(k.startswith(("text_mlp", "null_text")) for k in net.state_dict())


# --- the text path


def test_text_model_shapes_and_learned_null_vector():
    torch.manual_seed(0)
    net = UNet(text_model())
    keys = net.state_dict().keys()
    assert "null_text" in keys and "text_mlp.0.weight" in keys and "label_emb.weight" not in keys
    for p in net.parameters():
        p.data.add_(0.01 * torch.randn_like(p))  # a fresh net's output layer is zero
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 50, 500])
    c = torch.nn.functional.normalize(torch.randn(3, 6), dim=1)
    c[1] = 0  # the null condition
    out = net(x, t, c)
    assert out.shape == x.shape
    explicit = c.clone()
    explicit[1] = net.null_text.detach()
    assert torch.equal(out, net(x, t, explicit))
    with torch.no_grad():
        net.null_text.add_(1.0)  # the null row follows the learned vector, the others do not
    moved = net(x, t, c)
    assert not torch.allclose(moved[1], out[1]) and torch.equal(moved[[0, 2]], out[[0, 2]])


def test_a_caption_starts_at_the_label_rows_scale():
    """At init a unit-length caption embedding comes out of the text MLP as about N(0, 1) per
    component, as a class model's label rows start, and different captions differ by as much
    (torch's default init started them about 90x smaller, docs/text.md)."""
    torch.manual_seed(0)
    m = dataclasses.replace(text_model(256), base_channels=32)
    net = UNet(m)
    c = torch.nn.functional.normalize(torch.randn(4000, 256), dim=1)
    with torch.no_grad():
        e = net.condition_embedding(c)
    assert e.shape == (4000, 128)
    assert 0.85 < e.std(dim=0).mean().item() < 1.15  # caption to caption, per component
    assert e.mean(dim=0).abs().mean().item() < 0.6  # no shared offset (zero biases)
    label_rows = UNet(dataclasses.replace(m, condition="class", text_encoder="", text_dim=0,
                                          text_encoder_sha256="")).label_emb.weight  # fmt: skip
    assert 0.85 < label_rows.std().item() < 1.15
    # the meta device (checkpoint.check_network_size) builds it without values
    with torch.device("meta"):
        assert UNet(m).text_mlp[0].weight.is_meta


def test_text_dropout_zeroes_the_rows_class_dropout_would_drop():
    y = torch.arange(200) % 10
    e = torch.nn.functional.normalize(torch.randn(200, 4), dim=1)
    dropped_y = drop_labels(y, 0.3, 10, torch.Generator().manual_seed(1))
    dropped_e = drop_labels(e, 0.3, 10, torch.Generator().manual_seed(1))
    mask = dropped_y == 10
    assert 30 < int(mask.sum()) < 90
    assert torch.equal((dropped_e == 0).all(dim=1), mask)
    assert torch.equal(dropped_e[~mask], e[~mask])


def test_text_config_is_validated_and_round_trips():
    m = text_model()
    cfg = dataclasses.replace(RunConfig(), model=m)
    back = RunConfig.from_dict(cfg.to_dict())
    assert back.model == m
    with pytest.raises(ConfigError, match="`text_dim`"):
        dataclasses.replace(m, text_dim=0).validate()
    with pytest.raises(ConfigError, match="`condition`"):
        dataclasses.replace(m, condition="audio").validate()
    with pytest.raises(ConfigError, match="`condition` text only"):
        ModelConfig(text_dim=4).validate()
    resolved = resolve_config({"model.condition": "text"}).config.model
    assert resolved.text_dim == ENCODERS[resolved.text_encoder].dim == encoder_fields()["text_dim"]
    # a new text model reads 16 tokens unless told otherwise; a resumed one keeps its own
    assert resolved.text_tokens == TEXT_TOKENS == 16
    pooled = {"model.condition": "text", "model.text_tokens": 0}
    assert resolve_config(pooled).config.model.text_tokens == 0
    old = dataclasses.replace(RunConfig(), model=dataclasses.replace(resolved, text_tokens=0))
    assert resolve_config({}, resumed=old).config.model.text_tokens == 0
    assert RunConfig.from_dict(old.to_dict()).model.text_tokens == 0


# --- guidance: the negative prompt is the reference, one forward pass per step


def test_negative_prompt_is_the_reference_in_one_forward_pass_per_step():
    calls, refs = [], []
    target = torch.full((2, 1, 8, 8), 0.5)

    def net(x, t, c):
        calls.append(x.shape[0])
        refs.append(c[x.shape[0] // 2 :].clone())
        # eps depends on the condition's first component: guidance must move along it
        return torch.zeros_like(x) + c[:, :1, None, None]

    y = torch.nn.functional.normalize(torch.ones(2, 4), dim=1)
    neg = torch.tensor([0.0, 1.0, 0.0, 0.0])
    schedule = make_schedule("cosine", 1000)
    denoise = guided_denoiser(
        net, y, schedule, null_label=3, guidance=Guidance(scale=3.0, negative_condition=neg)
    )
    run_sampler("ddim", denoise, target.clone(), schedule, 7)
    assert calls == [4] * 7  # one batched forward of [cond; reference] per step
    assert all(torch.equal(r, neg.expand(2, 4)) for r in refs)
    calls.clear(), refs.clear()
    denoise = guided_denoiser(net, y, schedule, null_label=3, scale=3.0)
    run_sampler("ddim", denoise, target.clone(), schedule, 5)
    assert calls == [4] * 5 and all(torch.equal(r, torch.zeros(2, 4)) for r in refs)
    with pytest.raises(ConfigError, match="`negative_prompt`"):
        guided_denoiser(net, y, schedule, null_label=3, guidance=Guidance(negative_class=1))
    with pytest.raises(ConfigError, match="`negative_class`"):
        guided_denoiser(
            net, torch.tensor([0, 1]), schedule, null_label=3,
            guidance=Guidance(negative_condition=neg),
        )  # fmt: skip


# --- attributes measured on hand-made images


def _canvas() -> torch.Tensor:
    return torch.zeros(1, 1, 28, 28, dtype=torch.uint8)


def test_thickness_is_the_stroke_width_of_a_bar():
    for w in (1, 2, 3, 5):
        img = _canvas()
        img[0, 0, 4:24, 10 : 10 + w] = 255  # a vertical bar, 20 long, w wide
        thick = float(measure_attributes(img)["thickness"][0])
        assert thick == pytest.approx(2 * 20 * w / (2 * 20 + 2 * w))
    grey = _canvas()
    grey[0, 0, 4:24, 10:13] = 127  # below the ink threshold: no ink at all
    a = measure_attributes(grey)
    assert float(a["thickness"][0]) == 0 and float(a["width"][0]) == 0


def test_slant_is_the_shear_of_the_ink_and_width_its_columns():
    upright = _canvas()
    upright[0, 0, 4:24, 12:15] = 200
    a = measure_attributes(upright)
    assert float(a["slant"][0]) == pytest.approx(0, abs=1e-6)
    assert float(a["width"][0]) == 3
    for k in (0.5, -0.25):
        img = _canvas()
        for r in range(4, 24):
            y = 27 - r  # rows count down, y counts up
            img[0, 0, r, round(13 + k * (y - 13))] = 255
        assert float(measure_attributes(img)["slant"][0]) == pytest.approx(k, abs=0.03)
    leaning = _canvas()
    for r in range(4, 24):
        leaning[0, 0, r, 20 - (24 - r) // 2 : 22 - (24 - r) // 2] = 255  # top to the left
    assert float(measure_attributes(leaning)["slant"][0]) < -0.3
    with pytest.raises(DataError, match="uint8"):
        measure_attributes(upright.float())


# --- captions


def test_captions_from_label_and_attributes_with_held_out_phrasings():
    digits = [str(i) for i in range(10)]
    assert phrase("a {thick}, {slant} {word}", 7, digits, 2, 2) == "a thick, slanted seven"
    assert phrase("the digit {word} written {thick} and {slant}", 7, digits, 0, 1) == (
        "the digit seven written thin and upright"
    )
    cs = caption_set(digits, {"thickness": (1.0, 2.0), "slant": (-0.1, 0.1)})
    train = {cs.captions[int(i)] for i in cs.rows.flatten()}
    held = {cs.captions[int(i)] for i in cs.held_out_rows.flatten()}
    assert {"7", "seven", "a thick, slanted seven"} <= train
    assert not train & held and len(held) == 10 * 9 * len(HELD_OUT_TEMPLATES)
    assert "a handwritten seven that is thick and slanted" in held
    assert len(cs.captions) == len(set(cs.captions)) == len(train) + len(held)
    # the group of an image: its label and its measured levels
    img = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    img[0, 0, 4:24, 10:16] = 255  # thick, upright
    img[1, 0, 4:24, 10:11] = 255  # thin, upright
    groups = image_groups(img, torch.tensor([7, 1]), cs)  # edges: thickness 1, 2; slant +-0.1
    assert groups.tolist() == [7 * 9 + 2 * 3 + 1, 1 * 9 + 0 * 3 + 1]
    # cut at the data's own terciles: thicknesses 4.6 and 0.95, slants both 0 (edges 0, 0)
    own, groups = dataset_captions(img, torch.tensor([7, 1]), digits)
    assert own.edges["slant"] == (0, 0) and groups.tolist() == [7 * 9 + 2 * 3 + 2, 9 + 0 + 2]
    fashion = caption_set(["T-shirt/top", "Sneaker", "Ankle boot"], {})
    assert "a Sneaker" in fashion.captions and "an image of a Sneaker" in {
        fashion.captions[int(i)] for i in fashion.held_out_rows.flatten()
    }
    assert {"an Ankle boot", "a photo of an Ankle boot"} <= set(fashion.captions)
    assert "a Ankle boot" not in fashion.captions


def test_training_draws_only_training_phrasings_of_the_image_group():
    cs = caption_set([str(i) for i in range(10)], {"thickness": (1, 2), "slant": (0, 1)})
    table = torch.eye(len(cs.captions))
    tc = TextConditions(cs.captions, table, {}, cs, cs.to_record())
    groups = torch.tensor([7 * 9 + 8] * 500)
    rows = tc.training_condition(groups, torch.Generator().manual_seed(0)).argmax(dim=1)
    assert set(rows.tolist()) == set(cs.rows[7 * 9 + 8].tolist())
    # a token model's captions (here one token each, of 3 slots) get filler words after them
    k = len(cs.captions)
    tokens = torch.cat([torch.eye(k + 1)[:k, None], torch.zeros(k, 2, k + 1)], 1)
    filler = torch.zeros(1, 3, k + 1)
    filler[0, 0, k] = 1.0
    tc = TextConditions(cs.captions, tokens.reshape(k, -1), {}, cs, None, 1.0, filler)
    c = tc.training_condition(groups, torch.Generator().manual_seed(0)).reshape(500, 3, k + 1)
    assert set(c[:, 0].argmax(1).tolist()) == set(cs.rows[7 * 9 + 8].tolist())
    assert (c[:, 1:, k].sum(1) >= 1).all() and not c[:, 1:, :k].any()


def test_caption_table_round_trip_and_prompts_without_encoder(tmp_path, monkeypatch):
    m = text_model(dim=3)
    rec = {"name": m.text_encoder, "sha256": m.text_encoder_sha256, "dim": 3}
    table = torch.nn.functional.normalize(torch.randn(2, 3), dim=1)
    TextConditions(("seven", "a thick seven"), table, rec).save(tmp_path / "c.safetensors")
    back = TextConditions.load(tmp_path / "c.safetensors")
    assert back.captions == ("seven", "a thick seven") and torch.equal(back.table, table)

    def no_encoder(name):
        raise AssertionError("the encoder was loaded for captions the table holds")

    monkeypatch.setattr("cfgdiff.text.embedding.load_encoder", no_encoder)
    e = embed_prompts(["a thick seven", "", "seven"], m, back)
    assert torch.equal(e[0], table[1]) and torch.equal(e[2], table[0]) and not e[1].any()
    (tmp_path / "bad.safetensors").write_bytes(b"not a table")
    with pytest.raises(CheckpointError, match="not a caption table"):
        TextConditions.load(tmp_path / "bad.safetensors")
    with pytest.raises(ConfigError, match="text models"):
        embed_prompts(["seven"], ModelConfig(**SMALL))


# --- a folder's captions file: per class and per image, several phrasings, every refusal

FOLDER_CAPTION_LINES = (
    "\ufeff# a comment, then a blank line; CRLF line ends are read too\n\n"
    "class0\ta bar on the left\r\n"
    "class0\tleft bar\n"
    "class1\t  a bar in the middle  \n"
    "class2/1.png\tthe last bar\n"
    "class2/1.png\tlast\n"
    "class0\tleft bar\n"  # a duplicate counts once
)


def _folder_with_captions(root, text):
    from conftest import image_folder

    from cfgdiff.data import load_dataset

    folder = image_folder(root / "folder", 2)  # class0..2 x 0.png, 1.png
    (folder / FOLDER_CAPTIONS).write_text(text, encoding="utf-8")
    return folder, load_dataset(f"folder:{folder}", root / "data")


def test_folder_captions_per_class_and_per_image(tmp_path):
    folder, data = _folder_with_captions(tmp_path, FOLDER_CAPTION_LINES)
    cs, groups = dataset_captions(data.images, data.labels, data.class_names, folder)
    assert cs.from_file and cs.num_classes == 3 and not cs.with_attributes
    # groups 0..2 the classes (class2 has no line: its name and paraphrases), 3 the image
    # class2/1.png, which has lines of its own
    assert groups.tolist() == [0, 0, 1, 1, 2, 3]
    assert cs.counts.tolist() == [2, 1, 3, 2]

    def phrasings(g):
        return [cs.captions[int(r)] for r in cs.rows[g, : int(cs.counts[g])]]

    assert phrasings(0) == ["a bar on the left", "left bar"]
    assert phrasings(1) == ["a bar in the middle"]
    assert phrasings(2) == ["class2", "a class2", "a photo of a class2"]
    assert phrasings(3) == ["the last bar", "last"]
    assert len(cs.captions) == len(set(cs.captions)) == 8
    assert cs.held_out_rows.shape == (4, 0)  # nothing held out of a captions file
    assert [cs.captions[int(r)] for r in cs.class_rows()] == [
        "a bar on the left", "a bar in the middle", "class2",
    ]  # fmt: skip
    record = cs.to_record()
    assert record["source"] == "file" and record["file"] == str(folder / FOLDER_CAPTIONS)
    # training draws every phrasing of an image's group, and only those
    tc = TextConditions(cs.captions, torch.eye(len(cs.captions)), {}, cs, record)
    for g, n in ((0, 2), (1, 1), (2, 3), (3, 2)):
        drawn = tc.training_condition(torch.full((300,), g), torch.Generator().manual_seed(g))
        rows = drawn.argmax(dim=1)
        assert set(rows.tolist()) == set(cs.rows[g, :n].tolist())
        counts = torch.bincount(rows)[cs.rows[g, :n]].float()  # each about 300 / n: uniform
        assert (counts - 300 / n).abs().max() < 0.25 * 300 / n
    assert torch.equal(tc.class_condition(torch.tensor([1, 0])), torch.eye(8)[[2, 0]])
    # eval and sweep refuse such a run: nothing is held out and there are no levels
    from cfgdiff.metrics.adherence import held_out_prompts

    with pytest.raises(ConfigError, match="came from the captions file .*captions.txt"):
        held_out_prompts(tc, data.class_names)
    # without the file: the class names and paraphrases, one phrasing held out
    (folder / FOLDER_CAPTIONS).unlink()
    cs, groups = dataset_captions(data.images, data.labels, data.class_names, folder)
    assert not cs.from_file and groups.tolist() == [0, 0, 9, 9, 18, 18]
    assert cs.captions[int(cs.held_out_rows[9, 0])] == "an image of a class1"


def test_captions_carried_by_each_image_are_groups_of_their_own():
    """Data with a caption per image (tar shards' .txt): a captioned image is a group of its
    own with that one phrasing; the others train on their class's name and paraphrases; the
    record says where they came from, and eval refuses the run as a captions file's."""
    labels = torch.tensor([0, 0, 1, 1, 2])
    images = torch.zeros(5, 3, 8, 8, dtype=torch.uint8)
    caps = ["a red bar", None, "a red bar", "blue", None]
    cs, groups = dataset_captions(images, labels, ["r", "b", "g"], None, (caps, "shards:/s"))
    assert groups.tolist() == [3, 0, 4, 5, 2] and cs.counts.tolist()[3:] == [1, 1, 1]
    assert [cs.captions[int(cs.rows[g, 0])] for g in (3, 4)] == ["a red bar", "a red bar"]
    assert cs.captions[int(cs.rows[2, 0])] == "g"  # an uncaptioned image's class name
    record = cs.to_record()
    assert record["source"] == "file" and record["file"] == "shards:/s (each image's caption)"
    tc = TextConditions(cs.captions, torch.eye(len(cs.captions)), {}, cs, record)
    from cfgdiff.metrics.adherence import held_out_prompts

    with pytest.raises(ConfigError, match=r"came from the captions file shards:/s \(each"):
        held_out_prompts(tc, ["r", "b", "g"])
    with pytest.raises(DataError, match="shards:/s: no image has a caption"):
        dataset_captions(images, labels, ["r", "b", "g"], None, ([None] * 5, "shards:/s"))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"class0\tok\nclass1 a bar\n", r"captions.txt:2: no tab in 'class1 a bar'; a line is"),
        (
            b"# c\nclassX\ta bar\n",
            r"captions.txt:2: 'classX' is not a class folder of .*"
            r"\(classes: 'class0', 'class1', 'class2'; an image is CLASS/FILE\)",
        ),
        (b"class0/9.png\ta bar\n", r"captions.txt:1: 'class0/9.png' is not an image of "),
        (b"class0/0.png\ta\nclass2/\ta\n", r"captions.txt:2: 'class2/' is not an image of "),
        (b"class0\tok\n\nclass1\t  \n", r"captions.txt:3: empty caption for 'class1'"),
        (b"class0\tok\nclass1\tcaf\xe9\n", r"captions.txt:2: not UTF-8 text \(byte 0xe9\)"),
        (b"# only a comment\n\n", r"captions.txt: no captions; a line is KEY<TAB>caption"),
    ],
)
def test_folder_captions_file_refusals(tmp_path, content, message):
    path = tmp_path / FOLDER_CAPTIONS
    path.write_bytes(content)
    names = ["class0", "class1", "class2"]
    images = [f"{c}/{i}.png" for c in names for i in range(2)]
    with pytest.raises(ConfigError, match=message) as e:
        read_folder_captions(path, names, images)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_text_adherence_refuses_levels_on_colour_images_before_any_work(tmp_path):
    """Held-out prompts that ask for thickness and slant cannot be measured on a colour model
    (refused before a judge or a sample); those of class names can (accuracy alone)."""
    from cfgdiff.metrics.adherence import held_out_set
    from cfgdiff.metrics.evaluate import ReferenceOptions
    from cfgdiff.metrics.judging import judge_of
    from cfgdiff.sampling.conditions import Asks, Model

    digits = [str(i) for i in range(10)]
    cs = caption_set(digits, {"thickness": (1.5, 2.5), "slant": (-0.1, 0.1)})
    tc = TextConditions(cs.captions, torch.zeros(len(cs.captions), 2), {}, cs, cs.to_record())
    model = dataclasses.replace(text_model(), in_channels=3, num_classes=10)
    cfg = dataclasses.replace(RunConfig(), model=model)
    text = Model(None, cfg, tmp_path, captions=tc)
    with pytest.raises(ConfigError, match="one-channel images; this model makes 3-channel"):
        judge_of(text, Asks(), 10, ReferenceOptions(), device="cpu")
    names = ["cat", "dog"]
    cs = caption_set(names, {})
    tc = TextConditions(cs.captions, torch.zeros(len(cs.captions), 2), {}, cs, cs.to_record())
    assert not held_out_set(tc, names).levels  # class names: no levels, nothing to refuse


def test_folder_captions_file_is_read_when_the_folder_has_one(tmp_path):
    folder, data = _folder_with_captions(tmp_path, "class3\ta bar\n")
    with pytest.raises(ConfigError, match=r"captions.txt:1: 'class3' is not a class folder"):
        dataset_captions(data.images, data.labels, data.class_names, folder)
    # the images given must be the folder's, in its order: a caption per image depends on it
    with pytest.raises(DataError, match=r"the 5 images given are not the 6 its class folders"):
        dataset_captions(data.images[1:], data.labels[1:], data.class_names, folder)


# --- the encoder: offline, checked, refused when it is another


@needs_encoder
def test_encoder_checksum_refusal(tmp_path):
    from cfgdiff.text.encoder import package_file

    spec = ENCODERS["wordllama-l2-256"]
    for rel in (spec.weights, spec.tokenizer):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(package_file(spec.package, rel), tmp_path / rel)
    enc = load_encoder(root=tmp_path)
    z = enc.encode(["a thick, slanted seven", "a thin, upright one"])
    assert z.shape == (2, spec.dim) and torch.allclose(z.norm(dim=1), torch.ones(2))
    with open(tmp_path / spec.weights, "r+b") as f:  # one flipped byte in the weights
        f.seek(5000)
        b = f.read(1)
        f.seek(5000)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(DataError, match="SHA-256"):
        load_encoder(root=tmp_path)


@needs_encoder
def test_model_refuses_another_encoder():
    enc = load_encoder()
    model = ModelConfig(**SMALL, condition="text", **encoder_fields())
    check_encoder(model, enc)
    other = dataclasses.replace(model, text_encoder_sha256="1" * 64)
    with pytest.raises(CheckpointError, match="trained with text encoder"):
        check_encoder(other, enc)
    with pytest.raises(CheckpointError, match="trained with text encoder"):
        embed_prompts(["a new prompt"], other)


# --- cross-attention to tokens


def token_model(n: int = 4, dim: int = 6) -> ModelConfig:
    return dataclasses.replace(text_model(dim), text_tokens=n)


def test_token_model_reads_tokens_by_cross_attention_and_pools_them_for_film():
    torch.manual_seed(0)
    net = UNet(token_model())
    keys = net.state_dict().keys()
    assert "null_token" in keys and any(".kv.weight" in k for k in keys)
    assert sum(isinstance(m, CrossAttention) for m in net.modules()) == 4  # 3 blocks + mid
    for p in net.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    x, t = torch.randn(1, 1, 8, 8).expand(4, -1, -1, -1), torch.tensor([50] * 4)
    a, b = torch.randn(6), torch.randn(6)
    c = torch.zeros(4, 4, 6)
    c[0, :2] = torch.stack([a, b])  # "a b"
    c[1, 1], c[1, 3] = b, a  # the same tokens, padding between: padding is not read
    c[2, :2] = (a + b) / 2  # the same pooled embedding, other tokens
    out = net(x, t, c.reshape(4, 24))
    assert torch.allclose(out[0], out[1], atol=1e-5)
    assert not torch.allclose(out[0], out[2], atol=1e-3)  # the tokens matter, not only the sum
    # the pooled embedding is the normalised sum: FiLM sees "a b" as the encoder's pooling
    pooled = net.condition_embedding(c.reshape(4, 24))
    assert torch.allclose(pooled[0], net.text_mlp(torch.nn.functional.normalize(a + b, dim=0)))
    # row 3 is the null caption: the learned null vector and the one learned null token
    tokens, mask = net.context(c.reshape(4, 24))
    assert mask[3].tolist() == [True, False, False, False] and mask[0].tolist() == [1, 1, 0, 0]
    assert torch.equal(tokens[3, 0], net.null_token.detach())
    assert torch.allclose(pooled[3], net.text_mlp(net.null_text), atol=1e-6)
    with torch.no_grad():
        net.null_token.add_(torch.randn(6))  # (not a constant shift: LayerNorm removes those)
    moved = net(x, t, c.reshape(4, 24))
    assert not torch.allclose(moved[3], out[3]) and torch.equal(moved[:3], out[:3])


def test_filler_words_follow_the_caption_whole_and_leave_the_null_alone():
    from cfgdiff.text.embedding import MAX_FILLER, add_filler_words

    n, dim = 6, 2
    filler = torch.zeros(3, n, dim)
    filler[0, 0] = torch.tensor([1.0, 1])  # a one-token word
    filler[1, :2] = torch.tensor([[2.0, 2], [3, 3]])  # two tokens
    filler[2, 0] = torch.tensor([4.0, 4])
    caption = torch.zeros(n, dim)
    caption[:2] = torch.tensor([[-1.0, 0], [-2, 0]])
    long = torch.zeros(n, dim)
    long[:5] = -torch.ones(5, dim)  # room for one token
    gap = torch.zeros(n, dim)
    gap[0], gap[2] = -1, -2  # padding between tokens: filler goes after the last one
    c = torch.stack([caption] * 300 + [long] * 300 + [gap] * 300 + [torch.zeros(n, dim)] * 10)
    gen = torch.Generator().manual_seed(0)
    out = add_filler_words(c.reshape(len(c), -1), filler, 1.0, gen).reshape(c.shape)
    words = {(1.0,), (2.0, 3.0), (4.0,)}
    for first, ends in ((0, 2), (300, 5), (600, 3)):
        row = out[first : first + 300]
        assert torch.equal(row[:, :ends], c[first : first + 300, :ends])  # the caption is kept
        for r in row:
            tail = [float(v) for v in r[ends:, 0] if v != 0]
            # the first word always fits after 2 or 3 tokens; after 5 only a 1-token one does
            assert (ends == 5 or len(tail) >= 1) and len(tail) <= n - ends
            assert all(v > 0 for v in tail) and torch.equal(r[ends:, 0], r[ends:, 1])
            i, seen = 0, 0  # the tail is whole words laid end to end
            while i < len(tail):
                w = next(w for w in words if tuple(tail[i : i + len(w)]) == w)
                i, seen = i + len(w), seen + 1
            assert seen <= MAX_FILLER
    assert {float(r[5, 0]) for r in out[300:600]} == {0.0, 1.0, 4.0}
    assert not out[900:].any()  # the null condition stays the null
    counts = [sum(float(v) != 0 for v in r[2:, 0]) for r in out[:300]]
    assert {1, 2, 3, 4, 5, 6} >= set(counts) and len(set(counts)) >= 4
    # p is the share of captions that get any; the generator advances the same for any p
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    half = add_filler_words(c[:300].reshape(300, -1), filler, 0.5, g1).reshape(300, n, dim)
    share = half[:, 2:].ne(0).any(2).any(1).float().mean()
    assert 0.4 < share < 0.6
    none = add_filler_words(c[:300].reshape(300, -1), filler, 0.0, g2)
    assert torch.equal(none, c[:300].reshape(300, -1))
    assert torch.equal(g1.get_state(), g2.get_state())


def test_split_training_loss_of_text_conditions_is_the_whole_batch_loss():
    """diffusion.training_loss over parts of a global batch of text conditions (as torchrun
    runs it) averages to the one-process loss: the conditions keep their shape."""
    from cfgdiff.diffusion import training_loss

    net = UNet(text_model()).eval()
    d = RunConfig().diffusion
    schedule = make_schedule(d.schedule, d.timesteps)
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    c = torch.randn(8, 6)

    def loss(xs, cs, rows=None):
        return training_loss(net, xs, cs, schedule, d, 3, torch.Generator().manual_seed(4), rows)

    whole = loss(x, c)
    halves = [loss(x[r * 4 : r * 4 + 4], c[r * 4 : r * 4 + 4], (r * 4, 8)) for r in (0, 1)]
    assert torch.allclose((halves[0] + halves[1]) / 2, whole, atol=1e-6)


def test_split_caption_draws_are_the_whole_batch_draws(tmp_path):
    """Processes that each hold part of a global batch draw its captions and filler words for
    the whole batch and keep their rows: their parts put together are what one process draws
    (generated captions, and a captions file's groups with phrasings of their own number)."""
    digits = [str(i) for i in range(10)]
    cs = caption_set(digits, {"thickness": (1.5, 2.5), "slant": (-0.1, 0.1)})
    n, dim = 4, 3
    table = torch.randn(len(cs.captions), n, dim)
    table[:, 2:] = 0  # two tokens a caption, room for filler
    filler = torch.zeros(5, n, dim)
    filler[:, 0] = torch.randn(5, dim)
    folder, data = _folder_with_captions(tmp_path, FOLDER_CAPTION_LINES)
    fcs, fgroups = dataset_captions(data.images, data.labels, data.class_names, folder)
    ftable = torch.randn(len(fcs.captions), n * dim)
    for tc, groups in (
        (TextConditions(cs.captions, table.reshape(len(table), -1), {}, cs, None, 0.7, filler),
         torch.randint(90, (12,), generator=torch.Generator().manual_seed(3))),
        (TextConditions(fcs.captions, ftable, {}, fcs, None), fgroups.repeat(2)),
    ):  # fmt: skip
        whole = tc.training_condition(groups, torch.Generator().manual_seed(9))
        assert torch.equal(
            whole, tc.training_condition(groups, torch.Generator().manual_seed(9), (0, 12))
        )
        for size in (2, 3, 4):
            b = 12 // size
            parts = [
                tc.training_condition(
                    groups[r * b : (r + 1) * b], torch.Generator().manual_seed(9), (r * b, 12)
                )
                for r in range(size)
            ]
            assert torch.equal(torch.cat(parts), whole), size


def test_filler_words_are_no_held_out_word_and_carry_no_class_or_level():
    from cfgdiff.text.captions import (
        DIGIT_WORDS,
        FILLER_WORDS,
        LEVEL_WORDS,
        NAME_HELD_OUT,
        NAME_TEMPLATES,
        TRAIN_TEMPLATES,
    )

    held_out = {w.strip(",") for t in (*HELD_OUT_TEMPLATES, *NAME_HELD_OUT) for w in t.split()}
    trained = {w.strip(",") for t in (*TRAIN_TEMPLATES, *NAME_TEMPLATES) for w in t.split()}
    meaning = set(DIGIT_WORDS) | {w for v in LEVEL_WORDS.values() for w in v} | {"digit", "photo"}
    assert len(set(FILLER_WORDS)) == len(FILLER_WORDS) >= 40
    assert (held_out - trained).isdisjoint(FILLER_WORDS) and meaning.isdisjoint(FILLER_WORDS)
    assert not any(c.isdigit() for w in FILLER_WORDS for c in w)
    if encoder_available():  # ... nor a token of a held-out phrasing (so none is taught)
        enc = load_encoder()
        cs = caption_set([str(i) for i in range(10)], {"thickness": (1, 2), "slant": (0, 1)})

        def tokens(captions):
            return {int(t) for ids in enc._ids(list(captions)) for t in ids}

        unseen = tokens(cs.captions[int(i)] for i in cs.held_out_rows.flatten())
        unseen -= tokens(cs.captions[int(i)] for i in cs.rows.flatten())
        assert len(unseen) >= 5 and unseen.isdisjoint(tokens(FILLER_WORDS))


def test_filler_words_are_a_token_model_default_and_refused_elsewhere():
    from cfgdiff.presets import FILLER_WORDS

    text = {"model.condition": "text"}
    assert resolve_config(text).config.diffusion.filler_words == FILLER_WORDS == 0.5
    pooled = resolve_config({**text, "model.text_tokens": 0}).config
    assert pooled.diffusion.filler_words == 0.0
    assert resolve_config({}).config.diffusion.filler_words == 0.0
    own = resolve_config({**text, "diffusion.filler_words": 0.2}).config
    assert own.diffusion.filler_words == 0.2
    own.validate()
    resumed = dataclasses.replace(own, diffusion=dataclasses.replace(own.diffusion, filler_words=0))
    assert resolve_config({}, resumed=resumed).config.diffusion.filler_words == 0.0
    d = own.to_dict()
    del d["diffusion"]["filler_words"]  # a run from before filler words
    assert RunConfig.from_dict(d).diffusion.filler_words == 0.0
    for bad, message in (
        (pooled, "are for text models that read tokens"),
        (RunConfig(), "are for text models that read tokens"),
    ):
        with pytest.raises(ConfigError, match=message):
            dataclasses.replace(
                bad, diffusion=dataclasses.replace(bad.diffusion, filler_words=0.5)
            ).validate()
    with pytest.raises(ConfigError, match=r"`filler_words` must be in \[0, 1\], got 1.5"):
        dataclasses.replace(own.diffusion, filler_words=1.5).validate()


def test_token_model_config_is_validated():
    with pytest.raises(ConfigError, match="`text_tokens` must be in"):
        token_model(n=-1).validate()
    with pytest.raises(ConfigError, match="`attn_levels` is empty"):
        dataclasses.replace(token_model(), attn_levels=()).validate()
    with pytest.raises(ConfigError, match="for `condition` text only"):
        ModelConfig(**SMALL, text_tokens=4).validate()
    assert token_model(n=4, dim=6).cond_dim == 24 and text_model(6).cond_dim == 6


@needs_encoder
def test_token_encoding_pools_to_the_sentence_embedding_and_refuses_long_prompts():
    enc = load_encoder()
    model = ModelConfig(**SMALL, condition="text", text_tokens=8, **encoder_fields())
    captions = ["a thick, slanted seven", "seven"]
    z = embed_prompts([*captions, ""], model)
    assert z.shape == (3, 8 * enc.dim) and not z[2].any()
    tokens = z.reshape(3, 8, enc.dim)
    assert tokens[0, :6].ne(0).any(1).all() and not tokens[0, 6:].any()  # 6 tokens, padding
    pooled = torch.nn.functional.normalize(tokens[:2].sum(1), dim=1)
    assert torch.allclose(pooled, enc.encode(captions), atol=1e-6)
    with pytest.raises(ConfigError, match="has 12 tokens; this model reads at most 8"):
        embed_prompts(["the digit seven written thin and upright, slanted"], model)


# --- measurement


def test_spearman_against_closed_forms():
    from cfgdiff.metrics.adherence import spearman

    a = torch.tensor([0.0, 1, 2, 3, 4])
    assert spearman(a, a**3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, torch.ones(5)) == 0.0
    # ties take their mean rank: ranks (0.5, 0.5, 2) against (0, 1, 2)
    assert spearman(torch.tensor([0.0, 0, 1]), torch.tensor([1.0, 2, 3])) == pytest.approx(
        0.8660254, abs=1e-6
    )


def test_labelled_prompts_by_class_name_or_index():
    from cfgdiff.metrics.adherence import labelled_prompts

    cfg = dataclasses.replace(
        RunConfig(), model=text_model(), class_names=("T-shirt", "Sneaker", "Bag")
    )
    lines = ["\ufeff# comment", "Sneaker\t a white sneaker ", "", "2\ta bag\twith a tab"]
    ps = labelled_prompts(lines, "f.txt", cfg)
    assert ps.prompts == ["a white sneaker", "a bag\twith a tab"] and ps.labels.tolist() == [1, 2]
    assert not ps.levels and ps.source == "the prompts of f.txt"
    with pytest.raises(ConfigError, match=r"line 1: class 'Boot' is not one of .*T-shirt, Sneaker"):
        labelled_prompts(["Boot\ta boot"], "f.txt", cfg)


def test_held_out_prompts_cover_every_group_in_unseen_phrasings():
    from cfgdiff.metrics.adherence import held_out_prompts

    digits = [str(i) for i in range(10)]
    cs = caption_set(digits, {"thickness": (1.5, 2.5), "slant": (-0.1, 0.1)})
    tc = TextConditions(cs.captions, torch.zeros(len(cs.captions), 2), {}, cs, cs.to_record())
    prompts, labels, thick, slant = held_out_prompts(tc, digits)
    assert len(prompts) == 90 and set(prompts).isdisjoint(
        cs.captions[int(i)] for i in cs.rows.flatten()
    )
    g = 7 * 9 + 2 * 3 + 2
    assert (labels[g], thick[g], slant[g]) == (7, 2, 2)
    assert prompts[g] == "number 7, thick strokes, slanted"  # g is odd: the second phrasing
    assert prompts[g - 1] == "a handwritten seven that is thick and upright"


def test_held_out_prompts_of_class_names_ask_for_no_levels():
    from cfgdiff.metrics.adherence import held_out_set

    names = ["T-shirt/top", "Trouser", "Ankle boot"]
    cs = caption_set(names, {})
    tc = TextConditions(cs.captions, torch.zeros(len(cs.captions), 2), {}, cs, cs.to_record())
    ps = held_out_set(tc, names)
    assert ps.prompts == [
        "an image of a T-shirt/top", "an image of a Trouser", "an image of an Ankle boot"
    ]  # fmt: skip
    assert ps.labels.tolist() == [0, 1, 2] and not ps.levels and ps.slant is None


# --- through the CLI: train a text model, sample prompts with a negative prompt, measure it


@needs_encoder
def test_cli_trains_and_samples_a_text_model(idx_dir, tmp_path, capsys):
    import json

    from conftest import one_line

    from cfgdiff.cli import main

    run = tmp_path / "run"
    argv = ["train", "--condition", "text", "--preset", "tiny", "--dataset", "mnist"]
    argv += ["--data-dir", idx_dir, "--image-size", "8", "--steps", "3", "--out", run]
    assert main([str(a) for a in [*argv, "--no-progress", "--sample-every", "0"]]) == 0
    cfg = json.loads((run / "checkpoints" / "step-0000003" / "config.json").read_text())
    assert cfg["model"]["condition"] == "text" and cfg["model"]["text_dim"] == 256
    assert cfg["model"]["text_encoder_sha256"] == ENCODERS["wordllama-l2-256"].sha256
    assert cfg["model"]["text_tokens"] == 16  # a new text model reads tokens
    assert cfg["diffusion"]["filler_words"] == 0.5  # ... with filler words in its captions
    bad = [*argv[:-1], tmp_path / "bad", "--text-tokens", "0", "--filler-words", "0.3"]
    assert main([str(a) for a in bad]) == 2
    assert "--filler-words 0.3: filler words are for text models that read tokens" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "bad").exists()
    table = TextConditions.load(run / "captions.safetensors")
    assert "a thick, slanted seven" in table.captions and table.table.shape[1] == 16 * 256
    capsys.readouterr()
    out = tmp_path / "s.npz"
    argv = ["sample", "--checkpoint", run, "--prompt", "a thick seven", "--prompt", "one"]
    argv += ["--negative-prompt", "slanted", "--scale", "3", "--steps", "2", "--per-class", "2"]
    assert main([str(a) for a in [*argv, "--out", out]]) == 0
    import numpy as np

    saved = np.load(out)
    assert saved["images"].shape == (4, 1, 8, 8)
    record = json.loads(str(saved["settings"]))
    assert record["negative_prompt"] == "slanted" and record["prompts"] == ["a thick seven", "one"]
    assert list(saved["class_names"]) == ["a thick seven", "one"]
    argv = ["sample", "--checkpoint", run, "--classes", "1", "--scale", "3", "--out", out]
    assert "--prompt" in one_line(
        main([str(a) for a in argv]), capsys.readouterr().err.splitlines()
    )
    # a denoising animation of prompts: a row per prompt; its images are --out's at --scale
    gif, png, again = tmp_path / "a.gif", tmp_path / "a.png", tmp_path / "again.png"
    argv = ["sample", "--checkpoint", run, "--prompt", "a thick seven", "--prompt", "one"]
    argv += ["--negative-prompt", "slanted", "--steps", "3", "--per-class", "2"]
    assert main([str(a) for a in [*argv, "--scale", "3", "--animate", gif, "--out", png]]) == 0
    assert "rows = prompts, columns = s 3 x 2" in capsys.readouterr().out
    assert main([str(a) for a in [*argv, "--scale", "3", "--out", again]]) == 0
    assert png.read_bytes() == again.read_bytes()
    from PIL import Image

    with Image.open(gif) as im:
        assert im.n_frames == 3
    assert main([str(a) for a in [*argv, "--animate-scales", "1,3", "--animate", gif]]) == 0
    assert "columns = s 1,3 x 2" in capsys.readouterr().out
    assert main(["info", "--checkpoint", str(run)]) == 0
    assert "conditioned on text: wordllama-l2-256 (256 dims" in capsys.readouterr().out

    # eval: adherence on the 90 held-out prompts at one scale (--n 10: one round of them);
    # judged by the (synthetic) MNIST classifier at its 28x28, the 8x8 samples resized to it
    fast = ["--data-dir", idx_dir, "--steps", "2", "--precision", "fp32"]
    js = tmp_path / "e.json"
    argv = ["eval", "--checkpoint", run, "--scale", "3", "--n", "10", "--json", js, *fast]
    argv += ["--negative-prompt", "slanted"]
    assert main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    assert "90 samples (1 per held-out prompt x 90) at s=3 (w=2)" in printed
    r = json.loads(js.read_text())
    assert (r["scale"], r["w"], r["convention"]) == (3.0, 2.0, GUIDANCE_CONVENTION)
    assert (r["n"], r["n_asked"], r["per_prompt"], r["num_prompts"]) == (90, 10, 1, 90)
    assert (r["sampler"], r["steps"], r["seed"], r["dataset"]) == ("dpmpp-2m", 2, 0, "mnist")
    assert r["checkpoint"].startswith(str(run)) and r["machine"] and r["device"] == "cpu"
    assert r["negative_prompt"] == "slanted"
    _check_adherence(r)
    # FID and the rest against as many real images as the (50-image) test split has
    assert r["reference_n"] == 50 and r["features"] == "classifier"
    assert set(r["real_floor"]) == {"fid", "is", "precision", "recall"}
    assert "(FID, IS, precision, recall: the samples against 50 real" in printed

    # sweep: a row per scale in sweep.csv and sweep.json, and the plot
    out = tmp_path / "sw"
    argv = ["sweep", "--checkpoint", run, "--scales", "1,3", "--n", "100", "--out", out, *fast]
    assert main([str(a) for a in argv]) == 0
    assert "wrote" in capsys.readouterr().out
    sw = json.loads((out / "sweep.json").read_text())
    assert sw["scales"] == [1.0, 3.0] and "scale" not in sw and sw["convention"]
    assert (sw["n"], sw["per_prompt"]) == (180, 2)  # 100 rounded up to whole rounds of 90
    assert [row["scale"] for row in sw["rows"]] == [1.0, 3.0]
    for row in sw["rows"]:
        assert row["n"] == 180 and row["w"] == row["scale"] - 1
        _check_adherence(row)
    lines = (out / "sweep.csv").read_text().splitlines()
    assert lines[0] == (
        "scale,w,n,class_accuracy,thickness_spearman,slant_spearman,fid,is,precision,recall"
    )
    assert len(lines) == 3
    assert (out / "adherence_vs_scale.png").is_file() and (out / "adherence_vs_scale.svg").is_file()

    # prompts of one's own (--prompts FILE: CLASS<TAB>prompt): accuracy per prompt and in all,
    # each prompt's mean thickness and slant, no rank correlation (no level is asked for)
    pf = tmp_path / "prompts.txt"
    pf.write_text("# class, prompt\n7\ta bold seven\n\n2\tan italic two\n", encoding="utf-8")
    argv = ["eval", "--checkpoint", run, "--scale", "3", "--n", "10", "--json", js, *fast]
    assert main([str(a) for a in [*argv, "--prompts", pf]]) == 0
    printed = capsys.readouterr().out
    assert "10 samples (5 per prompt x 2) at s=3" in printed and "a bold seven" in printed
    r = json.loads(js.read_text())
    assert r["prompts"] == f"the prompts of {pf}" and r["thickness_spearman"] is None
    assert r["fid"] is None and "real_floor" not in r  # a file's prompts: not the data's mix
    assert [(p["prompt"], p["class"]) for p in r["prompt_rows"]] == [
        ("a bold seven", "7"), ("an italic two", "2"),
    ]  # fmt: skip
    assert r["class_accuracy"] == sum(p["class_accuracy"] for p in r["prompt_rows"]) / 2
    assert all(p["thickness"] >= 0 and "slant" in p for p in r["prompt_rows"])
    model_file = tmp_path / "model.safetensors"  # no caption table beside it: --prompts only
    assert main(["export", "--checkpoint", str(run), "--out", str(model_file)]) == 0
    argv = ["eval", "--checkpoint", model_file, "--scale", "3", "--n", "10", *fast]
    err = one_line(main([str(a) for a in argv]), capsys.readouterr().err.splitlines())
    assert "no captions.safetensors beside it" in err and "--prompts FILE" in err
    assert main([str(a) for a in [*argv, "--prompts", pf]]) == 0
    assert "a bold seven" in capsys.readouterr().out
    argv = ["sweep", "--checkpoint", run, "--scales", "1,3", "--n", "10", "--out", out, *fast]
    assert main([str(a) for a in [*argv, "--prompts", pf]]) == 0
    lines = (out / "sweep.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[1].startswith("1.0,0.0,10,") and lines[1].endswith(",,")
    assert len(json.loads((out / "sweep.json").read_text())["rows"][1]["prompt_rows"]) == 2
    for text, message in (
        ("7 a bold seven\n", "line 1: expected CLASS<TAB>prompt"),
        ("\n12\ta twelve\n", "line 2: class '12' is not one of the model's classes"),
        ("7\t  \n", "line 1: the prompt is empty"),
        ("# nothing\n", "no CLASS<TAB>prompt line in it"),
    ):
        pf.write_text(text, encoding="utf-8")
        argv = ["eval", "--checkpoint", run, "--scale", "3", "--prompts", pf, *fast]
        err = one_line(main([str(a) for a in argv]), capsys.readouterr().err.splitlines())
        assert err.startswith(f"cfgdiff: error: --prompts {pf}") and message in err, err
    pf.write_bytes(b"7\t\xff\n")
    argv = ["eval", "--checkpoint", run, "--scale", "3", "--prompts", pf, *fast]
    err = one_line(main([str(a) for a in argv]), capsys.readouterr().err.splitlines())
    assert f"--prompts {pf}: cannot read it" in err

    # options only a class model's evaluation reads are refused, naming the flag
    for extra, flag in (
        (["--negative-class", "1"], "--negative-class 1: only for class models"),
        (["--features", "inception"], "--features inception: only for class models"),
    ):
        argv = ["eval", "--checkpoint", run, "--scale", "3", *extra, *fast]
        err = one_line(main([str(a) for a in argv]), capsys.readouterr().err.splitlines())
        assert flag in err
    argv = ["sweep", "--checkpoint", run, "--negative-class", "1", "--out", out, *fast]
    err = one_line(main([str(a) for a in argv]), capsys.readouterr().err.splitlines())
    assert "--negative-class 1: only for class models" in err


def _check_adherence(r: dict) -> None:
    """An untrained model's figures: only their ranges; held-out prompts' samples are also
    measured against real images (FID, IS, precision, recall)."""
    assert 0 <= r["class_accuracy"] <= 1
    assert -1 <= r["thickness_spearman"] <= 1 and -1 <= r["slant_spearman"] <= 1
    assert r["fid"] > 0 and r["is"] >= 1 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1


@needs_encoder
def test_cli_trains_a_text_model_on_a_folder_with_captions_and_samples(
    tmp_path, capsys, monkeypatch
):
    import json

    import numpy as np
    from conftest import one_line

    from cfgdiff.cli import main

    folder, _ = _folder_with_captions(tmp_path, FOLDER_CAPTION_LINES)
    run = tmp_path / "run"
    argv = ["train", "--condition", "text", "--preset", "tiny", "--dataset", f"folder:{folder}"]
    argv += ["--data-dir", tmp_path / "data", "--steps", "2", "--sample-every", "0", "--out", run]
    argv += ["--text-tokens", "0"]  # the pooled embedding alone (FiLM only)
    assert main([str(a) for a in [*argv, "--no-progress", "--precision", "fp32"]]) == 0
    cfg = json.loads((run / "checkpoints" / "step-0000002" / "config.json").read_text())
    assert cfg["model"]["condition"] == "text" and cfg["dataset"] == f"folder:{folder}"
    assert cfg["model"]["text_tokens"] == 0
    table = TextConditions.load(run / "captions.safetensors")
    assert {"a bar on the left", "left bar", "the last bar", "class2"} <= set(table.captions)
    assert table.caption_record["source"] == "file" and table.table.shape == (8, 256)
    capsys.readouterr()

    # the file's captions are rows of the run's table: sampling them needs no encoder
    def no_encoder(name):
        raise AssertionError("the encoder was loaded for captions the table holds")

    monkeypatch.setattr("cfgdiff.text.embedding.load_encoder", no_encoder)
    out = tmp_path / "s.npz"
    argv = ["sample", "--checkpoint", run, "--prompt", "a bar on the left", "--prompt", "last"]
    argv += ["--scale", "3", "--steps", "2", "--per-class", "2", "--out", out]
    assert main([str(a) for a in argv]) == 0
    saved = np.load(out)
    assert saved["images"].shape == (4, 1, 8, 8)
    assert json.loads(str(saved["settings"]))["prompts"] == ["a bar on the left", "last"]

    # eval refuses it in one line, before training a judge
    argv = ["eval", "--checkpoint", run, "--scale", "3", "--n", "10", "--steps", "2"]
    err = one_line(main([str(a) for a in argv]), capsys.readouterr().err.splitlines())
    assert "came from the captions file" in err and str(folder / FOLDER_CAPTIONS) in err
    assert "--prompts FILE" in err
    # ... and measures it on prompts of one's own, judged by the folder's classifier
    pf = tmp_path / "prompts.txt"
    pf.write_text("class2\tthe last bar\nclass0\ta new bar on the left\n", encoding="utf-8")
    js = tmp_path / "f.json"
    argv += ["--prompts", pf, "--json", js, "--data-dir", tmp_path / "data"]
    monkeypatch.undo()  # the new prompt needs the encoder
    assert main([str(a) for a in argv]) == 0
    r = json.loads(js.read_text())
    assert r["dataset"] == f"folder:{folder}" and r["n"] == 10
    assert [p["class"] for p in r["prompt_rows"]] == ["class2", "class0"]

    # without the file: the class names and paraphrases; eval measures the held-out phrasing
    # of every class by accuracy alone (no level asked for, so no rank correlation)
    (folder / FOLDER_CAPTIONS).unlink()
    run2 = tmp_path / "run2"
    argv = ["train", "--condition", "text", "--preset", "tiny", "--dataset", f"folder:{folder}"]
    argv += ["--data-dir", tmp_path / "data", "--steps", "2", "--sample-every", "0", "--out", run2]
    assert main([str(a) for a in [*argv, "--no-progress", "--precision", "fp32"]]) == 0
    capsys.readouterr()
    argv = ["eval", "--checkpoint", run2, "--scale", "3", "--n", "10", "--steps", "2"]
    assert main([str(a) for a in [*argv, "--json", js, "--data-dir", tmp_path / "data"]]) == 0
    printed = capsys.readouterr().out
    assert "12 samples (4 per held-out prompt x 3)" in printed
    assert "on phrasings held out of training" in printed
    r = json.loads(js.read_text())
    assert r["levels"] is False and r["thickness_spearman"] is None
    assert r["fid"] is None and "real_floor" not in r  # 6 images: 3 to compare with, too few
    assert [p["prompt"] for p in r["prompt_rows"]] == [f"an image of a class{i}" for i in range(3)]


def test_the_caption_folder_benchmark_writes_a_folder_its_captions_and_prompts(
    tmp_path, monkeypatch, capsys
):
    """bench/caption_folder.py on (fake) Fashion-MNIST: class folders of PNGs, a captions.txt
    the folder reader accepts, and prompts whose classes are the folder's."""
    import runpy
    import sys

    from conftest import fake_digits, fashion_system_dir

    from cfgdiff.data import load_dataset

    fashion_system_dir(tmp_path / "sys", monkeypatch, fake_digits(40, 0), fake_digits(10, 1))
    bench = Path(__file__).resolve().parents[1] / "bench" / "caption_folder.py"
    argv = [str(bench), "--out", str(tmp_path / "f"), "--data-dir", str(tmp_path / "d")]
    monkeypatch.setattr(sys, "argv", [*argv, "--per-class", "2"])
    runpy.run_path(str(bench), run_name="__main__")
    assert "wrote 20 images of 10 classes" in capsys.readouterr().out
    data = load_dataset(f"folder:{tmp_path / 'f' / 'data'}", tmp_path / "d")
    assert len(data) == 20 and data.class_names[0] == "Ankle_boot"  # sorted by name
    cs, groups = dataset_captions(data.images, data.labels, data.class_names, tmp_path / "f/data")
    assert cs.from_file and "a knitted sweater" in cs.captions and groups.tolist()[:2] == [0, 0]
    prompts = (tmp_path / "f" / "prompts.txt").read_text().splitlines()
    assert len(prompts) == 12 and {p.split("\t")[0] for p in prompts} == set(data.class_names)
    assert set(p.split("\t")[1] for p in prompts[:10]).isdisjoint(cs.captions)  # all new
    with pytest.raises(SystemExit, match="exists already"):
        runpy.run_path(str(bench), run_name="__main__")


@needs_encoder
def test_a_text_model_trains_and_samples_in_bf16(idx_dir, tmp_path):
    """The precision a GPU run takes: autocast bf16 through the text MLP, the cross-attention
    and the null vector, in training and in guided sampling with a negative prompt."""
    import numpy as np

    from cfgdiff.cli import main

    run = tmp_path / "run"
    argv = ["train", "--condition", "text", "--preset", "tiny", "--dataset", "mnist"]
    argv += ["--data-dir", idx_dir, "--image-size", "8", "--steps", "2", "--out", run]
    argv += ["--precision", "bf16", "--no-progress", "--sample-every", "0"]
    assert main([str(a) for a in argv]) == 0
    out = tmp_path / "s.npz"
    argv = ["sample", "--checkpoint", run, "--prompt", "a thick seven", "--negative-prompt"]
    argv += ["thin", "--scale", "3", "--steps", "2", "--per-class", "2", "--precision", "bf16"]
    assert main([str(a) for a in [*argv, "--out", out]]) == 0
    images = np.load(out)["images"]
    assert images.shape == (2, 1, 8, 8) and images.std() > 0


@needs_encoder
def test_a_text_run_resumes_exactly(tmp_path, data):
    """2N steps straight == N steps, resume, N more: the captions and filler words drawn after
    the resume are those of the run that did not stop (loss, weights and EMA bit for bit)."""
    from conftest import tiny_config
    from safetensors.torch import load_file

    from cfgdiff.presets import encoder_fields
    from cfgdiff.train import TrainOptions, train

    def config(steps: int):
        cfg = tiny_config(steps=steps, log_every=1, checkpoint_every=4, sample_every=0)
        model = dataclasses.replace(cfg.model, condition="text", text_tokens=16, **encoder_fields())
        diffusion = dataclasses.replace(cfg.diffusion, filler_words=0.5)
        return dataclasses.replace(cfg, model=model, diffusion=diffusion, dataset="folder:x")

    train(config(8), tmp_path / "a", data, options=TrainOptions(final_strip=False))
    train(config(4), tmp_path / "b", data, options=TrainOptions(final_strip=False))
    train(
        config(8),
        tmp_path / "b",
        data,
        options=TrainOptions(resume=True, final_strip=False),
    )
    for run in ("a", "b"):
        assert (tmp_path / run / "captions.safetensors").is_file()
    import csv

    def losses(run):
        with open(tmp_path / run / "loss.csv") as f:
            return [(r["step"], r["loss"]) for r in csv.DictReader(f)]

    assert losses("a") == losses("b") and len(losses("a")) == 8
    for name in ("model", "ema"):
        a = load_file(str(tmp_path / "a" / "checkpoints" / "step-0000008" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "b" / "checkpoints" / "step-0000008" / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
