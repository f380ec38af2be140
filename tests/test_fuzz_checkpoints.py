"""A fuzz of checkpoint folders and model files, as someone who controls them would craft them:
every field of config.json and of state.pt, and the structure of every JSON file (types,
ranges, nesting), changed one at a time with the MANIFEST (or the model file's SHA-256)
recomputed to match. `info`, `sample`, `export` and `train --resume` each end within a time
bound with exit status 0, 1 or 2, and on 1 or 2 with one error line: never a traceback, a hang
or an allocation without bound.

The mutations are a fixed list (deterministic, so a failure repeats), two or more per field."""

from __future__ import annotations

import json
import signal
import time
from contextlib import contextmanager

import pytest
import torch
from conftest import image_folder, remanifest

from cfgdiff.cli import main

pytestmark = pytest.mark.slow

CALL_LIMIT_S = 60  # any one command: a hang is a failure, not a stuck test run
# What a field is changed to: a wrong type, a value out of every range, a fraction where an
# integer belongs, deep nesting, nothing. Each field gets two, chosen in turn.
VALUES = [
    "x",
    -(10**12),
    [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
    None,
    2.5,
    {"a": [1]},
    10**30,
    True,
    [],
    -1,
    0,
]


def _values(i: int) -> list:
    return [VALUES[i % len(VALUES)], VALUES[(i * 7 + 3) % len(VALUES)]]


class Hang(BaseException):  # not an Exception: no handler in the library may swallow it
    pass


@contextmanager
def time_limit(seconds: int):
    def on_alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    folder = image_folder(root / "folder", 6)
    run = root / "run"
    argv = ["train", "--dataset", f"folder:{folder}", "--preset", "tiny", "--out", run,
            "--steps", "2", "--sample-every", "0", "--no-progress", "--precision", "fp32",
            "--device", "cpu"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    model = root / "model.safetensors"
    assert main(["export", "--checkpoint", str(run), "--out", str(model)]) == 0
    return root, run, folder, model


def _check(argv, capsys, what: str) -> int:
    """Run one command: exit 0, 1 or 2 within the bound; on 1 or 2 one error line, last."""
    with time_limit(CALL_LIMIT_S):
        rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc in (0, 1, 2), (what, argv[0], rc, err)
    assert not any(e.startswith("Traceback") for e in err), (what, argv[0], err)
    if rc:
        errors = [e for e in err if e.startswith("cfgdiff: error: ")]
        assert len(errors) == 1 and err[-1] == errors[0], (what, argv[0], err)
    return rc


def _commands(root, run, folder):
    """The four commands, each as cheap as it can be while reading everything."""
    return [
        ["info", "--checkpoint", run],
        [
            "sample",
            "--checkpoint",
            run,
            "--scale",
            "2",
            "--steps",
            "1",
            "--per-class",
            "1",
            "--classes",
            "0",
            "--out",
            root / "out.npz",
            "--device",
            "cpu",
        ],  # fmt: skip
        ["export", "--checkpoint", run, "--out", root / "out.safetensors"],
        [
            "train",
            "--dataset",
            f"folder:{folder}",
            "--out",
            run,
            "--resume",
            "--steps",
            "2",
            "--no-progress",
            "--precision",
            "fp32",
            "--device",
            "cpu",
        ],  # fmt: skip
    ]


def _config_mutations(config: dict):
    """(name, new config.json text) for every field of every section, and the structure."""
    i = 0
    for section, body in config.items():
        whole = not isinstance(body, dict) or section == "guidance"  # (ignored when read)
        fields = [(None, body)] if whole else body.items()
        for name, _ in fields:
            for value in _values(i):
                d = json.loads(json.dumps(config))
                if name is None:
                    d[section] = value
                else:
                    d[section][name] = value
                yield f"config {section}.{name}={json.dumps(value)[:20]}", json.dumps(d)
            i += 1
    for section in ("model", "diffusion", "train"):
        d = json.loads(json.dumps(config))
        del d[section]
        yield f"config without {section}", json.dumps(d)
    yield "config a list", "[1, 2]"
    yield "config nested", "[" * 50_000 + "]" * 50_000
    yield "config empty", ""
    yield "config not utf-8", "\udcff"


def _state_mutations(state: dict):
    """(name, change) for every field of state.pt, some nested ones, and its structure."""
    i = 0
    for key in list(state):
        for value in [*_values(i), torch.zeros(2, 2)]:
            yield f"state {key}={str(value)[:20]}", lambda s, k=key, v=value: s.__setitem__(k, v)
        yield f"state without {key}", lambda s, k=key: s.pop(k)
        i += 1
    nested = [
        ("data", "epoch", -1), ("data", "offset", -5), ("data", "offset", 10**9),
        ("data", "offset", 2.5), ("data_identity", "n", "x"), ("data_identity", "sha256", 1),
        ("precision", "device", "tpu"), ("precision", "precision", ["fp32"]),
    ]  # fmt: skip
    for outer, inner, value in nested:
        yield (
            f"state {outer}.{inner}={value!r}",
            lambda s, o=outer, n=inner, v=value: s[o].__setitem__(n, v),
        )

    def moments(s, value):
        first = next(iter(s["optimizer"]["state"].values()))
        first["exp_avg"] = value

    yield "state exp_avg misshapen", lambda s: moments(s, torch.zeros(7))
    yield "state exp_avg a string", lambda s: moments(s, "x")
    yield "state param_groups", lambda s: s["optimizer"]["param_groups"][0].update(betas="x")
    yield "state param_groups empty", lambda s: s["optimizer"].update(param_groups=[])
    yield "state a list", lambda s: (s.clear(), s.update({"x": [1]}))


def _manifest_mutations(manifest: dict):
    yield "manifest a list", json.dumps(list(manifest))
    yield "manifest nested", "{" + '"a":{' * 10_000 + "1" + "}" * 10_001
    yield "manifest digests not strings", json.dumps({k: 1 for k in manifest})
    yield "manifest one file short", json.dumps(dict(list(manifest.items())[1:]))
    yield "manifest a file more", json.dumps({**manifest, "../../etc/passwd": "0" * 64})
    yield "manifest empty", "{}"


def _model_file_mutations(meta: dict):
    """(name, change of the metadata) for a model file."""
    config = json.loads(meta["config"])
    i = 0
    for section in ("model", "diffusion", "train"):
        for name in config[section]:
            value = _values(i)[0]
            i += 1

            def change(m, s=section, n=name, v=value):
                c = json.loads(m["config"])
                c[s][n] = v
                m["config"] = json.dumps(c, sort_keys=True)

            yield f"model file {section}.{name}", change
    yield "model file config nested", lambda m: m.update(config="[" * 9999 + "]" * 9999)
    yield "model file config a list", lambda m: m.update(config="[]")
    yield "model file data", lambda m: m.update(data='{"n": -1, "sha256": "x"}')
    yield "model file data nested", lambda m: m.update(data="[" * 9999 + "]" * 9999)
    yield "model file format", lambda m: m.update(format="cfgdiff-model-0")
    yield "model file dtype", lambda m: m.update(dtype="int8")
    yield "model file sha256", lambda m: m.update(sha256="x")


def test_crafted_checkpoint_folders(made, capsys):
    root, run, folder, _ = made
    ckpt = run / "checkpoints" / "step-0000002"
    pristine = {f: (ckpt / f).read_bytes() for f in ("config.json", "state.pt", "MANIFEST.json")}
    latest = (run / "checkpoints" / "latest").read_bytes()
    commands = _commands(root, run, folder)
    config = json.loads(pristine["config.json"])
    state = torch.load(ckpt / "state.pt", weights_only=True)
    cases = []
    for name, text in _config_mutations(config):
        cases.append((name, {"config.json": text.encode("utf-8", "surrogateescape")}, True))
    for name, change in _state_mutations(state):
        s = torch.load(ckpt / "state.pt", weights_only=True)
        change(s)
        cases.append((name, {"state.pt": s}, True))
    for name, text in _manifest_mutations(json.loads(pristine["MANIFEST.json"])):
        cases.append((name, {"MANIFEST.json": text.encode()}, False))
    for pointer in ("../..", "step-0000002/../../../..", str(ckpt), "\0\xff", "s" * 5000):
        cases.append((f"latest {pointer[:20]!r}", {"latest": pointer.encode()}, False))
    t0, statuses = time.perf_counter(), {0: 0, 1: 0, 2: 0}
    for name, files, manifest in cases:
        for f, content in files.items():
            target = run / "checkpoints" / "latest" if f == "latest" else ckpt / f
            if f == "state.pt":
                torch.save(content, target)
            else:
                target.write_bytes(content)
        if manifest:
            remanifest(ckpt)
        for argv in commands:
            statuses[_check(argv, capsys, name)] += 1
        for f, content in pristine.items():
            (ckpt / f).write_bytes(content)
        (run / "checkpoints" / "latest").write_bytes(latest)
    # the pristine checkpoint still works with every command: the fuzz broke nothing for good
    assert [_check(argv, capsys, "pristine") for argv in commands] == [0, 0, 0, 0]
    assert len(cases) > 150 and statuses[2] >= 2 * len(cases), statuses
    print(f"{len(cases)} checkpoint folders x 4 commands in {time.perf_counter() - t0:.0f} s")


def test_crafted_model_files(made, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    from cfgdiff.checkpoint import _model_file_sha256

    root, _, _, model = made
    with safe_open(str(model), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(model))
    crafted = root / "crafted.safetensors"
    commands = [
        ["info", "--checkpoint", crafted],
        [
            "sample",
            "--checkpoint",
            crafted,
            "--scale",
            "2",
            "--steps",
            "1",
            "--per-class",
            "1",
            "--classes",
            "0",
            "--out",
            root / "m.npz",
            "--device",
            "cpu",
        ],  # fmt: skip
    ]
    n = 0
    for name, change in _model_file_mutations(meta):
        m = dict(meta)
        change(m)
        if "sha256" in m and m["sha256"] != "x":
            m["sha256"] = _model_file_sha256(m["config"], tensors, m.get("data"))
        crafted.write_bytes(save(tensors, m))
        for argv in commands:
            _check(argv, capsys, name)
        n += 1
    assert n > 40
