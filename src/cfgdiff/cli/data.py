"""`cfgdiff data fetch NAME` (obtain, verify and cache a built-in dataset) and `cfgdiff data info
NAME` (files, counts per class, checksums; a folder's sizes, modes and caches)."""

from __future__ import annotations

import argparse

from cfgdiff.cli.options import Parser, data_dir_option, dataset_name, flag_words
from cfgdiff.cli.progress import log


def add_parser(sub) -> None:
    from cfgdiff.data import DATASETS
    from cfgdiff.data.specs import NAMES_HELP

    da = sub.add_parser("data", help="obtain datasets and show where they are")
    dsub = da.add_subparsers(dest="data_command", parser_class=Parser, metavar="ACTION")
    dsub.required = True
    fe = dsub.add_parser("fetch", help="obtain, verify and cache a dataset")
    fe.add_argument("name", choices=list(DATASETS))
    data_dir_option(fe)
    inf = dsub.add_parser("info", help="files, counts per class and checksums")
    inf.add_argument("name", type=dataset_name, help=NAMES_HELP)
    data_dir_option(inf)


def run(a: argparse.Namespace) -> int:
    from cfgdiff.data import default_data_dir, info, obtain

    data_dir = a.data_dir or default_data_dir()
    if a.data_command == "fetch":
        meta = obtain(a.name, data_dir, log=log)
        total = {s: v["shape"][0] for s, v in meta["splits"].items()}
        print(
            f"{a.name}: {total} images cached in {data_dir / 'cache' / a.name} "
            f"(source: {meta['source']})"
        )
        return 0
    meta = info(a.name, data_dir, log=log)
    print(f"{a.name}: {meta['path']}")
    if "source" in meta:
        print(f"  source: {meta['source']}")
    if "image_sizes" in meta:  # a folder
        _folder_lines(meta)
    for split, s in meta["splits"].items():
        print(f"  {split}: shape {tuple(s['shape'])}" if "shape" in s else f"  {split}:")
        print(
            "    counts per class: "
            + ", ".join(f"{n}={c}" for n, c in zip(meta["class_names"], s["counts"], strict=True))
        )
        if s.get("captioned"):  # tar shards with .txt captions
            print(f"    with a caption: {s['captioned']:,} images")
        if "images_sha256" in s:
            print(f"    images sha256 {s['images_sha256']}")
            print(f"    labels sha256 {s['labels_sha256']}")
    for c in meta.get("caches", []):  # a folder, as decoded at a size by earlier commands
        shape = "x".join(map(str, c["shape"][1:]))
        print(f"  decoded at {shape}: {c['path']} ({c['bytes'] / 2**20:,.1f} MiB)")
    if "note" in meta:
        print(f"  note: {flag_words(meta['note'])}")
    return 0


def _folder_lines(meta: dict) -> None:
    sizes = sorted(meta["image_sizes"].items(), key=lambda kv: -kv[1])
    shown = ", ".join(f"{size} ({n})" for size, n in sizes[:8])
    more = f", and {len(sizes) - 8} more sizes" if len(sizes) > 8 else ""
    print(f"  image sizes: {shown}{more}")
    print("  modes: " + ", ".join(f"{m} ({n})" for m, n in meta["modes"].items()))
    if meta["skipped"]:
        first = ", ".join(meta["skipped"][:3])
        print(f"  skipped: {len(meta['skipped'])} hidden or non-image files ({first}, ...)")
