"""FID / IS / sFID / precision-recall: the math against closed forms, parity with clean-fid's own compute_fid, the
Fashion-MNIST classifier, the Inception loading path (with a TorchScript network the test builds: no weights are
downloaded), and the one-line errors for missing weights."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from repro.cli import main
from repro.config import EvalConfig
from repro.evaluate import evaluate_file
from repro.metrics import extractors as ex
from repro.metrics.fid import Gaussian, fit, frechet_distance, inception_score, precision_recall

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fashion = pytest.mark.skipif(not FASHION.exists(), reason="Debian package dataset-fashion-mnist is not installed")


# ---------------------------------------------------------------------------------------------- the math
def test_fid_of_a_feature_set_against_itself_is_zero():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(3000, 64)) @ rng.normal(size=(64, 64))  # correlated, full rank
    g = fit(feats)
    assert abs(frechet_distance(g, g)) < 1e-6


def test_fid_matches_the_closed_form_for_gaussians():
    rng = np.random.default_rng(1)
    d = 6
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T  # commuting: Tr sqrt(S1 S2) = sum sqrt(a b)
    closed = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert frechet_distance(Gaussian(mu1, s1), Gaussian(mu2, s2)) == pytest.approx(closed, rel=1e-9, abs=1e-9)
    # and from samples of the two Gaussians: the fitted statistics converge on it
    x = rng.multivariate_normal(mu1, s1, size=200_000)
    y = rng.multivariate_normal(mu2, s2, size=200_000)
    assert frechet_distance(fit(x), fit(y)) == pytest.approx(closed, rel=0.02)


def test_inception_score_bounds():
    assert inception_score(np.full((1000, 10), 0.1)) == pytest.approx(1.0, abs=1e-12)
    confident = np.eye(10)[np.arange(1000) % 10]            # every class equally often, each sample certain
    assert inception_score(confident) == pytest.approx(10.0, rel=1e-12)
    # ADM's split convention: splits of 5,000 (the last one shorter), mean of the splits
    mixed = np.concatenate([np.eye(10)[np.arange(5000) % 10], np.full((2000, 10), 0.1)])
    assert inception_score(mixed) == pytest.approx((10.0 + 1.0) / 2)


def test_precision_recall():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(500, 8))
    assert precision_recall(ref, ref) == (1.0, 1.0)
    far = rng.normal(size=(400, 8)) + 100
    assert precision_recall(ref, far) == (0.0, 0.0)
    # samples covering half the reference: precise, but recall about one half
    half = ref[ref[:, 0] > 0]
    p, r = precision_recall(ref, half)
    assert p == 1.0 and 0.4 < r < 0.75


# ---------------------------------------------------------------------------------------------- Inception
class _Mixed6(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 12, 1)
        self.other = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.conv(x), self.other(x)], 1)


class FakeInception(nn.Module):
    """The interface of NVIDIA's TorchScript Inception (inception-2015-12-05.pt) at a toy size: `layers` with
    `mixed_6.conv`, 2048-d pool features, TF-style resize inside, probabilities without the output bias."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential()
        self.layers.add_module("conv", nn.Conv2d(3, 8, 3, stride=4))
        # 4x4 maps at mixed_6 keep sFID's features at 7 x 16 (the real net's are 7 x 17 x 17)
        self.layers.add_module("mixed_5", nn.Sequential(nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.MaxPool2d(4)))
        self.layers.add_module("mixed_6", _Mixed6())
        self.layers.add_module("mixed_7", nn.Sequential(nn.Conv2d(16, 2048, 1), nn.ReLU()))
        self.layers.add_module("pool", nn.AdaptiveAvgPool2d(1))
        self.output = nn.Linear(2048, 1008)

    def forward(self, img, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False):
        n, c, h, w = img.shape
        x = img.to(torch.float32)
        theta = torch.eye(2, 3, device=x.device)
        theta[0, 2] += theta[0, 0] / w - theta[0, 0] / 299
        theta[1, 2] += theta[1, 1] / h - theta[1, 1] / 299
        grid = F.affine_grid(theta.unsqueeze(0).repeat([n, 1, 1]), [n, c, 299, 299], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        x = (x - 128) / 128
        features = self.layers(x).reshape(n, 2048)
        if return_features:
            return features
        logits = features @ self.output.weight.t()
        if not no_output_bias:
            logits = logits + self.output.bias
        return F.softmax(logits, dim=1)


@pytest.fixture(scope="module")
def fake_inception(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / ex.INCEPTION_FILE
    torch.jit.script(FakeInception().eval()).save(str(path))
    return path


def _write_folder(folder: Path, images: np.ndarray) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"{i:05d}.png")
    return folder


@pytest.mark.parametrize("mode", ["legacy_tensorflow", "clean"])
def test_inception_fid_of_two_folders_equals_cleanfid(tmp_path, fake_inception, mode):
    """Our FID of two image folders equals clean-fid's compute_fid with the same network (a built stand-in for the
    real weights, which are never downloaded here)."""
    from cleanfid.fid import compute_fid

    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (1, 24, 24, 3))
    a = np.clip(base + rng.integers(-60, 60, (40, 24, 24, 3)), 0, 255).astype(np.uint8)
    b = np.clip(base + rng.integers(-90, 30, (36, 24, 24, 3)), 0, 255).astype(np.uint8)
    da, db = _write_folder(tmp_path / "a", a), _write_folder(tmp_path / "b", b)
    cfg = EvalConfig(extractor="inception", reference=str(db), mode=mode, metrics=("fid", "is", "sfid"),
                     inception=str(fake_inception))
    ours = evaluate_file(da, cfg, tmp_path / "cache")
    extractor = ex.build("inception", mode=mode, inception=fake_inception)
    theirs = compute_fid(str(da), str(db), mode=mode, custom_feat_extractor=extractor, device=torch.device("cpu"),
                         num_workers=0, batch_size=32, verbose=False, use_dataparallel=False)
    assert ours["metrics"]["fid"] == pytest.approx(theirs, abs=1e-3)
    assert ours["metrics"]["is"] >= 1.0
    # sFID is reported only because walking the layers by hand reproduced the net's own pool features
    assert ours["metrics"]["sfid"] is not None and ours["unavailable"] == {}
    p = ours["protocol"]
    assert p["cleanfid_mode"] == mode and p["extractor_sha256"] == ex.sha256_file(fake_inception)
    assert ours["labels"]["fid"] == "FID-40 (Inception, clean-fid %s)" % mode


def test_adm_and_cleanfid_statistics_are_used_as_stored(tmp_path, fake_inception):
    """An ADM reference batch: its mu/sigma and mu_s/sigma_s are used as stored (they come from ADM's TF graph),
    its images only for precision/recall; clean-fid statistics give FID alone; neither fits another extractor."""
    rng = np.random.default_rng(4)
    samples = rng.integers(0, 256, (40, 24, 24, 3), dtype=np.uint8)
    ref_images = rng.integers(0, 256, (30, 24, 24, 3), dtype=np.uint8)
    extractor = ex.build("inception", inception=fake_inception)
    feats = extractor.extract(samples)
    mu, sigma = feats.pool.mean(0) + 0.5, np.cov(feats.pool, rowvar=False) + np.eye(2048) * 1e-3
    mu_s, sigma_s = feats.spatial.mean(0), np.eye(feats.spatial.shape[1])
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    np.savez(tmp_path / "VIRTUAL_test.npz", mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, arr_0=ref_images)
    cfg = EvalConfig(reference=str(tmp_path / "VIRTUAL_test.npz"), inception=str(fake_inception))
    record = evaluate_file(tmp_path / "samples.npz", cfg, tmp_path / "cache", extractor)
    assert record["metrics"]["fid"] == pytest.approx(frechet_distance(fit(feats.pool), Gaussian(mu, sigma)))
    assert record["metrics"]["sfid"] == pytest.approx(frechet_distance(fit(feats.spatial), Gaussian(mu_s, sigma_s)))
    assert record["metrics"]["precision"] is not None
    assert record["protocol"]["reference_kind"] == "adm"
    assert record["protocol"]["reference_sha256"] == ex.sha256_file(tmp_path / "VIRTUAL_test.npz")

    np.savez(tmp_path / "cleanfid_stats.npz", mu=mu, sigma=sigma)
    cfg = EvalConfig(reference=str(tmp_path / "cleanfid_stats.npz"), inception=str(fake_inception),
                     metrics=("fid", "precision"))
    record = evaluate_file(tmp_path / "samples.npz", cfg, tmp_path / "cache", extractor)
    assert record["metrics"]["precision"] is None and "statistics only" in record["unavailable"]["precision"]
    with pytest.raises(ValueError, match="holds Inception statistics"):
        evaluate_file(tmp_path / "samples.npz", EvalConfig(extractor="fashion-mnist", reference=str(
            tmp_path / "cleanfid_stats.npz"), classifier=str(tmp_path / "unused.pt")), tmp_path / "cache",
            extractor=_NotInception())


class _NotInception(ex.Extractor):
    name, label, weights = "fashion-mnist", "stand-in", Path("/dev/null")


def test_missing_inception_weights_is_one_line(tmp_path, capsys):
    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    missing = tmp_path / "nowhere" / ex.INCEPTION_FILE
    assert main(["evaluate", str(samples), "--ref", str(samples), "--inception", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(missing) in err and "Inception weights not found" in err
    assert main(["evaluate", str(samples), "--extractor", "fashion-mnist",
                 "--classifier", str(tmp_path / "clf.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "clf.pt: Fashion-MNIST classifier not found" in err


# ---------------------------------------------------------------------------------------------- Fashion-MNIST
@needs_fashion
def test_classifier_accuracy_and_fid_separates_data_from_noise(classifier, stats_cache, tmp_path):
    from repro.data import FashionMNIST

    test = FashionMNIST(split="test", resolution=16)
    clf = ex.FashionClassifier(classifier)
    # accuracy measured here, not read from the file the trainer wrote
    probs = clf.extract(test.images[..., None], spatial=False).probs
    accuracy = (probs.argmax(1) == test.labels).mean()
    assert accuracy >= 0.88  # 89.6% at 16 px; 91.3% at 32 px
    assert clf.test_accuracy == pytest.approx(accuracy, abs=1e-4)

    rng = np.random.default_rng(0)
    sets = {"test": test.images[..., None],
            "noise": rng.integers(0, 256, (10_000, 16, 16, 1), dtype=np.uint8),
            "one_image": np.repeat(test.images[:1, ..., None], 10_000, axis=0)}
    cfg = EvalConfig(extractor="fashion-mnist", reference="fashion-mnist:train", classifier=str(classifier))
    fid = {}
    for name, images in sets.items():
        np.savez(tmp_path / f"{name}.npz", arr_0=images)
        fid[name] = evaluate_file(tmp_path / f"{name}.npz", cfg, stats_cache)["metrics"]["fid"]
    assert fid["test"] * 20 < fid["noise"] and fid["test"] * 20 < fid["one_image"], fid


@needs_fashion
def test_fid_of_samples_against_themselves_is_zero(classifier, tmp_path):
    from repro.data import FashionMNIST

    images = FashionMNIST(split="test", resolution=16).images[:2000, ..., None]
    np.savez(tmp_path / "s.npz", arr_0=images)
    cfg = EvalConfig(extractor="fashion-mnist", reference=str(tmp_path / "s.npz"), classifier=str(classifier))
    record = evaluate_file(tmp_path / "s.npz", cfg, tmp_path / "cache")
    assert abs(record["metrics"]["fid"]) < 1e-6 and abs(record["metrics"]["sfid"]) < 1e-6
    assert record["metrics"]["precision"] == 1.0 and record["metrics"]["recall"] == 1.0


@needs_fashion
def test_classifier_fid_of_two_folders_equals_cleanfid(classifier, tmp_path):
    from cleanfid.fid import compute_fid

    from repro.data import FashionMNIST

    train, test = FashionMNIST(split="train", resolution=16).images, FashionMNIST(split="test", resolution=16).images
    da = _write_folder(tmp_path / "a", train[:600, ..., None])
    db = _write_folder(tmp_path / "b", test[:500, ..., None])
    cfg = EvalConfig(extractor="fashion-mnist", reference=str(db), classifier=str(classifier), metrics=("fid",))
    ours = evaluate_file(da, cfg, tmp_path / "cache")["metrics"]["fid"]
    clf = ex.FashionClassifier(classifier)
    # legacy_tensorflow leaves the images at their size (its resize is inside Inception, which is not used here)
    theirs = compute_fid(str(da), str(db), mode="legacy_tensorflow", custom_feat_extractor=clf,
                         device=torch.device("cpu"), num_workers=0, batch_size=100, verbose=False,
                         use_dataparallel=False)
    assert ours == pytest.approx(theirs, abs=1e-3)


@needs_fashion
def test_cli_evaluate_prints_metrics_with_protocol(classifier, stats_cache, tmp_path, capsys):
    from repro.data import FashionMNIST

    np.savez(tmp_path / "s.npz", arr_0=FashionMNIST(split="test", resolution=16).images[:300, ..., None])
    assert main(["evaluate", str(tmp_path / "s.npz"), "--extractor", "fashion-mnist", "--classifier",
                 str(classifier), "--results", str(stats_cache.parent), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record["metrics"]) == {"fid", "is", "sfid", "precision", "recall"}
    assert record["labels"]["fid"] == "FID-300 (Fashion-MNIST classifier)"
    assert record["paper_protocol"]["comparable"] is False
    assert main(["evaluate", str(tmp_path / "s.npz"), "--extractor", "fashion-mnist", "--classifier",
                 str(classifier), "--results", str(stats_cache.parent), "--metrics", "fid,is"]) == 0
    out = capsys.readouterr().out
    assert "FID-300 (Fashion-MNIST classifier)" in out and "not the papers' protocol" in out


def test_a_classifier_of_another_size_is_a_one_line_error(tmp_path, capsys):
    # a 32 px classifier file (written here, untrained: only its size matters) cannot score 16 px samples
    torch.save({"model": ex.FashionNet(16).state_dict(), "width": 16, "resolution": 32, "test_accuracy": 0.1},
               tmp_path / "clf32.pt")
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((20, 16, 16, 1), np.uint8))
    assert main(["evaluate", str(tmp_path / "s.npz"), "--extractor", "fashion-mnist", "--ref", str(tmp_path / "s.npz"),
                 "--classifier", str(tmp_path / "clf32.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "takes 32x32 images, got 16x16" in err
    # without a file named, the classifier is picked (and trained once) at the samples' size
    assert ex.classifier_resolution(np.zeros((1, 16, 16, 1), np.uint8)) == 16
    assert ex.classifier_resolution(np.zeros((1, 28, 28, 1), np.uint8)) == 32
    assert ex.classifier_path(None, tmp_path, 16).name == "fashion-mnist-classifier-16px.pt"
    assert ex.classifier_path(None, tmp_path, 32).name == "fashion-mnist-classifier.pt"
