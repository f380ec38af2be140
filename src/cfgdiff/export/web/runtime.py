"""onnxruntime-web, the runtime the exported page samples with: where its files come from.

Owns: the pinned release and the two files of it the page loads (the ES-module build with the
WebAssembly glue inlined, and the WebAssembly binary, run single-threaded so that no host has
to send cross-origin isolation headers), fetching that release once with npm into a cache
folder (its tarball checked against the pinned SHA-512), and taking them instead from a folder
or tarball the user gives (`ort`), for a machine without npm or a network. Knows nothing about
models or pages.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cfgdiff.errors import ConfigError
from cfgdiff.files import writing

ORT_PACKAGE = "onnxruntime-web"
ORT_VERSION = "1.30.0"
# the registry's dist.integrity of that release (npm view onnxruntime-web@1.30.0 dist.integrity)
ORT_INTEGRITY = (
    "sha512-q0y+JrrtukXSzsBWEMccVfqX25LRmosXHF+CaRJmg8pZClzcV7svNc4r"
    "KY3jL02Vb7QmRMDs1SigqR4CXAfKYQ=="
)
# what the page loads from its ort/ folder (page.js imports the first; it fetches the second)
ORT_FILES = ("ort.wasm.bundle.min.mjs", "ort-wasm-simd-threaded.wasm")
# how long npm may take to fetch the release (about 20 MB)
NPM_TIMEOUT_S = 600


def default_cache() -> Path:
    """~/.cache/cfgdiff, which also holds the data cache: the runtime goes into its
    onnxruntime-web-VERSION folder."""
    return Path.home() / ".cache" / "cfgdiff"


@dataclass(frozen=True)
class Runtime:
    """The runtime's files (name -> content), its version and where it came from."""

    files: dict[str, bytes]
    version: str
    origin: str


def offline_hint() -> str:
    return (
        f"give it offline with `ort` (a folder holding {' and '.join(ORT_FILES)}, or the .tgz "
        f"of `npm pack {ORT_PACKAGE}@{ORT_VERSION}`)"
    )


def find_runtime(
    ort: Path | None = None, cache: Path | None = None, log: Callable[[str], None] | None = None
) -> Runtime:
    """The runtime's files: from `ort` when given (a folder holding them, directly or in dist/
    or package/dist/, or an npm tarball), else from the cache folder, fetched into it with npm
    first where it lacks them. A ConfigError naming `ort` when neither can be had; nothing is
    written but the cache."""
    if ort is not None:
        return _given(Path(ort))
    folder = (cache or default_cache()) / f"{ORT_PACKAGE}-{ORT_VERSION}"
    if not all((folder / n).is_file() for n in ORT_FILES):
        if log is not None:
            log(f"fetching {ORT_PACKAGE} {ORT_VERSION} with npm into {folder}")
        _fetch(folder)
    return Runtime(_read(folder, "the cache"), ORT_VERSION, f"npm, cached in {folder}")


def _given(ort: Path) -> Runtime:
    if not ort.exists():
        raise ConfigError(f"`ort` {ort}: no such file or directory")
    if ort.is_file():
        if not tarfile.is_tarfile(ort):
            raise ConfigError(f"`ort` {ort}: neither a folder nor a .tgz of {ORT_PACKAGE}")
        files, version = _unpack(ort, f"`ort` {ort}")
        return Runtime(files, version, str(ort))
    for sub in (ort, ort / "dist", ort / "package" / "dist"):
        if all((sub / n).is_file() for n in ORT_FILES):
            pkg = sub.parent / "package.json" if sub.name == "dist" else sub / "package.json"
            return Runtime(_read(sub, f"`ort` {ort}"), _version(pkg), str(ort))
    raise ConfigError(
        f"`ort` {ort}: holds no {' and '.join(ORT_FILES)} (nor in dist/); they are in the dist/ "
        f"of {ORT_PACKAGE} {ORT_VERSION}"
    )


def _read(folder: Path, what: str) -> dict[str, bytes]:
    try:
        return {n: (folder / n).read_bytes() for n in ORT_FILES}
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {e.filename}: {e.strerror}") from None


def _version(package_json: Path) -> str:
    try:
        return str(json.loads(package_json.read_text())["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return "of unknown version"


def _fetch(folder: Path) -> None:
    """npm pack the pinned release into a temporary folder beside `folder`, check its digest,
    and keep the runtime's files in `folder` (made in one rename)."""
    npm = shutil.which("npm")
    if npm is None:
        raise ConfigError(
            f"{ORT_PACKAGE} {ORT_VERSION} is not cached and npm is not installed; " + offline_hint()
        )
    spec = f"{ORT_PACKAGE}@{ORT_VERSION}"
    with writing(folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{folder.name}.", dir=folder.parent) as tmp:
        try:
            done = subprocess.run(
                [npm, "pack", spec, "--pack-destination", tmp, "--silent"],
                cwd=tmp, capture_output=True, text=True, timeout=NPM_TIMEOUT_S,
                env={**os.environ, "npm_config_update_notifier": "false"},
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ConfigError(f"`npm pack {spec}` failed ({e}); " + offline_hint()) from None
        tgz = Path(tmp) / f"{ORT_PACKAGE}-{ORT_VERSION}.tgz"
        if done.returncode != 0 or not tgz.is_file():
            why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            raise ConfigError(f"`npm pack {spec}` failed ({why[:200]}); " + offline_hint())
        digest = "sha512-" + base64.b64encode(hashlib.sha512(tgz.read_bytes()).digest()).decode()
        if digest != ORT_INTEGRITY:
            raise ConfigError(
                f"`npm pack {spec}` gave a tarball whose SHA-512 is not the release's; "
                + offline_hint()
            )
        files, _ = _unpack(tgz, f"`npm pack {spec}`")
        staged = Path(tmp) / "files"
        with writing(folder):
            staged.mkdir()
            for n, data in files.items():
                (staged / n).write_bytes(data)
            if folder.exists():  # an incomplete one, a file missing
                shutil.rmtree(folder)
            os.rename(staged, folder)


def _unpack(tgz: Path, what: str) -> tuple[dict[str, bytes], str]:
    """The runtime's files of an npm tarball (package/dist/NAME) and its package.json's
    version."""
    try:
        with tarfile.open(tgz) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            missing = [n for n in ORT_FILES if f"package/dist/{n}" not in members]
            if missing:
                raise ConfigError(f"{what}: holds no package/dist/{missing[0]}")
            files = {n: tar.extractfile(members[f"package/dist/{n}"]).read() for n in ORT_FILES}
            pkg = members.get("package/package.json")
            meta = json.load(tar.extractfile(pkg)) if pkg is not None else {}
    except (tarfile.TarError, OSError, ValueError) as e:
        raise ConfigError(f"{what}: cannot read it as a tarball ({e})") from None
    version = meta.get("version") if isinstance(meta, dict) else None
    return files, str(version or "of unknown version")
