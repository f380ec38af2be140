"""A captioned image folder made of real images, to train and measure a text model the way a
user with labelled images of their own would: Fashion-MNIST's training images as PNGs in class
sub-folders (`--per-class` of each), a captions.txt of two captions per class beside them, and
a prompts file (CLASS<TAB>prompt) of phrasings the captions never use, for eval and sweep
(docs/text.md, "Captions of an image folder").

    python bench/caption_folder.py --out /tmp/fashfold --data-dir /tmp/cfgdata
    cfgdiff train --preset demo --condition text --dataset folder:/tmp/fashfold/data \\
        --out /tmp/fashfold/run --data-dir /tmp/fashfold/cache
    cfgdiff sweep --checkpoint /tmp/fashfold/run --prompts /tmp/fashfold/prompts.txt \\
        --scales 1,2,3,5 --n 360 --steps 20 --data-dir /tmp/fashfold/cache
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from cfgdiff.data.store import load_dataset

# folder name: the captions of captions.txt (training), then the new phrasings (prompts.txt)
CLASSES = {
    "T-shirt_top": (["a t-shirt", "a short-sleeved top"], ["a tee"]),
    "Trouser": (["a pair of trousers", "long pants"], ["some jeans"]),
    "Pullover": (["a pullover", "a knitted sweater"], ["a warm sweater"]),
    "Dress": (["a dress", "a long dress"], ["a summer dress"]),
    "Coat": (["a coat", "a winter coat with sleeves"], ["a jacket"]),
    "Sandal": (["a sandal", "an open summer shoe"], ["a flip-flop"]),
    "Shirt": (["a shirt", "a button-up shirt"], ["a dress shirt"]),
    "Sneaker": (["a sneaker", "a sports shoe"], ["a running shoe"]),
    "Bag": (["a bag", "a handbag"], ["a purse"]),
    "Ankle_boot": (["an ankle boot", "a leather boot"], ["a boot"]),
}
# and two training captions, to compare against
TRAINED = [("T-shirt_top", "a t-shirt"), ("Sneaker", "a sneaker")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--per-class", type=int, default=1000)
    a = ap.parse_args()
    root = a.out / "data"
    if root.exists():
        raise SystemExit(f"--out {a.out}: {root} exists already")
    d = load_dataset("fashion-mnist", a.data_dir)
    names = list(CLASSES)
    count = dict.fromkeys(names, 0)
    for img, label in zip(d.images, d.labels.tolist(), strict=True):
        name = names[label]
        if count[name] < a.per_class:
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[0].numpy(), mode="L").save(root / name / f"{count[name]:04d}.png")
            count[name] += 1
    lines = [f"{n}\t{c}" for n, (caps, _) in CLASSES.items() for c in caps]
    (root / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prompts = [f"{n}\t{p}" for n, (_, new) in CLASSES.items() for p in new]
    prompts += [f"{n}\t{p}" for n, p in TRAINED]
    (a.out / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    print(f"wrote {sum(count.values())} images of {len(names)} classes to {root}, "
          f"{root / 'captions.txt'} and {a.out / 'prompts.txt'}")  # fmt: skip


if __name__ == "__main__":
    main()
