"""Python pickles of data sets (the CIFAR batches) read as data, never as code.

A plain `pickle.load` calls whatever function the file names, so a batch from an untrusted mirror
could run anything. This reader builds only what a CIFAR batch holds: dicts, lists, strings, bytes,
numbers and NumPy arrays. Every other global the file asks for is refused before it is called."""
import codecs
import importlib
import pickle
from pathlib import Path


class UnsafePickleError(ValueError):
    pass


def _latin1_encode(text, encoding="latin1"):
    # protocol-2 bytes are _codecs.encode(text, "latin1"); the codec name is compared as text (a lookup imports)
    if str(encoding).lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591") \
            or not isinstance(text, str):
        raise UnsafePickleError(f"_codecs.encode with {encoding!r}")
    return codecs.encode(text, "latin1")


def _empty_bytes(*args):
    # protocol-2 b"" is bytes() with no argument; bytes(n) would allocate n bytes
    if args:
        raise UnsafePickleError(f"bytes{args!r:.40}")
    return b""


def _numpy_core(module: str, name: str):
    # numpy.core (NumPy 1) or numpy._core (NumPy 2), whichever exists
    for candidate in (f"numpy._core.{module}", f"numpy.core.{module}"):
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise UnsafePickleError(f"numpy {module}.{name} is not in this NumPy")


# (module, name) as the file spells it -> the object; arrays come from _reconstruct or _frombuffer (protocol 5)
_ALLOWED = {
    ("numpy", "ndarray"): lambda: importlib.import_module("numpy").ndarray,
    ("numpy", "dtype"): lambda: importlib.import_module("numpy").dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
    ("__builtin__", "bytes"): lambda: _empty_bytes,
    ("builtins", "bytes"): lambda: _empty_bytes,
    **{(f"numpy.{core}.{module}", name): (lambda module=module, name=name: _numpy_core(module, name))
       for core in ("core", "_core")
       for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))},
}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        make = _ALLOWED.get((module, name))
        if make is None:
            raise UnsafePickleError(f"{module}.{name}")
        return make()


def load_data_pickle(path: Path, what: str = "a data set pickle"):
    """The object in `path`, built from plain containers and NumPy arrays only."""
    with open(path, "rb") as f:
        try:
            return _DataUnpickler(f, encoding="bytes").load()
        except UnsafePickleError as e:
            raise UnsafePickleError(f"{path} asks to call {e}, which {what} never holds; refused, since loading it "
                                    "could run code. Download the file again from the data set's publisher") from None
