"""Host memory of resuming a run (plain vs memory-mapped load) and the time a checkpoint takes to write.

1. Writes: for each of ``--write-models`` (and ``--model``), builds the training state the trainer
   saves — a REGLUE SiT of that size, its EMA, AdamW from the trainer's ``build_adamw`` after one
   update of every parameter (so every moment exists), scaler, the RNG states of ``--ranks``
   processes, counters, the resolved config and ``sit_config``, as ``Trainer.state`` lays them out —
   and times ``save_checkpoint`` (temporary file, fsync, rename; from the second of ``--repeats``
   saves on, pruning the previous file, as ``checkpoint.keep_last`` does) and the EMA export the
   trainer writes after it (``SiT.save_pretrained``) into a temporary folder; the median counts.
   A size whose state does not fit the RAM or disk free right now is skipped, saying so. For
   comparison, the disk's own rate: ``--raw-gb`` GB written with ``os.write`` and fsynced.
2. Resume memory: with ``--model``'s checkpoint, each variant runs in a fresh process that builds
   the model, EMA and optimiser, loads the file — ``eager``: ``torch.load`` as reglue did before
   (every tensor read into private memory), ``mmap``: ``reglue.checkpoint.load_checkpoint``
   (memory-mapped) — and restores them as ``Trainer.restore`` does (``load_state_dict`` of model,
   EMA, optimiser; RNG), then drops the loaded state. A thread samples ``/proc/self/status``
   (RssAnon: private memory; RssFile: pages of mapped files, which the page cache shares between
   processes) every 2 ms; each phase reports its peaks, and ``VmHWM`` the process's peak RSS.
   ``cold`` drops the file's pages from the page cache first (``posix_fadvise(DONTNEED)``: the
   first rank of a node after a restart), ``warm`` leaves them (the node's other ranks).

Everything written is deleted at the end. Linux only (``/proc``). It needs RAM for the largest
state (11 GB for SiT-XL/2; the eager SiT-L/2 resume peaks at 12 GB) and as much free disk.

    OMP_NUM_THREADS=1 python benchmarks/resume_memory.py --model SiT-L/2 --write-models SiT-B/2 SiT-L/2 SiT-XL/2

Writes alone, on the file system checkpoints will go to (e.g. a cluster's shared one):

    python benchmarks/resume_memory.py --model SiT-XL/2 --write-models SiT-XL/2 --variants --dir /shared/scratch
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from reglue.checkpoint import capture_rng_state, load_checkpoint, restore_process_rng_state, save_checkpoint
from reglue.config import OptimConfig, TrainConfig, load_config
from reglue.models import build_sit
from reglue.presets import get_preset
from reglue.training.trainer import build_adamw

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "reglue_sit_xl2.yaml"
LOADERS = {
    "eager": lambda path: torch.load(path, map_location="cpu", weights_only=True),  # reglue before mmap
    "mmap": load_checkpoint,
}
STATUS_KEYS = ("RssAnon", "RssFile", "VmHWM")
Objects = tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]  # model, EMA, AdamW
GB = 1e9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="SiT-L/2", help="the size whose resume memory is measured")
    parser.add_argument("--write-models", nargs="*", default=["SiT-B/2", "SiT-L/2", "SiT-XL/2"],
                        help="sizes whose checkpoint write is timed")
    parser.add_argument("--overrides", type=json.loads, default={}, help="JSON SiTConfig overrides (tiny runs)")
    parser.add_argument("--ranks", type=int, default=8, help="processes per node, for the node totals")
    parser.add_argument("--repeats", type=int, default=3, help="saves timed per size")
    parser.add_argument("--raw-gb", type=float, default=2.0, help="GB written to time the disk alone")
    parser.add_argument("--variants", nargs="*", choices=sorted(LOADERS), default=sorted(LOADERS),
                        help="loaders to measure; none: time the writes only (e.g. on a cluster's file system)")
    parser.add_argument("--caches", nargs="*", choices=("cold", "warm"), default=["cold", "warm"])
    parser.add_argument("--dir", default=None, help="where the temporary folder goes (default: the system's)")
    parser.add_argument("--json", help="also write the result as JSON to this path")
    parser.add_argument("--child", choices=("write", *LOADERS), help=argparse.SUPPRESS)  # internal, see run_child
    parser.add_argument("--path", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- the training state


def build_model(name: str, overrides: dict) -> torch.nn.Module:
    """REGLUE SiT ``name`` for 256² ImageNet (32² latents, 1,000 classes, DINOv2-B targets) with ``overrides``."""
    settings = {"input_size": 32, "num_classes": 1000, **get_preset("reglue").model_kwargs(), **overrides}
    return build_sit(name, **settings)


def build_training_objects(name: str, overrides: dict) -> Objects:
    """A REGLUE SiT ``name`` for 256² ImageNet, its EMA and the trainer's AdamW (no state yet)."""
    torch.manual_seed(0)
    model = build_model(name, overrides)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = build_adamw([p for p in model.parameters() if p.requires_grad], OptimConfig(),
                            TrainConfig.fused_optimizer, torch.device("cpu"))
    return model, ema, optimizer


def trained_objects(name: str, overrides: dict) -> Objects:
    """:func:`build_training_objects` after one AdamW update of every parameter (every moment exists).

    Parameters are updated one at a time (one gradient alive at once) to keep the peak at the
    state's own size: model + EMA + two moments, 16 bytes per parameter.
    """
    model, ema, optimizer = build_training_objects(name, overrides)
    generator = torch.Generator().manual_seed(1)
    for param in (p for p in model.parameters() if p.requires_grad):
        param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step()
        param.grad = None
    return model, ema, optimizer


def trainer_payload(name: str, model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    ranks: int) -> dict:
    """What ``Trainer.state`` saves for a run of ``name`` with these objects on ``ranks`` processes
    (bf16: no grad-scaler state)."""
    config = load_config(CONFIG, [f"model.name={name}", "data.dir=benchmark"]).to_dict()
    return {
        "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(), "scaler": {},
        "rng": [capture_rng_state() for _ in range(ranks)], "skipped_updates": 0, "nonfinite_in_row": 0,
        "config": config, "sit_config": dataclasses.asdict(model.config),
    }


def state_size(name: str, overrides: dict) -> tuple[int, int]:
    """(parameters, bytes of the tensors :func:`trainer_payload` holds: fp32 model, EMA, two AdamW moments)."""
    with torch.device("meta"):
        model = build_model(name, overrides)
    every = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return every, 4 * (2 * every + 2 * trained)


def _free_bytes(folder: Path) -> tuple[int, int]:
    """(RAM available to a new allocation, disk free under ``folder``) in bytes."""
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(meminfo["MemAvailable"].split()[0]) * 1024, shutil.disk_usage(folder).free


# ----------------------------------------------------------------------------- writes


def write(name: str, overrides: dict, ranks: int, run_dir: Path, repeats: int) -> dict:
    """Build ``name``'s training state; time ``repeats`` saves of it into ``run_dir`` (keep_last=1), each
    followed by the EMA export. The last checkpoint stays."""
    model, ema, optimizer = trained_objects(name, overrides)
    payload = trainer_payload(name, model, ema, optimizer, ranks)
    load = os.getloadavg()[0]
    saves, exports = [], []
    for step in range(1, repeats + 1):
        start = time.perf_counter()
        path = save_checkpoint(run_dir, step, payload, keep_last=1)
        saves.append(time.perf_counter() - start)
        start = time.perf_counter()
        ema.save_pretrained(run_dir / "ema")
        exports.append(time.perf_counter() - start)
    size, ema_size = path.stat().st_size, (run_dir / "ema" / "model.safetensors").stat().st_size
    save_s, export_s = statistics.median(saves), statistics.median(exports)
    return {"model": name, "file_bytes": size, "file_gb": round(size / GB, 3), "write_s": round(save_s, 2),
            "gb_per_s": round(size / GB / save_s, 3), "writes_s": [round(t, 2) for t in saves],
            "ema_bytes": ema_size, "ema_gb": round(ema_size / GB, 3), "ema_export_s": round(export_s, 2),
            "ema_gb_per_s": round(ema_size / GB / export_s, 3), "load_before": load,
            "load_after": os.getloadavg()[0], "path": str(path)}


def raw_write(folder: Path, gb: float) -> dict:
    """The disk alone: ``gb`` GB of random bytes written in 64 MiB blocks, fsynced, timed, deleted."""
    block = os.urandom(64 * 2**20)
    blocks = max(1, round(gb * GB / len(block)))
    path = folder / "raw-write"
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as handle:
        handle.writelines(block for _ in range(blocks))
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return {"gb": round(blocks * len(block) / GB, 3), "seconds": round(seconds, 2),
            "gb_per_s": round(blocks * len(block) / GB / seconds, 3)}


def time_write(name: str, args: argparse.Namespace, folder: Path) -> dict:
    """:func:`write` in a fresh process, or a ``skipped`` row when the state does not fit the RAM or disk free."""
    params, needed = state_size(name, args.overrides)
    ram, disk = _free_bytes(folder)
    if ram < 1.3 * needed or disk < 1.2 * needed:
        return {"model": name, "params": params, "skipped": f"needs {needed / GB:.1f} GB of RAM and disk; "
                f"{ram / GB:.1f} GB RAM available, {disk / GB:.1f} GB disk free"}
    return {"params": params, **run_child("write", name, folder / name.replace("/", "_"), args)}


# ----------------------------------------------------------------------------- one resume, measured


def read_status() -> dict[str, int]:
    """RssAnon, RssFile and VmHWM of this process, in bytes."""
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in STATUS_KEYS:
            found[key] = int(value.split()[0]) * 1024
    return found


class PeakSampler:
    """Peak RssAnon/RssFile since the last :meth:`phase`, sampled every ``interval_s`` in a thread."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.peaks = read_status()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.stopped.wait(self.interval_s):
            self._update()

    def _update(self) -> dict:
        now = read_status()
        with self.lock:
            self.peaks = {k: max(self.peaks[k], now[k]) for k in now}
        return now

    def phase(self, name: str, started: float) -> dict:
        """Peaks since the last phase and values now (GB), ``seconds`` since ``started``; resets the peaks."""
        now = self._update()
        with self.lock:
            peaks, self.peaks = self.peaks, now
        return {"phase": name, "seconds": round(time.perf_counter() - started, 2),
                "peak_anon_gb": round(peaks["RssAnon"] / GB, 3), "peak_file_gb": round(peaks["RssFile"] / GB, 3),
                "anon_gb": round(now["RssAnon"] / GB, 3), "file_gb": round(now["RssFile"] / GB, 3),
                "vm_hwm_gb": round(now["VmHWM"] / GB, 3)}

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


def fingerprint(model, ema, optimizer) -> list[float]:
    """Float64 sums of every restored tensor (model, EMA, optimiser state), to compare variants."""
    sums = [float(t.double().sum()) for t in (*model.state_dict().values(), *ema.state_dict().values())]
    for state in optimizer.state_dict()["state"].values():
        sums.extend(float(state[k].double().sum()) for k in sorted(state))
    return sums


def resume(variant: str, checkpoint: Path, name: str, overrides: dict) -> dict:
    """Build; load ``checkpoint`` with ``variant``; restore as ``Trainer.restore`` does; release. Memory per phase."""
    sampler = PeakSampler()
    phases = [sampler.phase("start", time.perf_counter())]
    started = time.perf_counter()
    model, ema, optimizer = build_training_objects(name, overrides)
    phases.append(sampler.phase("build", started))
    started = time.perf_counter()
    payload = LOADERS[variant](checkpoint)
    phases.append(sampler.phase("load", started))
    started = time.perf_counter()
    model.load_state_dict(payload["model"])
    ema.load_state_dict(payload["ema"])
    optimizer.load_state_dict(payload["optimizer"])
    restore_process_rng_state(payload["rng"], 0, len(payload["rng"]))
    phases.append(sampler.phase("restore", started))
    started = time.perf_counter()
    del payload
    gc.collect()
    phases.append(sampler.phase("release", started))
    sampler.stop()
    return {"variant": variant, "phases": phases, "fingerprint": fingerprint(model, ema, optimizer)}


def drop_page_cache(path: Path) -> None:
    """Ask the kernel to forget ``path``'s cached pages (it is fsynced, so it can)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_child(action: str, name: str, path: Path, args: argparse.Namespace) -> dict:
    """This script's ``action`` (``write`` or a loader's name) for model ``name`` and ``path``, in a fresh
    Python process, so that each measures its own peak and gives all its memory back; its JSON result."""
    command = [sys.executable, __file__, "--child", action, "--path", str(path), "--model", name, "--overrides",
               json.dumps(args.overrides), "--ranks", str(args.ranks), "--repeats", str(args.repeats)]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def run_variant(variant: str, cache: str, checkpoint: Path, args: argparse.Namespace) -> dict:
    """:func:`resume` in a fresh process, after dropping the file's pages for ``cache="cold"``."""
    if cache == "cold":
        drop_page_cache(checkpoint)
    load = os.getloadavg()[0]
    row = run_child(variant, args.model, checkpoint, args)
    return {**row, "cache": cache, "load_before": load, "load_after": os.getloadavg()[0],
            "node": node_private(row, args.ranks)}


def node_private(row: dict, ranks: int) -> dict:
    """Private host memory the loaded checkpoint costs one process, and ``ranks`` processes of a node (GB).

    Counted above the ``build`` phase: in a real run the model, EMA and optimiser live on the GPU.
    Either way the file also passes through the page cache, once per node, clean and reclaimable;
    a mapped load reads it from there instead of copying it.
    """
    phase = {p["phase"]: p for p in row["phases"]}
    private = max(phase["load"]["peak_anon_gb"], phase["restore"]["peak_anon_gb"]) - phase["build"]["anon_gb"]
    return {"private_per_rank_gb": round(private, 3), "private_per_node_gb": round(ranks * private, 3)}


# ----------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="reglue-resume-", dir=args.dir))
    try:
        raw = raw_write(folder, args.raw_gb)
        writes, built = [], None
        for name in dict.fromkeys([*args.write_models, args.model]):
            row = time_write(name, args, folder)
            if name in args.write_models:
                writes.append(row)
            if name == args.model:
                built = row
            elif "path" in row:
                shutil.rmtree(Path(row["path"]).parent.parent)
        if "path" not in built:
            raise RuntimeError(f"{args.model}'s resume is not measured: {built['skipped']}")
        checkpoint = Path(built["path"])
        resumes = [run_variant(variant, cache, checkpoint, args) for cache in args.caches for variant in args.variants]
        prints = {json.dumps(r.pop("fingerprint")) for r in resumes}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for row in writes:
        row.pop("path", None)
    return {"model": args.model, "params": built["params"], "ranks": args.ranks, "checkpoint_gb": built["file_gb"],
            "raw_write": raw, "writes": writes, "resumes": resumes,
            "restored_states_identical": len(prints) == 1 if resumes else None,
            "cpus": os.cpu_count(), "torch": torch.__version__}


def table(result: dict) -> str:
    """The Markdown tables of docs/benchmarks.md."""
    raw = result["raw_write"]
    lines = ["| model | params | checkpoint GB | save_checkpoint s | GB/s | EMA export GB | s | load avg |",
             "|---|---|---|---|---|---|---|---|"]
    for w in result["writes"]:
        if "skipped" in w:
            lines.append(f"| {w['model']} | {w['params'] / 1e6:.1f} M | skipped: {w['skipped']} | | | | | |")
        else:
            lines.append(f"| {w['model']} | {w['params'] / 1e6:.1f} M | {w['file_gb']:.2f} | {w['write_s']:.1f} | "
                         f"{w['gb_per_s']:.2f} | {w['ema_gb']:.2f} | {w['ema_export_s']:.1f} | "
                         f"{w['load_before']:.2f} → {w['load_after']:.2f} |")
    lines.append(f"| disk alone (os.write + fsync) | | {raw['gb']:.2f} | {raw['seconds']:.1f} | {raw['gb_per_s']:.2f} "
                 "| | | |")
    if not result["resumes"]:
        return "\n".join(lines)
    head = f"| {result['model']} ({result['checkpoint_gb']:.2f} GB) | page cache | phase | seconds | peak anon GB"
    lines += ["", head + " | peak file GB | VmHWM GB |", "|---|---|---|---|---|---|---|"]
    for r in result["resumes"]:
        for p in r["phases"][1:]:
            lines.append(f"| {r['variant']} | {r['cache']} | {p['phase']} | {p['seconds']:.1f} | "
                         f"{p['peak_anon_gb']:.2f} | {p['peak_file_gb']:.2f} | {p['vm_hwm_gb']:.2f} |")
    lines += ["", f"| variant | page cache | private GB per rank | private GB per node of {result['ranks']} | load avg |",
              "|---|---|---|---|---|"]
    for r in result["resumes"]:
        n = r["node"]
        lines.append(f"| {r['variant']} | {r['cache']} | {n['private_per_rank_gb']:.2f} | "
                     f"{n['private_per_node_gb']:.2f} | {r['load_before']:.2f} → {r['load_after']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:  # one step of run(), in its own process
        path = Path(args.path)
        row = (write(args.model, args.overrides, args.ranks, path, args.repeats) if args.child == "write"
               else resume(args.child, path, args.model, args.overrides))
        print(json.dumps(row))
        return row
    result = run(args)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
