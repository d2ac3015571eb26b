"""Downloading one package with its registry's own client (pip, npm, apt), and unpacking it safely.

Nothing is installed: ``pip download --no-deps``, ``npm pack --ignore-scripts`` and
``apt-get download`` write one file into a folder of ours, and :func:`unpack` refuses
archive members that would land outside its destination.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from gainsurgery.errors import DomainError
from gainsurgery.io.hashing import sha256_file


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise DomainError(f"{what}: {cmd[0]} is not available on this machine") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DomainError(f"{what}: {' '.join(cmd[:3])} failed: {tail[0]}")


def pip_download(spec: str, dest: Path, sdist: bool = False) -> Path:
    """``pip download --no-deps`` one distribution into ``dest``; return the file.

    If pip refuses (pip >= 26 rejects sdists that declare direct-URL
    dependencies, e.g. bigbench 1.0.0, even with ``--no-deps``), fall back to
    fetching the file named by the PEP 503 simple index -- the same URL pip
    would use -- and check it against the index's sha256.
    """
    dest.mkdir(parents=True, exist_ok=True)
    binary = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *binary, "-d", str(dest), spec]
    try:
        _run(cmd, dest, f"pip download {spec}")
    except DomainError as pip_error:
        if "==" not in spec:
            raise
        name, version = spec.split("==", 1)
        try:
            return _simple_index_download(name, version, dest, sdist)
        except DomainError:
            raise pip_error from None
    return _only_file(dest, f"pip download {spec}")


def _simple_index_download(name: str, version: str, dest: Path, sdist: bool) -> Path:
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    normalized = re.sub(r"[-_.]+", "-", name).lower()
    page_url = f"{index}/{normalized}/"
    try:
        with urllib.request.urlopen(page_url, timeout=60) as resp:
            page = resp.read().decode("utf-8", "replace")
    except OSError as exc:
        raise DomainError(f"cannot read {page_url}: {exc}") from None
    stem = re.sub(r"[-_.]+", "_", name).lower()
    wanted = (f"{stem}-{version}.tar.gz", f"{normalized}-{version}.tar.gz") if sdist else ()
    for href in re.findall(r'href="([^"]+)"', page):
        url = urllib.parse.urljoin(page_url, href.replace("&amp;", "&"))
        filename = urllib.parse.unquote(url.split("#")[0].rsplit("/", 1)[-1])
        if filename.lower() in wanted or (not sdist and filename.lower().startswith(f"{stem}-{version}-")):
            digest = re.search(r"#sha256=([0-9a-f]{64})", url)
            target = dest / filename
            try:
                urllib.request.urlretrieve(url.split("#")[0], target)
            except OSError as exc:
                raise DomainError(f"cannot download {filename}: {exc}") from None
            if digest and sha256_file(target) != digest.group(1):
                target.unlink()
                raise DomainError(f"{filename}: sha256 does not match the package index")
            return target
    raise DomainError(f"{name}=={version}: no matching file on {page_url}")


def npm_pack(spec: str, dest: Path) -> Path:
    """``npm pack`` one package tarball into ``dest`` (no install, no scripts)."""
    dest.mkdir(parents=True, exist_ok=True)
    _run(["npm", "pack", "--silent", "--ignore-scripts", spec], dest, f"npm pack {spec}")
    return _only_file(dest, f"npm pack {spec}")


def apt_download(package: str, dest: Path) -> Path:
    """``apt-get download`` one .deb into ``dest`` (no install, no root needed)."""
    dest.mkdir(parents=True, exist_ok=True)
    _run(["apt-get", "download", "-q", package], dest, f"apt-get download {package}")
    return _only_file(dest, f"apt-get download {package}")


def _only_file(folder: Path, what: str) -> Path:
    files = [p for p in folder.iterdir() if p.is_file()]
    if len(files) != 1:
        raise DomainError(f"{what}: expected one downloaded file, found {len(files)}")
    return files[0]


def unpack(archive: Path, dest: Path, members: Callable[[str], bool] | None = None) -> Path:
    """Unpack a wheel/zip, tarball or .deb into ``dest``; optionally only the
    members whose name satisfies ``members``. Refuses paths escaping ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    name = archive.name
    if name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if members is None or members(info.filename):
                    _check_member(info.filename, dest)
                    zf.extract(info, dest)
    elif name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(archive) as tf:
            chosen = [m for m in tf.getmembers() if members is None or members(m.name)]
            for member in chosen:
                _check_member(member.name, dest)
            tf.extractall(dest, members=chosen, filter="data")
    elif name.endswith(".deb"):
        _run(["dpkg-deb", "-x", str(archive), str(dest)], dest, f"dpkg-deb -x {name}")
    else:
        raise DomainError(f"{name}: unknown archive type")
    return dest


def _check_member(member: str, dest: Path) -> None:
    target = (dest / member).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise DomainError(f"archive member {member!r} escapes the extraction folder")


def find_one(root: Path, pattern: str) -> Path:
    hits = sorted(root.glob(pattern))
    if not hits:
        raise DomainError(f"{pattern} not found in the downloaded package (layout changed?)")
    return hits[0]
