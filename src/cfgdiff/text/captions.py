"""Captions from the data: attributes measured on each image, and phrasings of label + attributes.

Owns: the measurement of stroke thickness, slant and width on uint8 images (defined below and
tested on hand-made images), their binning into three levels by the training data's terciles,
the phrasing templates (some held out of training to test generalisation), and the caption
table of a dataset: every distinct caption once, and for every (image group, template) the row
of its caption, so that training looks rows up and never runs a text encoder. It knows nothing
about encoders, networks or guidance.

Definitions (ink = pixels >= 128 of 255; x to the right, y upwards, in pixels):
- thickness: 2 * ink area / number of ink-background edges between 4-neighbours (the image
  border counts as background). A bar of width w and length L has 2 w L / (2 L + 2 w), which
  tends to w as L grows: the mean stroke width.
- slant: cov(x, y) / var(y) over the ink pixels: the horizontal shift per pixel of height of the
  shear that best explains the ink (the moment used to deskew MNIST). > 0 leans right, 0 is
  upright; a bar x = x0 + k y has slant k.
- width: the number of columns that hold ink (the bounding box's width), in pixels.

Image folders (folder:PATH) may carry their own captions: a UTF-8 file captions.txt beside the
class sub-folders, one `KEY<TAB>caption` per line, KEY a class folder's name or an image's path
under the folder (CLASS/FILE); read_folder_captions parses and checks it, and a folder's
caption set takes every caption of the file for training (none held out; docs/text.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cfgdiff.errors import ConfigError, DataError

INK = 128  # uint8 threshold of an ink pixel
ATTRIBUTES = ("thickness", "slant", "width")
# words of the three levels (low, middle, high) of the attributes captions speak of
LEVEL_WORDS = {
    "thickness": ("thin", "medium", "thick"),
    "slant": ("left-leaning", "upright", "slanted"),
}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Phrasing templates: {num} "7", {word} "seven", {thick}/{slant} level words. Label-only ones
# teach the class alone (the attributes left to the sample); the rest name both attributes.
TRAIN_TEMPLATES = (
    "{num}",
    "{word}",
    "a {thick}, {slant} {word}",
    "the digit {word} written {thick} and {slant}",
    "{slant} {thick} {num}",
)
# held out of training: phrasings the model never saw, for measuring generalisation
HELD_OUT_TEMPLATES = (
    "a handwritten {word} that is {thick} and {slant}",
    "number {num}, {thick} strokes, {slant}",
)
# Fashion-MNIST and other class-named data: the class name and paraphrases (no attributes)
# ({a}: the name's indefinite article, "an" before a vowel: "an Ankle boot", "an airplane")
NAME_TEMPLATES = ("{name}", "{a} {name}", "a photo of {a} {name}")
NAME_HELD_OUT = ("an image of {a} {name}",)

# Filler words: content-free words a cross-attention text model sees added to some training
# captions (DiffusionConfig.filler_words), so that it learns a word it has no use for changes
# nothing, as an unseen word of a new phrasing should not (docs/text.md, "Filler words"). None
# is a word only the held-out phrasings have (those stay unseen), a digit or a level (tested);
# the few function words of the training phrasings ("the", "and", "of") are among them.
FILLER_WORDS = tuple(
    """the of and to in for on with as at by from this my your his her our their its very quite
    some here there now then again also just only even really rather so too much more most well
    still yet both each every any other such same own""".split()
)

# A folder dataset's own captions: this file in the folder's root, beside its class sub-folders
FOLDER_CAPTIONS = "captions.txt"


def measure_attributes(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """{attribute: (N,) float} for uint8 images (N, 1, H, W) (or (N, H, W)); see the module
    docstring. An image without ink gets thickness 0, slant 0 and width 0."""
    if images.dtype != torch.uint8:
        raise DataError(f"`images` must be uint8, got {images.dtype}")
    x = images.reshape(images.shape[0], *images.shape[-2:])
    if images.ndim == 4 and images.shape[1] != 1:
        raise DataError(f"`images` must have one channel, got {images.shape[1]}")
    ink = (x >= INK).float()  # (N, H, W)
    n, h, w = ink.shape
    area = ink.sum(dim=(1, 2))
    pad = torch.nn.functional.pad(ink, (1, 1, 1, 1))
    edges = (pad[:, 1:, :] - pad[:, :-1, :]).abs().sum(dim=(1, 2)) + (
        pad[:, :, 1:] - pad[:, :, :-1]
    ).abs().sum(dim=(1, 2))
    thickness = torch.where(edges > 0, 2 * area / edges.clamp_min(1), torch.zeros_like(area))
    cols = torch.arange(w, dtype=torch.float32)
    rows = (h - 1 - torch.arange(h, dtype=torch.float32)).reshape(h, 1)  # y upwards
    safe = area.clamp_min(1)
    mx = (ink * cols).sum(dim=(1, 2)) / safe
    my = (ink * rows).sum(dim=(1, 2)) / safe
    dx = cols - mx.reshape(n, 1, 1)
    dy = rows - my.reshape(n, 1, 1)
    cov = (ink * dx * dy).sum(dim=(1, 2))
    var_y = (ink * dy * dy).sum(dim=(1, 2))
    slant = torch.where(var_y > 0, cov / var_y.clamp_min(1e-9), torch.zeros_like(cov))
    width = (ink.amax(dim=1) > 0).float().sum(dim=1)
    return {"thickness": thickness, "slant": slant, "width": width}


def tercile_edges(values: torch.Tensor) -> tuple[float, float]:
    """The 1/3 and 2/3 quantiles: the edges of the low, middle and high levels."""
    q = torch.quantile(values.float(), torch.tensor([1 / 3, 2 / 3]))
    return float(q[0]), float(q[1])


def levels(values: torch.Tensor, edges: tuple[float, float]) -> torch.Tensor:
    """0 (low), 1 (middle) or 2 (high) per value."""
    return (values >= edges[0]).long() + (values >= edges[1]).long()


def are_digits(class_names: Sequence[str]) -> bool:
    """Whether the classes are the ten digits, named "0".."9" (MNIST's)."""
    return len(class_names) == 10 and all(n == str(i) for i, n in enumerate(class_names))


def class_words(class_names: Sequence[str]) -> list[str]:
    """The prompt that stands for each class: a digit as a word ("seven"), else the class's
    name ("Sneaker"): what `cfgdiff sample` draws without prompts and the page offers."""
    return list(DIGIT_WORDS) if are_digits(class_names) else list(class_names)


def phrase(template: str, label: int, class_names: Sequence[str], thick: int, slant: int) -> str:
    """One caption: `template` filled with a class and the attribute levels."""
    name = class_names[label]
    word = DIGIT_WORDS[label] if len(class_names) == 10 and name == str(label) else name
    return template.format(
        num=name,
        word=word,
        name=name,
        thick=LEVEL_WORDS["thickness"][thick],
        slant=LEVEL_WORDS["slant"][slant],
    )


def name_phrase(template: str, name: str) -> str:
    """One caption of a class name: `template` filled with the name and its article."""
    return template.format(name=name, a="an" if name[:1].lower() in "aeiou" else "a")


@dataclass(frozen=True)
class CaptionSet:
    """The captions of a dataset. An image's group is (label, thickness level, slant level),
    numbered label * 9 + thick * 3 + slant (attribute-free data: the label, levels 0). From a
    folder's captions file (`origin` says so): groups 0..num_classes-1 are the classes, then
    one group per image that has captions of its own.

    captions: every distinct caption, training ones first, then the held-out ones.
    rows: (groups, len(TRAIN_TEMPLATES)) the caption row of each group in each training phrasing
      (from a file: (groups, most captions of a group), a group's first `counts` entries used).
    held_out_rows: (groups, len(held-out templates)) likewise for the held-out phrasings.
    edges: {attribute: tercile edges} the levels were cut at (empty for attribute-free data).
    counts: (groups,) how many training phrasings each group has; None when every group has
      them all (generated captions).
    origin: {} for generated captions; {"source": "file", "file", "sha256"} for a captions file.
    """

    captions: tuple[str, ...]
    rows: torch.Tensor
    held_out_rows: torch.Tensor
    templates: tuple[str, ...]
    held_out_templates: tuple[str, ...]
    edges: dict[str, tuple[float, float]]
    num_classes: int
    counts: torch.Tensor | None = None
    origin: dict = field(default_factory=dict)

    @property
    def with_attributes(self) -> bool:
        return bool(self.edges)

    @property
    def from_file(self) -> bool:
        return self.origin.get("source") == "file"

    def group(self, label: int, thick: int = 0, slant: int = 0) -> int:
        return label * 9 + thick * 3 + slant

    def class_rows(self) -> torch.Tensor:
        """(num_classes,) the caption row that stands for each class in previews: its name as a
        word ("seven", "Sneaker"; the second generated phrasing), or a captions file's first
        caption of the class (its folder name when the file has none)."""
        labels = torch.arange(self.num_classes)
        if self.from_file:
            return self.rows[labels, 0]
        return self.rows[labels * 9, 1 if len(self.templates) > 1 else 0]

    def to_record(self) -> dict:
        return {
            "captions": list(self.captions),
            "templates": list(self.templates),
            "held_out_templates": list(self.held_out_templates),
            "edges": {k: list(v) for k, v in self.edges.items()},
            "num_classes": self.num_classes,
            **self.origin,
        }


def caption_set(class_names: Sequence[str], edges: dict[str, tuple[float, float]]) -> CaptionSet:
    """The captions of every group: digits (ten classes named "0".."9") with attribute levels
    when `edges` is given, otherwise the class names and their paraphrases."""
    attributed = are_digits(class_names) and bool(edges)
    train_t = TRAIN_TEMPLATES if attributed else NAME_TEMPLATES
    held_t = HELD_OUT_TEMPLATES if attributed else NAME_HELD_OUT
    k = len(class_names)
    captions: dict[str, int] = {}

    def table(templates):
        out = torch.zeros(k * 9, len(templates), dtype=torch.long)
        for label in range(k):
            for thick in range(3):
                for slant in range(3):
                    g = label * 9 + thick * 3 + slant
                    for j, tpl in enumerate(templates):
                        if attributed:
                            text = phrase(tpl, label, class_names, thick, slant)
                        else:
                            text = name_phrase(tpl, class_names[label])
                        out[g, j] = captions.setdefault(text, len(captions))
        return out

    rows = table(train_t)
    held = table(held_t)
    return CaptionSet(
        tuple(captions), rows, held, train_t, held_t, dict(edges) if attributed else {}, k
    )


def image_groups(
    images: torch.Tensor,
    labels: torch.Tensor,
    captions: CaptionSet,
    measured: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(N,) the group of every image: its label and the levels of its measured attributes
    (`measured`: measure_attributes(images), when the caller has it)."""
    if not captions.with_attributes:
        return labels.long() * 9
    a = measure_attributes(images) if measured is None else measured
    thick = levels(a["thickness"], captions.edges["thickness"])
    slant = levels(a["slant"], captions.edges["slant"])
    return labels.long() * 9 + thick * 3 + slant


def dataset_captions(
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    folder: Path | None = None,
    image_captions: tuple[Sequence[str | None], str] | None = None,
) -> tuple[CaptionSet, torch.Tensor]:
    """The caption set of a dataset (attribute levels cut at its own terciles where it is
    digits) and the group of each image. folder: the root of a folder dataset, whose
    captions.txt, when it has one, gives the captions (folder_caption_set). image_captions:
    (each image's caption or None, the data's name) for data that carries them
    (image_caption_set)."""
    if image_captions is not None:
        return image_caption_set(labels, class_names, *image_captions)
    if folder is not None:
        path = Path(folder) / FOLDER_CAPTIONS
        if path.exists() or path.is_symlink():
            return folder_caption_set(Path(folder), labels, class_names)
    edges: dict[str, tuple[float, float]] = {}
    a = None
    if are_digits(class_names) and images.shape[1] == 1:
        a = measure_attributes(images)
        edges = {name: tercile_edges(a[name]) for name in ("thickness", "slant")}
    cs = caption_set(class_names, edges)
    return cs, image_groups(images, labels, cs, a)


# --- a folder's captions file


@dataclass(frozen=True)
class FolderCaptions:
    """A folder's captions.txt, parsed and checked: the distinct captions of each class and of
    each image (by its index in the folder's order: classes sorted, then files sorted)."""

    path: Path
    classes: dict[int, tuple[str, ...]]
    images: dict[int, tuple[str, ...]]
    sha256: str


def _listed(names: Sequence[str], most: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:most])
    return shown + (f", ... ({len(names)} in all)" if len(names) > most else "")


def read_folder_captions(
    path: Path, class_names: Sequence[str], image_paths: Sequence[str]
) -> FolderCaptions:
    """Parse captions file `path` of a folder whose class folders are `class_names` and whose
    images are `image_paths` (CLASS/FILE, "/"-separated, in the dataset's order).

    The format (docs/text.md): UTF-8 text (a byte-order mark is allowed), one `KEY<TAB>caption`
    per line, split at the first tab; KEY is a class folder's name (the caption describes every
    image of the class) or an image's path under the folder, CLASS/FILE (that image alone).
    Several lines with one KEY are several phrasings, drawn from at random in training;
    duplicates count once. The caption is stripped of surrounding spaces; blank lines and lines
    starting with # are skipped. Raises ConfigError naming the file and line for anything else:
    bytes that are not UTF-8, a line without a tab, an unknown class or image, an empty caption,
    or a file without a caption."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the captions file ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); a captions file must be "
            "saved as UTF-8"
        ) from None
    class_index = {name: k for k, name in enumerate(class_names)}
    image_index = {p: i for i, p in enumerate(image_paths)}
    classes: dict[int, dict[str, None]] = {}
    images: dict[int, dict[str, None]] = {}
    form = "a line is KEY<TAB>caption, KEY a class folder or an image path CLASS/FILE"
    for n, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip() or line.startswith("#"):
            continue
        key, tab, caption = line.partition("\t")
        if not tab:
            raise ConfigError(f"{path}:{n}: no tab in {line[:80]!r}; {form}")
        caption = caption.strip()
        if not caption:
            raise ConfigError(
                f"{path}:{n}: empty caption for {key!r}; a caption needs a non-space character"
            )
        if "/" in key:
            if key not in image_index:
                raise ConfigError(
                    f"{path}:{n}: {key!r} is not an image of {path.parent} (an image is named by "
                    f"its path CLASS/FILE under the folder, e.g. {image_paths[0]!r})"
                )
            images.setdefault(image_index[key], {})[caption] = None
        else:
            if key not in class_index:
                raise ConfigError(
                    f"{path}:{n}: {key!r} is not a class folder of {path.parent} (classes: "
                    f"{_listed(list(class_names))}; an image is CLASS/FILE)"
                )
            classes.setdefault(class_index[key], {})[caption] = None
    if not classes and not images:
        raise ConfigError(f"{path}: no captions; {form}")
    return FolderCaptions(
        path,
        {k: tuple(v) for k, v in sorted(classes.items())},
        {i: tuple(v) for i, v in sorted(images.items())},
        hashlib.sha256(raw).hexdigest(),
    )


def folder_caption_set(
    root: Path, labels: torch.Tensor, class_names: Sequence[str]
) -> tuple[CaptionSet, torch.Tensor]:
    """The caption set of a folder dataset from its captions.txt, and the group of each image
    (labels: the dataset's, in the folder's order): own_caption_set of the file's lines."""
    from cfgdiff.data.folders import list_folder

    listing = list_folder(root)
    listed = [k for _, k in listing.files]
    if listing.class_names != list(class_names) or listed != [int(k) for k in labels.tolist()]:
        raise DataError(
            f"folder dataset {root}: the {len(labels)} images given are not the {len(listed)} "
            "its class folders list now (did they change while it was read?); run again"
        )
    image_paths = [f"{p.parent.name}/{p.name}" for p, _ in listing.files]
    fc = read_folder_captions(root / FOLDER_CAPTIONS, class_names, image_paths)
    origin = {"source": "file", "file": str(fc.path), "sha256": fc.sha256}
    return own_caption_set(labels, class_names, fc.classes, fc.images, origin)


def image_caption_set(
    labels: torch.Tensor, class_names: Sequence[str], captions: Sequence[str | None], where: str
) -> tuple[CaptionSet, torch.Tensor]:
    """The caption set of data that carries a caption per image (tar shards' .txt; None where an
    image has none, which trains with its class's name and paraphrases), and the group of each
    image: own_caption_set with one phrasing per captioned image. where: the data's name, for
    the record."""
    images = {i: (c,) for i, c in enumerate(captions) if c is not None}
    if not images:
        raise DataError(f"{where}: no image has a caption")
    digest = hashlib.sha256("\0".join(c or "" for c in captions).encode()).hexdigest()
    origin = {"source": "file", "file": f"{where} (each image's caption)", "sha256": digest}
    return own_caption_set(labels, class_names, {}, images, origin)


def own_caption_set(
    labels: torch.Tensor,
    class_names: Sequence[str],
    classes: dict[int, tuple[str, ...]],
    images: dict[int, tuple[str, ...]],
    origin: dict,
) -> tuple[CaptionSet, torch.Tensor]:
    """The caption set of data with captions of its own (`classes`: class -> its phrasings;
    `images`: image index -> its own), and the group of each image. Groups 0..K-1 are the
    classes: a class's phrasings, or without any its name and paraphrases (NAME_TEMPLATES); an
    image with phrasings of its own is a group of its own. Every caption trains; none is held
    out (a single caption cannot be, and the captions are the data the model has to learn)."""
    k = len(class_names)
    phrasings = [
        classes.get(c) or tuple(name_phrase(t, class_names[c]) for t in NAME_TEMPLATES)
        for c in range(k)
    ]
    groups = labels.long().clone()
    for i, caps in images.items():
        groups[i] = len(phrasings)
        phrasings.append(caps)
    captions: dict[str, int] = {}
    width = max(len(p) for p in phrasings)
    rows = torch.zeros(len(phrasings), width, dtype=torch.long)
    for g, caps in enumerate(phrasings):
        for j in range(width):  # past a group's count: its first caption (never drawn)
            rows[g, j] = captions.setdefault(caps[j if j < len(caps) else 0], len(captions))
    counts = torch.tensor([len(p) for p in phrasings], dtype=torch.long)
    cs = CaptionSet(
        tuple(captions), rows, torch.zeros(len(phrasings), 0, dtype=torch.long), (), (), {}, k,
        counts=counts, origin=origin,
    )  # fmt: skip
    return cs, groups
