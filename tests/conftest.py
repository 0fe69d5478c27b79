"""Tiny versions of the presets: the same classes and switches at widths and depths a CPU runs in milliseconds."""

from pathlib import Path

import pytest
import torch

from repro import models


def tiny_overrides(name: str) -> dict:
    """Overrides that shrink a preset while keeping its switches (arch, skip stride, attention, ...)."""
    fam = models.family(name).name
    kw = models.PRESETS[name]
    if fam == "DiT":
        return dict(hidden_size=32, depth=4, num_heads=2, long_skips=min(kw.get("long_skips", 0), 2))
    if fam == "U-ViT":
        return dict(embed_dim=32, depth=2, num_heads=2)
    if fam in ("PixArt-α", "DiffiT", "DiT-LLaMA", "DiG"):
        return dict(hidden_size=32, depth=2, num_heads=2)
    if fam in ("DiS", "DiffuSSM", "DiMSUM"):
        return dict(hidden_size=32, depth=2)
    if fam == "DiM":
        return dict(hidden_size=32, depth=3)  # odd: DiM's long skips pair the blocks around a middle one
    if fam == "DiC":
        arch = kw.get("arch", "hourglass")
        depths = {"hourglass": (4, 4, 1, 4, 4), "isotropic": (3,), "isotropic_skip": (4,)}[arch]
        return dict(width=16, depths=depths)
    if fam == "DiCo":
        arch = kw.get("arch", "unet")
        if arch == "unet":
            return dict(width=16, depths=(2, 1, 1, 1, 2), attn_head_dim=8)
        return dict(width=32, depths=(4,), attn_head_dim=8, **({"long_skips": 2} if arch == "isotropic_skip" else {}))
    raise AssertionError(fam)


def tiny(name: str, **overrides) -> torch.nn.Module:
    """A tiny version of preset `name` for 16x16 inputs (override input_size for others)."""
    torch.manual_seed(0)
    return models.build(name, **{"input_size": 16, **tiny_overrides(name), **overrides})


def randomize_(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter random values, so zero-initialised layers stop hiding the conditioning."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.fixture(scope="session")
def classifier(tmp_path_factory) -> Path:
    """The real Fashion-MNIST classifier at 16 px (the tiny studies' size), trained once for the whole test session
    (about a minute on 2 cores)."""
    from repro.metrics.extractors import train_classifier

    if not FASHION.exists():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    path = tmp_path_factory.mktemp("extractors") / "fashion-mnist-classifier-16px.pt"
    train_classifier(path, resolution=16, log=lambda *_: None)
    return path


@pytest.fixture(scope="session")
def stats_cache(tmp_path_factory) -> Path:
    """One statistics cache for the session (the training split's statistics are computed once); it sits where the
    CLI and the evaluate stage look for it, <results>/.cache."""
    return tmp_path_factory.mktemp("results") / ".cache"


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` run only when asked for (`-m slow`): the default run stays under 15 minutes."""
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
