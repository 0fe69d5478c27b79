"""Inception feature extraction: ours against clean-fid's own, side by side on the same images, in one run.

A: clean-fid's `get_folder_features` (its dataset, resizer and InceptionV3W forward): pool features only.
B: `repro.metrics.extractors.Inception.extract` after reading the same folder: one pass giving pool and spatial
   (sFID) features, and the class probabilities when the file has the output layer; the next batch is prepared
   while this one runs.
Both in clean-fid's `clean` mode (PIL bicubic to 299: clean-fid runs the layers-only file only in this mode),
the same batch size, interleaved A, B, B, A, ... over repeats. Prints images/s per repeat, the medians and B/A.

With `--scale N` (meant for a GPU) it also times what one paper-scale evaluation costs: N generated-size images
(256 px, legacy_tensorflow, pool + spatial + probabilities), precision/recall ADM-style against 10K reference
features, and the FID and sFID Frechet distances; then projects the 50K total.

    .venv/bin/python benchmarks/inception_extract.py [--weights FILE] [--images 128] [--batch 32] [--repeats 3]
    .venv/bin/python benchmarks/inception_extract.py --device cuda --batch 200 --scale 10000

A machine that cannot install the weights (an offline GPU node with a 64 MiB transfer limit) gets a copy rounded to
float16 (44 MB): `--write-half weights.half.pt` here, then `--weights weights.half.pt` there. Its weights are
widened back to float32 on load; its features differ from the real ones, so its figures are timings only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from repro.metrics import extractors as ex
from repro.metrics import weights
from repro.metrics.fid import fit, frechet_distance, precision_recall
from repro.metrics.reference import load_images
from repro.metrics.throughput import environment


def widened(path: Path, tmp: Path) -> Path:
    """A float32 copy of a file whose weights were rounded to float16 for transport (timing only)."""
    net = torch.jit.load(str(path), map_location="cpu")
    if not any(t.dtype == torch.float16 for t in net.state_dict().values()):
        return path
    print(f"{path.name}: float16 weights widened to float32: timings only, not features")
    out = tmp / "inception-widened.pt"
    net.float().save(str(out))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_folder(root: Path, n: int) -> Path:
    """n Fashion-MNIST test images (32 px, RGB PNG), or structured noise where the dataset is absent."""
    from PIL import Image

    try:
        from repro.data import FashionMNIST

        grey = FashionMNIST(split="test", resolution=32).images[:n]
        source = "Fashion-MNIST test, 32 px"
    except (OSError, ValueError):
        grey = np.random.default_rng(0).integers(0, 256, (n, 32, 32), dtype=np.uint8)
        source = "uniform noise, 32 px"
    folder = root / "images"
    folder.mkdir()
    for i, g in enumerate(grey):
        Image.fromarray(np.repeat(g[..., None], 3, axis=-1)).save(folder / f"{i:05d}.png")
    print(f"images: {n} ({source}) in {folder}")
    return folder


def side_by_side(path: Path, args, device: torch.device) -> dict:
    from cleanfid.fid import get_folder_features

    with tempfile.TemporaryDirectory() as tmp:
        folder = images_folder(Path(tmp), args.images)
        model = ex.cleanfid_model(path, device)
        ours = ex.Inception(path, mode="clean", device=device)

        def run_a():
            return get_folder_features(str(folder), model=model, num_workers=args.workers, batch_size=args.batch,
                                       device=device, mode="clean", verbose=False)

        def run_b():
            return ours.extract(load_images(folder), batch_size=args.batch).pool

        rates = {"cleanfid": [], "ours": []}
        feats = {}
        run_b()  # warm-up for both (first-call costs of TorchScript and the allocator)
        run_a()
        for r in range(args.repeats):
            order = (("cleanfid", run_a), ("ours", run_b))
            for name, fn in order if r % 2 == 0 else order[::-1]:  # alternate who goes first
                sync(device)
                t0 = time.perf_counter()
                feats[name] = fn()
                sync(device)
                rates[name].append(args.images / (time.perf_counter() - t0))
                print(f"repeat {r + 1}: {name:8s} {rates[name][-1]:8.2f} img/s")
        diff = float(np.abs(feats["ours"] - feats["cleanfid"]).max())
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"median img/s: clean-fid {med['cleanfid']:.2f} (pool only), ours {med['ours']:.2f} "
          f"(pool + spatial{' + probabilities' if ours.output_weight is not None else ''}); "
          f"ours / clean-fid = {med['ours'] / med['cleanfid']:.2f}x")
    print(f"max |pool features ours - clean-fid| = {diff:.3g}")
    return {"img_per_s": rates, "median": med, "ratio": med["ours"] / med["cleanfid"], "max_abs_diff": diff}


def scale(path: Path, args, device: torch.device) -> dict:
    """One paper-scale evaluation's parts at N samples, projected to 50K."""
    n = args.scale
    rng = np.random.default_rng(0)
    # smooth random images: noise this size through a bilinear upsample, so the features are not degenerate
    small = torch.from_numpy(rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)).float()
    images = torch.nn.functional.interpolate(small, size=256, mode="bilinear").round().clamp(0, 255)
    images = images.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    extractor = ex.Inception(path, mode="legacy_tensorflow", device=device)
    extractor.extract(images[:args.batch], batch_size=args.batch)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    feats = extractor.extract(images, batch_size=args.batch)
    sync(device)
    t_extract = time.perf_counter() - t0
    ref = feats.pool[: min(10_000, n)]
    t0 = time.perf_counter()
    p, r = precision_recall(ref, feats.pool, distances="adm", device=device)
    sync(device)
    t_pr = time.perf_counter() - t0
    t0 = time.perf_counter()
    fid = frechet_distance(fit(feats.pool), fit(ref))
    sfid = frechet_distance(fit(feats.spatial), fit(feats.spatial[: len(ref)]))
    t_frechet = time.perf_counter() - t0
    # extraction is linear in N; precision/recall's sample radii are N^2 (reference radii and the cross term N);
    # the Frechet distances do not depend on N beyond fitting
    projected = t_extract * 50_000 / n + t_pr * (50_000 / n) ** 2 + t_frechet
    out = {"samples": n, "extract_s": t_extract, "extract_img_per_s": n / t_extract, "pr_s": t_pr,
           "frechet_s": t_frechet, "projected_50k_s": projected, "fid": fid, "sfid": sfid, "precision": p,
           "recall": r}
    print(f"{n} samples at 256 px: extraction {t_extract:.1f} s ({n / t_extract:.0f} img/s, pool + spatial + "
          f"probabilities when the file has them), precision/recall (ADM, against {len(ref)}) {t_pr:.1f} s, "
          f"FID + sFID {t_frechet:.1f} s")
    print(f"projected FID-50K with sFID, IS and P/R: {projected / 60:.1f} min per run (upper bound: P/R scaled N^2)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", help="Inception TorchScript file (default: `repro weights install`'s copy)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0, help="clean-fid's DataLoader workers")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scale", type=int, default=0, help="also time one evaluation at this many samples")
    ap.add_argument("--json", help="write the figures and the machine here")
    ap.add_argument("--write-half", help="write the weights rounded to float16 here (for transport) and stop")
    args = ap.parse_args()
    path = Path(args.weights) if args.weights else weights.installed()
    if path is None:
        raise SystemExit("no Inception weights: run `repro weights install` or pass --weights")
    if args.write_half:
        torch.jit.load(str(path), map_location="cpu").half().save(args.write_half)
        print(f"wrote {args.write_half} ({Path(args.write_half).stat().st_size / 1e6:.1f} MB)")
        return
    path = widened(path, Path(tempfile.mkdtemp()))
    device = torch.device(args.device)
    env = environment(args.device)
    print(f"machine: {json.dumps(env)}; weights {path.name} (sha256 {ex.sha256_file(path)[:12]}); "
          f"batch {args.batch}, clean-fid workers {args.workers}")
    record = {"machine": env, "weights": str(path), "batch": args.batch, "workers": args.workers,
              "side_by_side": side_by_side(path, args, device)}
    if args.scale:
        record["scale"] = scale(path, args, device)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
