"""Opt-in download of CIFAR-10/100 and SVHN into data.root (only with data.download=true).

Each file is checked against the MD5 its publisher's archive has long had, written under a temporary
name and renamed once complete, so an interrupted download never looks like a data set."""
import hashlib
import os
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class Remote:
    url: str
    md5: str
    extract: bool  # a .tar.gz to unpack into data.root
    present: str  # what exists under data.root once this file is in place


REMOTES: dict[str, tuple[Remote, ...]] = {
    "cifar10": (Remote("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                       "c58f30108f718f92721af3b95e74349a", True, "cifar-10-batches-py/test_batch"),),
    "cifar100": (Remote("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                        "eb9058c3a382ffc7106e4002c42a8d85", True, "cifar-100-python/test"),),
    "svhn": (Remote("http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
                    "e26dedcc434d2e4c54c9b2d4a06d8373", False, "train_32x32.mat"),
             Remote("http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
                    "eb5a983be6a315427106f1b164d9cef3", False, "test_32x32.mat")),
}


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(remote: Remote, root: Path) -> None:
    target = root / Path(remote.url).name
    if not target.is_file():
        partial = target.with_name(target.name + ".part")
        try:
            with urllib.request.urlopen(remote.url, timeout=60) as response, open(partial, "wb") as out:
                while block := response.read(1 << 20):
                    out.write(block)
        except OSError as e:
            raise ConnectionError(f"could not download {remote.url} ({e}); fetch it by hand into {root}, "
                                  "or set data.download=false and point data.root at a copy") from e
        os.replace(partial, target)
    if md5_of(target) != remote.md5:
        raise ValueError(f"{target} does not have the published MD5 {remote.md5}; delete it and download again")
    if remote.extract:
        with tarfile.open(target) as archive:
            archive.extractall(root, filter="data")


def download(name: str, root: Optional[str]) -> Path:
    """Fetch what `name` needs into `root` unless it is already there; returns the root."""
    if name not in REMOTES:
        raise ValueError(f"data.download=true works for {', '.join(REMOTES)}; {name!r} must be placed by hand")
    if not root:
        raise ValueError("data.download=true needs data.root: the folder to download into")
    base = Path(root).expanduser()
    base.mkdir(parents=True, exist_ok=True)
    for remote in REMOTES[name]:
        if not (base / remote.present).is_file():
            fetch(remote, base)
    return base
