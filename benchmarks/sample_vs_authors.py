"""Our SDE sampler against the authors' released sampler and SiT: same weights, noise, steps, guidance.

    python benchmarks/sample_vs_authors.py --authors-code ../authors-code --batch 2 --steps 8
    python benchmarks/sample_vs_authors.py --authors-code ../authors-code --batch 32 --steps 4 --repeats 2

``--authors-code DIR`` holds the authors' code as released, which never enters this repository:
``DIR/samplers.py`` with their ``euler_maruyama_sampler`` (giorgospets/reglue) and ``DIR/models/sit.py``
with the SiT their ``generate.py`` imports (``SiT_models``; REG's, with ``cls_projectors2`` and
``wg_norm``). docs/benchmarks.md says where the files come from and how they were checked against
SPEC's compatibility vectors.

Both sides run the same REGLUE model (``--model``, 20 input channels, z_dim 768, random weights
moved off their zero initialisation): theirs built as their ``generate.py`` builds it (their timm
attention with ``fused_attn`` off, fp32 as they ship it), ours an :class:`~reglue.models.sit.SiT`
loading their state dict strictly (the configuration read off their weights, as for their
checkpoints). Both start from the same latents, labels and ``torch.manual_seed``: ours takes its step
noise from the global generator (``noise_generators=None``, the path that reproduces their seeds), so
the samples are comparable and the largest difference is reported. Ours otherwise runs as
:class:`~reglue.generate.ImageSampler` runs it: its precision (``--precision``; by default
:func:`~reglue.generate.fast_precision`: bf16 on GPUs and on CPUs with fast bf16 matrix
multiplies, fp32 on others), no padding, at most
:data:`~reglue.generate.MAX_CALL_ROWS` rows per model call.

Timing: one 2-step warm-up draw each, then ``--repeats`` timed draws alternating which side goes
first, so load from other work hits both alike; the median of each side, the speed-up (theirs /
ours) and the CPU time other processes used meanwhile ("other load", in cores) are printed as one
Markdown row (``--json PATH`` writes everything).

``--check-vectors PATH`` (SPEC's ``compat/official_vectors.pt``) first shows that ``DIR`` holds the
authors' model and sampler: their SiT, built with the vectors' configuration, must load the vectors'
state dict strictly and reproduce its forward outputs, and their sampler its SDE samples, seed for
seed (largest differences printed; above 1e-5 is an error).

``--profile``: where the time of one guided model call (2·``--batch`` rows, as each side calls its
SiT) goes on each side — ``torch.profiler``'s self time of the costliest ops and the share of the
matrix multiplies, with the FLOPs each side computes (``FlopCounterMode``). A sampler step is one
such call plus a few element-wise float64 updates, so this bounds what any sampler-side change can
gain.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # a sibling benchmark's load meter:
from compare import other_load, synchronize
from reglue.generate import MAX_CALL_ROWS, fast_precision
from reglue.models.loading import config_from_weights
from reglue.models.sit import SiT, sit_config
from reglue.sampling import Guidance, sample_sde
from reglue.state_dict import load_state_dict_strict


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--authors-code", type=Path, required=True,
                        help="folder with the authors' samplers.py and models/sit.py")
    parser.add_argument("--model", default="SiT-B/2")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cfg-scale", type=float, default=2.3)
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=(0.0, 0.9), metavar=("LOW", "HIGH"))
    parser.add_argument("--precision", choices=("fp32", "bf16"),
                        help="ours (theirs: fp32); default: ImageSampler's, fast_precision of the device")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--input-size", type=int, default=32, help="latent side (32 for 256² images)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--check-vectors", type=Path, help="official_vectors.pt: check the authors' code first")
    parser.add_argument("--profile", action="store_true", help="profile one guided model call per side (see above)")
    parser.add_argument("--json", type=Path, help="also write the result as JSON to this path")
    return parser.parse_args(argv)


def authors_code(folder: Path) -> tuple[object, object]:
    """Their ``models.sit`` module and ``euler_maruyama_sampler``, imported from ``folder``."""
    if not (folder / "samplers.py").is_file() or not (folder / "models" / "sit.py").is_file():
        raise FileNotFoundError(f"{folder} must hold the authors' samplers.py and models/sit.py "
                                "(see this script's docstring).")
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module("models.sit"), importlib.import_module("samplers").euler_maruyama_sampler
    finally:
        sys.path.remove(str(folder))


def check_vectors(path: Path, sit_module, authors_sampler) -> dict:
    """Largest differences of the authors' SiT and sampler from SPEC's compatibility vectors."""
    vectors = torch.load(path, weights_only=True)
    c = vectors["config"]
    model = sit_module.SiT(input_size=c["input_size"], patch_size=c["patch"], in_channels=c["in_ch"],
                           hidden_size=c["hidden"], decoder_hidden_size=c["hidden"], depth=c["depth"],
                           num_heads=c["heads"], encoder_depth=c["enc_depth"], num_classes=c["num_classes"],
                           z_dims=[c["z_dim"]], projector_dim=c["proj_dim"], fused_attn=False, qk_norm=False)
    model.load_state_dict(vectors["state_dict"], strict=True)
    model.eval()
    f = vectors["forward"]
    with torch.no_grad():
        out, zs, cls_out = model(f["x"], f["t"], y=f["y"], cls_token=f["cls_token"])
    differences = {"forward": max(float((a - b).abs().max()) for a, b in
                                  ((out, f["out"]), (zs[0], f["zs"]), (cls_out, f["cls_out"])))}
    for i, case in enumerate(vectors["sde_samples"]):
        p = case["params"]
        torch.manual_seed(case["torch_manual_seed"])
        with torch.no_grad():
            sample = authors_sampler(model, case["latents"], case["y"], num_steps=p["num_steps"],
                                     cfg_scale=p["cfg_scale"], guidance_low=p["guidance_low"],
                                     guidance_high=p["guidance_high"], cls_latents=case["cls_latents"],
                                     args=SimpleNamespace(vae_cfg=p["vae_cfg"], cls_cfg_scale=p["cls_cfg_scale"]))
        differences[f"sde_{i}"] = float((sample - case["out"]).abs().max())
    if max(differences.values()) > 1e-5:
        raise ValueError(f"the code in --authors-code does not reproduce {path}: largest differences {differences}.")
    return differences


def build_models(args, sit_models, device: torch.device) -> tuple[torch.nn.Module, SiT]:
    """(theirs, ours) with the same random weights, both in eval mode on ``device``."""
    torch.manual_seed(0)
    encoder_depth = sit_config(args.model).encoder_depth
    theirs = sit_models[args.model](input_size=args.input_size, num_classes=1000, in_channels=20, use_cfg=True,
                                    z_dims=[768], encoder_depth=encoder_depth, fused_attn=False, qk_norm=False)
    with torch.no_grad():  # zero-initialised heads would make every output trivial
        for name, p in theirs.named_parameters():
            if name != "pos_embed":
                p.add_(0.02 * torch.randn_like(p))
    state = theirs.state_dict()
    ours = SiT(config_from_weights(state, {"model": args.model, "encoder_depth": theirs.encoder_depth}))
    load_state_dict_strict(ours, state, "the authors' SiT")
    ours.check_inputs = device.type == "cpu"  # as ImageSampler sets it
    return theirs.to(device).eval(), ours.to(device).eval()


MATMULS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution")


def profile_call(call, top: int = 8) -> dict:
    """Self time (ms) of ``call``'s costliest ops, the matrix multiplies' share, and its GFLOP."""
    call()  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_ms = sum(e.self_cpu_time_total for e in events) / 1e3
    matmul_ms = sum(e.self_cpu_time_total for e in events if e.key in MATMULS) / 1e3
    with FlopCounterMode(display=False) as flops:
        call()
    return {"total_ms": round(total_ms), "matmul_ms": round(matmul_ms), "matmul_share": round(matmul_ms / total_ms, 3),
            "gflop": round(flops.get_total_flops() / 1e9, 3),
            "top_ops_ms": {e.key: round(e.self_cpu_time_total / 1e3) for e in events[:top]}}


def profiles(args, theirs, ours: SiT, device: torch.device, max_rows: int) -> dict:
    """:func:`profile_call` of one guided model call of 2·batch rows, as each sampler makes it."""
    rows = 2 * args.batch
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, 20, args.input_size, args.input_size, generator=g).to(device)
    cls = torch.randn(rows, 768, generator=g).to(device)
    y, t = torch.arange(rows, device=device) % 1000, torch.full((rows,), 0.5, device=device)

    def authors():
        theirs(x, t, y=y, cls_token=cls)

    def reglue():  # the unpadded near-equal chunks of at most max_rows, without the REPA projector
        calls = -(-rows // max_rows)
        sizes = [rows // calls + (i < rows % calls) for i in range(calls)]
        for part in zip(x.split(sizes), t.split(sizes), y.split(sizes), cls.split(sizes)):
            ours(*part[:3], cls_token=part[3], repa=False)

    # One autocast context around ours' warm-up and profiled call: its weights are cast once, as in a sampling
    # run (autocast caches the casts of weights that require grad while its context is open).
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()
    with torch.no_grad():
        profiled = {"authors": profile_call(authors)}
        with amp:
            profiled["reglue"] = profile_call(reglue)
    return profiled


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    args.precision = args.precision or fast_precision(device)
    sit_module, authors_sampler = authors_code(args.authors_code)
    checked = check_vectors(args.check_vectors, sit_module, authors_sampler) if args.check_vectors else None
    theirs, ours = build_models(args, sit_module.SiT_models, device)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(args.batch, 20, args.input_size, args.input_size, generator=g).to(device)
    cls = torch.randn(args.batch, 768, generator=g).to(device)
    y = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    low, high = args.guidance_interval
    guidance = Guidance(scale=args.cfg_scale, low=low, high=high)
    max_rows = MAX_CALL_ROWS

    def authors(steps: int) -> torch.Tensor:
        options = SimpleNamespace(vae_cfg="false", cls_cfg_scale=args.cfg_scale)  # their argparse fields
        return authors_sampler(theirs, latents, y, num_steps=steps, cfg_scale=args.cfg_scale, guidance_low=low,
                               guidance_high=high, cls_latents=cls, args=options)

    def reglue(steps: int) -> torch.Tensor:
        amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()
        with amp:
            return sample_sde(ours, latents, y, cls, num_steps=steps, guidance=guidance, max_call_rows=max_rows)

    def draw(sampler, steps: int) -> tuple[torch.Tensor, float]:
        torch.manual_seed(2)
        start = time.perf_counter()
        with torch.no_grad():
            x = sampler(steps)
        synchronize(device)
        return x, time.perf_counter() - start

    samplers = {"authors": authors, "reglue": reglue}
    for sampler in samplers.values():
        draw(sampler, 2)  # warm-up: kernels, the allocator's free lists
    seconds: dict[str, list[float]] = {name: [] for name in samplers}
    samples = {}
    with other_load() as load:
        for repeat in range(args.repeats):
            for name in (list(samplers) if repeat % 2 == 0 else list(samplers)[::-1]):
                samples[name], elapsed = draw(samplers[name], args.steps)
                seconds[name].append(elapsed)
    median = {name: statistics.median(times) for name, times in seconds.items()}
    profiled = profiles(args, theirs, ours, device, max_rows) if args.profile else None
    return {"vectors": checked, "profile": profiled, "model": args.model, "batch": args.batch, "steps": args.steps, "cfg_scale": args.cfg_scale,
            "guidance_interval": [low, high], "precision": args.precision, "max_call_rows": max_rows,
            "device": device.type, "threads": torch.get_num_threads(), "authors_s": round(median["authors"], 2),
            "reglue_s": round(median["reglue"], 2), "speedup": round(median["authors"] / median["reglue"], 2),
            "seconds": seconds, "max_abs_diff": float((samples["reglue"] - samples["authors"]).abs().max()),
            "other_load_cores": round(load[0], 2)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(f"| {result['model']} | {result['batch']} | {result['steps']} | {result['cfg_scale']} | "
          f"{result['precision']} | {result['authors_s']:.2f} | {result['reglue_s']:.2f} | "
          f"**{result['speedup']:.2f}×** | {result['max_abs_diff']:.2g} | {result['other_load_cores']} |")
    if result["vectors"]:
        print("the authors' code reproduces the compatibility vectors; largest differences: "
              + ", ".join(f"{name} {value:.1e}" for name, value in result["vectors"].items()))
    for side, report in (result["profile"] or {}).items():
        print(f"{side}: one call of {2 * args.batch} rows {report['total_ms']} ms, {report['gflop']} GFLOP, matrix "
              f"multiplies {report['matmul_ms']} ms ({100 * report['matmul_share']:.0f} %); "
              + ", ".join(f"{op} {ms}" for op, ms in report["top_ops_ms"].items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
