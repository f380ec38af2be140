"""Verified downloads: checksum before use, partial files never kept, mirrors fall through."""

from __future__ import annotations

import hashlib
import io
import urllib.error

import pytest

from cfgdiff.data import download as dl
from cfgdiff.errors import DataError

GOOD = b"the real content" * 1000
MD5 = hashlib.md5(GOOD).hexdigest()


class _Resp(io.BytesIO):
    def __init__(self, data: bytes, fail_after: int | None = None):
        super().__init__(data)
        self.fail_after = fail_after
        self.sent = 0

    def read(self, n=-1):
        if self.fail_after is not None and self.sent >= self.fail_after:
            raise ConnectionResetError("connection reset by peer")
        chunk = super().read(min(n, 4096) if n and n > 0 else 4096)
        self.sent += len(chunk)
        return chunk

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _serve(monkeypatch, table: dict):
    def urlopen(url, timeout):
        what = table[url]
        if isinstance(what, Exception):
            raise what
        return what()

    monkeypatch.setattr(dl.urllib.request, "urlopen", urlopen)


def test_falls_through_bad_mirrors_with_one_line_notes(tmp_path, monkeypatch):
    _serve(
        monkeypatch,
        {
            "http://a/f": urllib.error.URLError("Name or service not known"),
            "http://b/f": lambda: _Resp(b"wrong bytes"),
            "http://c/f": lambda: _Resp(GOOD),
        },
    )
    notes = []
    out = dl.download(
        ["http://a/f", "http://b/f", "http://c/f"], tmp_path / "f.gz", md5=MD5, log=notes.append
    )
    assert out.read_bytes() == GOOD
    assert len(notes) == 2 and all("\n" not in n for n in notes)
    assert "http://a/f" in notes[0] and "checksum mismatch" in notes[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.gz"]


def test_partial_download_is_never_kept(tmp_path, monkeypatch):
    _serve(monkeypatch, {"http://a/f": lambda: _Resp(GOOD, fail_after=8192)})
    with pytest.raises(DataError, match="could not download f.gz from any mirror"):
        dl.download(["http://a/f"], tmp_path / "f.gz", md5=MD5)
    assert list(tmp_path.iterdir()) == []


def test_wrong_content_never_replaces_a_good_file(tmp_path, monkeypatch):
    (tmp_path / "f.gz").write_bytes(GOOD)
    _serve(monkeypatch, {"http://a/f": lambda: _Resp(b"evil")})
    with pytest.raises(DataError):
        dl.download(["http://a/f"], tmp_path / "f.gz", md5=MD5)
    assert (tmp_path / "f.gz").read_bytes() == GOOD
