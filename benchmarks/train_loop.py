"""The real training loop (``reglue train``) on an ImageNet-shaped dataset: images/s, step time,
peak memory and MFU from the run's own metrics.

    python benchmarks/train_loop.py --models SiT-B/2 SiT-XL/2 --batches 32 128 --compile --out results/loop
    torchrun --nproc-per-node 8 benchmarks/train_loop.py --batches 32 --compile --out results/loop_8gpu

1. Data: :func:`data_loading.write_dataset` writes a prepared dataset with cached semantics in
   ImageNet's 1,282 shards of ``--rows-per-shard`` rows (default 4: 5,128 rows, ≈ 3.1 GB at 256²),
   every array at the real size of ``--resolution`` (moments, semantics, CLS, REPA targets and the
   images, random values; 1,000 classes).
2. Runs: for each (model, per-GPU batch), :func:`reglue.training.trainer.train` — what ``reglue
   train`` calls — with the model's shipped config (``configs/reglue_sit_b2.yaml``,
   ``configs/reglue_sit_xl2.yaml``: bf16, fused AdamW, foreach EMA, cached semantics, the config's
   loader workers) and these overrides: ``data.dir``, ``run_dir``, ``train.global_batch`` (per-GPU
   batch × processes), ``train.max_steps`` (``--warmup`` + ``--steps``), ``log.every``,
   ``train.compile`` (``--compile``), no previews, evaluation, TensorBoard or intermediate checkpoint
   (the trainer still saves one at the last step), then ``--set KEY=VALUE`` (tests: a tiny model).
3. Figures, from ``RUN_DIR/metrics.jsonl``: the trainer logs ``images_per_s`` and ``step_time_s``
   averaged over each ``log.every`` steps and, on CUDA, ``memory_gib`` (peak allocated since the
   run started). The intervals ending within the first ``--warmup`` steps (compilation, first
   kernels, the loader's start) are dropped; the report gives the median of the others, the peak
   memory, and MFU = images/s × FLOPs per training image ÷ (GPUs × peak FLOP/s), the FLOPs counted
   by ``compare.sit_training_flops`` on the run's own model (rebuilt on the meta device from its
   EMA export's ``config.json``), the peak from ``compare.PEAK_TFLOPS`` (or ``--peak-tflops``).
   Also: ``warmup_s`` (seconds from the start of the loop to the end of the warm-up, compilation
   included), ``final_checkpoint_s`` (from the last metrics line to the end of ``train``: the last
   checkpoint and the EMA export), ``run_s`` (the whole ``train`` call) and the load average.
   With ``--isolated compare.json`` (benchmarks/compare.py's result on the same machine), each row
   also gives compare.py's isolated ``fast`` step at the same model and batch: the loop's step time
   over it is what the loop adds around the step (loader, random draws, host syncs, logging, and
   DDP's all-reduce on several GPUs).

Every run starts from fresh compiled graphs (``torch._dynamo.reset``: a second batch shape in one
process would otherwise be recompiled with a dynamic batch dimension) and a fresh memory peak. A run
directory is deleted once read, the dataset at the end. Under ``torchrun`` every process trains; the
main process writes the dataset and the report. Writes ``train_loop.json`` and ``train_loop.md``
into ``--out``, rewritten after every run (a cut-short run keeps what it measured).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from compare import device_name, peak_tflops, sit_training_flops
from data_loading import IMAGENET_SHARDS, bytes_read_per_row, write_dataset
from reglue.config import load_config
from reglue.distributed import on_main, process_state
from reglue.models import SiT, SiTConfig
from reglue.training.metrics import METRICS_FILE, read_metrics
from reglue.training.trainer import train

CONFIGS = {"SiT-B/2": "reglue_sit_b2.yaml", "SiT-XL/2": "reglue_sit_xl2.yaml"}
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=tuple(CONFIGS), default=list(CONFIGS),
                        help="models, each trained from its shipped config")
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 128], help="per-GPU (per-process) batches")
    parser.add_argument("--warmup", type=int, default=10, help="first steps, not measured (compilation)")
    parser.add_argument("--steps", type=int, default=60, help="measured steps after the warm-up")
    parser.add_argument("--log-every", type=int, default=10, help="log.every: steps per measured interval")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="train.compile")
    parser.add_argument("--workers", type=int, help="data.num_workers (default: the config's)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="more config overrides for every run (tests: a tiny model)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--shards", type=int, default=IMAGENET_SHARDS, help="shards (ImageNet: 1,282)")
    parser.add_argument("--rows-per-shard", type=int, default=4)
    parser.add_argument("--isolated", help="compare.json of benchmarks/compare.py, for its isolated steps")
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: looked up by name)")
    parser.add_argument("--dir", help="where the dataset and the runs go (default: the system's temporary folder)")
    parser.add_argument("--out", default="benchmarks/results/train_loop")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace, processes: int) -> None:
    if args.warmup % args.log_every or args.steps % args.log_every or args.steps < args.log_every:
        raise SystemExit(f"--warmup ({args.warmup}) and --steps ({args.steps}) must be multiples of --log-every "
                         f"({args.log_every}), --steps at least one of them: the metrics come per interval.")
    rows, largest = args.shards * args.rows_per_shard, max(args.batches) * processes
    if rows < largest:
        raise SystemExit(f"{rows} rows hold no global batch of {largest}; raise --shards or --rows-per-shard.")


def overrides(args: argparse.Namespace, data: Path, run_dir: Path, global_batch: int) -> list[str]:
    """The config overrides of one run (see the module's docstring)."""
    workers = [] if args.workers is None else [f"data.num_workers={args.workers}"]
    return [f"data.dir={data}", f"run_dir={run_dir}", f"train.global_batch={global_batch}",
            f"train.max_steps={args.warmup + args.steps}", f"log.every={args.log_every}",
            f"train.compile={str(args.compile).lower()}", "checkpoint.every=1000000000", "log.sample_every=0",
            "log.tensorboard=false", "eval.every=0", *workers, *args.set]


def fresh_device() -> None:
    """Forget the previous run: its compiled graphs, the memory it left to the caching allocator, its peak."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def summarise(records: list[dict], *, warmup: int, processes: int, gflop_per_image: float,
              peak: float | None) -> dict:
    """Median images/s and step time over the logged intervals after ``warmup`` steps, the peak memory
    and MFU (``peak``: one GPU's TFLOP/s, None: no MFU) from a run's metrics records."""
    logged = [r for r in records if "images_per_s" in r]
    measured = [r for r in logged if r["step"] > warmup]
    if not measured:
        raise ValueError(f"the run logged no interval after step {warmup}; raise --steps.")
    images_per_s = statistics.median(r["images_per_s"] for r in measured)
    memory = [r["memory_gib"] for r in measured if "memory_gib" in r]
    warmed = [r["wall_time_s"] for r in logged if r["step"] <= warmup]
    summary = {"images_per_s": round(images_per_s, 2),
               "step_s": round(statistics.median(r["step_time_s"] for r in measured), 5),
               "interval_images_per_s": [round(r["images_per_s"], 2) for r in measured],
               "peak_memory_gib": round(max(memory), 2) if memory else None,
               "gflop_per_image": round(gflop_per_image, 3),
               "warmup_s": round(warmed[-1], 1) if warmed else 0.0}
    if peak:
        summary["mfu"] = round(images_per_s * gflop_per_image * 1e9 / (processes * peak * 1e12), 4)
    return summary


def run_model(run_dir: Path) -> SiT:
    """The run's SiT on the meta device, rebuilt from its EMA export's config.json."""
    with torch.device("meta"):
        return SiT(SiTConfig(**json.loads((run_dir / "ema" / "config.json").read_text())))


def isolated_steps(path: str | None) -> dict[tuple[str, int], float]:
    """compare.py's isolated ``fast`` step (s) by (model, batch); {} without a file."""
    if path is None or not Path(path).is_file():
        return {}
    rows = json.loads(Path(path).read_text())["train"]
    return {(r["model"], r["batch"]): r["step_s"] for r in rows if r["setup"] == "fast" and "step_s" in r}


def measure(name: str, batch: int, args: argparse.Namespace, work: Path, *, processes: int,
            peak: float | None) -> dict | None:
    """One run of the trainer (``peak``: one GPU's TFLOP/s for MFU); its row on the main process (None on
    the others)."""
    run_dir = work / f"run-{name.replace('/', '_')}-{batch}"
    config = load_config(CONFIG_DIR / CONFIGS[name], overrides(args, work / "data", run_dir, batch * processes))
    row = {"config": CONFIGS[name], "model": config.model.name, "batch_per_gpu": batch, "processes": processes,
           "global_batch": config.train.global_batch, "compile": config.train.compile,
           "steps": config.train.max_steps}
    fresh_device()
    start = time.perf_counter()
    try:
        train(config)
    except torch.OutOfMemoryError:  # this batch does not fit: say so, go on with the next run
        fresh_device()

        def record() -> dict:
            shutil.rmtree(run_dir, ignore_errors=True)
            return row | {"error": "out of memory"}

        return on_main("removing a run directory", record)
    ended = time.time()
    run_s = time.perf_counter() - start

    def read() -> dict:
        model = run_model(run_dir)
        figures = summarise(read_metrics(run_dir), warmup=args.warmup, processes=processes,
                            gflop_per_image=sit_training_flops(model) / 1e9, peak=peak)
        isolated = isolated_steps(args.isolated).get((row["model"], batch))
        if isolated:
            figures |= {"isolated_step_s": isolated, "loop_over_isolated": round(figures["step_s"] / isolated, 3)}
        final_s = ended - (run_dir / METRICS_FILE).stat().st_mtime
        shutil.rmtree(run_dir)
        return row | figures | {"params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                                "final_checkpoint_s": round(final_s, 1), "run_s": round(run_s, 1),
                                "load_average": round(os.getloadavg()[0], 2)}

    result = on_main(f"reading the metrics of {name} at batch {batch}", read)
    fresh_device()
    return result


def shared_folder(parent: str | None) -> Path:
    """A new temporary folder, made by the main process; every process gets its path."""
    from accelerate.utils import broadcast_object_list

    def make() -> str:
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        return tempfile.mkdtemp(prefix="reglue-train-loop-", dir=parent)

    return Path(broadcast_object_list([on_main("making the work folder", make)])[0])


HEADER = ("| config | model | batch per GPU | processes | compile | images/s | step (s) | MFU | peak memory (GiB) | "
          "GFLOP/image | isolated step (s) | loop ÷ isolated | warm-up (s) | final checkpoint (s) | load average |")
COLUMNS = ("step_s", "mfu", "peak_memory_gib", "gflop_per_image", "isolated_step_s", "loop_over_isolated", "warmup_s",
           "final_checkpoint_s", "load_average")  # after images/s


def markdown(results: dict) -> str:
    m, d = results["machine"], results["dataset"]
    summary = (f"Device: {m['device']}, {m['processes']} process(es), PyTorch {m['torch']}. Data: {d['shards']:,} "
               f"shards × {d['rows_per_shard']} rows at {d['resolution']}² ({d['row_kib']} KiB read per row), "
               f"written in {d['write_s']} s. Medians over the intervals of {results['settings']['log_every']} "
               f"steps after {results['settings']['warmup']} warm-up steps.")
    lines = [summary, "", HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    for r in results["runs"]:
        cells = [r["config"], r["model"], r["batch_per_gpu"], r["processes"], r["compile"],
                 r.get("images_per_s", r.get("error")), *(r.get(key) for key in COLUMNS)]
        lines.append("| " + " | ".join("–" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_loop.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "train_loop.md").write_text(markdown(results))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    state = process_state()
    check_args(args, state.num_processes)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out, peak = Path(args.out), peak_tflops(device, args.peak_tflops)
    results = {"machine": {"device": device_name(device), "processes": state.num_processes, "torch": torch.__version__,
                           "peak_tflops": peak},
               "settings": {k: v for k, v in vars(args).items() if k != "out"}, "runs": []}
    work = shared_folder(args.dir)
    try:
        write_s = on_main("writing the dataset", lambda: write_dataset(
            work / "data", shards=args.shards, rows_per_shard=args.rows_per_shard, resolution=args.resolution))
        row_kib = round(bytes_read_per_row(args.resolution) / 1024, 1)
        results["dataset"] = {"shards": args.shards, "rows_per_shard": args.rows_per_shard,
                              "resolution": args.resolution, "row_kib": row_kib,
                              "write_s": None if write_s is None else round(write_s, 1)}
        for name in args.models:
            for batch in args.batches:
                row = measure(name, batch, args, work, processes=state.num_processes, peak=peak)
                if row is not None:  # the main process
                    results["runs"].append(row)
                    write_results(results, out)
    finally:
        state.wait_for_everyone()
        on_main("removing the dataset", lambda: shutil.rmtree(work))
    if state.is_main_process:
        print(markdown(results), end="")
    return results


if __name__ == "__main__":
    main()
