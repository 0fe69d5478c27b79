"""Datasets keyed by (index, seed): Fashion-MNIST from Debian's IDX files, the ADM crop, image folders, latents."""

import gzip
import json
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repro import data

FMNIST = Path(data.FASHION_MNIST_ROOT)
needs_fmnist = pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
                                  reason="apt-get install dataset-fashion-mnist")


# ---------------------------------------------------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fmnist():
    return {split: data.FashionMNIST(split=split) for split in ("train", "test")}


@needs_fmnist
@pytest.mark.parametrize("split,count,prefix", [("train", 60_000, "train"), ("test", 10_000, "t10k")])
def test_fashion_mnist_real_files(fmnist, split, count, prefix):
    ds = fmnist[split]
    assert len(ds) == count
    assert sorted(set(ds.labels.tolist())) == list(range(10))
    assert ds.images.min() == 0 and ds.images.max() == 255
    # Read the IDX files independently: 8-byte label header, 16-byte image header, row-major 28x28 uint8.
    with gzip.open(FMNIST / f"{prefix}-labels-idx1-ubyte.gz") as f:
        raw_labels = f.read()
    with gzip.open(FMNIST / f"{prefix}-images-idx3-ubyte.gz") as f:
        raw_images = f.read()
    assert struct.unpack(">I", raw_labels[:4])[0] == 2049 and struct.unpack(">I", raw_images[:4])[0] == 2051
    for i in (0, 1, 7, count // 2, count - 1):
        x, y = ds[(i, 123)]
        assert x.dtype == torch.float32 and x.shape == (1, 32, 32)
        assert -1 <= x.min() and x.max() <= 1
        assert y == raw_labels[8 + i] and isinstance(y, int)
        border = torch.cat([x[:, :2].flatten(), x[:, -2:].flatten(), x[:, :, :2].flatten(), x[:, :, -2:].flatten()])
        assert (border == -1).all()
        pixels = np.frombuffer(raw_images, np.uint8, 784, 16 + 784 * i).reshape(28, 28)
        assert torch.equal(x[0, 2:30, 2:30], torch.from_numpy(pixels.astype(np.float32)) / 127.5 - 1)
    assert ds.describe() == dict(kind="fashion_mnist", path=str(FMNIST), split=split, resolution=32, channels=1,
                                 shape=[1, 32, 32], num_classes=10, count=count, padding=2, flip=False,
                                 latent_source="pixels")


@needs_fmnist
def test_fashion_mnist_at_16px_is_the_2x2_mean_of_the_32px_image(fmnist):
    ds = data.FashionMNIST(split="test", resolution=16)
    full = fmnist["test"].images.astype(np.int64)
    assert ds.images.shape == (10_000, 16, 16) and ds.images.dtype == np.uint8
    for i in (0, 1, 9_999):
        # each pixel by hand: the four bytes of its block, mean rounded half up
        for r, c in ((0, 0), (8, 8), (5, 11), (15, 15)):
            block = full[i, 2 * r:2 * r + 2, 2 * c:2 * c + 2]
            assert ds.images[i, r, c] == int(np.floor(block.mean() + 0.5))
        x, y = ds[(i, 0)]
        assert x.shape == (1, 16, 16) and y == fmnist["test"].labels[i]
        border = torch.cat([x[:, :1].flatten(), x[:, -1:].flatten(), x[:, :, :1].flatten(), x[:, :, -1:].flatten()])
        assert (border == -1).all()  # 2 px of background become 1
    assert ds.describe()["shape"] == [1, 16, 16] and ds.describe()["padding"] == 1
    with pytest.raises(ValueError, match="resolution must be 32 or 16, got 28"):
        data.FashionMNIST(split="test", resolution=28)


@needs_fmnist
@pytest.mark.parametrize("flip", [False, True])
def test_fashion_mnist_batch_is_the_collated_items(flip):
    """The trainer's one-gather batch (num_workers 0) holds the bits the DataLoader would collate item by item."""
    ds = data.FashionMNIST(split="test", flip=flip, resolution=16)
    keys = [(i * 37 % 10_000, s) for i, s in enumerate(range(100, 132))]
    x, y = ds.batch(keys)
    collated = torch.utils.data.default_collate([ds[k] for k in keys])
    assert torch.equal(x, collated[0]) and torch.equal(y, collated[1])
    assert x.dtype == collated[0].dtype and y.dtype == collated[1].dtype
    if flip:  # some flipped, some not: the flag is applied per item, not to the batch
        plain = data.FashionMNIST(split="test", resolution=16).batch(keys)[0]
        same = [torch.equal(a, b) for a, b in zip(x, plain, strict=True)]
        assert any(same) and not all(same)
    with pytest.raises(IndexError):
        ds.batch([(10_000, 0)])


@needs_fmnist
def test_fashion_mnist_keys_are_deterministic(fmnist):
    ds = fmnist["test"]
    a, b = ds[(5, 1)], ds[(5, 1)]
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert torch.equal(ds[(5, 1)][0], ds[(5, 2)][0])  # no flip by default: the seed changes nothing
    flipping = data.FashionMNIST(split="test", flip=True)
    xs = [flipping[(5, s)][0] for s in range(16)]
    assert all(torch.equal(x, a[0]) or torch.equal(x, a[0].flip(-1)) for x in xs)
    assert any(torch.equal(x, a[0]) for x in xs) and any(torch.equal(x, a[0].flip(-1)) for x in xs)
    assert all(torch.equal(flipping[(5, s)][0], xs[s]) for s in range(16))
    with pytest.raises(IndexError):
        ds[(10_000, 0)]
    with pytest.raises(TypeError, match=r"\(index, seed\)"):
        ds[5]


def test_fashion_mnist_missing_directory_is_one_line(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError) as e:
        data.FashionMNIST(root=missing)
    msg = str(e.value)
    assert "\n" not in msg and str(missing) in msg
    assert "train-images-idx3-ubyte.gz" in msg and "apt-get install dataset-fashion-mnist" in msg
    with pytest.raises(ValueError, match="split must be one of train, test"):
        data.FashionMNIST(root=missing, split="val")


def test_fashion_mnist_bad_header_names_the_file(tmp_path):
    for name, payload in (("t10k-images-idx3-ubyte.gz", struct.pack(">IIII", 2049, 10_000, 28, 28)),
                          ("t10k-labels-idx1-ubyte.gz", struct.pack(">II", 2049, 10_000) + bytes(10_000))):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(payload)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz has IDX magic number 2049, expected 2051"):
        data.FashionMNIST(root=tmp_path, split="test")


# ---------------------------------------------------------------------------------------------------------------------
# ADM centre crop
# ---------------------------------------------------------------------------------------------------------------------

def _noise_image(w, h, mode="RGB", seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8)
    return Image.fromarray(arr, mode)


def test_center_crop_sizes_and_offsets():
    # 500x300 at 256: short side 300 < 512, so no halving; bicubic to (427, 256); crop from x = (427 - 256) // 2.
    img = _noise_image(500, 300)
    out = data.center_crop_arr(img, 256)
    assert out.size == (256, 256) and out.mode == "RGB"
    expect = np.array(img.resize((427, 256), Image.Resampling.BICUBIC))[:, 85:85 + 256]
    assert np.array_equal(np.array(out), expect)


def test_center_crop_box_halves_a_large_image_first():
    # 1100x600 at 256: 600 >= 512, so box-halve to 550x300; then bicubic to (469, 256); crop x from 106.
    img = _noise_image(1100, 600, seed=1)
    halved = img.resize((550, 300), Image.Resampling.BOX)
    expect = np.array(halved.resize((469, 256), Image.Resampling.BICUBIC))[:, 106:106 + 256]
    assert np.array_equal(np.array(data.center_crop_arr(img, 256)), expect)
    # A bicubic resize straight from the full image is a different picture: the box step matters.
    direct = np.array(img.resize((469, 256), Image.Resampling.BICUBIC))[:, 106:106 + 256]
    assert not np.array_equal(direct, expect)


def test_center_crop_upsamples_small_and_converts_to_rgb():
    img = _noise_image(60, 100, mode="L", seed=2)  # portrait, grayscale
    out = data.center_crop_arr(img, 32)
    # short side 60 -> 32: (32, round(100 * 32 / 60) = 53); crop y from (53 - 32) // 2 = 10.
    expect = np.array(img.convert("RGB").resize((32, 53), Image.Resampling.BICUBIC))[10:42]
    assert out.mode == "RGB" and np.array_equal(np.array(out), expect)


# ---------------------------------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------------------------------

CLASSES = ("a_dog", "b_cat", "c_eel")  # written out of order below: labels must follow sorted names


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for name in ("c_eel", "a_dog", "b_cat"):
        (root / name).mkdir()
        for j, ext in enumerate((".png", ".PNG" if name == "b_cat" else ".png")):
            arr = rng.integers(0, 256, (24, 20 + 4 * j, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"img{1 - j}{ext}", format="PNG")
        (root / name / "notes.txt").write_text("not an image")
    return root


def test_image_folder_labels_and_values(image_tree):
    ds = data.ImageFolderDataset(image_tree, 16)
    assert len(ds) == 6 and ds.classes == list(CLASSES)
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert [p.decode() for p in ds._files[:2]] == ["a_dog/img0.png", "a_dog/img1.png"]  # files sorted by name
    for i in range(6):
        x, y = ds[(i, 0)]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == i // 2
        assert -1 <= x.min() and x.max() <= 1
        plain = torch.from_numpy(ds.image(i)).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.equal(x, plain) or torch.equal(x, plain.flip(-1))
    assert ds.describe()["num_classes"] == 3 and ds.describe()["count"] == 6


def test_image_folder_flip_comes_from_the_seed(image_tree):
    ds = data.ImageFolderDataset(image_tree, 16)
    plain = torch.from_numpy(ds.image(3)).permute(2, 0, 1).float() / 127.5 - 1
    flipped = [torch.equal(ds[(3, s)][0], plain.flip(-1)) for s in range(32)]
    assert 0 < sum(flipped) < 32
    assert flipped == [data.flip_from_seed(s) for s in range(32)]
    assert all(torch.equal(ds[(3, s)][0], ds[(3, s)][0]) for s in range(4))
    unflipped = data.ImageFolderDataset(image_tree, 16, flip=False)
    assert all(torch.equal(unflipped[(3, s)][0], plain) for s in range(8))


def test_image_folder_bad_roots(tmp_path):
    with pytest.raises(ValueError, match=f"image folder {tmp_path / 'missing'} does not exist"):
        data.ImageFolderDataset(tmp_path / "missing", 16)
    with pytest.raises(ValueError, match="has no class folders"):
        data.ImageFolderDataset(tmp_path, 16)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="class folders without .* images: empty_class"):
        data.ImageFolderDataset(tmp_path, 16)
    with pytest.raises(ValueError, match="resolution must be a positive int"):
        data.ImageFolderDataset(tmp_path, 0)


def test_build_dataset(image_tree):
    ds = data.build_dataset("imagenet_folder", root=image_tree, resolution=16)
    assert isinstance(ds, data.ImageFolderDataset) and len(ds) == 6
    with pytest.raises(ValueError, match=r"unknown dataset kind 'imagenet'.*did you mean imagenet_folder.*"
                                         r"valid kinds: fashion_mnist, imagenet_folder, latents"):
        data.build_dataset("imagenet", root=image_tree)
    with pytest.raises(ValueError, match=r"no option 'resolutoin' \(did you mean resolution\?\); "
                                         r"valid options: root, resolution, flip"):
        data.build_dataset("imagenet_folder", root=image_tree, resolutoin=16)
    with pytest.raises(ValueError, match="needs option.* resolution"):
        data.build_dataset("imagenet_folder", root=image_tree)


# ---------------------------------------------------------------------------------------------------------------------
# VAE and latents
# ---------------------------------------------------------------------------------------------------------------------

def test_to_uint8_is_dits_truncating_mapping():
    x = torch.tensor([-1.1, -1.0, -0.5, 0.0, 0.5, 0.99, 1.0, 2.0]).view(1, 1, 1, 8).expand(1, 3, 1, 8)
    out = data.to_uint8(x)  # 127.5 x + 128: -12.25, 0.5, 64.25, 128, 191.75, 254.225, 255.5, 383
    assert out.dtype == torch.uint8 and out.shape == (1, 1, 8, 3)
    assert out[0, 0, :, 0].tolist() == [0, 0, 64, 128, 191, 254, 255, 255]
    assert torch.equal(out[..., 0], out[..., 2])


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers", reason="pip install diffusers")
    torch.manual_seed(0)
    ae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                 block_out_channels=(8, 8), latent_channels=4, norm_num_groups=8, sample_size=16)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    ae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def extracted(tiny_vae, image_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents") / "pair"
    assert data.extract_latents(image_tree, out, 16, tiny_vae, batch_size=4, seed=3) == out
    return out


def test_extract_latents_files_and_meta(extracted, image_tree, tiny_vae):
    assert sorted(p.name for p in extracted.iterdir()) == ["labels.npy", "latents.npy", "meta.json"]
    latents, labels = np.load(extracted / "latents.npy"), np.load(extracted / "labels.npy")
    assert latents.shape == (6, 2, 4, 8, 8) and latents.dtype == np.float32
    assert labels.tolist() == [0, 0, 1, 1, 2, 2] and labels.dtype == np.int64
    meta = json.loads((extracted / "meta.json").read_text())
    assert meta == dict(source=str(image_tree.resolve()), resolution=16, crop="adm_center", mode="pre_extracted_pair",
                        vae_path=str(tiny_vae.resolve()), vae_id="tiny-vae", scale=0.18215, seed=3, dtype="float32",
                        count=6, num_classes=3, classes=list(CLASSES), latent_shape=[4, 8, 8], limit=None)
    assert not np.array_equal(latents[:, 0], latents[:, 1])


def test_pair_holds_the_flip_as_a_posterior_sample(extracted, image_tree, tiny_vae):
    from diffusers import AutoencoderKL

    ae = AutoencoderKL.from_pretrained(tiny_vae, local_files_only=True).eval()
    ds = data.ImageFolderDataset(image_tree, 16, flip=False)
    latents = np.load(extracted / "latents.npy")
    i = 4
    x = ds[(i, 0)][0][None]
    noise = data.posterior_noise(3, i, (4, 8, 8))
    with torch.no_grad():
        for view, img in enumerate((x, x.flip(-1))):
            dist = ae.encode(img).latent_dist
            expect = (dist.mean + dist.std * noise[view]) * 0.18215
            assert torch.allclose(torch.from_numpy(latents[i, view]), expect[0], atol=1e-5)
            # a sample, not the mean
            assert not torch.allclose(torch.from_numpy(latents[i, view]), dist.mean[0] * 0.18215, atol=1e-3)


def test_latent_dataset_seed_picks_the_view(extracted, tiny_vae):
    ds = data.LatentDataset(extracted)
    latents = np.load(extracted / "latents.npy")
    assert len(ds) == 6
    for s in range(8):
        x, y = ds[(2, s)]
        assert x.dtype == torch.float32 and x.shape == (4, 8, 8) and y == 1
        assert np.array_equal(x.numpy(), latents[2, int(data.flip_from_seed(s))])
    assert {int(data.flip_from_seed(s)) for s in range(8)} == {0, 1}
    d = ds.describe()
    assert d["latent_source"] == "pre_extracted_pair" and d["shape"] == [4, 8, 8] and d["channels"] == 4
    assert d["vae_path"] == str(tiny_vae.resolve()) and d["count"] == 6 and d["num_classes"] == 3
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned loader worker gets: no copy of the latents inside
    assert len(pickle.dumps(ds)) < latents.nbytes and torch.equal(clone[(2, 5)][0], ds[(2, 5)][0])


def test_extract_again_is_a_no_op_and_other_settings_refuse(extracted, image_tree, tiny_vae):
    before = (extracted / "latents.npy").stat().st_mtime_ns
    assert data.extract_latents(image_tree, extracted, 16, tiny_vae, batch_size=2, seed=3) == extracted
    assert (extracted / "latents.npy").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match=r"meta\.json holds an extraction with other settings .*'seed': \(3, 4\)"):
        data.extract_latents(image_tree, extracted, 16, tiny_vae, seed=4)


def test_interrupted_extraction_resumes_to_the_same_latents(extracted, image_tree, tiny_vae, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_PROGRESS_EVERY_S", 0.0)
    real, calls = data.VAE.posterior, []

    def dying(self, x):
        calls.append(len(x))
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill in the third batch
        return real(self, x)

    monkeypatch.setattr(data.VAE, "posterior", dying)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        data.extract_latents(image_tree, out, 16, tiny_vae, batch_size=1, seed=3)
    assert not (out / "latents.npy").exists() and not (out / "meta.json").exists()
    with pytest.raises(ValueError, match="meta.json missing"):
        data.LatentDataset(out)
    monkeypatch.setattr(data.VAE, "posterior", real)
    calls.clear()
    monkeypatch.setattr(data.VAE, "posterior", lambda self, x: calls.append(len(x)) or real(self, x))
    data.extract_latents(image_tree, out, 16, tiny_vae, batch_size=1, seed=3)
    assert len(calls) == 4  # images 2..5: the two finished before the kill are not encoded again
    assert np.allclose(np.load(out / "latents.npy"), np.load(extracted / "latents.npy"), atol=1e-6)
    assert sorted(p.name for p in out.iterdir()) == ["labels.npy", "latents.npy", "meta.json"]


def test_single_mode_is_one_frozen_view_of_the_pair(extracted, image_tree, tiny_vae, tmp_path):
    out = data.extract_latents(image_tree, tmp_path / "single", 16, tiny_vae, batch_size=6, seed=3, mode="single",
                               dtype="float16", limit=5)
    single, pair = np.load(out / "latents.npy"), np.load(extracted / "latents.npy")
    assert single.shape == (5, 1, 4, 8, 8) and single.dtype == np.float16
    views = [int(data.flip_from_seed(3 * 2**32 + i)) for i in range(5)]
    assert 0 < sum(views) < 5
    assert np.allclose(single[:, 0], pair[np.arange(5), views], atol=2e-3)
    ds = data.LatentDataset(out)
    assert len(ds) == 5 and ds.describe()["latent_source"] == "pre_extracted_single"
    assert all(np.array_equal(ds[(4, s)][0].numpy(), single[4, 0].astype(np.float32)) for s in range(4))


def test_latent_dataset_validates_files(extracted, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(extracted, bad)
    np.save(bad / "labels.npy", np.zeros(5, np.int64))
    with pytest.raises(ValueError, match=r"labels\.npy is int64 \(5,\), expected int64 \(6,\)"):
        data.LatentDataset(bad)
    np.save(bad / "labels.npy", np.zeros(6, np.int64))
    np.save(bad / "latents.npy", np.zeros((6, 4, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"latents\.npy is float32 \(6, 4, 8, 8\), expected .* \(6, 2, 4, 8, 8\)"):
        data.LatentDataset(bad)
    with pytest.raises(ValueError, match="does not exist"):
        data.LatentDataset(tmp_path / "nope")


def test_vae_directory_is_checked_first(tmp_path, image_tree):
    with pytest.raises(ValueError, match=f"VAE directory {tmp_path / 'vae'} does not exist: put "
                                         "stabilityai/sd-vae-ft-ema there"):
        data.VAE(tmp_path / "vae")
    (tmp_path / "vae").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        data.extract_latents(image_tree, tmp_path / "out", 16, tmp_path / "vae")
    assert not (tmp_path / "out").exists()


def test_vae_encode_decode(tiny_vae):
    vae = data.VAE(tiny_vae)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    a = vae.encode(x, torch.Generator().manual_seed(0))
    b = vae.encode(x, torch.Generator().manual_seed(0))
    assert a.shape == (2, 4, 8, 8) and torch.equal(a, b)
    assert not torch.equal(a, vae.encode(x, torch.Generator().manual_seed(1)))
    img = vae.decode(a)
    assert img.dtype == torch.uint8 and img.shape == (2, 16, 16, 3) and img.device.type == "cpu"
    with torch.no_grad():
        expect = data.to_uint8(vae.model.decode(a / 0.18215).sample)
    assert torch.equal(img, expect)
    assert vae.describe()["latent_source"] == "on_the_fly"


def test_latent_run_end_to_end_through_the_cli(image_tree, tiny_vae, tmp_path, capsys):
    # extract-latents -> train on the latents -> sample, decoded by the same VAE: the ImageNet path in miniature
    import yaml

    from repro.cli import main

    out = tmp_path / "latents"
    assert main(["extract-latents", str(image_tree), "--out", str(out), "--vae", str(tiny_vae),
                 "--resolution", "16", "--batch", "4"]) == 0
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "DiC-S", "overrides": {"width": 16, "depths": [1, 1, 1, 1, 1]}},
        "data": {"kind": "latents", "path": str(out), "vae": str(tiny_vae)},
        "train": {"steps": 2, "global_batch": 2, "ckpt_every": 2, "log_every": 1, "num_workers": 0},
        "sample": {"num_samples": 3, "sampler": "ddim", "steps": "2", "per_proc_batch": 2, "cfg_scale": 1.5}}))
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert main(["sample", str(tmp_path / "run"), "--no-progress"]) == 0
    npz = capsys.readouterr().out.strip().splitlines()[-1]
    with np.load(npz) as f:
        assert f["arr_0"].shape == (3, 16, 16, 3) and f["arr_0"].dtype == np.uint8  # decoded RGB
    assert json.loads(Path(npz).with_suffix(".json").read_text())["decode"] == "vae"


def test_on_the_fly_vae_training_records_its_latent_source(image_tree, tiny_vae, tmp_path):
    from repro.config import RunConfig
    from repro.train import train
    from repro.yamlio import from_dict

    cfg = from_dict(RunConfig, {
        "model": {"name": "DiT-S/2", "overrides": {"hidden_size": 32, "depth": 2, "num_heads": 2}},
        "data": {"kind": "imagenet_folder", "path": str(image_tree), "resolution": 16, "flip": True,
                 "vae": str(tiny_vae)},
        "train": {"steps": 2, "global_batch": 2, "ckpt_every": 2, "log_every": 1, "num_workers": 0}})
    train(cfg, tmp_path / "run", progress=False)
    recorded = json.loads((tmp_path / "run" / "train" / "data.json").read_text())
    assert recorded["latent_source"] == "on_the_fly" and recorded["kind"] == "imagenet_folder"
    state = torch.load(tmp_path / "run" / "train" / "checkpoints" / "0000002.pt", weights_only=False)
    assert state["model_spec"]["kwargs"]["in_channels"] == 4 and state["model_spec"]["kwargs"]["input_size"] == 8
