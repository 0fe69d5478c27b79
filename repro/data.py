"""Training data: the ADM centre crop, image folders, Fashion-MNIST, the VAE and pre-extracted latents (protocol.md §5).

Every dataset is map-style and indexed by a key `(index, seed)`; it returns `(x, y)` with x a float32 (C, H, W) tensor
(pixels in [-1, 1], or latents already x 0.18215) and y an int label. All randomness of an item (its flip, which stored
latent it reads) comes from the seed alone, never from global RNG state, so a resumed or multi-worker run reads exactly
the same batches (style.md 6). `describe()` returns what a run records about its data.
"""

from __future__ import annotations

import gzip
import inspect
import json
import logging
import math
import os
import random
import struct
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from repro.config import FASHION_MNIST_RESOLUTIONS
from repro.errors import did_you_mean
from repro.rundir import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

LATENT_SCALE = 0.18215  # DiT's constant for sd-vae-ft-ema: latents are multiplied by it, decode divides by it
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")  # compared lower-cased, so ImageNet's .JPEG matches
CROP = "adm_center"
LATENT_MODES = {"pair": "pre_extracted_pair", "single": "pre_extracted_single"}  # extract_latents mode -> record name
VIEWS = {"pre_extracted_pair": 2, "pre_extracted_single": 1}  # latents stored per image

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist installs the files
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_COUNTS = {"train": 60_000, "test": 10_000}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049  # big-endian: 0x0803 = uint8 data with 3 dims, 0x0801 = with 1 dim


# ---------------------------------------------------------------------------------------------------------------------
# Keys, flips and the ADM crop
# ---------------------------------------------------------------------------------------------------------------------

def _unpack_key(key, count: int) -> tuple[int, int]:
    """(index, seed) from a dataset key, the index checked against the dataset size."""
    if not (isinstance(key, (tuple, list)) and len(key) == 2):
        raise TypeError(f"dataset keys are (index, seed) pairs, got {key!r}")
    index, seed = int(key[0]), int(key[1])
    if not 0 <= index < count:
        raise IndexError(f"index {index} out of range for a dataset of {count} items")
    return index, seed


def flip_from_seed(seed: int) -> bool:
    """The item's horizontal flip (p = 0.5) from its seed alone; pixel and pair-latent datasets agree on it."""
    return random.Random(seed).random() < 0.5


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM/DiT centre crop to an RGB image_size x image_size image: box-halve, bicubic to the short side, crop."""
    img = pil_image.convert("RGB")
    # ADM halves with a box filter by hand before the bicubic resize, for a better downsample; kept for parity.
    while min(img.size) >= 2 * image_size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.Resampling.BOX)
    scale = image_size / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample=Image.Resampling.BICUBIC)
    left, top = (img.width - image_size) // 2, (img.height - image_size) // 2
    return img.crop((left, top, left + image_size, top + image_size))


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, C) -> float32 (C, H, W) in [-1, 1] (ToTensor + Normalize(0.5, 0.5), up to float rounding)."""
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 127.5 - 1


def _check_resolution(resolution) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    return resolution


# ---------------------------------------------------------------------------------------------------------------------
# Image folders (ImageNet)
# ---------------------------------------------------------------------------------------------------------------------

def _list_images(class_dir: Path) -> list[str]:
    """Image paths under one class folder, relative to its parent, in torchvision ImageFolder's order."""
    found = []
    # Same walk and sort as ImageFolder, so dataset index i is the image DiT's sampler calls i.
    for dirpath, _, filenames in sorted(os.walk(class_dir, followlinks=True)):
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(dirpath, name), class_dir.parent))
    return found


class ImageFolderDataset(torch.utils.data.Dataset):
    """root/<class>/<image> (the ImageNet layout): ADM centre crop, random flip from the seed, 3 channels in [-1, 1]."""

    def __init__(self, root: str | Path, resolution: int, flip: bool = True):
        self.root = Path(root)
        self.resolution = _check_resolution(resolution)
        self.flip = flip
        if not self.root.is_dir():
            raise ValueError(f"image folder {self.root} does not exist (expected {self.root}/<class>/<image>)")
        self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        if not self.classes:
            raise ValueError(f"image folder {self.root} has no class folders (expected {self.root}/<class>/<image>)")
        files, labels, empty = [], [], []
        for label, name in enumerate(self.classes):
            found = _list_images(self.root / name)
            if not found:
                empty.append(name)
            files += found
            labels += [label] * len(found)
        if empty:
            exts = "/".join(IMAGE_EXTENSIONS)
            raise ValueError(f"image folder {self.root} has class folders without {exts} images: "
                             f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}")
        # One numpy bytes array rather than 1.28M Python strings: forked loader workers touching Python objects
        # bump refcounts and copy pages, which grows memory per worker.
        self._files = np.array([os.fsencode(f) for f in files], dtype=bytes)
        self.labels = np.array(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> np.ndarray:
        """The centre-cropped image `index`, unflipped: uint8 (S, S, 3)."""
        with Image.open(self.root / os.fsdecode(self._files[index])) as img:
            return np.array(center_crop_arr(img, self.resolution))

    def __getitem__(self, key) -> tuple[torch.Tensor, int]:
        index, seed = _unpack_key(key, len(self))
        arr = self.image(index)  # (S, S, 3)
        if self.flip and flip_from_seed(seed):
            arr = arr[:, ::-1]  # after the crop, as DiT's transform does (the crop offset is floored, so order matters)
        return _to_tensor(arr), int(self.labels[index])

    def describe(self) -> dict:
        return dict(kind="imagenet_folder", path=str(self.root.resolve()), resolution=self.resolution, channels=3,
                    shape=[3, self.resolution, self.resolution], num_classes=len(self.classes), count=len(self),
                    crop=CROP, flip=self.flip, latent_source="pixels")


# ---------------------------------------------------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------------------------------------------------

_IDX_READ: dict[tuple, np.ndarray] = {}  # decompressed once per process (a pilot builds the dataset per run)


def _read_idx(path: Path, magic: int, shape: tuple[int, ...]) -> np.ndarray:
    """One original big-endian IDX .gz file as read-only uint8 of `shape`, header and length checked."""
    try:
        st = Path(path).stat()
    except OSError as e:
        raise ValueError(f"{path} is not a readable gzip file ({e})") from e
    key = (str(path), st.st_mtime_ns, st.st_size, magic, shape)
    if key not in _IDX_READ:
        _IDX_READ[key] = _decode_idx(path, magic, shape)
    return _IDX_READ[key]


def _decode_idx(path: Path, magic: int, shape: tuple[int, ...]) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path} is not a readable gzip file ({e})") from e
    head = 4 * (1 + len(shape))
    if len(raw) < head:
        raise ValueError(f"{path} is truncated: {len(raw)} bytes, shorter than its IDX header")
    got_magic, *dims = struct.unpack(f">{1 + len(shape)}I", raw[:head])
    if got_magic != magic:
        raise ValueError(f"{path} has IDX magic number {got_magic}, expected {magic}")
    if tuple(dims) != shape:
        raise ValueError(f"{path} holds shape {tuple(dims)}, expected {shape}")
    if len(raw) - head != math.prod(shape):
        raise ValueError(f"{path} has {len(raw) - head} data bytes, expected {math.prod(shape)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(shape)


# the 16 px average costs 0.7 s, and a pilot or a test builds the dataset once per run
_PADDED: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _padded(images: np.ndarray, resolution: int) -> np.ndarray:
    """(N, 28, 28) uint8 -> (N, resolution, resolution) uint8, computed once per process and shared: never written
    to (torch.from_numpy warns on a read-only array, so it is not marked so)."""
    key = (id(images), resolution)  # _read_idx's memoised array, kept alive below, so its id stays its own
    if key not in _PADDED:
        n = len(images)
        # 2 pixels of background (0) each side: 32 is a power of two, so every patch size and 2x downsampling fits
        out = np.pad(images, ((0, 0), (2, 2), (2, 2)))  # (N, 32, 32)
        if resolution == 16:
            sums = out.reshape(n, 16, 2, 16, 2).sum(axis=(2, 4), dtype=np.uint16)
            out = ((sums + 2) // 4).astype(np.uint8)  # the 2x2 mean, rounded half up, in integers
        _PADDED[key] = (images, out)
    return _PADDED[key][1]


class FashionMNIST(torch.utils.data.Dataset):
    """Fashion-MNIST from the original IDX files, padded to 32x32 (background -1), 1 channel in [-1, 1].

    resolution=16 averages each 2x2 block of the padded image (rounded back to uint8): the 28 px garment becomes
    14 px with 1 px of background, and every model costs about a quarter as much (the CPU demo's setting).
    """

    def __init__(self, root: str | Path = FASHION_MNIST_ROOT, split: str = "train", flip: bool = False,
                 resolution: int = 32):
        if split not in FASHION_MNIST_FILES:
            raise ValueError(f"Fashion-MNIST split must be one of {', '.join(FASHION_MNIST_FILES)}, got {split!r}")
        if resolution not in FASHION_MNIST_RESOLUTIONS:
            raise ValueError(f"Fashion-MNIST resolution must be "
                             f"{' or '.join(map(str, FASHION_MNIST_RESOLUTIONS))}, got {resolution!r}")
        self.root, self.split, self.resolution = Path(root), split, resolution
        # No flip by default: a deterministic pixel set keeps small runs and their golden tests exact.
        self.flip = flip
        names = FASHION_MNIST_FILES[split]
        if not all((self.root / n).is_file() for n in names):
            raise ValueError(f"Fashion-MNIST files missing in {self.root} (expected {', '.join(names)}): "
                             f"run `apt-get install dataset-fashion-mnist`, or download the four original "
                             f"*-ubyte.gz files from the Fashion-MNIST project into {self.root}")
        n = FASHION_MNIST_COUNTS[split]
        images = _read_idx(self.root / names[0], IDX_IMAGES_MAGIC, (n, 28, 28))
        labels = _read_idx(self.root / names[1], IDX_LABELS_MAGIC, (n,))
        if labels.max() >= len(FASHION_MNIST_CLASSES):
            raise ValueError(f"{self.root / names[1]} holds label {labels.max()}, expected 0..9")
        self.images = _padded(images, resolution)
        self.labels = labels.astype(np.int64)
        self.classes = list(FASHION_MNIST_CLASSES)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key) -> tuple[torch.Tensor, int]:
        x, y = self.batch([key])
        return x[0], int(y[0])

    def batch(self, keys) -> tuple[torch.Tensor, torch.Tensor]:
        """The items of `keys` stacked, (B, 1, R, R) in [-1, 1] and labels, in one gather: the trainer's batch when
        the data is in memory (collating item by item cost 1.6 ms of a tiny model's 120 ms CPU step)."""
        pairs = [_unpack_key(key, len(self)) for key in keys]
        index = np.array([i for i, _ in pairs], dtype=np.int64)
        x = torch.from_numpy(self.images[index]).float()[:, None] / 127.5 - 1  # (B, 1, R, R)
        if self.flip:
            flips = torch.tensor([flip_from_seed(seed) for _, seed in pairs])
            x = torch.where(flips[:, None, None, None], x.flip(-1), x)
        return x, torch.from_numpy(self.labels[index])

    def describe(self) -> dict:
        return dict(kind="fashion_mnist", path=str(self.root.resolve()), split=self.split, resolution=self.resolution,
                    channels=1, shape=[1, self.resolution, self.resolution], num_classes=len(self.classes),
                    count=len(self), padding=2 * self.resolution // 32, flip=self.flip,
                    latent_source="pixels")


# ---------------------------------------------------------------------------------------------------------------------
# VAE (sd-vae-ft-ema through diffusers)
# ---------------------------------------------------------------------------------------------------------------------

def _check_vae_dir(path: str | Path) -> Path:
    """The VAE folder, if it exists and holds config.json; else a ValueError saying where to put the weights."""
    path = Path(path)
    if not (path / "config.json").is_file():
        what = "has no config.json" if path.is_dir() else "does not exist"
        raise ValueError(f"VAE directory {path} {what}: put stabilityai/sd-vae-ft-ema there, e.g. "
                         f"`hf download stabilityai/sd-vae-ft-ema --local-dir {path}`")
    return path


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Decoder output (N, 3, H, W) in about [-1, 1] -> uint8 (N, H, W, 3) as clamp(127.5 x + 128, 0, 255), truncated."""
    # DiT's sample_ddp.py mapping; it differs from round((x + 1) / 2 * 255) but is kept for FID parity (protocol §3).
    return (127.5 * x + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def posterior_noise(seed: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The fixed N(0, I) noise of image `index` for its two orientations, (2, *shape), from (seed, index) alone."""
    # One generator per image, so a latent does not depend on batch size, device or where a resumed run restarted.
    g = torch.Generator().manual_seed(seed * 2**32 + index)
    return torch.randn((2, *shape), generator=g)


class VAE:
    """diffusers AutoencoderKL from a local folder, with DiT's latent scale and uint8 decode (protocol.md §3, §5)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        self.path = _check_vae_dir(path)
        try:
            from diffusers import AutoencoderKL  # here, not at the top: pixel-space runs need no diffusers
        except ImportError as e:
            raise ImportError("the VAE needs diffusers: pip install diffusers") from e
        self.device = torch.device(device)
        model = AutoencoderKL.from_pretrained(str(self.path), local_files_only=True)
        self.model = model.to(self.device).eval().requires_grad_(False)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, h, w) of the latent of a resolution x resolution image: every encoder block but the last halves it."""
        cfg = self.model.config
        size = resolution // 2 ** (len(cfg.block_out_channels) - 1)
        return cfg.latent_channels, size, size

    @torch.no_grad()
    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the unscaled posterior of images x in [-1, 1], (N, 3, H, W) -> 2 x (N, C, h, w)."""
        dist = self.model.encode(x.to(self.device, torch.float32)).latent_dist
        return dist.mean, dist.std

    def encode(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A posterior sample (not the mean, as DiT trains) x 0.18215; its noise comes from `generator` only."""
        mean, std = self.posterior(x)
        noise = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean.device)
        return (mean + std * noise) * LATENT_SCALE

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (already x 0.18215), (N, C, h, w) -> uint8 (N, H, W, 3) on the CPU, by DiT's mapping."""
        x = self.model.decode(z.to(self.device, torch.float32) / LATENT_SCALE).sample
        return to_uint8(x).cpu()

    def describe(self) -> dict:
        return dict(vae_path=str(self.path.resolve()), vae_id=self.path.name, scale=LATENT_SCALE,
                    latent_source="on_the_fly")


# ---------------------------------------------------------------------------------------------------------------------
# Pre-extracted latents (DiCo's pair mode; fast-DiT/DiC's single mode)
# ---------------------------------------------------------------------------------------------------------------------

_PROGRESS_EVERY_S = 60.0  # how often an extraction flushes its partial file and records progress for a resume
_PARTIAL, _PROGRESS = ".latents.partial.npy", ".extract-progress.json"


def _save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    """np.save atomically, so `path` is either absent or complete."""
    atomic_write(path, lambda f: np.save(f, arr))


def extract_latents(dataset_root: str | Path, out_dir: str | Path, resolution: int, vae_path: str | Path,
                    batch_size: int = 32, device: str = "cpu", limit: int | None = None, mode: str = "pair",
                    seed: int = 0, dtype: str = "float32", num_workers: int = 0) -> Path:
    """Encode an image folder once into out_dir/{latents.npy, labels.npy, meta.json}; re-running resumes or returns."""
    # mode "pair" stores each centre-cropped image's latent and its flip's, (N, 2, C, h, w) (DiCo); "single" stores one
    # orientation per image drawn from (seed, index), (N, 1, C, h, w) (fast-DiT, DiC). Latents are posterior samples
    # x 0.18215 whose noise depends only on (seed, index) and row i is dataset index i, so the result does not depend
    # on batch size, device or interruptions. `limit` keeps the first `limit` indices (smoke tests).
    out_dir = Path(out_dir)
    if mode not in LATENT_MODES:
        raise ValueError(f"extract_latents mode must be one of {', '.join(LATENT_MODES)}, got {mode!r}")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"extract_latents dtype must be float32 or float16, got {dtype!r}")
    if not (isinstance(seed, int) and 0 <= seed < 2**31):
        raise ValueError(f"extract_latents seed must be an int in [0, 2**31), got {seed!r}")
    if batch_size < 1 or (limit is not None and limit < 1):
        raise ValueError(f"extract_latents batch_size and limit must be >= 1, got {batch_size}, {limit}")
    vae_dir = _check_vae_dir(vae_path)
    images = ImageFolderDataset(dataset_root, resolution, flip=False)
    count = len(images) if limit is None else min(limit, len(images))
    record = LATENT_MODES[mode]
    key = dict(source=str(images.root.resolve()), resolution=resolution, crop=CROP, mode=record,
               vae_path=str(vae_dir.resolve()), vae_id=vae_dir.name, scale=LATENT_SCALE, seed=seed, dtype=dtype,
               count=count)

    meta_path = out_dir / "meta.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        changed = {k: (old.get(k), v) for k, v in key.items() if old.get(k) != v}
        if not changed:
            log.info("latents in %s are complete; nothing to do", out_dir)
            return out_dir
        raise ValueError(f"{meta_path} holds an extraction with other settings (old, new: {changed}); "
                         f"choose another out_dir or delete this one")

    vae = VAE(vae_dir, device)
    shape = (count, VIEWS[record], *vae.latent_shape(resolution))  # (N, V, C, h, w)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial, progress = out_dir / _PARTIAL, out_dir / _PROGRESS
    start = 0
    if progress.is_file() and partial.is_file() and json.loads(progress.read_text())["key"] == key:
        latents = np.lib.format.open_memmap(partial, mode="r+")
        if latents.shape == shape and latents.dtype == np.dtype(dtype):
            start = json.loads(progress.read_text())["done"]
            log.info("resuming the extraction into %s at %d/%d", out_dir, start, count)
    if start == 0:
        latents = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=shape)

    # The loader only decodes and crops (flip off, so the key's seed is unused); rows are written by dataset index.
    keys = [(i, 0) for i in range(start, count)]
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, sampler=keys, num_workers=num_workers)
    pos, last_save = start, time.monotonic()
    for x, _ in loader:  # (B, 3, S, S)
        idx = range(pos, pos + len(x))
        noise = torch.stack([posterior_noise(seed, i, shape[2:]) for i in idx])  # (B, 2, C, h, w)
        if mode == "pair":
            mean, std = vae.posterior(torch.stack([x, x.flip(-1)], 1).flatten(0, 1))  # (2B, C, h, w)
            mean, std = mean.unflatten(0, (len(x), 2)), std.unflatten(0, (len(x), 2))  # (B, 2, C, h, w)
        else:
            # A frozen random flip per image; its noise is that orientation's, so it equals the pair's latent.
            view = torch.tensor([int(flip_from_seed(seed * 2**32 + i)) for i in idx])
            x = torch.where(view.bool()[:, None, None, None], x.flip(-1), x)
            noise = noise[torch.arange(len(x)), view][:, None]  # (B, 1, C, h, w)
            mean, std = (t[:, None] for t in vae.posterior(x))
        z = (mean + std * noise.to(mean.device)) * LATENT_SCALE
        latents[pos:pos + len(x)] = z.cpu().numpy().astype(dtype)
        pos += len(x)
        if time.monotonic() - last_save >= _PROGRESS_EVERY_S:
            latents.flush()  # the rows must be on disk before the progress that counts them
            atomic_write_text(progress, json.dumps(dict(key=key, done=pos)))
            last_save = time.monotonic()
            log.info("extracted %d/%d latents into %s", pos, count, out_dir)
    assert pos == count, (pos, count)

    # Final names appear only once complete; meta.json goes last and marks the folder finished.
    latents.flush()
    del latents
    os.replace(partial, out_dir / "latents.npy")
    _save_npy_atomic(out_dir / "labels.npy", images.labels[:count])
    meta = dict(key, num_classes=len(images.classes), classes=images.classes, latent_shape=list(shape[2:]),
                limit=limit)
    atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n")
    progress.unlink(missing_ok=True)
    return out_dir


class LatentDataset(torch.utils.data.Dataset):
    """Latents written by extract_latents; in pair mode the seed picks the image's or its flip's latent."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"latent folder {self.root} does not exist (make it with extract_latents)")
        meta_path, lat_path, lab_path = (self.root / n for n in ("meta.json", "latents.npy", "labels.npy"))
        if not meta_path.is_file():
            raise ValueError(f"{meta_path} missing: not a finished extraction (meta.json is written last; re-run it)")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path} is not valid JSON ({e})") from e
        need = ("mode", "count", "latent_shape", "num_classes", "resolution")
        if any(k not in self.meta for k in need) or self.meta["mode"] not in VIEWS:
            raise ValueError(f"{meta_path} needs keys {', '.join(need)} and mode in {', '.join(VIEWS)}")
        count, self.views = self.meta["count"], VIEWS[self.meta["mode"]]
        expect = (count, self.views, *self.meta["latent_shape"])
        for path in (lat_path, lab_path):
            if not path.is_file():
                raise ValueError(f"{path} missing")
        try:
            latents = np.load(lat_path, mmap_mode="r")  # header only; rows are read on access
            labels = np.load(lab_path)  # small (8 bytes an image) and read whole to check its range
        except ValueError as e:
            raise ValueError(f"{lat_path} or {lab_path} is not a readable .npy file ({e})") from e
        if latents.shape != expect or latents.dtype not in (np.float16, np.float32):
            raise ValueError(f"{lat_path} is {latents.dtype} {latents.shape}, expected float16/32 {expect}")
        if labels.shape != (count,) or labels.dtype != np.int64:
            raise ValueError(f"{lab_path} is {labels.dtype} {labels.shape}, expected int64 ({count},)")
        if count and not 0 <= labels.min() <= labels.max() < self.meta["num_classes"]:
            raise ValueError(f"{lab_path} holds labels outside 0..{self.meta['num_classes'] - 1}")
        self.labels = labels
        self._latents = latents

    def _array(self) -> np.ndarray:
        # Reopened lazily in each loader worker: pickling a memmap would copy the whole file into the pickle.
        if self._latents is None:
            self._latents = np.load(self.root / "latents.npy", mmap_mode="r")
        return self._latents

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_latents": None}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key) -> tuple[torch.Tensor, int]:
        index, seed = _unpack_key(key, len(self))
        view = int(flip_from_seed(seed)) if self.views == 2 else 0  # same flip as the pixel datasets for this seed
        x = torch.from_numpy(np.array(self._array()[index, view], dtype=np.float32))  # (C, h, w)
        return x, int(self.labels[index])

    def describe(self) -> dict:
        m = self.meta
        return dict(kind="latents", path=str(self.root.resolve()), resolution=m["resolution"],
                    channels=m["latent_shape"][0], shape=list(m["latent_shape"]), num_classes=m["num_classes"],
                    count=len(self), latent_source=m["mode"], vae_path=m.get("vae_path"), vae_id=m.get("vae_id"),
                    scale=m.get("scale"), crop=m.get("crop"), seed=m.get("seed"), dtype=m.get("dtype"),
                    source=m.get("source"))


# ---------------------------------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------------------------------

DATASETS = {"fashion_mnist": FashionMNIST, "imagenet_folder": ImageFolderDataset, "latents": LatentDataset}


def build_dataset(kind: str, **options) -> torch.utils.data.Dataset:
    """The dataset `kind` built from `options`; a wrong kind or option is a ValueError listing the valid ones."""
    if kind not in DATASETS:
        raise ValueError(f"unknown dataset kind {kind!r}{did_you_mean(kind, DATASETS)}; "
                         f"valid kinds: {', '.join(DATASETS)}")
    params = inspect.signature(DATASETS[kind]).parameters
    for name in options:
        if name not in params:
            raise ValueError(f"dataset {kind!r} has no option {name!r}{did_you_mean(name, params)}; "
                             f"valid options: {', '.join(params)}")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in options]
    if missing:
        raise ValueError(f"dataset {kind!r} needs option(s) {', '.join(missing)}; valid options: {', '.join(params)}")
    return DATASETS[kind](**options)
