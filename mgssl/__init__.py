"""mgssl: semi-supervised image classification with meta-gradient pseudo labels.

Its packages keep their folders at the top of the source tree (pipelines/, model/, train/, tools/) and
install as mgssl.pipelines, mgssl.model, mgssl.train and mgssl.tools (setup.cfg maps them).
"""
from importlib import metadata as _metadata
from pathlib import Path as _Path

try:
    __version__ = _metadata.version("mgssl")
except _metadata.PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0+unknown"

# A source checkout used without an install (PYTHONPATH=.) finds the subpackages beside this folder.
if (_Path(__file__).resolve().parent.parent / "setup.cfg").is_file():
    __path__.append(str(_Path(__file__).resolve().parent.parent))
