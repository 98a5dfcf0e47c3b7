"""When one process fails, every process stops and names the cause, whatever started them.

Two gloo processes are started as ``srun`` starts a job's tasks: no torchrun agent tears the group down
when one of them exits, each process only has the environment an sbatch script sets from SLURM's
variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). In each case, a
section that only the main process runs is made to fail there: its work function is replaced, on rank 0
only, by one raising ``OSError: [Errno 28] No space left on device``. Both processes must end the
command within CASE_LIMIT_S with the status ``reglue`` exits with for errors the user can act on (2),
rank 0 printing its own error, rank 1 "the main process failed while ..." and the same cause.

The two processes run every case one after the other (``reglue.cli.main``, whose status is the
command's exit status), so torch is imported once instead of once per case; they exit once all cases
have ended, meeting first and tearing the group down (``end_process_group``, as the CLI does after a
command that succeeded; without it the first process to exit can make gloo abort the other). Each case has its own folders, its injection is undone after it, and both processes start
it together (a barrier), so the cases stay independent. A case in which a process does not end leaves
the pair stuck: the test stops both processes after CASE_LIMIT_S, and that case and those after it fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, tiny_sit
from reglue.cli import main
from reglue.config import ConfigError, load_config
from reglue.data.synthetic import write_synthetic_dataset
from test_pipeline import TINY_VFM, save_compressor
from test_train import TINY_MODEL
from test_train_eval import EVAL

CASE_LIMIT_S = 30  # both processes end a failed command within this
START_LIMIT_S = 180  # two processes importing torch and the commands' modules on a busy machine
CAUSE = "OSError: [Errno 28] No space left on device"
DEMO_CONFIG = str(REPO / "configs" / "demo.yaml")

# Each process runs the cases of argv[1] and writes one JSON line per case to argv[2]/results-RANK.jsonl.
CHILD = r'''
import contextlib, importlib.util, io, json, sys, time, traceback
from pathlib import Path
from unittest import mock

import torch.distributed as dist

import reglue.generate, reglue.pipeline, reglue.training.teacher, reglue.training.trainer  # imported before the clock
from reglue.cli import main
from reglue.distributed import end_process_group, process_state


def no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")


def interrupted(*args, **kwargs):
    raise KeyboardInterrupt


def find_spec_without(package):
    real = importlib.util.find_spec
    return lambda name, *args: None if name == package else real(name, *args)


state = process_state()  # joins the gloo group the environment describes
cases, results = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]) / f"results-{state.process_index}.jsonl"
with results.open("a") as out:
    for case in cases:
        dist.barrier()  # both processes start each case together
        start, stderr = time.monotonic(), io.StringIO()
        with contextlib.ExitStack() as stack:
            if case["breaks"] and state.is_main_process:
                stack.enter_context(mock.patch(case["breaks"], interrupted if case["interrupts"] else no_space))
            if case["hides"]:  # on every process, as a package missing on the machine
                stack.enter_context(mock.patch("importlib.util.find_spec", find_spec_without(case["hides"])))
            stack.enter_context(contextlib.redirect_stderr(stderr))
            try:
                status = main(case["argv"])
            except BaseException:
                status = "raised"
                stderr.write(traceback.format_exc())
        record = {"case": case["name"], "status": status, "stderr": stderr.getvalue(), "seconds": time.monotonic() - start}
        out.write(json.dumps(record) + "\n")
        out.flush()
end_process_group()  # as the CLI after a command: the first process out would make gloo abort the other
'''


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(code: str, *args: str, logs: Path) -> list[subprocess.Popen]:
    """``python -c CODE ARGS`` as ranks 0 and 1 of one job, started the way ``srun`` starts tasks:
    each with only the environment variables of its place (no torchrun agent); stderr to LOGS/rank-R.err."""
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "REGLUE_DEBUG"))}
    processes = []
    for rank in range(2):
        env = dict(base, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        with open(logs / f"rank-{rank}.err", "w") as err:
            processes.append(subprocess.Popen([sys.executable, "-c", code, *args], env=env, cwd=REPO,
                                              stdout=subprocess.DEVNULL, stderr=err))
    return processes


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def log_tail(logs: Path) -> str:
    return "\n".join(f"--- rank {r}:\n" + (logs / f"rank-{r}.err").read_text()[-3000:] for r in range(2))


# --------------------------------------------------------------------------------------
# The sections and the commands that reach them
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """What the commands read: an image folder, its dataset at 64² (pixel autoencoder) with norm stats of a
    random tiny VFM, a compressor and cached semantics, CLS and REPA targets; a tiny SiT."""

    root: Path
    images: Path
    data: Path
    compressor: Path
    sit: Path

    def data_copy(self, folder: Path) -> Path:
        """A copy of the dataset that only this case writes into."""
        return Path(shutil.copytree(self.data, folder / "data"))


@dataclass(frozen=True)
class Case:
    """A command, the function whose failure on the main process it must survive, and the section it is in.

    ``what`` is the section's name in rank 1's message ("the main process failed while {what}…"); None for
    the sections the trainer's own code names. ``interrupts``: the function raises KeyboardInterrupt (Ctrl-C)
    instead. ``hides``: a package every process behaves as if it lacked."""

    name: str
    breaks: str | None
    what: str | None
    argv: Callable[[Inputs, Path], list[str]]
    interrupts: bool = False
    hides: str | None = None


def prepare(inputs: Inputs, out: Path) -> list[str]:
    return ["prepare", str(inputs.images), str(out / "data"), "--resolution", "64", "--vae", "pixel", "--quiet"]


def train_run(inputs: Inputs, out: Path, *overrides: str) -> list[str]:
    return ["train", "--config", DEMO_CONFIG, f"data.dir={inputs.data_copy(out)}", f"run_dir={out / 'run'}", *TINY_MODEL,
            "train.global_batch=2", "train.max_steps=2", *overrides]


def train_vfm(inputs: Inputs, out: Path, *options: str) -> list[str]:
    return ["train-vfm", str(inputs.data), "--out", str(out / "teacher"), "--embed-dim", "16", "--depth", "1",
            "--num-heads", "2", "--epochs", "1", "--global-batch", "8", "--local-crops", "2", "--quiet", *options]


def sample(inputs: Inputs, out: Path) -> list[str]:
    return ["sample", "--ckpt", str(inputs.sit), "--vae", "pixel", "--out", str(out / "samples"), "--num-samples", "2",
            "--steps", "2", "--micro-batch", "2", "--quiet"]


def compressor(inputs: Inputs, out: Path) -> list[str]:
    return ["train-compressor", str(inputs.data), "--out", str(out / "compressor"), "--epochs", "1",
            "--global-batch", "16", "--quiet"]


def cache(inputs: Inputs, out: Path) -> list[str]:
    return ["cache-semantics", str(inputs.data_copy(out)), "--compressor", str(inputs.compressor), "--repa-targets",
            "--quiet"]


CASES = [
    Case("prepare: lock and settings.json", "reglue.data.store.check_or_write_json", "locking", prepare),
    Case("prepare: manifest", "reglue.data.prepare.write_json", "manifest.json", prepare),
    Case("norm-stats", "reglue.encoders.norm_stats.NormStats.save", "computing the norm stats",
         lambda i, out: ["norm-stats", str(i.data), "--out", str(out / "stats.safetensors"), "--num-images", "8",
                         "--quiet", *TINY_VFM]),
    Case("fit-pca", "reglue.models.compressor.PCAProjection.save", "fitting the PCA",
         lambda i, out: ["fit-pca", str(i.data), "--rank", "4", "--out", str(out / "pca.safetensors"),
                         "--num-images", "8", "--quiet"]),
    Case("cache-semantics: lock and semantics.json", "reglue.data.store.check_or_write_json", "locking", cache),
    Case("cache-semantics: completion", "reglue.data.cache.write_json", "complete", cache),
    Case("train-compressor: best weights", "reglue.training.compressor._save_weights", "compressor_best", compressor),
    Case("train-compressor: train state", "reglue.training.run.save_state_file", "train_state.pt", compressor),
    Case("train-compressor: history", "reglue.training.compressor._plot_loss_curve", "history.json", compressor),
    Case("train-vfm: metrics log", "reglue.training.metrics.MetricsLogger.__init__", "opening the metrics log",
         lambda i, out: train_vfm(i, out, "--no-probe")),
    Case("train-vfm: train state", "reglue.training.run.save_state_file", "train_state.pt",
         lambda i, out: train_vfm(i, out, "--no-probe")),
    Case("train-vfm: export and probe", "reglue.training.teacher._probe", "exporting and probing",
         lambda i, out: train_vfm(i, out, "--max-held-out-fraction", "0.25")),
    Case("sample: settings.json", "reglue.data.store.check_or_write_json", "settings.json", sample),
    Case("sample: samples.npz", "reglue.generate.pack_npz", "packing", sample),
    Case("train: evaluation scores", "reglue.training.evaluation.frechet_distance", "scoring the evaluation",
         lambda i, out: train_run(i, out, *EVAL)),
    # the SiT trainer's own sections (src/reglue/training/trainer.py)
    Case("train: config.yaml", "reglue.config.RunConfig.save", None, train_run),
    Case("train: metrics log", "reglue.training.metrics.MetricsLogger.__init__", None, train_run),
    Case("train: checkpoint", "reglue.checkpoint.save_checkpoint", None, train_run),
]


INTERRUPTED = Case("sample: Ctrl-C while packing", "reglue.generate.pack_npz", "packing", sample, interrupts=True)
WITHOUT_WANDB = Case("train: log.wandb without wandb", None, None,
                     lambda i, out: train_run(i, out, "log.wandb=true"), hides="wandb")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    root = tmp_path_factory.mktemp("failures")
    images = write_synthetic_dataset(root / "images", images_per_class=4, size=64, seed=0, num_classes=4)
    data, compressor_path, sit = root / "data", root / "compressor.safetensors", root / "sit"
    assert main(["prepare", str(images), str(data), "--resolution", "64", "--vae", "pixel", "--quiet"]) == 0
    assert main(["norm-stats", str(data), "--quiet", *TINY_VFM]) == 0
    save_compressor(compressor_path, (64, 16, 16))
    assert main(["cache-semantics", str(data), "--compressor", str(compressor_path), "--repa-targets", "--quiet"]) == 0
    tiny_sit().save_pretrained(sit)
    return Inputs(root, images, data, compressor_path, sit)


@dataclass
class Outcomes:
    """What the pair of processes did: per case name, [rank 0's record, rank 1's] ({"status", "stderr",
    "seconds"}) for the cases both ended; each case's folder; the processes' exit statuses (None: stopped)."""

    records: dict[str, list[dict]]
    folders: dict[str, Path]
    exits: list[int | None]
    log: str  # the end of each process's own stderr (logging, tracebacks)


@pytest.fixture(scope="module")
def outcomes(inputs) -> Outcomes:
    folder = inputs.root / "cases"
    cases, folders = [], {}
    for number, case in enumerate([WITHOUT_WANDB, *CASES, INTERRUPTED]):
        folders[case.name] = out = folder / f"{number:02d}"
        out.mkdir(parents=True)
        cases.append({"name": case.name, "breaks": case.breaks, "interrupts": case.interrupts, "hides": case.hides,
                      "argv": case.argv(inputs, out)})
    (folder / "cases.json").write_text(json.dumps(cases))
    processes = launch(CHILD, str(folder / "cases.json"), str(folder), logs=folder)
    results = [folder / f"results-{rank}.jsonl" for rank in range(2)]
    ended, deadline = 0, time.monotonic() + START_LIMIT_S
    try:
        while time.monotonic() < deadline and any(p.poll() is None for p in processes):
            time.sleep(0.2)
            now_ended = min(len(path.read_text().splitlines()) if path.exists() else 0 for path in results)
            if now_ended > ended:  # the next case starts now: it has CASE_LIMIT_S (+ a margin for the barrier)
                ended, deadline = now_ended, time.monotonic() + CASE_LIMIT_S + 10
        exits = [process.poll() for process in processes]
    finally:
        stop(processes)
    records = [[json.loads(line) for line in path.read_text().splitlines()] if path.exists() else [] for path in results]
    return Outcomes({first["case"]: [first, second] for first, second in zip(*records)}, folders, exits,
                    log_tail(folder))


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_a_failure_on_the_main_process_stops_both_naming_the_cause(case, outcomes):
    assert case.name in outcomes.records, f"a process did not end {case.name!r} within {CASE_LIMIT_S} s\n{outcomes.log}"
    main_process, other = outcomes.records[case.name]
    for record in (main_process, other):
        assert record["status"] == 2, f"{record}\n{outcomes.log}"
        assert record["seconds"] < CASE_LIMIT_S
        assert record["stderr"].count("\n") == 1 and record["stderr"].startswith("reglue "), record["stderr"]
    assert "No space left on device" in main_process["stderr"]
    assert "the main process failed while " in other["stderr"] and CAUSE in other["stderr"], other["stderr"]
    section = other["stderr"].split("the main process failed while ")[1].split(f": {CAUSE}")[0]
    assert case.what is None or case.what in section, other["stderr"]


def test_ctrl_c_on_the_main_process_stops_the_others_too(outcomes):
    assert INTERRUPTED.name in outcomes.records, outcomes.log
    main_process, other = outcomes.records[INTERRUPTED.name]
    assert main_process["status"] == "raised" and main_process["stderr"].endswith("KeyboardInterrupt\n")
    assert other["status"] == 2 and other["stderr"].endswith(f"the main process failed while packing "
                                                              f"{outcomes.folders[INTERRUPTED.name]}/samples/samples.npz: "
                                                              "KeyboardInterrupt\n"), other["stderr"]


def test_both_processes_exit_once_every_case_ended(outcomes):
    assert outcomes.exits == [0, 0], outcomes.log


# --------------------------------------------------------------------------------------
# Optional packages: refused when the config is validated, before any file
# --------------------------------------------------------------------------------------


def hide_package(monkeypatch, package: str) -> list[str]:
    """``importlib.util.find_spec`` answers as if ``package`` were not installed; returns the names asked for."""
    real, asked = importlib.util.find_spec, []

    def find_spec(name, *args):
        asked.append(name)
        return None if name == package else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    return asked


@pytest.mark.parametrize("key,package,install", [
    ("log.wandb", "wandb", 'pip install "reglue[wandb]"'),
    ("log.tensorboard", "tensorboard", "pip install tensorboard"),
])
def test_an_option_whose_package_is_missing_is_refused_by_the_config(monkeypatch, key, package, install):
    imported_before = package in sys.modules
    asked = hide_package(monkeypatch, package)
    with pytest.raises(ConfigError) as refused:
        load_config(DEMO_CONFIG, ["data.dir=anywhere", f"{key}=true"])
    assert str(refused.value) == (f"{key}=true needs the {package} package, which is not installed; `{install}`, "
                                  f"or set {key}=false.")
    assert package in asked and (package in sys.modules) == imported_before  # looked up, not imported
    load_config(DEMO_CONFIG, ["data.dir=anywhere", f"{key}=false"])


def test_wandb_missing_stops_both_processes_before_any_file(outcomes):
    assert WITHOUT_WANDB.name in outcomes.records, outcomes.log
    for record in outcomes.records[WITHOUT_WANDB.name]:
        assert record["status"] == 2 and record["stderr"] == (
            "reglue train: error: log.wandb=true needs the wandb package, which is not installed; "
            '`pip install "reglue[wandb]"`, or set log.wandb=false.\n'), record
    assert not (outcomes.folders[WITHOUT_WANDB.name] / "run").exists()  # neither config.yaml nor metrics.jsonl


def test_a_finished_command_meets_every_process_before_tearing_the_group_down(monkeypatch):
    """A process that left while another still held its gloo connections made that one abort
    ("terminate called without an active exception") after `reglue sample` under torchrun had finished."""
    import torch.distributed as dist

    from reglue import distributed

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    distributed.end_process_group()
    assert calls == ["barrier", "destroy"]
