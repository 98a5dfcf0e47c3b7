"""Improved precision and recall (Kynkäänniemi et al. 2019) with k = 3, as in ADM (SPEC §10).

Each feature set is a union of balls: around every feature, the ball reaching its k-th nearest
neighbour in the same set (itself excluded). Precision is the fraction of sample features inside
any reference ball; recall the fraction of reference features inside any sample ball. A point
exactly on a ball's surface counts as inside.

The arithmetic is ADM's (``ManifoldEstimator`` and ``DistanceBlock`` of guided-diffusion's
``evaluations/evaluator.py``), whose rounding moves precision and recall by a few samples in 500:

- Distances are squared Euclidean distances from the expansion ‖u‖² − 2u·v + ‖v‖², clamped at 0;
  radii are squared too, and ``distance <= radius`` is decided on those float32 values.
- They are computed in float16 for blocks of :data:`ADM_BLOCK` × :data:`ADM_BLOCK` features
  (reference rows × sample columns for precision/recall; rows × columns of one set for the
  radii). A block holding any inf or NaN is computed again from the float32 features with the
  same expansion in float32 — in practice when squared norms pass float16's 65504.

How ADM's TensorFlow graph evaluates the float16 expansion on a GPU, and how
:func:`squared_distances` reproduces each step:

1. The float32 features are cast to float16 (round to nearest even, overflowing to inf).
2. The squares are float16 products; ``reduce_sum`` adds them in float16, rounding after every
   addition (TensorFlow's GPU kernel keeps a float16 accumulator), in the order of the CUB
   reduction that TensorFlow launches, which :func:`_float16_row_sums` follows.
3. ``U @ Vᵀ`` is a float16 matmul that cuBLAS accumulates in float32
   (``TF_FP16_MATMUL_USE_FP32_COMPUTE`` is on by default), rounding the result once to float16.
   We multiply the float16 values in float32, where every product is exact (also under TF32),
   and round the sums to float16. CPU torch's own float16 matmul does the same but 2× slower.
4. ``2·uv``, ``‖u‖² − 2uv``, ``+ ‖v‖²`` and the clamp at 0 are float16 operations, each one
   rounded. torch's float16 operations compute in float32 and round once, which gives the same
   result as float16 arithmetic for a single +, − or ×.

One difference from ADM is left. A float32 matmul sum that comes within float32 error of a
float16 rounding boundary can round the other way, because the summation order differs. It
shows up in very few entries, as a change of one float16 unit.
"""

from __future__ import annotations

import numpy as np
import torch

from reglue.errors import InputError

NEIGHBOURHOOD_K = 3
ADM_BLOCK = 10_000  # ADM's row_batch_size = col_batch_size: the unit of the float32 fallback
CHUNK_ROWS = 1024  # rows per float32 matmul inside a block: 1024 × 10K float32 = 40 MB


def precision_recall(
    reference: np.ndarray, samples: np.ndarray, k: int = NEIGHBOURHOOD_K, device: str | torch.device = "cpu"
) -> tuple[float, float]:
    """Precision and recall (Python floats) of ``samples`` ``(M, D)`` against ``reference`` ``(N, D)``."""
    for name, features in (("reference", reference), ("samples", samples)):
        if features.ndim != 2 or features.shape[0] <= k:
            raise InputError(
                f"precision/recall with k={k} needs {name} features (N, D) with N > {k}, found shape "
                f"{features.shape}; evaluate more images."
            )
    ref = torch.as_tensor(reference, dtype=torch.float32, device=device)  # ADM feeds float32 features
    gen = torch.as_tensor(samples, dtype=torch.float32, device=device)
    ref_radii, gen_radii = knn_squared_radii(ref, k), knn_squared_radii(gen, k)
    ref_inside = torch.zeros(len(ref), dtype=torch.bool, device=device)  # inside some sample ball
    gen_inside = torch.zeros(len(gen), dtype=torch.bool, device=device)  # inside some reference ball
    for i in range(0, len(ref), ADM_BLOCK):
        for j in range(0, len(gen), ADM_BLOCK):
            distances = squared_distances(ref[i : i + ADM_BLOCK], gen[j : j + ADM_BLOCK])  # (ref, gen)
            ref_inside[i : i + ADM_BLOCK] |= (distances <= gen_radii[j : j + ADM_BLOCK]).any(dim=1)
            gen_inside[j : j + ADM_BLOCK] |= (distances <= ref_radii[i : i + ADM_BLOCK, None]).any(dim=0)
    return gen_inside.sum().item() / len(gen), ref_inside.sum().item() / len(ref)


def knn_squared_radii(features: torch.Tensor, k: int = NEIGHBOURHOOD_K) -> torch.Tensor:
    """Squared distance ``(N,)`` float32 from each row of ``features`` ``(N, D)`` to its k-th nearest other.

    The (k+1)-th smallest entry of the row's distances (the row itself is the smallest), as ADM.
    """
    radii = []
    for rows in features.split(ADM_BLOCK):
        nearest = [  # the k+1 smallest of each column block hold the k+1 smallest of the row
            torch.topk(squared_distances(rows, cols), min(k + 1, len(cols)), dim=1, largest=False).values
            for cols in features.split(ADM_BLOCK)
        ]
        radii.append(torch.kthvalue(torch.cat(nearest, dim=1), k + 1, dim=1).values)
    return torch.cat(radii)


def knn_radii(features: torch.Tensor, k: int = NEIGHBOURHOOD_K) -> torch.Tensor:
    """Distance ``(N,)`` from each row of ``features`` ``(N, D)`` to its k-th nearest other row."""
    return knn_squared_radii(features, k).sqrt()


def squared_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ADM's ``DistanceBlock``: float32 squared distances ``(len(u), len(v))`` between rows of u and v.

    Computed in float16; the whole block in float32 if any float16 entry is not finite.
    """
    u16, v16 = u.half(), v.half()
    v16_t = v16.float().T  # (D, len(v)): float16 values held in float32
    uv = torch.empty(len(u), len(v), dtype=torch.float16, device=u.device)
    for start in range(0, len(u), CHUNK_ROWS):  # float32 sums of exact products, stored rounded to float16
        uv[start : start + CHUNK_ROWS] = u16[start : start + CHUNK_ROWS].float() @ v16_t
    distances = uv.mul_(-2).add_(_float16_row_sums(u16 * u16)[:, None])  # ‖u‖² − 2uv, rounded
    distances = distances.add_(_float16_row_sums(v16 * v16)[None, :]).clamp_min_(0)  # + ‖v‖², rounded
    if torch.isfinite(distances).all():
        return distances.float()
    norms_u, norms_v = (u * u).sum(dim=1), (v * v).sum(dim=1)
    return (norms_u[:, None] - 2 * (u @ v.T) + norms_v[None, :]).clamp_min_(0)


def _float16_row_sums(x: torch.Tensor) -> torch.Tensor:
    """Row sums ``(N,)`` of float16 ``x`` ``(N, D)`` added in float16, in TensorFlow's GPU order.

    TensorFlow sums the D ≥ 1024 columns of a row with one CUB block of 256 threads (fewer
    columns: one warp of 32): thread t adds columns t, t + 256, t + 512, … in turn; each warp
    adds its 32 thread sums as a pairwise tree (lanes 0+1, 2+3, …, then pairs of pairs); the
    warp sums are added in turn. Every addition rounds to float16. Adding the zero padding is exact.
    """
    threads = 256 if x.shape[1] >= 1024 else 32
    padded = torch.nn.functional.pad(x, (0, -x.shape[1] % threads))
    columns = padded.reshape(len(x), -1, threads)  # (N, items per thread, threads)
    per_thread = columns[:, 0]
    for item in range(1, columns.shape[1]):
        per_thread = per_thread + columns[:, item]
    lanes = per_thread.reshape(len(x), threads // 32, 32)  # (N, warps, 32)
    while lanes.shape[2] > 1:
        lanes = lanes[:, :, 0::2] + lanes[:, :, 1::2]
    total = lanes[:, 0, 0]
    for warp in range(1, lanes.shape[1]):
        total = total + lanes[:, warp, 0]
    return total
