"""Feature spaces for the Fréchet distance and precision/recall: a frozen ViT's final-normed CLS token
(or, for a teacher without one, its family's stand-in: docs/vfm.md).

**FD_DINOv2** (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics"; EDM2's
``calculate_metrics.py``; layer6ai-labs/dgm-eval) is the Fréchet distance between Gaussians fitted
to the CLS features of DINOv2 ViT-L/14 *without* registers (``dinov2_vitl14_pretrain.pth``,
1024-d). :data:`FD_DINOV2` names that network; the weights file is the user's to give.

Preprocessing (:func:`preprocess`), EDM2's default ``resize_mode='torch'``, in this order:

1. uint8 (B, 3, H, W) → float32, values still 0–255;
2. ``F.interpolate(size=(224, 224), mode="bicubic", antialias=True, align_corners=False)`` — no
   rounding and no clamping afterwards (antialiased bicubic in torch is PIL's filter, a = −0.5);
3. ÷ 255, then ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225);
4. the ViT's forward with the official no-register position-embedding resize (37×37 → 16×16,
   scale factor 16.1 / 37, no antialias; :mod:`reglue.encoders.vfm`), final LayerNorm, token 0.

dgm-eval (and EDM2's ``resize_mode='pil'``) resize the uint8 image with PIL's bicubic instead,
which rounds and clips to uint8 after each of its two 1-D passes; docs/evaluation.md gives the
measured size of that difference.

Any registered VFM can serve as the space (:func:`load_feature_space` with a :class:`VFMSpec`): it sees
its 256² input side (224² for patch 14, 256² for patch 16: 16×16 tokens), resized as in step 2, normalised
with its family's mean/std, and gives its ``cls`` (the class token, SigLIP's attention-pool head, I-JEPA's
mean patch token).
The metric is then called ``fd_<network>`` (:func:`fd_key`). Every space carries its network name
and the fingerprint of its weights, so results and cached reference statistics name both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from reglue.encoders.semantics import RANDOM_WEIGHTS, VFMSpec
from reglue.encoders.vfm import IMAGENET_MEAN, IMAGENET_STD, VFM_MODELS, vfm_family
from reglue.errors import InputError
from reglue.state_dict import weights_fingerprint

FD_DINOV2 = VFMSpec(name="dinov2_vitl14", weights=None)  # the canonical network; weights given by the user
FD_DINOV2_KEY = "fd_dinov2"
FD_INPUT_SIDE = 224  # FD_DINOv2's network input: 16×16 patches of 14 pixels
OFFICIAL_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2"

Progress = Callable[[int], None] | bool | None  # a callable gets the images done per batch; True: a tqdm bar


def fd_key(network: str) -> str:
    """The metric's name: ``"fd_dinov2"`` for DINOv2 ViT-L/14 without registers, else ``f"fd_{network}"``."""
    return FD_DINOV2_KEY if network == FD_DINOV2.name else f"fd_{network}"


def preprocess(images: torch.Tensor, *, size: int = FD_INPUT_SIDE, mean: Sequence[float] = IMAGENET_MEAN,
               std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 (B, 3, H, W) → float32 (B, 3, size, size): bicubic antialias resize of the 0–255
    values (no rounding, no clamping), ÷ 255, ``mean``/``std`` (ImageNet's: EDM2's FD_DINOv2 preprocessing)."""
    x = images.float()  # (B, 3, H, W), 0..255
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x / 255.0 - mean) / std


class FeatureSpace:
    """A frozen ViT as a feature space: uint8 images → final-normed CLS features (or the stand-in its pooling
    gives: timm's ``forward_head``).

    ``key`` is the metric name (``"fd_dinov2"`` or ``f"fd_{network}"``), ``network`` the registry
    name, ``fingerprint`` :func:`reglue.state_dict.weights_fingerprint` of the ViT (16 hex), ``dim``
    the feature width, ``weights`` where the weights came from (a path or ``"random"``),
    ``input_size`` the side images are resized to, ``mean``/``std`` the network's normalisation. Build one
    with :func:`load_feature_space`.
    """

    def __init__(
        self, vit: nn.Module, *, network: str, weights: str, input_size: int = FD_INPUT_SIDE,
        mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
        device: str | torch.device = "cpu",
    ):
        self.network = network
        self.key = fd_key(network)
        self.weights = str(weights)
        self.fingerprint = weights_fingerprint(vit)  # on the CPU copy, before any move
        self.dim = int(vit.embed_dim)
        self.input_size = input_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.device = torch.device(device)
        self.vit = vit.to(self.device).eval().requires_grad_(False)

    @property
    def is_random(self) -> bool:
        return self.weights == RANDOM_WEIGHTS

    def describe(self) -> dict[str, str | int | bool]:
        """What results record about the space: network, weights, fingerprint, input side, width."""
        return {
            "network": self.network, "weights": self.weights, "weights_fingerprint": self.fingerprint,
            "input_size": self.input_size, "dim": self.dim, "random_weights": self.is_random,
        }

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) on any device → float32 (B, dim) CLS features on the space's device."""
        x = preprocess(images.to(self.device), size=self.input_size, mean=self.mean, std=self.std)  # (B, 3, 224, 224)
        tokens = self.vit.forward_features(x)  # (B, P + h·w, dim) after the final norm, P prefix tokens
        return self.vit.forward_head(tokens, pre_logits=True).float()  # the class token, or the stand-in

    def features(self, images: np.ndarray, *, batch_size: int = 64, progress: Progress = None) -> np.ndarray:
        """uint8 images (N, H, W, 3) numpy (any H = W) -> float64 (N, dim): final-normed CLS token.

        Batches of ``batch_size`` run on the space's device; ``progress`` is a callable given the
        number of images of each finished batch, or True for a tqdm bar (stderr).
        """
        _check_images(images)
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, found {batch_size}.")
        out = np.empty((len(images), self.dim), dtype=np.float64)
        with tqdm(total=len(images), unit="img", desc=self.key, disable=progress is not True) as bar:
            for start in range(0, len(images), batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
                out[start : start + len(batch)] = self.embed(batch.permute(0, 3, 1, 2)).double().cpu().numpy()
                bar.update(len(batch))
                if callable(progress):
                    progress(len(batch))
        return out


def load_feature_space(spec: VFMSpec | None = None, *, device: str | torch.device = "cpu") -> FeatureSpace:
    """spec None = DINOv2 ViT-L/14 without weights -> fails fast naming where to put dinov2_vitl14_pretrain.pth.

    ``spec`` names a registered VFM and its weights (a file, or ``"random"`` for tests and demos;
    ``spec.arch`` shrinks it for tests); ``spec.layers`` is not used. A missing file fails before
    any model is built; weights of another shape fail with every mismatched key listed.
    """
    spec = FD_DINOV2 if spec is None else spec
    if spec.name not in VFM_MODELS:
        raise InputError(f"unknown VFM {spec.name!r} for the feature space; choose one of {', '.join(VFM_MODELS)}.")
    if spec.weights is None or not (spec.is_random or Path(spec.weights).is_file()):
        raise FileNotFoundError(_missing_weights_message(spec))
    extractor = spec.build(resolution=256)  # the ViT, its input side (224 for patch 14, 256 for 16) and mean/std
    return FeatureSpace(extractor.vit, network=spec.name, weights=spec.weights, input_size=extractor.input_size,
                        mean=extractor.mean, std=extractor.std, device=device)


def _missing_weights_message(spec: VFMSpec) -> str:
    """Which file the space needs, where to get it and how to pass it."""
    found = "no weights were given" if spec.weights is None else f"{spec.weights} is not a file"
    what = "FD_DINOv2 needs DINOv2 ViT-L/14 without registers" if spec.name == FD_DINOV2.name else (
        f"the feature space {fd_key(spec.name)} needs {spec.name}")
    if VFM_MODELS[spec.name].family == "dinov2":
        base = spec.name.removesuffix("_reg")
        file = f"{base}_reg4_pretrain.pth" if spec.name.endswith("_reg") else f"{base}_pretrain.pth"
        fetch, path = f"fetch {file} from {OFFICIAL_DINOV2_URL}/{base}/{file}", f"weights/{file}"
    else:
        fetch, path = f"fetch {vfm_family(spec.name).accepts}", "weights/FILE"
    return (
        f"{what}, but {found}. reglue never downloads weights: {fetch} on a machine with internet, put it at "
        f"{path} and pass --vfm-weights {path} (in Python: VFMSpec({spec.name!r}, weights='{path}')). "
        f"--vfm-weights {RANDOM_WEIGHTS} builds a random network for tests only."
    )


def _check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        found = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise InputError(
            f"feature-space input must be uint8 numpy images (N, H, W, 3); found {found}. Pass raw pixels "
            "channels-last, e.g. the arr_0 of an ADM .npz."
        )
    if images.shape[1] != images.shape[2]:
        raise InputError(
            f"feature-space input must be square images (N, H, H, 3); found {images.shape}. Centre-crop them "
            "first, as `reglue prepare` and ADM's reference batches do."
        )

