"""Inception-v3 features for the ADM suite, from torch-fidelity's port of the 2015-12-05 TF graph.

torch-fidelity's ``FeatureExtractorInceptionV3`` reproduces the TensorFlow graph ADM's evaluator
runs, including its bilinear resize of any input to 299×299 and its (x − 128)/128 scaling; we
use it unchanged and read three outputs from one forward pass:

- ``pool`` (N, 2048): the ``pool_3`` average pool, torch-fidelity's ``"2048"`` (FID, precision/recall);
- ``logits`` (N, 1008): pool·W without the bias, torch-fidelity's ``"logits_unbiased"``, which is
  ADM's ``softmax/logits/MatMul`` on pool_3 (Inception Score);
- ``spatial`` (N, 2023): ADM's ``mixed_6/conv`` tensor, first 7 of its 192 channels at 17×17 (sFID).

Which layer is ``mixed_6/conv``: the TF graph names its 11 Inception blocks ``mixed`` …
``mixed_10``, so ``mixed_6`` is the seventh, torch-fidelity's ``Mixed_6d``; inside a block,
``conv`` is the 1×1 branch and the ``tower*`` scopes the others. torch-fidelity's weight
converter (``utils/util_convert_inception_weights.py``) maps ``mixed_6/conv/conv2d_params`` and
``mixed_6/conv/batchnorm`` to ``Mixed_6d.branch1x1.conv`` / ``.bn``, which confirms it. The tensor
``mixed_6/conv:0`` is the last op of that scope, i.e. the output of conv → batch norm → ReLU,
which is what ``Mixed_6d.branch1x1`` (a ``BasicConv2d``) returns; we take it with a forward hook.
ADM flattens it from TF's channels-last layout, so we flatten (N, 17, 17, 7), not (N, 7, 17, 17):
the order matters for comparing with the ``mu_s``/``sigma_s`` stored in ADM reference batches.

Weights are read from a local file only (no downloads): torch-fidelity's converted TF weights,
``weights-inception-2015-12-05-6726825d.pth`` (see :data:`INCEPTION_WEIGHTS_URL`).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from reglue.errors import InputError
from reglue.io import read_tensor_file

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
)
SPATIAL_CHANNELS = 7  # ADM keeps the first 7 channels of mixed_6/conv: 7 · 17 · 17 = 2023 features


class InceptionFeatures(nn.Module):
    """The 2015 Inception-v3 returning ``{"pool": (B, 2048), "spatial": (B, 2023), "logits": (B, 1008)}``.

    Input: uint8 images ``(B, 3, H, W)`` of any size (resized to 299×299 inside).
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network  # torch-fidelity's extractor asked for ("2048", "logits_unbiased")
        self._spatial: torch.Tensor | None = None
        network.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)  # ADM's mixed_6/conv

    def _keep_spatial(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        channels_last = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)  # (B, 17, 17, 7), TF's layout
        self._spatial = channels_last.reshape(output.shape[0], -1).float()  # (B, 2023)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pool, logits = self.network(images)
        spatial, self._spatial = self._spatial, None
        return {"pool": pool, "spatial": spatial, "logits": logits}


def resolve_weights_path(path: str | Path) -> Path:
    """The weights file at ``path``, or ``path/weights-inception-2015-12-05-6726825d.pth`` for a folder.

    Raises FileNotFoundError saying what the file is, what it is called and where to get it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / INCEPTION_WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception-v3 weights not found at {path}. reglue never downloads at run time: download "
            f"{INCEPTION_WEIGHTS_FILE} (torch-fidelity's conversion of the 2015-12-05 TensorFlow Inception) from "
            f"{INCEPTION_WEIGHTS_URL} and pass its path, or a folder holding it, as --inception."
        )
    return path


def load_inception(weights_path: str | Path) -> InceptionFeatures:
    """Build :class:`InceptionFeatures` from a local weights file (or a folder holding it), in eval mode.

    The file is read with ``weights_only`` (or as safetensors) so it cannot run pickled code, then
    handed to torch-fidelity's constructor, which loads it strictly, as an in-memory copy.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = resolve_weights_path(weights_path)
    state_dict = read_tensor_file(path, "Inception-v3 weights")
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    try:
        network = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=buffer
        )
    except (RuntimeError, AttributeError) as err:
        raise InputError(
            f"{path} is not an Inception-v3 state dict of torch-fidelity's layout "
            f"({str(err).strip().splitlines()[0][:200]}); use {INCEPTION_WEIGHTS_FILE} from {INCEPTION_WEIGHTS_URL}."
        ) from err
    return InceptionFeatures(network)


def extract_features(
    images: np.ndarray,
    extractor: InceptionFeatures,
    batch_size: int = 250,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Features of uint8 ``images`` ``(N, H, W, 3)``: ``pool`` (N, 2048), ``spatial`` (N, 2023), ``logits`` (N, 1008).

    Batches of ``batch_size`` go to ``device``; ``progress`` shows a tqdm bar (on stderr).
    """
    extractor = extractor.to(device).eval()
    batches = []
    for start in tqdm(
        range(0, len(images), batch_size), desc="inception", unit="batch", disable=not progress
    ):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
        batch = batch.to(device).permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)
        batches.append({name: value.cpu().numpy() for name, value in extractor(batch).items()})
    return {
        name: np.concatenate([batch[name] for batch in batches]) for name in ("pool", "spatial", "logits")
    }
