"""Authors-style vs fast: REGLUE training and sampling side by side, same process, same device.

    python benchmarks/compare.py --models SiT-B/2 --batches 8 --out benchmarks/results/compare_cpu

Both configurations compute the same maths with random weights and synthetic data of the real
shapes; they differ only in how (:func:`setups`):

- ``authors``: timm-style attention (explicit softmax(q·kᵀ)·v), fp16 autocast + grad scaler on
  GPUs (fp32 on CPUs), DINOv2-B with registers + the semantic compressor run online every step
  (under the step's autocast), AdamW with the per-parameter loop (foreach=False), the
  per-parameter EMA loop, and DDP's unused-parameter search when distributed;
- ``fast``: SDPA attention, bf16 autocast, optional regional ``torch.compile`` (``--compile``),
  fused AdamW (CUDA and CPU kernels), foreach EMA, cached semantics (no VFM forward)
  copied from pinned host memory.

Training: median step time over ``--steps`` after ``--warmup`` steps (``--interleave``: the two
setups' timed steps alternate, for shared machines), images/s, peak memory (above what was in
use before the setup was built, so the other setup and the process baseline do not count),
FLOPs per training image (counted with ``FlopCounterMode``: SiT forward + backward, plus the
frozen VFM + compressor forward for ``authors``) and, on GPUs, MFU against the device's dense
bf16 peak. Sampling: SDE with CFG and guidance interval, and ODE, fp32 timm-style attention
(``authors``) vs bf16 SDPA (``fast``) from the same noise, with the max/mean absolute difference
of the fast samples from the fp32 ones (peak memory: above the weights, during the draw).
Every timed row records the CPU time other processes used meanwhile ("other load", in cores;
Linux), so a measurement disturbed on a shared machine shows it.
Writes ``compare.json`` and ``compare.md`` into ``--out`` (rewritten after every measurement, so
a cut-short run keeps what it measured).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import resource
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

from reglue.config import OptimConfig, TrainConfig
from reglue.ema import EMAUpdate
from reglue.encoders.norm_stats import NormStats
from reglue.encoders.semantics import SemanticEncoder
from reglue.encoders.vfm import build_vfm
from reglue.models import SiT, build_sit
from reglue.models.compressor import SemanticCompressor
from reglue.presets import get_preset
from reglue.sampling import Guidance, sample_ode, sample_sde
from reglue.training.inputs import InputBuilder
from reglue.training.trainer import build_adamw
from reglue.transport import JointLoss

PRESET = get_preset("reglue")
# Dense bf16/fp16 tensor-core peaks (TFLOP/s), matched against the CUDA device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


@dataclass(frozen=True)
class Setup:
    """How one configuration computes a training step or a sample (not what it computes)."""

    name: str
    attention: str  # sdpa | math
    autocast: str  # fp32 | fp16 | bf16
    online_semantics: bool  # VFM + compressor every step (else cached tensors)
    fused_optimizer: bool
    ema: str  # foreach | loop
    compile: bool
    pin_memory: bool
    find_unused_parameters: bool  # DDP only; recorded, this harness runs one process


def describe(setup: Setup) -> dict:
    """The setup as result columns: ``setup`` (its name) and its switches."""
    fields = asdict(setup)
    return {"setup": fields.pop("name"), **fields}


def setups(device: torch.device, compile_fast: bool) -> tuple[Setup, Setup]:
    authors = Setup("authors", "math", "fp16" if device.type == "cuda" else "fp32", online_semantics=True,
                    fused_optimizer=False, ema="loop", compile=False, pin_memory=False,
                    find_unused_parameters=True)
    fast = Setup("fast", "sdpa", "bf16", online_semantics=False, fused_optimizer=True, ema="foreach",
                 compile=compile_fast, pin_memory=device.type == "cuda", find_unused_parameters=False)
    return authors, fast


AUTOCAST = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=("train", "sample"), default=["train", "sample"])
    parser.add_argument("--models", nargs="+", default=["SiT-B/2"], help="training: SiT sizes")
    parser.add_argument("--batches", nargs="+", type=int, default=[8], help="training: per-device batches")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--interleave", action="store_true",
                        help="training: alternate the two setups' timed steps (fair on a shared machine)")
    parser.add_argument("--compile", action="store_true", help="fast path: torch.compile each SiT block")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (tests: eager)")
    parser.add_argument("--sample-model", default="SiT-B/2")
    parser.add_argument("--sample-batch", type=int, default=2)
    parser.add_argument("--sde-steps", type=int, default=250)
    parser.add_argument("--ode-steps", type=int, default=50)
    parser.add_argument("--cfg-scale", type=float, default=2.8)
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=[0.0, 0.9])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-tf32", dest="tf32", action="store_false", help="fp32 matmuls without TF32 on GPUs")
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: looked up by name)")
    parser.add_argument("--sit-overrides", type=json.loads, default={}, help="JSON SiTConfig overrides (tests)")
    parser.add_argument("--vfm-overrides", type=json.loads, default={},
                        help="JSON DINOv2 embed_dim/depth/num_heads overrides (tests)")
    parser.add_argument("--compressor-hidden", type=int, default=256)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/compare"))
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[list[float]]:
    """Yields ``peak``; when the block ends, ``peak[0]`` is its peak memory in MiB: CUDA
    ``max_memory_allocated``, or on CPUs the process RSS sampled every 5 ms from /proc (where
    there is no /proc, ``ru_maxrss``: the process's peak over its whole life)."""
    peak = [0.0]
    statm = Path("/proc/self/statm")
    if device.type == "cuda" or not statm.exists():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        yield peak
        peak[0] = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10)
        return
    page_mib = os.sysconf("SC_PAGE_SIZE") / 2**20
    stop = threading.Event()

    def poll() -> None:
        while True:
            peak[0] = max(peak[0], int(statm.read_text().split()[1]) * page_mib)
            if stop.wait(0.005):
                return

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()


def busy_cpu_s() -> tuple[float, float]:
    """(CPU seconds busy on the whole machine, CPU seconds of this process) so far; Linux only."""
    ticks = os.sysconf("SC_CLK_TCK")
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    own = os.times()
    return (sum(fields[:8]) - idle) / ticks, own.user + own.system


@contextlib.contextmanager
def other_load() -> Iterator[list[float]]:
    """Yields ``share``; when the block ends, ``share[0]`` is the CPU time other processes used
    during it, in cores (0 on a quiet machine; 1 = another process kept a whole core busy)."""
    share = [float("nan")]
    if not Path("/proc/stat").exists():
        yield share
        return
    start, (busy0, own0) = time.perf_counter(), busy_cpu_s()
    yield share
    busy1, own1 = busy_cpu_s()
    share[0] = max(0.0, (busy1 - busy0) - (own1 - own0)) / (time.perf_counter() - start)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override is not None or device.type != "cuda":
        return override
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


# --------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------


def vfm_dim(args) -> int:
    return args.vfm_overrides.get("embed_dim", 768)


def build_model(name: str, args, setup: Setup, device: torch.device):
    """REGLUE SiT (random init, seed 0) with ``setup``'s attention kernel, regionally compiled if asked."""
    torch.manual_seed(0)
    model = build_sit(name, **PRESET.model_kwargs(vfm_dim=vfm_dim(args)), **args.sit_overrides)
    model = model.to(device).set_attention(setup.attention)
    model.check_inputs = device.type == "cpu"  # no host syncs on accelerators
    return model


def compile_blocks(model, backend: str) -> None:
    """Compile every SiT block afresh: without the reset, a block compiled for an earlier run (another
    batch or model) would be recompiled with dynamic shapes, which is not what a user's run gets."""
    torch._dynamo.reset()
    for block in model.blocks:
        block.compile(backend=backend)


def build_semantic_encoder(args, setup: Setup, device: torch.device) -> SemanticEncoder:
    """Random DINOv2-B/14 with registers + z-scoring + the real compressor encoder (3072→256→16)."""
    torch.manual_seed(0)
    extractor = build_vfm("dinov2_vitb14_reg", weights=None, autocast_dtype=AUTOCAST[setup.autocast],
                          **args.vfm_overrides)
    width = len(extractor.layers) * extractor.embed_dim
    stats = NormStats(torch.randn(width) * 0.1, torch.rand(width) + 0.5)
    compressor = SemanticCompressor((width, args.compressor_hidden, PRESET.semantic_channels))
    return SemanticEncoder(extractor, stats, compressor).to(device)


def host_batch(batch: int, tokens: int, args, setup: Setup) -> dict[str, torch.Tensor]:
    """One synthetic batch in host memory, in the dataset's layout (moments, labels, and images or
    the cached float16 semantics/CLS/REPA targets); page-locked when ``setup.pin_memory``."""
    g = torch.Generator().manual_seed(0)
    size = 32  # 256² images → 32×32 latents, 16×16 VFM grid
    out = {"moments": torch.randn(batch, 8, size, size, generator=g).abs(),
           "label": torch.randint(0, 1000, (batch,), generator=g)}
    if setup.online_semantics:
        out["images"] = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8, generator=g)
    else:
        out["semantics"] = torch.randn(batch, PRESET.semantic_channels, 16, 16, generator=g).half()
        out["cls"] = torch.randn(batch, vfm_dim(args), generator=g).half()
        out["repa"] = torch.randn(batch, tokens, vfm_dim(args), generator=g).half()
    return {k: v.pin_memory() for k, v in out.items()} if setup.pin_memory else out


def training_flops_per_image(name: str, args, encoder: SemanticEncoder | None, device: torch.device) -> float:
    """FLOPs of one training image: SiT forward + backward (counted on the meta device), plus the
    frozen VFM + compressor forward when ``encoder`` is given (counted on one real image)."""
    with torch.device("meta"):
        model = build_sit(name, **PRESET.model_kwargs(vfm_dim=vfm_dim(args)), **args.sit_overrides)
    return sit_training_flops(model, encoder, device)


def flops_of(run: Callable[[], object]) -> float:
    """FLOPs ``run()`` executes, counted by ``FlopCounterMode`` (meta tensors count without computing)."""
    with FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())


def sit_training_flops(model: SiT, encoder: SemanticEncoder | None = None,
                       device: torch.device | None = None) -> float:
    """FLOPs of one training image through ``model`` (a SiT on the meta device): forward + backward,
    plus ``encoder``'s forward of one 256² image on ``device`` when given."""
    model.check_inputs = False
    c = model.config
    x = torch.zeros(1, c.in_channels, c.input_size, c.input_size, device="meta")
    with FlopCounterMode(display=False) as counter:
        velocity, repa, cls = model(x, torch.zeros(1, device="meta"), torch.zeros(1, dtype=torch.long, device="meta"),
                                    torch.zeros(1, c.z_dim, device="meta"))
        (velocity.sum() + repa.sum() + cls.sum()).backward()
        if encoder is not None:
            encoder(torch.zeros(1, 3, 256, 256, dtype=torch.uint8, device=device))
    return float(counter.get_total_flops())


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


class TrainingRun:
    """One setup's model, EMA, optimiser, grad scaler, (online) semantic encoder and host batch."""

    def __init__(self, name: str, batch: int, setup: Setup, args, device: torch.device):
        self.name, self.batch, self.setup, self.args, self.device = name, batch, setup, args, device
        self.model = build_model(name, args, setup, device).train()
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.ema_update = EMAUpdate(self.ema, self.model, setup.ema)  # built once, as the trainer does
        if setup.compile:
            compile_blocks(self.model, args.compile_backend)
        self.optimizer = build_adamw([p for p in self.model.parameters() if p.requires_grad], OptimConfig(),
                                     setup.fused_optimizer, device)
        self.amp = AUTOCAST[setup.autocast]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16)
        self.encoder = build_semantic_encoder(args, setup, device) if setup.online_semantics else None
        self.inputs = InputBuilder(PRESET, SimpleNamespace(num_classes=1000), 32, 1000, False, self.encoder)
        self.loss_fn = JointLoss(**PRESET.loss_kwargs())
        self.host = host_batch(batch, self.model.config.num_patches + 1, args, setup)
        self.times: list[float] = []
        self.memory_mib = 0.0
        self.other_load = float("nan")  # cores used by other processes while timed

    def step(self) -> float:
        """One optimisation step from host memory: inputs, loss, backward, clip, AdamW, EMA; seconds."""
        start = time.perf_counter()
        x = self.inputs(self.host, self.device)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            terms = self.loss_fn(self.model, x.x0, x.y, x.cls_target, x.repa_target)
        self.scaler.scale(terms.total).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), OptimConfig.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema_update(TrainConfig.ema_decay)
        synchronize(self.device)
        return time.perf_counter() - start

    def result(self) -> dict:
        flops = training_flops_per_image(self.name, self.args, self.encoder, self.device)
        median = statistics.median(self.times)
        result = {"model": self.name, "batch": self.batch, **describe(self.setup), "step_s": round(median, 4),
                  "images_per_s": round(self.batch / median, 3), "peak_mem_mib": round(self.memory_mib),
                  "gflop_per_image": round(flops / 1e9, 1), "other_load_cores": round(self.other_load, 2)}
        peak_flops = peak_tflops(self.device, self.args.peak_tflops)
        if peak_flops:
            result["mfu"] = round(flops * self.batch / median / (peak_flops * 1e12), 4)
        return result


def memory_in_use_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    statm = Path("/proc/self/statm")
    return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20 if statm.exists() else 0.0


def measure_training(name: str, batch: int, args, device: torch.device) -> list[dict]:
    """Both setups at one (model, batch): median of ``args.steps`` timed steps after ``args.warmup``.

    Memory: a setup's peak over its warm-up steps above the memory in use before it was built.
    ``--interleave`` keeps both setups built and alternates their timed steps, so that load from
    other processes on a shared machine hits both alike; otherwise each is timed, then freed.
    """
    results, runs = [], []
    for setup in setups(device, args.compile):
        before = memory_in_use_mib(device)
        try:
            with peak_memory(device) as peak:
                run = TrainingRun(name, batch, setup, args, device)
                for _ in range(args.warmup):
                    run.step()
        except torch.OutOfMemoryError:
            results.append({"model": name, "batch": batch, **describe(setup), "error": "out of memory"})
            free_memory(device)
            continue
        run.memory_mib = peak[0] - before
        if args.interleave:
            runs.append(run)
            continue
        with other_load() as load:
            run.times = [run.step() for _ in range(args.steps)]
        run.other_load = load[0]
        results.append(run.result())
        del run
        free_memory(device)
    with other_load() as load:
        for _ in range(args.steps):
            for run in runs:
                run.times.append(run.step())
    for run in runs:
        run.other_load = load[0]
    return results + [run.result() for run in runs]


def run_training(args, device: torch.device, results: dict, out: Path) -> None:
    for name in args.models:
        for batch in args.batches:
            results["train"] += measure_training(name, batch, args, device)
            write_results(results, out)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------


def measure_sampling(args, device: torch.device, results: dict, out: Path) -> None:
    """SDE and ODE from the same noise: authors (fp32, math) then fast (bf16, SDPA, compiled if asked)."""
    authors, fast = setups(device, args.compile)
    precision = {authors: "fp32", fast: fast.autocast}  # the authors sample in fp32
    model = build_model(args.sample_model, args, authors, device).eval()
    with torch.no_grad():  # random heads are zero-initialised: perturb so every output matters
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    models = {authors: model, fast: copy.deepcopy(model).set_attention(fast.attention)}
    if fast.compile:
        compile_blocks(models[fast], args.compile_backend)
    c = model.config
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(args.sample_batch, c.in_channels, c.input_size, c.input_size, generator=g).to(device)
    cls = torch.randn(args.sample_batch, c.z_dim, generator=g).to(device)
    y = torch.arange(args.sample_batch, device=device) % c.num_classes
    low, high = args.guidance_interval
    guidance = Guidance(scale=args.cfg_scale, low=low, high=high)

    def draw(setup: Setup, sampler, steps: int) -> tuple[torch.Tensor, float]:
        torch.manual_seed(2)
        start = time.perf_counter()
        amp = AUTOCAST[precision[setup]]
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            x = sampler(models[setup], latents, y, cls, num_steps=steps, guidance=guidance)
        synchronize(device)
        return x, time.perf_counter() - start

    for mode, sampler, steps in (("sde", sample_sde, args.sde_steps), ("ode", sample_ode, args.ode_steps)):
        samples = {}
        for setup in (authors, fast):
            draw(setup, sampler, 2)  # warm-up: kernels, compilation (guided and unguided batch shapes)
            before = memory_in_use_mib(device)
            with peak_memory(device) as peak, other_load() as load:
                samples[setup], seconds = draw(setup, sampler, steps)
            results["sample"].append({
                "model": args.sample_model, "mode": mode, "steps": steps, "batch": args.sample_batch,
                "cfg_scale": guidance.scale, "guidance_low": guidance.low, "guidance_high": guidance.high,
                "setup": setup.name, "precision": precision[setup],
                "attention": setup.attention, "compile": setup.compile, "seconds": round(seconds, 3),
                "images_per_s": round(args.sample_batch / seconds, 4), "peak_mem_mib": round(peak[0] - before),
                "other_load_cores": round(load[0], 2),
            })
        difference = (samples[fast] - samples[authors]).abs()
        results["sample"][-1] |= {"max_abs_vs_fp32": round(float(difference.max()), 5),
                                  "mean_abs_vs_fp32": round(float(difference.mean()), 6)}
        write_results(results, out)


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def speedups(rows: list[dict], key: tuple[str, ...], rate: str) -> list[dict]:
    """fast ÷ authors throughput for every ``key`` group measured by both setups."""
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        if rate in row:
            groups.setdefault(tuple(row[k] for k in key), {})[row["setup"]] = row
    return [dict(zip(key, k)) | {"speedup": round(g["fast"][rate] / g["authors"][rate], 2)}
            for k, g in groups.items() if {"authors", "fast"} <= g.keys()]


TRAIN_HEADER = ("| model | batch | setup | attention | autocast | semantics | AdamW | EMA | compile | step (s) | "
                "images/s | peak mem (MiB) | GFLOP/image | MFU | other load (cores) |")
SAMPLE_HEADER = ("| model | sampler | steps | batch | CFG | interval | setup | precision | attention | compile | "
                 "seconds | images/s | max-abs vs fp32 | mean-abs vs fp32 | other load (cores) |")


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"Device: {m['device']} ({m['threads']} threads), PyTorch {m['torch']}, TF32 {m['tf32']}.", ""]
    if results["train"]:
        lines += [TRAIN_HEADER, "|" + "---|" * TRAIN_HEADER.count(" | ") + "---|"]
        for r in results["train"]:
            adamw = "fused" if r["fused_optimizer"] else "loop"
            sem = "online" if r["online_semantics"] else "cached"
            cells = [r["model"], r["batch"], r["setup"], r["attention"], r["autocast"], sem, adamw, r["ema"],
                     r["compile"], r.get("step_s", r.get("error")), r.get("images_per_s", "–"),
                     r.get("peak_mem_mib", "–"), r.get("gflop_per_image", "–"), r.get("mfu", "–"),
                     r.get("other_load_cores", "–")]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        lines += ["", "Training speed-up (fast ÷ authors images/s): " + ", ".join(
            f"{s['model']} batch {s['batch']}: **{s['speedup']}×**"
            for s in speedups(results["train"], ("model", "batch"), "images_per_s")), ""]
    if results["sample"]:
        lines += [SAMPLE_HEADER, "|" + "---|" * SAMPLE_HEADER.count(" | ") + "---|"]
        for r in results["sample"]:
            cells = [r["model"], r["mode"].upper(), r["steps"], r["batch"], r["cfg_scale"],
                     f"[{r['guidance_low']}, {r['guidance_high']}]", r["setup"], r["precision"], r["attention"],
                     r["compile"], r["seconds"], r["images_per_s"], r.get("max_abs_vs_fp32", "–"),
                     r.get("mean_abs_vs_fp32", "–"), r["other_load_cores"]]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        lines += ["", "Sampling speed-up (fast ÷ authors images/s): " + ", ".join(
            f"{s['mode'].upper()}-{s['steps']}: **{s['speedup']}×**"
            for s in speedups(results["sample"], ("mode", "steps"), "images_per_s")), ""]
    return "\n".join(lines)


def write_results(results: dict, out: Path) -> None:
    results["train_speedup"] = speedups(results["train"], ("model", "batch"), "images_per_s")
    results["sample_speedup"] = speedups(results["sample"], ("mode", "steps"), "images_per_s")
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "compare.md").write_text(markdown(results))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("--warmup and --steps must be at least 1 (memory is measured over the warm-up).")
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch._dynamo.config.cache_size_limit = 64  # one compiled block per model size × batch shape
    out = Path(args.out)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    results = {"machine": {"device": device_name(device), "threads": torch.get_num_threads(),
                           "torch": torch.__version__, "tf32": args.tf32 and device.type == "cuda"},
               "settings": settings, "train": [], "sample": []}
    if "train" in args.parts:
        run_training(args, device, results, out)
    if "sample" in args.parts:
        measure_sampling(args, device, results, out)
    write_results(results, out)
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
