"""FD_DINOv2's feature space: how much the other reference resize moves the number, and its speed.

    python benchmarks/feature_space.py resize --images 300            # EDM2 'torch' vs dgm-eval's PIL resize
    python benchmarks/feature_space.py speed --network dinov2_vitl14 --batch 8 --batches 2

``resize``: crops of the real photographs in tests/fixtures/testdata/real_images (random position and
scale, resized to ``--resolution``² with PIL Lanczos) form a reference set, a second set from other
crops, and a degraded set (the second one blurred). Features come from a random DINOv2 whose layer
scales are 1 and whose weights are perturbed (timm's 1e-5 layer scales would make every CLS token
alike); each set goes through reglue's preprocessing (float bicubic antialias resize, EDM2's
default) and through dgm-eval's (PIL bicubic of the uint8 image, rounded to uint8). Printed: the
pixel difference of the two network inputs, the FD between the two feature sets of the same
images, and each FD under both resizes. A random network only indicates the order of magnitude.

``speed``: images per second of ``FeatureSpace.features`` (random weights) on ``--device`` and the
forward FLOPs per image counted by torch's FlopCounterMode.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.flop_counter import FlopCounterMode

from reglue.encoders.semantics import VFMSpec
from reglue.encoders.vfm import IMAGENET_MEAN, IMAGENET_STD
from reglue.metrics.feature_space import FeatureSpace, load_feature_space, preprocess
from reglue.metrics.fid import feature_statistics, frechet_distance

PHOTOS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "testdata" / "real_images"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("resize", "speed"))
    parser.add_argument("--network", default="dinov2_vitl14")
    parser.add_argument("--arch", type=json.loads, default=None,
                        help='JSON size overrides, e.g. {"embed_dim": 384, "depth": 12, "num_heads": 6}')
    parser.add_argument("--images", type=int, default=300, help="resize: images per set")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--photos", default=str(PHOTOS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=3, help="speed: timed batches (after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def random_space(args: argparse.Namespace, *, perturb: bool) -> FeatureSpace:
    """A random network of ``args.network``'s kind; ``perturb``: layer scales 1, weights + 0.05·N(0, 1)."""
    space = load_feature_space(VFMSpec(args.network, weights="random", arch=args.arch or {}), device=args.device)
    if perturb:
        generator = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            for name, p in space.vit.named_parameters():
                if name.endswith(".gamma"):
                    p.fill_(1.0)
                p.add_(0.05 * torch.randn(p.shape, generator=generator).to(p.device))
    return space


def photo_crops(folder: Path, count: int, size: int, seed: int) -> np.ndarray:
    """``count`` random square crops (side 30–100 % of the short side) resized to size²: (count, size, size, 3)."""
    photos = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*/*")) if p.parent.name in ("photo", "grey")]
    if not photos:
        raise FileNotFoundError(f"no photographs under {folder}/photo or {folder}/grey; pass --photos")
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(count):
        image = photos[rng.integers(len(photos))]
        side = int(min(image.size) * rng.uniform(0.3, 1.0))
        left, top = rng.integers(0, image.width - side + 1), rng.integers(0, image.height - side + 1)
        crops.append(np.asarray(image.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)))
    return np.stack(crops)


def pil_preprocess(images: torch.Tensor) -> torch.Tensor:
    """dgm-eval's DINOv2 transform (and EDM2's resize_mode='pil'): PIL bicubic of the uint8 image to
    224², ToTensor (÷ 255), ImageNet mean/std. uint8 (B, 3, H, W) → float32 (B, 3, 224, 224)."""
    resized = [np.asarray(Image.fromarray(img).resize((224, 224), Image.BICUBIC))
               for img in images.permute(0, 2, 3, 1).cpu().numpy()]
    x = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float().to(images.device) / 255
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def features(space: FeatureSpace, images: np.ndarray, preprocessing, batch: int) -> np.ndarray:
    out = []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(images[start : start + batch]).permute(0, 3, 1, 2).to(space.device)
        out.append(space.vit.forward_features(preprocessing(x))[:, 0].double().cpu().numpy())
    return np.concatenate(out)


def fd(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def run_resize(args: argparse.Namespace) -> dict:
    space = random_space(args, perturb=True)
    reference = photo_crops(Path(args.photos), args.images, args.resolution, args.seed)
    samples = photo_crops(Path(args.photos), args.images, args.resolution, args.seed + 1)
    blurred = np.stack([np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(1.5))) for x in samples])
    x = torch.from_numpy(reference[: args.batch]).permute(0, 3, 1, 2)
    pixel_diff = ((preprocess(x) - pil_preprocess(x)) * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255).abs()
    sets = {"reference": reference, "samples": samples, "blurred": blurred}
    feats = {(name, way): features(space, images, prep, args.batch)
             for name, images in sets.items() for way, prep in (("torch", preprocess), ("pil", pil_preprocess))}
    result = {
        "network": args.network, "arch": args.arch or {}, "images": args.images, "resolution": args.resolution,
        "input_grey_levels_mean_abs": float(pixel_diff.mean()), "input_grey_levels_max_abs": float(pixel_diff.max()),
        "fd_same_images_torch_vs_pil": fd(feats["reference", "torch"], feats["reference", "pil"]),
    }
    for name in ("samples", "blurred"):
        for way in ("torch", "pil"):
            result[f"fd_reference_{name}_{way}"] = fd(feats["reference", way], feats[name, way])
        result[f"fd_reference_{name}_relative_change"] = (
            result[f"fd_reference_{name}_pil"] / result[f"fd_reference_{name}_torch"] - 1)
    return result


def run_speed(args: argparse.Namespace) -> dict:
    space = random_space(args, perturb=False)
    images = np.random.default_rng(args.seed).integers(0, 256, (args.batch, args.resolution, args.resolution, 3),
                                                       dtype=np.uint8)
    with FlopCounterMode(display=False) as counter:
        space.features(images[:1])
    space.features(images)  # warm-up
    if space.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.batches):
        space.features(images, batch_size=args.batch)
    if space.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    per_s = args.batches * args.batch / seconds
    return {
        "network": args.network, "arch": args.arch or {}, "device": str(space.device), "batch": args.batch,
        "resolution": args.resolution, "gflop_per_image": counter.get_total_flops() / 1e9,
        "images_per_s": per_s, "s_per_1k_images": 1000 / per_s, "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    result = run_resize(args) if args.what == "resize" else run_speed(args)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
