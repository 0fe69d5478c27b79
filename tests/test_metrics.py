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


# ADM's ManifoldEstimator and DistanceBlock (guided-diffusion evaluations/evaluator.py), transcribed to numpy line
# by line; TF's ops become numpy ops with each result rounded to the op's dtype (exact sums, then one rounding).
@np.errstate(over="ignore", invalid="ignore")  # float16 overflow is the point of the fallback
def _adm_pairwise_distances(u, v, dtype):
    u, v = u.astype(dtype), v.astype(dtype)
    norm_u = np.square(u).astype(np.float64).sum(1).astype(dtype).reshape([-1, 1])
    norm_v = np.square(v).astype(np.float64).sum(1).astype(dtype).reshape([1, -1])
    uv = (u.astype(np.float64) @ v.astype(np.float64).T).astype(dtype)
    return np.maximum(norm_u - dtype(2) * uv + norm_v, dtype(0))


def _adm_distance_block(u, v):
    d16 = _adm_pairwise_distances(u, v, np.float16)
    if np.all(np.isfinite(d16)):
        return d16.astype(np.float32)
    return _adm_pairwise_distances(u, v, np.float32)


def _adm_manifold_radii(features, row_batch_size, col_batch_size, nhood_sizes=(3,)):
    num_images = len(features)
    radii = np.zeros([num_images, len(nhood_sizes)], dtype=np.float32)
    distance_batch = np.zeros([row_batch_size, num_images], dtype=np.float32)
    seq = np.arange(max(nhood_sizes) + 1, dtype=np.int32)
    for begin1 in range(0, num_images, row_batch_size):
        end1 = min(begin1 + row_batch_size, num_images)
        row_batch = features[begin1:end1]
        for begin2 in range(0, num_images, col_batch_size):
            end2 = min(begin2 + col_batch_size, num_images)
            distance_batch[0:end1 - begin1, begin2:end2] = _adm_distance_block(row_batch, features[begin2:end2])
        radii[begin1:end1, :] = np.partition(distance_batch[0:end1 - begin1, :], seq, axis=1)[:, list(nhood_sizes)]
    return radii


def _adm_prec_recall(activations_ref, activations_sample, row_batch_size=10000, col_batch_size=10000):
    radii_1 = _adm_manifold_radii(activations_ref, row_batch_size, col_batch_size)
    radii_2 = _adm_manifold_radii(activations_sample, row_batch_size, col_batch_size)
    features_1, features_2 = activations_ref, activations_sample
    features_1_status = np.zeros([len(features_1), radii_2.shape[1]], dtype=bool)
    features_2_status = np.zeros([len(features_2), radii_1.shape[1]], dtype=bool)
    for begin_1 in range(0, len(features_1), row_batch_size):
        end_1 = begin_1 + row_batch_size
        batch_1 = features_1[begin_1:end_1]
        for begin_2 in range(0, len(features_2), col_batch_size):
            end_2 = begin_2 + col_batch_size
            dist32 = _adm_distance_block(batch_1, features_2[begin_2:end_2])[..., None]
            features_1_status[begin_1:end_1] |= np.any(dist32 <= radii_2[begin_2:end_2], axis=1)
            features_2_status[begin_2:end_2] |= np.any(dist32 <= radii_1[begin_1:end_1][:, None], axis=0)
    return float(np.mean(features_2_status.astype(np.float64))), float(np.mean(features_1_status.astype(np.float64)))


def _pr_cases():
    rng = np.random.default_rng(7)
    # exact ties: coarse values and duplicated rows, so distances sit exactly on the radii
    coarse_ref = rng.integers(0, 6, (90, 12)) / 4
    coarse_gen = np.concatenate([coarse_ref[:20], rng.integers(0, 6, (60, 12)) / 4])
    # float16 ties: squared norms near 20,000, where float16's spacing is 16
    big_ref = rng.normal(35, 3, (90, 16))
    big_gen = rng.normal(35.5, 3, (70, 16))
    # overflow: squared norms above float16's 65,504 in some rows only, so only some blocks fall back to float32
    over_ref, over_gen = rng.normal(0, 1, (90, 16)), rng.normal(0.2, 1, (70, 16))
    over_ref[:10] *= 90
    over_gen[5:12] *= 90
    return {"coarse": (coarse_ref, coarse_gen), "float16_ties": (big_ref, big_gen), "overflow": (over_ref, over_gen)}


@pytest.mark.parametrize("case", ["coarse", "float16_ties", "overflow"])
@pytest.mark.parametrize("block", [16, 10_000])
def test_precision_recall_equals_the_adm_transcription(case, block):
    ref, gen = (x.astype(np.float32) for x in _pr_cases()[case])
    if case == "overflow":  # the case is what it claims: some blocks overflow in float16, some do not
        finite = [np.isfinite(_adm_pairwise_distances(ref[i:i + 16], gen[j:j + 16], np.float16)).all()
                  for i in range(0, len(ref), 16) for j in range(0, len(gen), 16)]
        assert not all(finite) and any(finite)
    expected = _adm_prec_recall(ref, gen, block, block)
    assert precision_recall(ref, gen, distances="adm", block=block) == expected
    if case == "float16_ties":  # float16's ties count as inside: ADM's values are higher than float32's
        p32, r32 = precision_recall(ref, gen, distances="float32")
        assert expected[0] >= p32 and expected[1] >= r32 and expected != (p32, r32)


# ---------------------------------------------------------------------------------------------- Inception
class _Mixed6(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 12, 1)
        self.other = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.conv(x), self.other(x)], 1)


POOL = 256


class FakeInception(nn.Module):
    """The interface of NVIDIA's TorchScript Inception (inception-2015-12-05.pt) at a toy size: `layers` with
    `mixed_6.conv`, pool features (256-d here, 2048 in the real net: scipy's sqrtm at 2048 costs about 25 s per
    FID on 2 cores), TF-style resize inside, probabilities without the output bias."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential()
        self.layers.add_module("conv", nn.Conv2d(3, 8, 3, stride=4))
        # 4x4 maps at mixed_6 keep sFID's features at 7 x 16 (the real net's are 7 x 17 x 17)
        self.layers.add_module("mixed_5", nn.Sequential(nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.MaxPool2d(4)))
        self.layers.add_module("mixed_6", _Mixed6())
        self.layers.add_module("mixed_7", nn.Sequential(nn.Conv2d(16, POOL, 1), nn.ReLU()))
        self.layers.add_module("pool", nn.AdaptiveAvgPool2d(1))
        self.output = nn.Linear(POOL, 1008)

    def forward(self, img, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False):
        n, c, h, w = img.shape
        x = img.to(torch.float32)
        theta = torch.eye(2, 3, device=x.device)
        theta[0, 2] += theta[0, 0] / w - theta[0, 0] / 299
        theta[1, 2] += theta[1, 1] / h - theta[1, 1] / 299
        grid = F.affine_grid(theta.unsqueeze(0).repeat([n, 1, 1]), [n, c, 299, 299], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        x = (x - 128) / 128
        features = self.layers(x).reshape(n, -1)
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
    mu, sigma = feats.pool.mean(0) + 0.5, np.cov(feats.pool, rowvar=False) + np.eye(POOL) * 1e-3
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


def test_sfid_against_adm_layout_statistics_of_the_same_set_is_zero(tmp_path, fake_inception):
    """ADM stores mu_s/sigma_s of `mixed_6/conv[..., :7]` flattened from TF's NHWC map. Built here the way ADM does
    (the eager network's mixed_6.conv output, NHWC, [..., :7], reshape), a set scored against its own statistics
    gives sFID 0; flattening channel-first (the old order) cannot."""
    torch.manual_seed(0)
    eager = FakeInception().eval()  # the same weights as the scripted fixture (same seed)
    maps = []
    eager.layers.mixed_6.conv.register_forward_hook(lambda m, i, o: maps.append(o.detach()))
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (300, 24, 24, 3), dtype=np.uint8)
    extractor = ex.build("inception", inception=fake_inception)
    with torch.no_grad():
        pool = eager(extractor.prepare(images), return_features=True).numpy()
    nhwc = maps[0].permute(0, 2, 3, 1).numpy()
    adm_spatial = nhwc[..., :7].reshape(len(nhwc), -1)
    mu_s, sigma_s = adm_spatial.mean(0), np.cov(adm_spatial, rowvar=False)
    np.savez(tmp_path / "VIRTUAL_self.npz", mu=pool.mean(0), sigma=np.cov(pool, rowvar=False), mu_s=mu_s,
             sigma_s=sigma_s, arr_0=images[:50])
    np.savez(tmp_path / "samples.npz", arr_0=images)
    cfg = EvalConfig(reference=str(tmp_path / "VIRTUAL_self.npz"), inception=str(fake_inception),
                     metrics=("fid", "sfid"))
    record = evaluate_file(tmp_path / "samples.npz", cfg, tmp_path / "cache", extractor)
    assert abs(record["metrics"]["sfid"]) < 1e-4 and abs(record["metrics"]["fid"]) < 1e-4
    assert record["protocol"]["sfid_layout"].startswith("ADM")
    # the same activations flattened channel-first sit far from these statistics
    nchw = maps[0][:, :7].flatten(1).numpy()
    assert frechet_distance(fit(nchw), Gaussian(mu_s, sigma_s)) > 1.0


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
