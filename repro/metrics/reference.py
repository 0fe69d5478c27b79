"""Reference statistics for FID: what the samples are compared against, identified by content.

A reference is one of
  - ADM's batch (`VIRTUAL_imagenet256_labeled.npz`, `VIRTUAL_imagenet512.npz`): `mu`/`sigma` (pool) and
    `mu_s`/`sigma_s` (spatial, in TF's NHWC order) over the whole training set, computed by ADM's TF Inception, and
    10,000 images (`arr_0`) used only for precision/recall, all of them, as ADM does. Its statistics are used as
    stored, with the Inception extractor only;
  - clean-fid statistics (`mu`, `sigma` only): FID only;
  - images: an npz with `arr_0` (uint8 NHWC) or a folder of image files, run through the extractor;
  - `fashion-mnist:train` / `fashion-mnist:test`: a split of the Fashion-MNIST files, as the samples are padded.

Statistics computed here are cached under `<cache>/stats/`, keyed by the reference's content hash, the
extractor's id and CACHE_VERSION (clean-fid writes its own into site-packages, which fails on read-only installs).
v2: spatial features in ADM's NHWC order (v1 flattened NCHW), and every reference image kept for ADM-style
precision/recall.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from repro.errors import ConfigError
from repro.metrics.fid import Gaussian, fit, pr_reference_subset

IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}
DATASET_PREFIX = "fashion-mnist:"
CACHE_VERSION = "stats v2"


@dataclass
class Reference:
    id: str                                 # what reports print, e.g. "VIRTUAL_imagenet256_labeled.npz"
    kind: str                               # adm | cleanfid_stats | images | folder | dataset
    source: str
    sha256: str                             # content hash of the file, folder or dataset split
    count: int | None                       # images behind the statistics (None: not stated by the file)
    pool: Gaussian
    spatial: Gaussian | None = None
    pr_features: np.ndarray | None = None   # pool features of the reference images for precision/recall
    stats_by: str = ""                      # who computed the statistics
    pr_distances: str = "float32"           # adm | float32 (repro.metrics.fid): how precision/recall is computed

    def protocol(self) -> dict:
        return {"reference": self.id, "reference_kind": self.kind, "reference_source": self.source,
                "reference_sha256": self.sha256, "reference_count": self.count, "reference_stats_by": self.stats_by,
                "pr_reference_count": None if self.pr_features is None else len(self.pr_features),
                "pr_distances": PR_DESCRIPTIONS[self.pr_distances]}


PR_DESCRIPTIONS = {
    "adm": "ADM: float16 distances, float32 fallback per 10,000 x 10,000 block, every reference image",
    "float32": "float32 distances (original k-NN code), at most 10,000 reference images",
}


def _sha_bytes(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()


def load_images(path: Path) -> np.ndarray:
    """uint8 NHWC from an npz (`arr_0`) or a folder of images (sorted, as RGB like clean-fid reads them)."""
    if path.is_dir():
        from PIL import Image

        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ConfigError(f"{path}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        images = [np.array(Image.open(f).convert("RGB")) for f in files]
        if len({im.shape for im in images}) != 1:
            raise ConfigError(f"{path}: images of different sizes")
        return np.stack(images)
    try:
        with np.load(path) as f:
            if "arr_0" not in f:
                raise ConfigError(f"{path}: no arr_0 (uint8 NHWC images) in this npz; keys: {', '.join(f.files)}")
            images = f["arr_0"]
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable npz ({e})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ConfigError(f"{path}: arr_0 must be uint8 (N, H, W, 1|3), got {images.dtype} {images.shape}")
    return images


def content_hash(path: Path) -> str:
    """sha256 of a file, or of a folder's image files (names and bytes, in sorted order)."""
    from repro.metrics.extractors import sha256_file

    if not path.is_dir():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        h.update(str(f.relative_to(path)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _cached(cache: Path, key: str, compute) -> dict:
    """Arrays computed once per (reference content, extractor), kept in an npz."""
    from repro import rundir

    path = cache / "stats" / f"{key}.npz"
    if path.is_file():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    arrays = compute()
    buf = io.BytesIO()
    np.savez(buf, **{k: v for k, v in arrays.items() if v is not None})
    rundir.atomic_write(path, lambda out: out.write(buf.getvalue()))
    return {k: v for k, v in arrays.items() if v is not None}


def _image_stats(images: np.ndarray, extractor, want_spatial: bool, batch_size: int, pr_all: bool) -> dict:
    feats = extractor.extract(images, batch_size=batch_size, probs=False, spatial=want_spatial)
    pool, out = fit(feats.pool), {}
    out.update(mu=pool.mu, sigma=pool.sigma, count=np.array(len(images)))
    if feats.spatial is not None:
        s = fit(feats.spatial)
        out.update(mu_s=s.mu, sigma_s=s.sigma)
    out["pr"] = feats.pool[slice(None) if pr_all else pr_reference_subset(len(images))].astype(np.float32)
    return out


def load_reference(spec: str | Path, extractor, cache: Path, want: set[str], batch_size: int = 64,
                   pr_distances: str = "auto") -> Reference:
    """The reference named by `spec` (a path or `fashion-mnist:<split>`), its statistics under `extractor`.
    `pr_distances` "auto" is ADM's precision/recall for an ADM batch, float32 for anything else."""
    spec = str(spec)
    want_spatial = "sfid" in want

    def images_reference(ref_id: str, kind: str, source: str, sha: str, read) -> Reference:
        pr = "float32" if pr_distances == "auto" else pr_distances
        key = _sha_bytes(f"{CACHE_VERSION}|{sha}|{extractor.id}|{want_spatial}|{pr}".encode())[:20]
        arrays = _cached(cache, key, lambda: _image_stats(read(), extractor, want_spatial, batch_size, pr == "adm"))
        return _from_arrays(ref_id, kind, source, sha, arrays, extractor.id, pr)

    if spec.startswith(DATASET_PREFIX):
        from repro.data import FashionMNIST

        split = spec[len(DATASET_PREFIX):]
        resolution = getattr(extractor, "resolution", 32)  # the split as the classifier sees the samples
        try:
            data = FashionMNIST(split=split, resolution=resolution)
        except ValueError as e:
            raise ConfigError(f"reference {spec}: {e}") from None
        images = data.images[..., None]
        return images_reference(spec, "dataset", f"{data.root}/{split} at {resolution} px",
                                _sha_bytes(images.tobytes()), lambda: images)
    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"{path}: reference not found (an ADM batch such as VIRTUAL_imagenet256_labeled.npz, "
                          f"clean-fid statistics, an npz of images, a folder of images, or fashion-mnist:train)")
    if path.is_dir():
        return images_reference(path.name, "folder", str(path), content_hash(path), lambda: load_images(path))
    sha = content_hash(path)
    try:
        with np.load(path) as f:
            keys = set(f.files)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable npz ({e})") from None
    if {"mu", "sigma"} <= keys:  # precomputed statistics: ADM's (with images) or clean-fid's
        if extractor.name != "inception":
            raise ConfigError(f"{path}: holds Inception statistics (mu/sigma); evaluate it with the inception "
                              f"extractor, not {extractor.name}")
        with np.load(path) as f:
            arrays = {k: f[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in f.files}
        kind, by = ("adm", "ADM evaluator (TF Inception), as stored") if "arr_0" in keys else \
            ("cleanfid_stats", "as stored")
        pr = ("adm" if kind == "adm" else "float32") if pr_distances == "auto" else pr_distances
        if "arr_0" in keys and want & {"precision", "recall"}:
            key = _sha_bytes(f"{CACHE_VERSION}|pr|{sha}|{extractor.id}".encode())[:20]
            feats = _cached(cache, key, lambda: {"pr": extractor.extract(load_images(path), batch_size=batch_size,
                                                                         probs=False, spatial=False).pool})["pr"]
            arrays["pr"] = feats if pr == "adm" else feats[pr_reference_subset(len(feats))]
        return _from_arrays(path.name, kind, str(path), sha, arrays, by, pr)
    if "arr_0" in keys:
        return images_reference(path.name, "images", str(path), sha, lambda: load_images(path))
    raise ConfigError(f"{path}: neither statistics (mu, sigma) nor images (arr_0); keys: {', '.join(sorted(keys))}")


def _from_arrays(ref_id: str, kind: str, source: str, sha: str, a: dict, stats_by: str, pr: str) -> Reference:
    count = int(a["count"]) if "count" in a else None
    spatial = Gaussian(a["mu_s"], a["sigma_s"], count) if "mu_s" in a and "sigma_s" in a else None
    return Reference(id=ref_id, kind=kind, source=source, sha256=sha, count=count,
                     pool=Gaussian(np.asarray(a["mu"], np.float64), np.asarray(a["sigma"], np.float64), count),
                     spatial=spatial, pr_features=a.get("pr"), stats_by=stats_by, pr_distances=pr)
