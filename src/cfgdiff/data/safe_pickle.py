"""A restricted unpickler for the two pickled datasets we read (MNIST's mnist.pkl.gz and the
CIFAR-10 python batches). It resolves only the numpy names needed to rebuild plain arrays and
refuses every other global (a bytes helper aside), so a crafted pickle cannot call anything
(e.g. os.system)."""

from __future__ import annotations

import codecs
import importlib
import io
import pickle

import numpy as np

from cfgdiff.errors import DataError


def _multiarray():
    try:
        return importlib.import_module("numpy._core.multiarray")  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        return importlib.import_module("numpy.core.multiarray")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): lambda: _multiarray()._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): lambda: _multiarray()._reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(str, "latin1"); it only
    # turns a string into bytes (torch's weights_only unpickler allows it too).
    ("_codecs", "encode"): lambda: codecs.encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        factory = _ALLOWED.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return factory()


def safe_loads(data: bytes, what: str, encoding: str = "latin1"):
    """Unpickle `data` allowing only numpy array reconstruction; DataError otherwise."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
    except Exception as e:  # UnpicklingError, EOFError, ValueError ... all mean "bad file"
        raise DataError(f"{what}: refused or corrupt pickle ({type(e).__name__}: {e})") from None
