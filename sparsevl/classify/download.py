"""`python -m sparsevl.classify download`: fetch the official archives, check their SHA-256, unpack.

Each file is written to a temporary name beside its destination and renamed only after its
checksum matches; archives are unpacked into a temporary folder and moved into place whole,
so a failed or mismatched download leaves nothing half-written under the root.
"""

import argparse
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Archive:
    url: str
    sha256: str | None
    md5: str | None = None  # only where no SHA-256 is published

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


_FASHION = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_FLICKR = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/"
ARCHIVES = {
    "cifar10": [Archive("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                        "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd")],
    "fashion_mnist": [
        Archive(_FASHION + "train-images-idx3-ubyte.gz", "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
        Archive(_FASHION + "train-labels-idx1-ubyte.gz", "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
        Archive(_FASHION + "t10k-images-idx3-ubyte.gz", "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
        Archive(_FASHION + "t10k-labels-idx1-ubyte.gz", "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
    ],
    # No SHA-256 is published for these mirrors; the MD5s are the ones other loaders pin.
    "flickr8k": [Archive(_FLICKR + "Flickr8k_Dataset.zip", None, "f18a1e2920de5bd84dae7cf08ec78978"),
                 Archive(_FLICKR + "Flickr8k_text.zip", None, "bf6c1abcb8e4a833b7f922104de18627")],
}


class ChecksumError(ValueError):
    pass


def _digests(path: Path) -> tuple[str, str]:
    sha256, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha256.update(chunk)
            md5.update(chunk)
    return sha256.hexdigest(), md5.hexdigest()


def verify(path: Path, archive: Archive, source: str) -> None:
    """Raise ChecksumError naming `source` unless the file matches every checksum the archive knows."""
    sha256, md5 = _digests(path)
    if archive.sha256 and sha256 != archive.sha256.lower():
        raise ChecksumError(f"{source}: SHA-256 {sha256} does not match the expected {archive.sha256}")
    if archive.md5 and md5 != archive.md5.lower():
        raise ChecksumError(f"{source}: MD5 {md5} does not match the expected {archive.md5}")


def fetch(archive: Archive, dest: Path, timeout: float = 60.0) -> Path:
    """Download to a temporary file beside `dest`, verify, then rename; an existing verified file is kept."""
    if not (archive.sha256 or archive.md5):
        raise ChecksumError(f"{archive.url}: no checksum known; pass --sha256")
    if dest.is_file():
        verify(dest, archive, str(dest))
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(archive.url, timeout=timeout) as response:
            shutil.copyfileobj(response, out, 1 << 20)
        verify(Path(tmp), archive, archive.url)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def unpack(path: Path, root: Path) -> list[Path]:
    """Unpack a .tar.gz or .zip into a temporary folder under `root`, then move its top-level entries into `root`."""
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".unpack."))
    try:
        if path.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(path) as tar:
                tar.extractall(staging, filter="data")  # refuses absolute paths, '..', devices
        else:
            with zipfile.ZipFile(path) as archive:
                for name in archive.namelist():
                    if not (staging / name).resolve().is_relative_to(staging.resolve()):
                        raise ValueError(f"{path}: member {name!r} would unpack outside {root}")
                archive.extractall(staging)
        moved = []
        for entry in sorted(p for p in staging.iterdir() if p.name != "__MACOSX"):
            target = root / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
            moved.append(target)
        return moved
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def archives_for(dataset: str, url: str | None, sha256: str | None) -> list[Archive]:
    """The official archives, or `url` for a one-archive dataset, or `url` ending in '/' as a mirror of all of them."""
    if dataset not in ARCHIVES:
        raise ValueError(f"nothing to download for {dataset!r}; choose from: {', '.join(ARCHIVES)} (digits ships with scikit-learn)")
    official = ARCHIVES[dataset]
    if url is None:
        return official
    if url.endswith("/"):
        return [Archive(url + a.filename, a.sha256, a.md5) for a in official]
    if len(official) != 1:
        raise ValueError(f"{dataset} has {len(official)} files; give --url as a mirror folder ending in '/'")
    return [Archive(url, sha256 or official[0].sha256, None if sha256 else official[0].md5)]


def download(dataset: str, root: str | Path, *, url: str | None = None, sha256: str | None = None) -> list[Path]:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for archive in archives_for(dataset, url, sha256):
        path = fetch(archive, root / archive.filename)
        written += unpack(path, root) if path.name.endswith((".tar.gz", ".tgz", ".zip")) else [path]
    return written


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsevl.classify download", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=sorted(ARCHIVES))
    parser.add_argument("--root", default="data", help="folder to put the files in (the classifier's --data_root)")
    parser.add_argument("--url", help="another URL for a one-archive dataset, or a mirror folder ending in '/'")
    parser.add_argument("--sha256", help="expected SHA-256 of the file at --url")
    args = parser.parse_args(argv)
    try:
        for path in download(args.dataset, args.root, url=args.url, sha256=args.sha256):
            print(path)
    except (OSError, ValueError) as err:
        print(f"download failed: {err}", file=sys.stderr)
        return 1
    return 0
