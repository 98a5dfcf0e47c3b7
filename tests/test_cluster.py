"""Two "nodes" on this machine through the shipped SLURM script (scripts/slurm/reglue.sbatch).

srun, scontrol and scancel are stand-ins (tests/slurm_standin): srun starts one copy of the command per
node as a real srun starts one task per node (and, like it, kills them when it gets SIGTERM), so each "node" runs its own torchrun launcher with one gloo
process, and the two meet through torchrun's c10d rendezvous on localhost, as on a cluster. The job
is stopped the ways a cluster stops it — the time limit's USR1 (checkpoint, then requeue) and a hard
kill of every process (a node lost) — restarted as SLURM would restart it, with the dataset copied to
a new path in between (a job staging data to node-local disks), and must end bit-identical to an
uninterrupted two-node run, and within float tolerance of one process; its evaluation series too.
Then both node counts sample the same images.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from reglue import checkpoint as ckpt
from reglue.cli import main
from reglue.config import load_config
from reglue.training.metrics import read_metrics
from reglue.training.trainer import train
from test_train import TINY_MODEL, cached_data  # noqa: F401 (cached_data is a fixture)
from test_train_eval import EVAL

SBATCH = REPO / "scripts" / "slurm" / "reglue.sbatch"
STANDIN = REPO / "tests" / "slurm_standin"
STEPS = 40
RUN = ["--config", "configs/demo.yaml", *TINY_MODEL, "train.global_batch=2", f"train.max_steps={STEPS}",
       "checkpoint.every=4", "checkpoint.keep_last=2", "log.every=4",
       *[e for e in EVAL if not e.startswith("eval.every")], "eval.every=20"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def submit(args: list[str], tmp_path: Path, *, job_id: int = 4242) -> subprocess.Popen:
    """``sbatch --nodes 2 reglue.sbatch ARGS`` as SLURM would run it: the script itself, in a session of its own."""
    env = {**os.environ, "PATH": f"{STANDIN}{os.pathsep}{os.environ['PATH']}", "SLURM_NNODES": "2",
           "SLURM_JOB_ID": str(job_id), "SLURM_JOB_NODELIST": "node[1-2]", "GPUS_PER_NODE": "1",
           "PYTHON": sys.executable, "RDZV_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "GRACE_S": "60",
           "SLURM_STANDIN_REQUEUED": str(tmp_path / "requeued")}
    name = f"job-{time.monotonic_ns()}"
    env["SLURM_STANDIN_TASKS"] = str(tmp_path / f"{name}.tasks")  # the tasks scancel signals
    log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 (closed by finish)
    job = subprocess.Popen(["bash", str(SBATCH), *args], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                           start_new_session=True)
    job.log = log
    return job


def finish(job: subprocess.Popen, timeout: float = 240) -> str:
    try:
        job.wait(timeout=timeout)
    finally:
        job.log.close()
    output = Path(job.log.name).read_text()
    assert job.returncode == 0, output[-6000:]
    return output


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc): the stand-in srun, the launchers and their workers."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def wait_for_checkpoint(run_dir: Path, after: int, job: subprocess.Popen, timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [step for step, _ in ckpt.list_checkpoints(run_dir)]
        if steps and steps[-1] > after:
            return steps[-1]
        assert job.poll() is None, Path(job.log.name).read_text()[-6000:]
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint after step {after} in {run_dir} within {timeout} s")


def state(run_dir: Path) -> dict:
    _, payload = ckpt.latest_valid_checkpoint(run_dir, print)
    return payload


def eval_series(run_dir: Path) -> dict[int, dict[str, float]]:
    return {row["step"]: {k: v for k, v in row.items() if k.startswith("eval/") and k != "eval/seconds"}
            for row in read_metrics(run_dir) if any(k.startswith("eval/") for k in row)}


@pytest.mark.usefixtures("one_thread")
def test_two_nodes_train_through_a_requeue_and_a_lost_node_and_sample_like_one_process(cached_data, tmp_path):
    data = cached_data / "data"
    straight, chain = tmp_path / "straight", tmp_path / "chain"
    finish(submit(["train", *RUN, "--resume", "auto", f"data.dir={data}", f"run_dir={straight}"], tmp_path))

    # the time limit: USR1 to the batch script, which stops the command at a checkpoint and requeues the job
    job = submit(["train", *RUN, "--resume", "auto", f"data.dir={data}", f"run_dir={chain}"], tmp_path)
    first = wait_for_checkpoint(chain, 0, job)
    os.kill(job.pid, signal.SIGUSR1)
    output = finish(job)
    stopped = ckpt.list_checkpoints(chain)[-1][0]
    assert "stopped early" in output and first <= stopped < STEPS
    assert (tmp_path / "requeued").read_text().split() == ["4242"]

    # requeued on nodes that staged the data to a new path; then a node is lost: every process killed
    staged = tmp_path / "node-local" / "data"
    shutil.copytree(data, staged)
    job = submit(["train", *RUN, "--resume", "auto", f"data.dir={staged}", f"run_dir={chain}"], tmp_path)
    killed_after = wait_for_checkpoint(chain, stopped + 4, job)
    for pid in [job.pid, *descendants(job.pid)]:
        os.kill(pid, signal.SIGKILL)
    job.wait()
    job.log.close()
    assert killed_after < STEPS, "the run ended before it could be killed"

    # restarted again: resumes from the last complete checkpoint and finishes
    output = finish(submit(["train", *RUN, "--resume", "auto", f"data.dir={staged}", f"run_dir={chain}"], tmp_path))
    assert "resumed from" in output and f"training finished at step {STEPS}" in output

    a, b = state(straight), state(chain)
    assert len(a["rng"]) == len(b["rng"]) == 2  # two processes
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][key], b[part][key]) for key in a[part]), part
    for s1, s2 in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert eval_series(chain) == eval_series(straight) and sorted(eval_series(straight)) == [20, 40]

    one = train(load_config(RUN[1], [*RUN[2:], f"data.dir={data}", f"run_dir={tmp_path / 'one'}"])).run_dir
    c = state(one)
    for part in ("model", "ema"):
        assert all(torch.allclose(a[part][key], c[part][key], atol=1e-5) for key in a[part]), part
    for step, values in eval_series(one).items():
        assert eval_series(straight)[step] == pytest.approx(values, rel=1e-3, abs=1e-6)

    # samples: two nodes and one process draw the same images from the same weights
    sample = ["sample", "--ckpt", str(chain / "ema"), "--vae", str(cached_data / "vae"), "--num-samples", "4",
              "--steps", "3", "--micro-batch", "2", "--per-device-batch", "1", "--quiet"]
    finish(submit([*sample, "--out", str(tmp_path / "two-nodes")], tmp_path, job_id=4343))
    assert main([*sample, "--out", str(tmp_path / "one-process")]) == 0
    two, single = (np.load(tmp_path / name / "samples.npz") for name in ("two-nodes", "one-process"))
    assert np.array_equal(two["arr_0"], single["arr_0"]) and np.array_equal(two["labels"], single["labels"])


@pytest.mark.parametrize("path", sorted(p.name for p in (REPO / "configs").glob("*.yaml") if p.name != "demo.yaml"))
def test_shipped_configs_checkpoint_every_percent_of_the_run(path):
    """A lost node costs at most 1 % of a run (docs/cluster.md)."""
    config = load_config(REPO / "configs" / path, ["data.dir=/data"])
    assert config.checkpoint.every <= config.train.max_steps // 100, path


# Steps the paper reports for each model size (SiT-B/2: its FID table and the curve behind it; SiT-XL/2: the
# comparison with iterations and the 160-epoch headline, 800K steps at batch 256).
PAPER_REPORTED_STEPS = {"SiT-B/2": (100_000, 200_000, 300_000, 400_000),
                        "SiT-XL/2": (200_000, 400_000, 700_000, 800_000, 1_000_000)}


@pytest.mark.parametrize("path", sorted(p.name for p in (REPO / "configs").glob("*.yaml") if p.name != "demo.yaml"))
def test_shipped_configs_keep_every_step_the_paper_reports(path):
    """keep_last prunes the rest; a milestone's checkpoint stays, so the run can be scored where the paper was."""
    config = load_config(REPO / "configs" / path, ["data.dir=/data"])
    wanted = [step for step in PAPER_REPORTED_STEPS[config.model.name] if step <= config.train.max_steps]
    assert set(wanted) <= set(config.checkpoint.milestones), (path, sorted(set(wanted) - set(config.checkpoint.milestones)))
    assert all(step % config.checkpoint.every == 0 for step in config.checkpoint.milestones), path  # ever written


def test_the_collective_timeout_reaches_the_process_group(cached_data, monkeypatch):
    """train.dist_timeout is the timeout the process group is set up with, before anything else starts it."""
    import datetime

    import accelerate

    from reglue import distributed
    from reglue.training import trainer as trainer_module

    asked = []
    real = trainer_module.process_state
    monkeypatch.setattr(trainer_module, "process_state", lambda timeout_s: asked.append(timeout_s) or real())
    train(load_config(RUN[1], [*RUN[2:], f"data.dir={cached_data / 'data'}", "train.max_steps=1", "eval.every=0",
                               f"run_dir={cached_data / 'timeout'}", "train.dist_timeout=77"]))
    assert asked == [77]
    made = []
    monkeypatch.setattr(accelerate, "PartialState", lambda **kwargs: made.append(kwargs))
    distributed.process_state(timeout_s=77)
    assert made == [{"cpu": distributed.on_cpu_only(), "timeout": datetime.timedelta(seconds=77)}]
