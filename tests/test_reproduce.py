"""docs/reproduce.md's scripts run end to end at a tiny size: the same commands, in the same order, with
tiny stand-ins for ImageNet, the weights and the step counts (appended as the last, winning settings)."""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from reglue.cli import main
from reglue.data.synthetic import write_synthetic_dataset
from reglue.metrics import fid as fid_module
from test_evaluate import random_weights  # noqa: F401 (a fixture: a random Inception in torch-fidelity's layout)
from test_prepare import tiny_vae_dir

DOC = REPO / "docs" / "reproduce.md"
SCRIPTS = ("## Table 1", "## SiT-XL/2 with guidance")  # the sections whose first bash block is a whole recipe
LAUNCHER = re.compile(r"^(?:accelerate launch .*?-m reglue\.cli|reglue)\s+")
TINY_VFM = ["--vfm-arch", "embed_dim=32,depth=12,num_heads=2"]  # 12 blocks: ReDi's layer 11 exists
TINY_SIT = ["model.depth=2", "model.hidden_size=32", "model.num_heads=2", "model.encoder_depth=1",
            "model.projector_dim=32", "train.global_batch=4", "train.max_steps=2", "train.precision=fp32",
            "checkpoint.every=2", "checkpoint.milestones=[2]", "log.every=1", "log.sample_every=0",
            "log.tensorboard=false", "data.num_workers=0"]
SAMPLES = 8
TINY = {  # appended to each command (argparse and the settings take the last value)
    "prepare": ["--resolution", "64", "--quiet"],
    "norm-stats": [*TINY_VFM, "--num-images", "32", "--quiet"],
    "train-compressor": ["--quiet", "epochs=1", "global_batch=8", "val_fraction=0.25"],  # 0.01 of 32: none
    "fit-pca": ["--num-images", "16", "--quiet"],
    "cache-semantics": ["--quiet"],
    "train": TINY_SIT,
    "sample": ["--quiet", f"num_samples={SAMPLES}", "num_steps=2", "micro_batch=4"],
    "evaluate": ["--quiet", "--micro-batch", "16"],
}


def script(heading: str) -> list[str]:
    """The lines of the first bash block after ``heading``, continuations joined, comments dropped."""
    text = DOC.read_text().split(heading, 1)[1]
    block = re.search(r"```bash\n(.*?)```", text, flags=re.DOTALL).group(1)
    return [line.split(" #")[0].strip() for line in block.replace("\\\n", " ").splitlines()
            if line.strip() and not line.strip().startswith("#")]


def commands(lines: list[str], values: dict[str, str]) -> list[list[str]]:
    """Each reglue command (argv) and `cp -a` of the script, loops unrolled, variables set to ``values``."""
    found, loop = [], None
    for line in lines:
        if re.fullmatch(r"[A-Z]+=\S+", line):  # the script's own paths: replaced by the test's
            continue
        if match := re.fullmatch(r"for p in ([\w ]+); do", line):
            loop = match.group(1).split()
            continue
        if line == "done":
            loop = None
            continue
        for p in loop or [None]:
            expanded = line.replace("${p}", p or "${p}")
            for name, value in values.items():
                expanded = expanded.replace(name, value)
            assert "$" not in expanded, f"a variable the test does not set: {expanded}"
            found.append(shlex.split(LAUNCHER.sub("reglue ", expanded)))
    return found


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, random_weights):  # noqa: F811 (the imported fixture)
    root = tmp_path_factory.mktemp("reproduce")
    imagenet = write_synthetic_dataset(root / "imagenet", images_per_class=8, size=72, num_classes=4)
    weights = root / "weights"
    weights.mkdir()
    tiny_vae_dir(weights / "sd-vae-ft-ema")
    shutil.copy(random_weights, weights / random_weights.name)
    images = [np.asarray(Image.open(p).convert("RGB").resize((64, 64)))
              for p in sorted(imagenet.rglob("*.png"))]
    np.savez(weights / "VIRTUAL_imagenet256_labeled.npz", arr_0=np.stack(images[::2]))  # 16 reference images
    return {"$IMAGENET": str(imagenet), "$DATA": str(root / "in256"), "$REDI": str(root / "in256-redi"),
            "$W/dinov2_vitb14_reg4_pretrain.pth": "random", "$W": str(weights), "$RUNS": str(root / "runs"),
            "step-000800000.pt": "step-000000002.pt"}  # the tiny run's last (milestone) checkpoint


def run(argv: list[str]) -> None:
    if argv[:2] == ["cp", "-a"]:
        shutil.copytree(argv[2], argv[3])
        return
    assert argv[0] == "reglue", argv
    assert main([*argv[1:], *TINY.get(argv[1], [])]) == 0, argv


@pytest.mark.parametrize("heading", SCRIPTS)
def test_the_documented_recipe_runs_end_to_end_at_a_tiny_size(heading, stand_ins, monkeypatch):
    # FID's matrix square root of 2048² covariances takes 7 s on two cores, twice per evaluation; its maths is
    # held to known answers in test_metrics_maths.py. Here the diagonal's root stands in: the plumbing is the test.
    monkeypatch.setattr(fid_module.linalg, "sqrtm", lambda m: np.diag(np.sqrt(np.clip(np.diag(m), 0, None))))
    steps = commands(script(heading), stand_ins)
    names = [argv[1] for argv in steps if argv[0] == "reglue"]
    if heading == SCRIPTS[0]:  # Table 1: every stage, five trainings, five samples and evaluations
        assert names.count("train") == 5 and names.count("sample") == 5 and names.count("evaluate") == 5
        assert {"prepare", "norm-stats", "train-compressor", "cache-semantics", "fit-pca"} <= set(names)
    else:  # the XL/2 headline reads the data the first script prepared
        assert names == ["train", "sample", "evaluate"] and Path(stand_ins["$DATA"]).is_dir()
    for argv in steps:
        run(argv)
    for argv in steps:
        if argv[1:2] == ["evaluate"]:
            samples = argv[argv.index("--samples") + 1]
            metrics = json.loads(Path(samples.removesuffix(".npz") + ".metrics.json").read_text())
            assert {"fid", "sfid", "inception_score", "precision", "recall"} <= set(metrics)
            assert math.isfinite(metrics["fid"])


def test_the_xl2_recipe_samples_with_the_papers_guidance_at_the_800k_checkpoint():
    sample = next(argv for argv in commands(script(SCRIPTS[1]), {"$W": "w", "$RUNS": "r", "$DATA": "d"})
                  if argv[1] == "sample")
    assert "--paper" in sample and sample[sample.index("--ckpt") + 1] == "r/reglue_xl2/checkpoints/step-000800000.pt"
    assert sample[sample.index("--precision") + 1] == "fp32" and sample[sample.index("--num-samples") + 1] == "50000"
