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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cfgdiff.errors import DataError

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
NAME_TEMPLATES = ("{name}", "a {name}", "a photo of a {name}")
NAME_HELD_OUT = ("an image of a {name}",)


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


@dataclass(frozen=True)
class CaptionSet:
    """The captions of a dataset. An image's group is (label, thickness level, slant level),
    numbered label * 9 + thick * 3 + slant (attribute-free data: the label, levels 0).

    captions: every distinct caption, training ones first, then the held-out ones.
    rows: (groups, len(TRAIN_TEMPLATES)) the caption row of each group in each training phrasing.
    held_out_rows: (groups, len(held-out templates)) likewise for the held-out phrasings.
    edges: {attribute: tercile edges} the levels were cut at (empty for attribute-free data).
    """

    captions: tuple[str, ...]
    rows: torch.Tensor
    held_out_rows: torch.Tensor
    templates: tuple[str, ...]
    held_out_templates: tuple[str, ...]
    edges: dict[str, tuple[float, float]]
    num_classes: int

    @property
    def with_attributes(self) -> bool:
        return bool(self.edges)

    def group(self, label: int, thick: int = 0, slant: int = 0) -> int:
        return label * 9 + thick * 3 + slant

    def to_record(self) -> dict:
        return {
            "captions": list(self.captions),
            "templates": list(self.templates),
            "held_out_templates": list(self.held_out_templates),
            "edges": {k: list(v) for k, v in self.edges.items()},
            "num_classes": self.num_classes,
        }


def caption_set(class_names: Sequence[str], edges: dict[str, tuple[float, float]]) -> CaptionSet:
    """The captions of every group: digits (ten classes named "0".."9") with attribute levels
    when `edges` is given, otherwise the class names and their paraphrases."""
    digits = len(class_names) == 10 and all(n == str(i) for i, n in enumerate(class_names))
    attributed = digits and bool(edges)
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
                            text = tpl.format(name=class_names[label])
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
    images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]
) -> tuple[CaptionSet, torch.Tensor]:
    """The caption set of a dataset (attribute levels cut at its own terciles where it is
    digits) and the group of each image."""
    edges: dict[str, tuple[float, float]] = {}
    a = None
    digits = len(class_names) == 10 and all(n == str(i) for i, n in enumerate(class_names))
    if digits and images.shape[1] == 1:
        a = measure_attributes(images)
        edges = {name: tercile_edges(a[name]) for name in ("thickness", "slant")}
    cs = caption_set(class_names, edges)
    return cs, image_groups(images, labels, cs, a)
