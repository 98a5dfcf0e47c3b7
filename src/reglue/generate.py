"""``reglue sample``: many samples to PNGs and an ADM ``.npz``, independent of GPU count (SPEC §8).

Sample i's initial noise, its label and every step's SDE noise come from generators seeded with
(seed, i) only. Float kernels are chosen by tensor shape, so every SiT and VAE call sees exactly
``micro_batch`` rows (chunks, the last one padded): the images are then bit-identical whatever
the number of processes, the per-device batch and however often the run was resumed. The
micro-batch is part of the settings (another value selects other kernels, changing images by
about one grey level on a few pixels). Each PNG is written atomically under its index
(``000123.png``); a rerun keeps the existing ones and generates only the missing indices. The
folder's ``settings.json`` records the settings and fingerprints of the SiT and VAE weights, so
a rerun with another checkpoint is refused instead of mixing models. When all PNGs exist, the
main process packs ``samples.npz`` (``arr_0`` uint8 N×H×W×3, ``labels`` int64 N), atomically.
The main process's parts (``settings.json``, packing) run in :func:`reglue.distributed.on_main`: when
one fails, every process stops with its cause.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from reglue.data import store
from reglue.distributed import on_rank_zero
from reglue.encoders.autoencoder import load_vae
from reglue.encoders.vae import DEFAULT_VAE
from reglue.errors import InputError
from reglue.io import atomic_write
from reglue.models.loading import load_sampling_model
from reglue.models.sit import SiT
from reglue.sampling import NO_GUIDANCE, Guidance, padded_rows, sample_ode, sample_sde
from reglue.seeding import LABEL_STREAM, NOISE_STREAM, seeded_generator
from reglue.state_dict import weights_fingerprint


@dataclass(frozen=True, kw_only=True)
class SampleSettings:
    """What determines the images; a rerun into the same folder must match."""

    num_samples: int = 50_000
    mode: str = "sde"  # sde | ode
    num_steps: int = 250
    heun: bool = False  # ODE only
    guidance: Guidance = NO_GUIDANCE
    labels: str = "random"  # random | balanced | comma-separated class list
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16
    # Rows per SiT/VAE call (guidance doubles the rows of a step): every call exactly this many (padded),
    # so images do not depend on the batch; None: the rows of each call as they come (MAX_CALL_ROWS).
    micro_batch: int | None = 32

    def __post_init__(self) -> None:
        if self.mode not in ("sde", "ode"):
            raise InputError(f"mode must be sde or ode, found {self.mode!r}.")
        if self.heun and self.mode != "ode":
            raise InputError("heun is a correction of the ODE sampler; use mode ode or drop heun.")
        if self.guidance.vae_only and self.mode != "sde":
            raise InputError("vae_only guidance (the authors' --vae_cfg) exists for the SDE sampler only.")
        if self.precision not in ("fp32", "bf16"):
            raise InputError(f"precision must be fp32 or bf16, found {self.precision!r}.")
        if self.num_samples < 1:
            raise InputError(f"num_samples must be >= 1, found {self.num_samples}.")
        if self.num_steps < 1:
            raise InputError(f"num_steps must be >= 1, found {self.num_steps}.")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise InputError(f"micro_batch must be >= 1 or None, found {self.micro_batch}.")
        fixed = self.labels in ("random", "balanced")
        if not fixed and not all(c.strip().isdigit() for c in self.labels.split(",")):
            raise InputError(f"labels must be random, balanced or comma-separated class ids such as 1,7,42; "
                             f"found {self.labels!r}.")


# The paper's evaluation sampler (SPEC §8, §11): SDE, 250 steps, CFG 2.8 on t in [0, 0.9].
PAPER = SampleSettings(mode="sde", num_steps=250, guidance=Guidance(scale=2.8, low=0.0, high=0.9))
# `reglue grid`'s default: stronger guidance than the paper's FID setting, for a picture.
GRID_GUIDANCE = Guidance(scale=4.0, low=0.0, high=0.9)


def label_of(index: int, settings: SampleSettings, num_classes: int) -> int:
    """Sample ``index``'s class: random from (seed, index), balanced (index mod K), or from a list."""
    if num_classes == 0:
        return 0  # unconditional model: the null label is 0
    if settings.labels == "random":
        g = seeded_generator(settings.seed, LABEL_STREAM, index)
        return int(torch.randint(num_classes, (1,), generator=g))
    if settings.labels == "balanced":
        return index % num_classes
    classes = [int(c) for c in settings.labels.split(",")]
    if not all(0 <= c < num_classes for c in classes):
        raise InputError(f"labels {classes} must lie in 0..{num_classes - 1}.")
    return classes[index % len(classes)]


def initial_noise(index: int, seed: int, model: SiT, device: torch.device | str = "cpu",
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Generator]:
    """Sample ``index``'s latent noise (C, H, W), CLS noise (z,) or None, and its step-noise generator,
    all on ``device``: the generator is seeded by (seed, index) there and draws the latent, then the
    CLS noise, then every SDE step's noise (CPU and CUDA generators give different numbers)."""
    c = model.config
    g = seeded_generator(seed, NOISE_STREAM, index, device=device)
    latents = torch.randn(c.in_channels, c.input_size, c.input_size, generator=g, device=device)
    cls = torch.randn(c.z_dim, generator=g, device=device) if c.use_cls_token else None
    return latents, cls, g


MAX_CALL_ROWS = 32  # rows per SiT/VAE call when the settings fix no micro-batch (bounds activation memory)


def fast_precision(device: torch.device) -> str:
    """The faster sampling precision on ``device``: bf16 on accelerators and on CPUs whose bf16 matrix
    multiplies outrun fp32 (:func:`cpu_bf16_is_faster`), fp32 on other CPUs."""
    if device.type != "cpu":
        return "bf16"
    return "bf16" if cpu_bf16_is_faster() else "fp32"


def cpu_bf16_is_faster(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bf16 matrices faster than fp32 ones, from its feature flags: AMX tiles
    (torch's own probe), or an AMD CPU with AVX512-BF16 (Zen 4 and later). docs/benchmarks.md measured
    both kinds of AVX512-BF16 machine: on AMD EPYC bf16 matrix multiplies ran 2.2–2.3× fp32's rate, on an
    Intel Xeon without AMX (AMX hidden by the VM) at half of it.
    Decided from flags, never by timing, so that one machine always samples in the same precision.
    Where ``cpuinfo`` cannot be read (not Linux): AMX only."""
    if torch.cpu._is_amx_tile_supported():
        return True
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    first = text.split("\n\n", 1)[0]  # the first processor's entry
    fields = {key.strip(): value.strip() for key, value in
              (line.split(":", 1) for line in first.splitlines() if ":" in line)}
    return fields.get("vendor_id") == "AuthenticAMD" and "avx512_bf16" in fields.get("flags", "").split()


@torch.no_grad()
def sample_batch(model: SiT, vae, indices: Sequence[int], settings: SampleSettings,
                 device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (B, H, W, 3) and labels (B,) for the given sample indices.

    ``settings.micro_batch`` None: each SiT call takes a step's rows in near-equal unpadded chunks of at
    most :data:`MAX_CALL_ROWS`, and the VAE decodes in chunks of that many (nothing computed twice)."""
    noise = [initial_noise(i, settings.seed, model, device) for i in indices]
    latents = torch.stack([n[0] for n in noise])
    cls = torch.stack([n[1] for n in noise]) if model.use_cls_token else None
    labels = torch.tensor([label_of(i, settings, model.num_classes) for i in indices], device=device)
    max_rows = MAX_CALL_ROWS if settings.micro_batch is None else None
    rows = {"micro_batch": settings.micro_batch, "max_call_rows": max_rows}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.precision == "bf16")
    with autocast:
        if settings.mode == "sde":
            x = sample_sde(model, latents, labels, cls, num_steps=settings.num_steps, guidance=settings.guidance,
                           noise_generators=[n[2] for n in noise], **rows)
        else:
            x = sample_ode(model, latents, labels, cls, num_steps=settings.num_steps, heun=settings.heun,
                           guidance=settings.guidance, **rows)
    latents = x[:, :4].float()  # only the 4 VAE channels
    images = vae.decode(latents, batch_size=max_rows) if max_rows else decode_fixed(vae, latents, settings.micro_batch)
    return images.permute(0, 2, 3, 1).cpu().numpy(), labels.cpu().numpy()


def decode_fixed(vae, latents: torch.Tensor, micro_batch: int) -> torch.Tensor:
    """``vae.decode`` with every call exactly ``micro_batch`` latents (the last chunk padded)."""
    rows = padded_rows(latents.shape[0], micro_batch, latents.device)
    return vae.decode(latents[rows], batch_size=micro_batch)[: latents.shape[0]]


def _png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    with atomic_write(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def generate(
    model: SiT, vae, out_dir: str | Path, settings: SampleSettings, *, per_device_batch: int = 32,
    device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
    barrier: Callable[[], None] = lambda: None, progress: Callable[[int], None] | None = None,
) -> Path:
    """Generate the missing samples of ``out_dir`` on this rank, then (main) pack the ``.npz``."""
    if per_device_batch < 1:
        raise InputError(f"per_device_batch must be >= 1, found {per_device_batch}.")
    if settings.micro_batch is None:
        raise InputError("reglue sample needs a fixed micro_batch (every SiT/VAE call that many rows), so that the "
                         "images do not depend on the batch size or the number of processes; set micro_batch=32.")
    out_dir, device = Path(out_dir), torch.device(device)
    out_dir.mkdir(parents=True, exist_ok=True)

    def claim() -> None:  # the settings recorded (or another run's refused), a killed run's half-written PNGs gone
        recorded = {**asdict(settings), "sit_weights": weights_fingerprint(model),
                    "vae_weights": weights_fingerprint(vae)}
        fix = "rerun with the original settings, checkpoint and VAE to resume, or choose another output folder."
        store.check_or_write_json(out_dir / "settings.json", recorded, fix)
        for leftover in out_dir.glob(".*.tmp-*"):
            leftover.unlink()

    on_rank_zero(rank, f"checking {out_dir / 'settings.json'}", claim)  # before any process writes a PNG
    todo = [i for i in range(rank, settings.num_samples, world_size) if not (out_dir / f"{i:06d}.png").exists()]
    model.eval()
    for start in range(0, len(todo), per_device_batch):
        indices = todo[start : start + per_device_batch]
        images, _ = sample_batch(model, vae, indices, settings, device)
        for i, image in zip(indices, images):
            _png(out_dir / f"{i:06d}.png", image)
        if progress is not None:
            progress(len(indices))
    barrier()
    npz = out_dir / "samples.npz"
    on_rank_zero(rank, f"packing {npz}", lambda: pack_npz(out_dir, settings, model.num_classes, npz))
    return npz


def pack_npz(out_dir: Path, settings: SampleSettings, num_classes: int, npz: Path) -> None:
    """Stack ``000000.png``… into an ADM ``.npz`` (``arr_0`` N×H×W×3 uint8, ``labels``)."""
    from PIL import Image

    first = np.asarray(Image.open(out_dir / "000000.png").convert("RGB"))
    images = np.empty((settings.num_samples, *first.shape), np.uint8)  # one copy in memory, filled in place
    for i in range(settings.num_samples):
        image = np.asarray(Image.open(out_dir / f"{i:06d}.png").convert("RGB"))
        if image.shape != first.shape:
            raise InputError(f"{out_dir / f'{i:06d}.png'} is {image.shape}, not {first.shape} like 000000.png; "
                             "delete the odd file and rerun to regenerate it.")
        images[i] = image
    labels = np.array([label_of(i, settings, num_classes) for i in range(settings.num_samples)], np.int64)
    with atomic_write(npz) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, arr_0=images, labels=labels)


class ImageSampler:
    """Images from a trained model in a few lines, the same code path as ``reglue sample``.

    >>> sampler = ImageSampler.from_pretrained("runs/reglue/ema", vae="stabilityai/sd-vae-ft-ema")
    >>> images = sampler([207, 360, 387], guidance=Guidance(scale=4.0, high=0.9), num_steps=250, seed=0)

    Sample i of a call gets the noise of index i and label ``labels[i]``, exactly as ``reglue
    sample --labels 207,360,387 --num-samples 3 --seed 0`` with the same sampler options. By default
    (``micro_batch=None``) each model call takes the rows a step has — a call for 2 images computes
    2 images, not a padded micro-batch — so an image is bit-identical to the same call's with the same
    labels count, ``batch_size``, options and device, and may differ by a grey level on a few pixels
    from one made in a batch of another size. With ``micro_batch=32`` (``reglue sample``'s default) and
    the same precision the images equal that command's PNGs bit for bit whatever the batch. The
    precision defaults to the faster one on the device (:func:`fast_precision`; ``reglue sample``: fp32).
    """

    def __init__(self, model: SiT, vae, *, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.model.check_inputs = self.device.type == "cpu"
        self.vae = vae.to(self.device)

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path, *, vae: str | Path = DEFAULT_VAE, weights: str = "ema",
                        device: torch.device | str | None = None) -> ImageSampler:
        """``checkpoint``: RUN_DIR/ema, a training checkpoint, or the authors' ``.pt`` (see
        :func:`~reglue.models.loading.load_sampling_model`); ``vae``: a diffusers folder, a cached hub id, or ``"pixel"``."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(load_sampling_model(checkpoint, weights), load_vae(vae), device=device)

    def __call__(self, labels: Sequence[int], *, guidance: Guidance = NO_GUIDANCE, mode: str = "sde",
                 num_steps: int = 250, heun: bool = False, seed: int = 0, precision: str | None = None,
                 micro_batch: int | None = None, batch_size: int = 32, output_type: str = "pil"):
        """One image per class id in ``labels``: a list of PIL images (``output_type="pil"``) or
        uint8 (N, H, W, 3) (``"np"``). ``batch_size`` samples advance together; ``micro_batch``: see
        the class docstring (None: the rows as they come, at most :data:`MAX_CALL_ROWS` per call);
        ``precision``: fp32 or bf16, None = :func:`fast_precision` of the device."""
        if output_type not in ("pil", "np"):
            raise InputError(f"output_type must be pil or np, found {output_type!r}.")
        if len(labels) == 0:
            raise InputError("labels is empty: pass one class id per image, e.g. [207, 360].")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, found {batch_size}.")
        settings = SampleSettings(num_samples=len(labels), mode=mode, num_steps=num_steps, heun=heun,
                                  guidance=guidance, labels=",".join(str(int(c)) for c in labels), seed=seed,
                                  precision=precision or fast_precision(self.device), micro_batch=micro_batch)
        chunks = [sample_batch(self.model, self.vae, range(start, min(start + batch_size, len(labels))), settings,
                               self.device)[0] for start in range(0, len(labels), batch_size)]
        images = np.concatenate(chunks)
        if output_type == "np":
            return images
        from PIL import Image

        return [Image.fromarray(image) for image in images]


def class_grid(model: SiT, vae, classes: Sequence[int], settings: SampleSettings, *, per_class: int = 1,
               device: torch.device | str = "cpu") -> np.ndarray:
    """A labelled uint8 grid (H, W, 3): one column per class, ``per_class`` rows, class ids on top.

    Each column is one batch, so model calls use at most 2·``per_class`` rows (no padding to the
    settings' micro-batch); the grid is still the same for the same settings and ``per_class``."""
    from dataclasses import replace

    from PIL import Image, ImageDraw

    device = torch.device(device)
    columns = []
    for column, label in enumerate(classes):
        micro = None if settings.micro_batch is None else min(settings.micro_batch, 2 * per_class)
        class_settings = replace(settings, labels=str(label), micro_batch=micro)
        indices = [column * per_class + r for r in range(per_class)]
        images, _ = sample_batch(model.eval(), vae, indices, class_settings, device)
        columns.append(np.concatenate(list(images), axis=0))  # (per_class·H, W, 3)
    body = np.concatenate(columns, axis=1)
    header = 16
    canvas = Image.new("RGB", (body.shape[1], body.shape[0] + header), "white")
    canvas.paste(Image.fromarray(body), (0, header))
    draw = ImageDraw.Draw(canvas)
    width = body.shape[1] // len(classes)
    for column, label in enumerate(classes):
        draw.text((column * width + 3, 2), f"class {label}", fill="black")
    return np.asarray(canvas)
