"""Host work per training step at the real run's shape, beside a modelled H100 step.

    python benchmarks/host_overhead.py --global-batch 256 1024 --processes 1 8

Everything is the real code; four measurements, on this CPU:

1. **draws**: :meth:`StepNoise.draw` for the whole global batch at 256² (a 20×32×32 joint state and
   its ε, a 768-wide CLS noise, times, dropout). The trainer makes these on the training device,
   so on a GPU they are five kernels of device time and the host only launches them (``launch``:
   the same call for one sample, i.e. its Python and dispatch); before that change every process
   drew all of them on the host, every step — the ``draws`` column is that cost.
2. **the loop**: the real trainer (``open_run_inputs``, ``Trainer``, ``Trainer.run``) as process 0
   of W — an Accelerator that reports rank 0 of W processes while running alone, so the trainer
   takes that process's rows and noise and goes through its collectives' code — on a prepared
   dataset of tiny rows (64², an 8-wide VFM, written with the project's shard writer), one row per
   process, with a stub SiT of the same input and output shapes that computes one multiply. Its
   kernels are then nothing and a step's time is its host work: Python, kernel dispatch, the step's
   host reads (counted), the loader hand-off of tiny rows — what the host spends per step whatever
   the batch, while a GPU would run the real shapes' kernels (on a GPU a launch costs about what
   such a tiny CPU kernel does). The SiT's own launches are not counted: they are the model's,
   whatever the loop (and ``train.compile`` cuts them). Between steps the loop sleeps 10 ms, the
   GPU's time, so the loader's workers run ahead as they would. Reported: the step's host time
   besides the hand-off (wall and the main thread's CPU time), the hand-off, host reads (counted
   in a few more steps, untimed: counting dispatched ops costs host time itself), and a log step's
   cost spread over ``log.every``.
3. **per-tensor work**: fused AdamW's step, the EMA update and the gradient clip over as many
   1-element tensors as REGLUE SiT-B/2 (143) and SiT-XL/2 (303) train — their loops and launches,
   which the one-tensor stub leaves out (an upper bound for a GPU, whose foreach kernels are
   multi-tensor).
4. **hand-off at the real row size**: :func:`~reglue.data.dataset.training_loader` with DataLoader
   workers reading real 256² rows (427 KiB each, cached semantics) from a dataset of ImageNet's shard
   count, while the main process sleeps the modelled SiT-B/2 step between batches, as a GPU step
   would keep it busy: the main process's time to receive a batch. (Pinning is a separate thread
   on GPU runs and is not measured here: no CUDA.)

The modelled step: per-GPU rows × FLOPs per training image (counted with ``FlopCounterMode``, as
``benchmarks/compare.py`` does) at 40 % of an H100's dense bf16 peak (989 TFLOP/s).
Prints a Markdown table; ``--json`` writes every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmarks
from compare import PEAK_TFLOPS, sit_training_flops  # noqa: E402
from data_loading import TRAINING_FIELDS, write_dataset  # noqa: E402

from reglue.config import load_config  # noqa: E402
from reglue.data.dataset import PreparedDataset, training_loader  # noqa: E402
from reglue.ema import EMAUpdate  # noqa: E402
from reglue.models.sit import SiT, build_sit, sit_config  # noqa: E402
from reglue.presets import get_preset  # noqa: E402
from reglue.training import trainer as trainer_module  # noqa: E402
from reglue.training.inputs import open_run_inputs  # noqa: E402
from reglue.training.order import process_batches  # noqa: E402
from reglue.training.step_noise import StepNoise  # noqa: E402
from reglue.transport import JointLoss  # noqa: E402

H100_BF16 = PEAK_TFLOPS["H100"] * 1e12
MFU = 0.4
REAL_RESOLUTION, TINY_RESOLUTION, TINY_VFM_WIDTH = 256, 64, 8
IMAGENET_IMAGES, IMAGENET_SHARDS = 1_281_167, 1_282
COUNTED_STEPS = 3  # steps after the timed ones whose host reads are counted


class OneRankOf(Accelerator):
    """An Accelerator that reports process ``rank`` of ``world`` while running alone: the trainer then
    takes that process's rows and noise; its collectives reduce over this one process."""

    def __init__(self, rank: int, world: int, **kwargs):
        self._rank, self._world = rank, world
        super().__init__(**kwargs)

    @property
    def num_processes(self) -> int:
        return self._world

    @property
    def process_index(self) -> int:
        return self._rank


class StubSiT(nn.Module):
    """Stands in for the SiT: its inputs and outputs (velocity, REPA tokens, CLS velocity) at their real
    shapes, one multiply of compute. ``save_pretrained`` is the SiT's (the loop exports the EMA)."""

    save_pretrained = SiT.save_pretrained

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.in_channels, self.num_classes, self.use_cls_token = config.in_channels, config.num_classes, True
        self.check_inputs = False
        self.semantic_norm = None  # loss.semantic_norm off: the targets go in as they are (the trainer reads it)
        self.tokens = 1 + (config.input_size // config.patch_size) ** 2
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x, t, y, cls_token=None, force_drop_ids=None):
        tokens = cls_token[:, None, :].expand(-1, self.tokens, -1)  # (B, 1 + N, z): the REPA tokens' shape
        return x * self.scale, tokens * self.scale, cls_token * self.scale


def stub_builder(config, latent_size: int, num_classes: int, vfm_dim: int) -> StubSiT:
    """Replaces the trainer's ``_build_model``: the stub with the SiT config the run would build."""
    preset = get_preset(config.model.preset)
    return StubSiT(sit_config(config.model.name, input_size=latent_size, num_classes=num_classes,
                              **preset.model_kwargs(vfm_dim=vfm_dim)))


class HostReads(TorchDispatchMode):
    """Counts the ops that bring a tensor's value to the host (item, float, bool; tolist is patched)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def median_ms(seconds: list[float]) -> float:
    return round(1000 * statistics.median(seconds), 3)


def measure_draws(global_batch: int, repeats: int) -> dict:
    """StepNoise.draw at 256² for the global batch (ms), and its launch cost (one sample)."""
    loss, latent = JointLoss(), REAL_RESOLUTION // 8

    def draw(rows: int) -> float:
        start = time.perf_counter()
        StepNoise.draw(0, 1, global_batch=rows, channels=20, size=latent, vfm_dim=768, loss=loss, dropout=0.1,
                       device="cpu")
        return time.perf_counter() - start

    draw(global_batch)
    return {"draws_ms": median_ms([draw(global_batch) for _ in range(repeats)]),
            "launch_ms": median_ms([draw(1) for _ in range(max(repeats, 20))])}


def measure_loop(data: Path, work: Path, *, global_batch: int, world: int, steps: int, log_every: int,
                 workers: int, device_step_s: float) -> dict:
    """The trainer's per-step host work as process 0 of ``world`` with the stub SiT and tiny rows. After
    each step the loop sleeps ``device_step_s``, the time a GPU would spend on the real step (the host
    waits for it at the next step's status read), so the loader's workers can run ahead as they would."""
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "reglue_sit_b2.yaml", [
        f"data.dir={data}", f"run_dir={work / f'run-{global_batch}-{world}'}", f"train.global_batch={global_batch}",
        f"train.max_steps={10 * steps}", f"log.every={log_every}", "checkpoint.every=1000000", "log.sample_every=0",
        "log.tensorboard=false", f"data.num_workers={workers}"])
    inputs = open_run_inputs(config)
    real_build, trainer_module._build_model = trainer_module._build_model, stub_builder
    try:
        trainer = trainer_module.Trainer(inputs, OneRankOf(0, world, cpu=True))
    finally:
        trainer_module._build_model = real_build
    step_s, step_cpu_s, fetch_s, fetch_cpu_s, log_s, reads = [], [], [], [], [], []
    real_batches, real_step, real_log = trainer.batches, trainer.train_step, trainer._log

    def timed_batches():
        batches = real_batches()
        while True:
            start, start_cpu = time.perf_counter(), time.thread_time()
            batch = next(batches)
            fetch_s.append(time.perf_counter() - start)
            fetch_cpu_s.append(time.thread_time() - start_cpu)
            yield batch

    def timed_step(batches):
        if len(step_s) < steps:  # timed
            start, start_cpu = time.perf_counter(), time.thread_time()
            real_step(batches)
            step_s.append(time.perf_counter() - start)
            step_cpu_s.append(time.thread_time() - start_cpu)
        else:  # counted: the dispatch mode costs host time itself, so these steps are not timed
            tolist_calls[0] = 0
            with HostReads() as counted:
                real_step(batches)
            reads.append(counted.count + tolist_calls[0])
        time.sleep(device_step_s)

    def timed_log(*args):
        start = time.perf_counter()
        real_log(*args)
        log_s.append(time.perf_counter() - start)

    tolist_calls, real_tolist = [0], torch.Tensor.tolist

    def counting_tolist(tensor):
        tolist_calls[0] += 1
        return real_tolist(tensor)

    trainer.batches, trainer.train_step, trainer._log = timed_batches, timed_step, timed_log
    torch.Tensor.tolist = counting_tolist
    try:
        trainer.run(stop_after_steps=steps + COUNTED_STEPS)
    finally:
        torch.Tensor.tolist = real_tolist
    warm = slice(2, None)  # the first steps start the loader's workers and fill its queue
    fetches = fetch_s[warm]
    return {"handoff_ms": median_ms(fetches), "other_ms": round(median_ms(step_s[warm]) - median_ms(fetches), 3),
            "other_cpu_ms": round(median_ms(step_cpu_s[warm]) - median_ms(fetch_cpu_s[warm]), 3),
            "host_reads_per_step": statistics.median(reads),
            "log_step_ms": median_ms(log_s) if log_s else None,
            "log_ms_per_step": round(median_ms(log_s) / log_every, 3) if log_s else None}


def measure_handoff(data: Path, *, rows: int, workers: int, wait_s: float, batches: int) -> dict:
    """The main process's time to receive a batch of ``rows`` real-size rows from ``workers`` workers:
    wall time and the main thread's CPU time of ``next``. It waits ``wait_s`` between batches, long
    enough for the workers to have the next one ready: what is timed is the hand-off, not their reading
    (whose rate ``benchmarks/data_loading.py`` measures)."""
    dataset = PreparedDataset(data, fields=TRAINING_FIELDS)
    order = process_batches(len(dataset), rows, seed=0, epoch=0, rank=0, num_processes=1)[:batches]
    loader = iter(training_loader(dataset, order, num_workers=workers, pin_memory=False))
    wall, cpu = [], []
    for index in range(len(order)):
        start, start_cpu = time.perf_counter(), time.thread_time()
        batch = next(loader)
        if index >= workers:  # the first batches wait for the workers to start
            wall.append(time.perf_counter() - start)
            cpu.append(time.thread_time() - start_cpu)
        del batch  # freed outside the timing, as the trainer frees it during the next step
        time.sleep(wait_s)
    return {"rows": rows, "workers": workers, "handoff_ms": median_ms(wall), "handoff_cpu_ms": median_ms(cpu)}


def measure_per_tensor_work(name: str, repeats: int = 50) -> dict:
    """The trainer's per-parameter-tensor host work at ``name``'s tensor count (1-element tensors, so only
    the loops and launches remain): fused AdamW's step with its found_inf flag, the EMA update, the
    gradient-norm clip. On a CPU the foreach kernels loop over the tensors; on a GPU they are multi-tensor
    kernels, so this is an upper bound of what the host spends there."""
    with torch.device("meta"):
        count = sum(p.requires_grad for p in build_sit(name, **get_preset("reglue").model_kwargs(vfm_dim=768))
                    .parameters())
    model = nn.ParameterList([nn.Parameter(torch.randn(1)) for _ in range(count)])
    ema = nn.ParameterList([nn.Parameter(torch.randn(1), requires_grad=False) for _ in range(count)])
    params = list(model.parameters())
    for param in params:
        param.grad = torch.randn(1)
    adamw, update = torch.optim.AdamW(params, lr=1e-4, fused=True), EMAUpdate(ema, model)
    found_inf = torch.zeros(())

    def optimiser_step() -> None:
        adamw.found_inf = found_inf
        adamw.step()
        del adamw.found_inf

    def timed(work) -> float:
        work()
        start = time.perf_counter()
        for _ in range(repeats):
            work()
        return round(1000 * (time.perf_counter() - start) / repeats, 3)

    return {"model": name, "tensors": count, "adamw_ms": timed(optimiser_step), "ema_ms": timed(lambda: update(0.9999)),
            "clip_ms": timed(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0))}


def reglue_training_flops(name: str) -> float:
    """FLOPs of one 256² training image through REGLUE ``name`` (forward + backward, cached semantics)."""
    with torch.device("meta"):
        model = build_sit(name, **get_preset("reglue").model_kwargs(vfm_dim=768))
    return sit_training_flops(model)


def modelled_step_ms(rows_per_gpu: int, flops_per_image: float) -> float:
    return round(1000 * rows_per_gpu * flops_per_image / (MFU * H100_BF16), 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--global-batch", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 8], help="W: the loop runs as process 0 of W")
    parser.add_argument("--steps", type=int, default=30, help="loop steps per configuration")
    parser.add_argument("--log-every", type=int, default=10, help="log.every of the loop (its cost is spread over it)")
    parser.add_argument("--draw-repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1,
                        help="DataLoader workers of the loop and the hand-off (1 on a 2-core machine: the main process "
                        "needs the other core)")
    parser.add_argument("--handoff-wait", type=float, default=0.3, help="seconds between batches of the hand-off")
    parser.add_argument("--tiny-rows", type=int, default=16_384, help="rows of the tiny dataset the loop reads")
    parser.add_argument("--real-shards", type=int, default=IMAGENET_SHARDS, help="shards of the real-size dataset")
    parser.add_argument("--real-rows-per-shard", type=int, default=4)
    parser.add_argument("--handoff-batches", type=int, default=12)
    parser.add_argument("--dir", type=Path, default=None, help="where the datasets go (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    flops = {name: reglue_training_flops(name) for name in ("SiT-B/2", "SiT-XL/2")}
    result = {"flops_per_image": flops, "load_avg": os.getloadavg()[0], "rows": [], "handoff": {}}
    world = max(args.processes)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tiny, real = Path(tmp) / "tiny", Path(tmp) / "real"
        shards = min(IMAGENET_SHARDS, args.tiny_rows)
        write_dataset(tiny, shards=shards, rows_per_shard=-(-args.tiny_rows // shards), resolution=TINY_RESOLUTION,
                      vfm_width=TINY_VFM_WIDTH)
        with one_thread():  # one row per process: the kernels are nothing, what remains is host work
            result["loop"] = measure_loop(tiny, Path(tmp), global_batch=world, world=world, steps=args.steps,
                                          log_every=args.log_every, workers=args.workers, device_step_s=0.01)
        write_dataset(real, shards=args.real_shards, rows_per_shard=args.real_rows_per_shard,
                      resolution=REAL_RESOLUTION)
        for rows in sorted({b // w for b in args.global_batch for w in args.processes}):
            if rows * args.handoff_batches <= args.real_shards * args.real_rows_per_shard:
                result["handoff"][rows] = measure_handoff(real, rows=rows, workers=args.workers,
                                                          wait_s=args.handoff_wait, batches=args.handoff_batches)
    for global_batch in args.global_batch:
        draws = measure_draws(global_batch, args.draw_repeats)
        for processes in args.processes:
            rows = global_batch // processes
            handoff = result["handoff"].get(rows, {})
            result["rows"].append({"global_batch": global_batch, "processes": processes, "rows_per_process": rows,
                                   **draws, "handoff_ms": handoff.get("handoff_ms"),
                                   "handoff_cpu_ms": handoff.get("handoff_cpu_ms"),
                                   **{f"h100_{name}_ms": modelled_step_ms(rows, flops[name]) for name in flops}})
    with one_thread():
        result["per_tensor"] = [measure_per_tensor_work(name) for name in flops]
    result["load_avg_after"] = os.getloadavg()[0]
    return result


def report(result: dict) -> str:
    loop = result["loop"]
    lines = [f"the loop, 1 row per process: other host {loop['other_ms']:.3f} ms a step ({loop['other_cpu_ms']:.3f} ms "
             f"of CPU), hand-off of tiny rows {loop['handoff_ms']:.3f} ms, {loop['host_reads_per_step']:g} host read(s) "
             f"a step, logging {loop['log_ms_per_step']} ms a step ({loop['log_step_ms']} ms every log.every steps)", "",
             "| global batch | processes | rows / process | draws on the host, before (ms) | draw launch, now (ms) | "
             "hand-off of real rows, wall / CPU (ms) | H100 step B/2 (ms) | H100 step XL/2 (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        handoff = "–" if r["handoff_ms"] is None else f"{r['handoff_ms']:.3f} / {r['handoff_cpu_ms']:.3f}"
        lines.append(f"| {r['global_batch']} | {r['processes']} | {r['rows_per_process']} | {r['draws_ms']:.1f} | "
                     f"{r['launch_ms']:.3f} | {handoff} | {r['h100_SiT-B/2_ms']} | {r['h100_SiT-XL/2_ms']} |")
    lines += ["", "| model | parameter tensors | AdamW step (ms) | EMA update (ms) | clip (ms) |", "|---|---|---|---|---|"]
    lines += [f"| {w['model']} | {w['tensors']} | {w['adamw_ms']:.3f} | {w['ema_ms']:.3f} | {w['clip_ms']:.3f} |"
              for w in result["per_tensor"]]
    lines.append(f"\nload average {result['load_avg']:.2f} → {result['load_avg_after']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
