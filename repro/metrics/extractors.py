"""Feature extractors behind FID / IS / sFID / precision-recall, and where their weights come from.

`inception`: clean-fid's wrapper (`InceptionV3W`) around NVIDIA's TorchScript port of the 2015-12-05 TF Inception
graph, the network of the ADM evaluator. Preprocessing is clean-fid's for the chosen mode, so our numbers equal
`cleanfid.fid.compute_fid` on the same images:
  - `legacy_tensorflow` (default; closest to ADM): uint8 images in, TF-compatible bilinear resize inside the net;
  - `clean`: PIL bicubic resize to 299 outside the net.
Pool features (2048) for FID and precision/recall; softmax without the output bias (ADM's logits are pool3 x the
graph's MatMul weights) for IS; `mixed_6/conv` channels 0-6 (7x17x17 = 2023) for sFID, read by running the
net's layers ourselves, which is checked against the net's own pool features before sFID is reported.

`fashion-mnist`: a small CNN trained once on the Fashion-MNIST training split and saved with its test accuracy
(FID on MNIST-like data is usually computed with such a domain classifier). Its numbers are labelled
"(Fashion-MNIST classifier)" and never compared with Inception numbers.

Weights are local files: a missing one is a one-line error naming the file and where to put it; nothing is
downloaded unless asked for (`allow_download`), because compute nodes are usually offline.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from repro.errors import ConfigError

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_ENV = "REPRO_INCEPTION"
CLEANFID_CACHE = Path("/tmp")  # where clean-fid itself downloads the weights on first use
MODES = ("legacy_tensorflow", "clean")
SFID_CHANNELS = 7  # ADM: mixed_6/conv[..., :7]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Features:
    """What one pass of the extractor gives for a set of images."""

    pool: np.ndarray                  # (N, D) for FID and precision/recall
    probs: np.ndarray | None = None   # (N, classes) for IS
    spatial: np.ndarray | None = None  # (N, D_s) for sFID


class Extractor:
    """A feature network and everything the protocol records about it."""

    name: str
    label: str           # printed after every number it gives, e.g. "Fashion-MNIST classifier"
    weights: Path
    mode: str | None = None
    sfid_note: str | None = None  # why sFID is unavailable, when it is

    @property
    def weights_sha256(self) -> str:
        if not hasattr(self, "_sha"):
            self._sha = sha256_file(self.weights)
        return self._sha

    @property
    def id(self) -> str:
        return f"{self.name}{'/' + self.mode if self.mode else ''}@{self.weights_sha256[:12]}"

    def protocol(self) -> dict:
        return {"extractor": self.name, "extractor_label": self.label, "extractor_weights": str(self.weights),
                "extractor_sha256": self.weights_sha256, "cleanfid_mode": self.mode}

    def prepare(self, images: np.ndarray) -> torch.Tensor:
        """uint8 NHWC (1 or 3 channels) -> the float (N, 3, H, W) batch in [0, 255] that clean-fid feeds."""
        raise NotImplementedError

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Pool features of a prepared batch (clean-fid's `custom_feat_extractor` convention)."""
        raise NotImplementedError

    def extract(self, images: np.ndarray, batch_size: int = 64, probs: bool = True, spatial: bool = True) -> Features:
        raise NotImplementedError


def _rgb(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 images (N, H, W, 1 or 3), got {images.dtype} {images.shape}")
    # grey -> RGB by repeating the channel, as PIL's convert("RGB") does for clean-fid's folder reader
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


# ---------------------------------------------------------------------------------------------- Inception
def inception_path(configured: str | Path | None = None, allow_download: bool = False) -> Path:
    """The Inception weights: the configured file, else $REPRO_INCEPTION, else clean-fid's cache (/tmp)."""
    candidates = [Path(p) for p in (configured, os.environ.get(INCEPTION_ENV)) if p]
    path = candidates[0] if candidates else CLEANFID_CACHE / INCEPTION_FILE
    if path.is_dir():
        path = path / INCEPTION_FILE
    if path.is_file():
        if path.name != INCEPTION_FILE:
            raise ConfigError(f"{path}: clean-fid loads the Inception weights by their file name; rename it to "
                              f"{INCEPTION_FILE}")
        return path
    if allow_download:
        from cleanfid.downloads_helper import check_download_url

        return Path(check_download_url(local_folder=str(path.parent), url=INCEPTION_URL))
    raise ConfigError(f"{path}: Inception weights not found; put {INCEPTION_FILE} there (from {INCEPTION_URL}), "
                      f"or point evaluate.inception / --inception / ${INCEPTION_ENV} at it")


class Inception(Extractor):
    name = "inception"

    def __init__(self, weights: Path, mode: str = "legacy_tensorflow", device: str | torch.device = "cpu"):
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        if mode not in MODES:
            raise ConfigError(f"clean-fid mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.weights, self.mode, self.device = Path(weights), mode, torch.device(device)
        self.label = f"Inception, clean-fid {mode}"
        try:
            self.net = InceptionV3W(str(self.weights.parent), download=False,
                                    resize_inside=mode == "legacy_tensorflow").to(self.device).eval()
        except RuntimeError as e:
            raise ConfigError(f"{self.weights}: not a TorchScript Inception network ({str(e).splitlines()[0]})") \
                from None
        self.resize = build_resizer(mode)
        self._spatial_checked = False

    def prepare(self, images: np.ndarray) -> torch.Tensor:
        from torchvision.transforms import ToTensor

        to_tensor, out = ToTensor(), []
        for img in _rgb(images):
            r = self.resize(img)
            # clean-fid's ResizeDataset: uint8 -> ToTensor()*255, float32 (PIL "F" resize) -> ToTensor() as is
            out.append(to_tensor(np.array(r)) * 255 if r.dtype == np.uint8 else to_tensor(r))
        return torch.stack(out)

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.net(batch.to(self.device))

    @torch.no_grad()
    def _probs(self, batch: torch.Tensor) -> torch.Tensor:
        # softmax(pool3 @ W) without the bias, as ADM's evaluator and StyleGAN's IS do
        return self.net.base(batch, return_features=False, no_output_bias=True)

    def _resized(self, batch: torch.Tensor) -> torch.Tensor:
        """The 299x299 input of the net's layers, scaled to [-1, 1)."""
        n, c, h, w = batch.shape
        x = batch.float()
        if (h, w) != (299, 299):  # TF's resize_bilinear (align_corners False, half-pixel offsets) as a grid sample
            theta = torch.eye(2, 3, device=x.device)
            theta[0, 2] += theta[0, 0] / w - theta[0, 0] / 299
            theta[1, 2] += theta[1, 1] / h - theta[1, 1] / 299
            grid = F.affine_grid(theta[None].repeat(n, 1, 1), [n, c, 299, 299], align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return (x - 128) / 128

    @torch.no_grad()
    def _spatial(self, batch: torch.Tensor, pool: torch.Tensor) -> torch.Tensor | None:
        layers = dict(self.net.layers.named_children())
        if "mixed_6" not in layers or not hasattr(layers["mixed_6"], "conv"):
            self.sfid_note = "the Inception network has no layers.mixed_6.conv"
            return None
        x, names = self._resized(batch), list(layers)
        cut = names.index("mixed_6")
        for name in names[:cut]:
            x = layers[name](x)
        spatial = layers["mixed_6"].conv(x)[:, :SFID_CHANNELS].flatten(1)
        if not self._spatial_checked:  # our walk through the layers must reproduce the net's own pool features
            for name in names[cut:]:
                x = layers[name](x)
            err = (x.reshape(len(x), -1) - pool).abs().max().item()
            if err > 1e-3 * max(1.0, pool.abs().max().item()):
                self.sfid_note = f"running the layers by hand differs from the net's pool features by {err:.2e}"
                return None
            self._spatial_checked = True
        return spatial

    def extract(self, images: np.ndarray, batch_size: int = 64, probs: bool = True, spatial: bool = True) -> Features:
        pools, ps, sps = [], [], []
        for i in range(0, len(images), batch_size):
            batch = self.prepare(images[i:i + batch_size]).to(self.device)
            pool = self(batch)
            pools.append(pool.cpu().numpy())
            if probs:
                ps.append(self._probs(batch).cpu().numpy())
            if spatial and self.sfid_note is None:
                s = self._spatial(batch, pool)
                if s is not None:
                    sps.append(s.cpu().numpy())
        return Features(np.concatenate(pools), np.concatenate(ps) if probs else None,
                        np.concatenate(sps) if spatial and self.sfid_note is None else None)


# ---------------------------------------------------------------------------------------------- Fashion-MNIST
class FashionNet(nn.Module):
    """A small CNN for 32x32 (or 16x16) grey images, Fashion-MNIST as our samples are: 10 classes.

    Features: `pool` (4 x width: 64-d at the default width 16, after global average pooling) for FID and
    precision/recall; `spatial`, the first 8 channels of the R/4 map before the last block (512-d at 32 px,
    128-d at 16 px), playing the role of Inception's mixed_6/conv for sFID.
    """

    def __init__(self, width: int = 16):
        super().__init__()
        w = width

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.block1, self.block2 = block(1, w), block(w, 2 * w)
        self.block3 = nn.Sequential(nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU())
        self.head = nn.Linear(4 * w, 10)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (N, 1, 32, 32) in [-1, 1]."""
        h = F.max_pool2d(self.block1(x), 2)
        spatial = F.max_pool2d(self.block2(h), 2)
        pool = self.block3(spatial).mean(dim=(2, 3))
        return {"pool": pool, "logits": self.head(pool), "spatial": spatial[:, :8].flatten(1)}


def grey(images: np.ndarray, resolution: int = 32) -> np.ndarray:
    """uint8 NHWC (1 or 3 equal channels) -> uint8 (N, R, R); at R = 32, 28 px (Fashion-MNIST's own) is padded by 2."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 images (N, H, W, 1 or 3), got {images.dtype} {images.shape}")
    g = images[..., 0]
    if resolution == 32 and g.shape[1:] == (28, 28):
        g = np.pad(g, ((0, 0), (2, 2), (2, 2)))
    if g.shape[1:] != (resolution, resolution):
        raise ValueError(f"this Fashion-MNIST classifier takes {resolution}x{resolution} images, "
                         f"got {g.shape[1]}x{g.shape[2]}")
    return g


def classifier_resolution(images: np.ndarray) -> int:
    """The classifier resolution that scores these images: 16 for 16 px samples, else 32 (28 px pads to it)."""
    return 16 if np.asarray(images).shape[1] == 16 else 32


class FashionClassifier(Extractor):
    name = "fashion-mnist"
    label = "Fashion-MNIST classifier"

    def __init__(self, weights: Path, device: str | torch.device = "cpu"):
        self.weights, self.device = Path(weights), torch.device(device)
        if not self.weights.is_file():
            raise ConfigError(f"{self.weights}: Fashion-MNIST classifier not found; train it with "
                              f"`repro evaluate ... --extractor fashion-mnist` (it is trained once on first use)")
        state = torch.load(self.weights, map_location="cpu", weights_only=False)
        self.net = FashionNet(state["width"]).eval().to(self.device)
        self.net.load_state_dict(state["model"])
        self.test_accuracy = state["test_accuracy"]
        self.resolution = state.get("resolution", 32)

    def protocol(self) -> dict:
        return {**super().protocol(), "extractor_test_accuracy": self.test_accuracy,
                "extractor_resolution": self.resolution}

    def prepare(self, images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.repeat(grey(images, self.resolution)[:, None], 3, axis=1)).float()

    @torch.no_grad()
    def _forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        x = batch[:, :1].to(self.device) / 127.5 - 1  # grey channel, [0, 255] -> [-1, 1] as in training
        return self.net(x)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self._forward(batch)["pool"]

    def extract(self, images: np.ndarray, batch_size: int = 256, probs: bool = True, spatial: bool = True) -> Features:
        pools, ps, sps = [], [], []
        for i in range(0, len(images), batch_size):
            out = self._forward(self.prepare(images[i:i + batch_size]))
            pools.append(out["pool"].cpu().numpy())
            ps.append(out["logits"].softmax(-1).cpu().numpy())
            sps.append(out["spatial"].cpu().numpy())
        return Features(np.concatenate(pools), np.concatenate(ps) if probs else None,
                        np.concatenate(sps) if spatial else None)


def train_classifier(out: Path, root: str | Path | None = None, epochs: int = 5, width: int = 16, seed: int = 0,
                     batch: int = 128, resolution: int = 32, log=print) -> dict:
    """Train FashionNet on the training split at `resolution` (as the samples it will score), measure it on the
    test split, save {weights, accuracy} atomically."""
    from repro import rundir
    from repro.data import FASHION_MNIST_ROOT, FashionMNIST

    train_set = FashionMNIST(root or FASHION_MNIST_ROOT, "train", resolution=resolution)
    test_set = FashionMNIST(root or FASHION_MNIST_ROOT, "test", resolution=resolution)
    torch.manual_seed(seed)
    net = FashionNet(width)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    x_train = torch.from_numpy(train_set.images).float()[:, None] / 127.5 - 1
    y_train = torch.from_numpy(train_set.labels)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * (len(x_train) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(x_train), generator=g)
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            x = x_train[idx]
            flip = torch.rand(len(x), generator=g) < 0.5  # garments are left-right symmetric classes
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(net(x)["logits"], y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log(f"fashion-mnist classifier: epoch {epoch + 1}/{epochs}, last loss {loss.item():.3f}")
    net.eval()
    x_test = torch.from_numpy(test_set.images).float()[:, None] / 127.5 - 1
    with torch.no_grad():
        pred = torch.cat([net(x_test[i:i + 1000])["logits"].argmax(-1) for i in range(0, len(x_test), 1000)])
    accuracy = (pred.numpy() == test_set.labels).mean().item()
    record = {"model": net.state_dict(), "width": width, "resolution": resolution, "epochs": epochs, "seed": seed,
              "test_accuracy": accuracy, "trained_on": "Fashion-MNIST train (60,000)",
              "tested_on": "Fashion-MNIST test (10,000)"}
    rundir.save_atomic(record, out)
    info = {k: v for k, v in record.items() if k != "model"}
    rundir.atomic_write_text(out.with_suffix(".json"), json.dumps(info, indent=2) + "\n")
    log(f"fashion-mnist classifier: test accuracy {accuracy:.4f}, saved to {out}")
    return info


def classifier_path(configured: str | Path | None, cache: Path, resolution: int = 32) -> Path:
    name = "fashion-mnist-classifier.pt" if resolution == 32 else f"fashion-mnist-classifier-{resolution}px.pt"
    return Path(configured) if configured else cache / "extractors" / name


def build(name: str, *, mode: str = "legacy_tensorflow", inception: str | Path | None = None,
          classifier: str | Path | None = None, cache: Path = Path("results/.cache"), allow_download: bool = False,
          train_if_missing: bool = True, device: str | torch.device = "cpu", resolution: int = 32,
          log=print) -> Extractor:
    """The extractor `name` with its weights: Inception from a local file; the Fashion-MNIST classifier for
    `resolution` px images from its file, trained once (under a lock, so concurrent evaluate jobs train it once)
    when missing and allowed."""
    if name == "inception":
        return Inception(inception_path(inception, allow_download), mode, device)
    if name == "fashion-mnist":
        path = classifier_path(classifier, cache, resolution)
        if not path.is_file() and train_if_missing and not classifier:
            from repro import rundir

            with rundir.file_lock(path.with_suffix(".lock")):
                if not path.is_file():
                    log(f"training the Fashion-MNIST classifier once into {path} ...")
                    train_classifier(path, resolution=resolution, log=log)
        return FashionClassifier(path, device)
    raise ConfigError(f"unknown extractor {name!r}: use inception or fashion-mnist")
