"""Shared fixtures: tiny models, and the authors' compatibility vectors and real test images shipped in
tests/fixtures (copies of ../shared/compat and ../shared/testdata, checked against them by test_fixtures.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from reglue.models import SiT
from reglue.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
SHARED = Path(os.environ.get("REGLUE_SHARED", REPO.parent / "shared"))
# CI sets REGLUE_REQUIRE_SHARED=1: a missing ../shared then fails instead of skipping.
REQUIRE_SHARED = os.environ.get("REGLUE_REQUIRE_SHARED") == "1"


def shared_file(relative: str) -> Path:
    """The shipped copy of a file of ../shared (``compat/...``, ``testdata/...``), else ../shared's own;
    a skip (a failure in CI) naming what is missing when neither exists."""
    for root in (FIXTURES, SHARED):
        if (root / relative).exists():
            return root / relative
    reason = (f"{FIXTURES / relative} not found (nor {SHARED / relative}): the authors' compatibility vectors "
              "and test images ship in tests/fixtures; restore them with `git checkout -- tests/fixtures`.")
    if REQUIRE_SHARED:
        pytest.fail(reason)
    pytest.skip(reason)


def shared_source() -> Path:
    """../shared itself (the source the shipped fixtures are checked against), or a skip (a failure in CI)."""
    if not SHARED.is_dir():
        reason = f"{SHARED} not found: the shipped fixtures are checked against ../shared beside the checkout " \
                 "(set REGLUE_SHARED to point elsewhere)."
        if REQUIRE_SHARED:
            pytest.fail(reason)
        pytest.skip(reason)
    return SHARED


@pytest.fixture(scope="session")
def official_vectors() -> dict:
    return torch.load(shared_file("compat/official_vectors.pt"), weights_only=True)


@pytest.fixture(scope="session")
def official_config(official_vectors) -> dict:
    """The small SiT of the vectors as SiT keyword arguments."""
    c = official_vectors["config"]
    return dict(
        input_size=c["input_size"], patch_size=c["patch"], in_channels=c["in_ch"],
        hidden_size=c["hidden"], depth=c["depth"], num_heads=c["heads"],
        encoder_depth=c["enc_depth"], num_classes=c["num_classes"], z_dim=c["z_dim"],
        projector_dim=c["proj_dim"],
    )


@pytest.fixture(scope="session")
def official_model(official_vectors, official_config) -> SiT:
    model = SiT(**official_config)
    model.load_state_dict(official_vectors["state_dict"], strict=True)
    return model.eval()


def tiny_sit(preset: str = "reglue", perturb: bool = True, seed: int = 0, **overrides) -> SiT:
    """A 2-block SiT on an 8×8 latent with the preset's parts; heads perturbed off zero."""
    torch.manual_seed(seed)
    kwargs = dict(
        input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, encoder_depth=1,
        num_classes=10, projector_dim=16, **PRESETS[preset].model_kwargs(vfm_dim=12),
    )
    kwargs.update(overrides)
    model = SiT(**kwargs)
    if perturb:  # zero-initialised heads would hide wiring mistakes
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """``prepared(preset)``: the data folder a tiny ``reglue demo --preset PRESET --random-vfm``
    trains on (pixel autoencoder, random tiny DINOv2, 8 classes × 8 images at 128²), made by the
    demo's own data stages and the comparison's cache stages once per session: the redi demo's
    ``datasets/pca`` (PCA semantics) for redi, the reglue demo's ``datasets/compressor`` (compressor
    semantics, CLS, REPA targets) for every other preset, with the norm stats (and the compressor)
    copied in as `reglue norm-stats DATA` (and `reglue train-compressor DATA`) leave them."""
    from reglue.compare.settings import ComparePaths
    from reglue.compare.stages import Ledger, cache_stages
    from reglue.demo.settings import DemoPaths, DemoSettings
    from reglue.demo.stages import compare_settings, data_stages

    made: dict[str, Path] = {}

    def prepared(preset: str) -> Path:
        kind = "redi" if preset == "redi" else "reglue"
        if kind not in made:
            settings = DemoSettings(presets=(kind,), steps=1, images_per_class=8, compressor_epochs=1,
                                    teacher="random")
            out = tmp_path_factory.mktemp(f"demo-data-{kind}")
            paths, ledger = DemoPaths(out), Ledger(out, settings.to_json())
            data_stages(ledger, paths, settings, progress=False)
            cache_stages(ledger, ComparePaths(out), paths.data, compare_settings(paths, settings), progress=False)
            compared, copy = ComparePaths(out), "pca" if kind == "redi" else "compressor"
            made[kind] = compared.copy(copy)
            # where `reglue norm-stats DATA` / `train-compressor DATA` put them: online runs find them there
            shutil.copy2(compared.norm_stats(copy), made[kind] / "norm_stats.safetensors")
            if kind == "reglue":
                shutil.copytree(compared.compressor, made[kind] / compared.compressor.name)
        return made[kind]

    return prepared


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and two threads stall when another process shares the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_processes(args: list[str], *, processes: int = 1, timeout: float = 300) -> None:
    """Run ``reglue ARGS`` in fresh processes on one thread each; a failure shows the command's own output.

    Two or more processes go through ``torchrun --standalone``, which picks a free rendezvous port: a fixed
    ``--master-port`` fails whenever another job on the machine holds it.
    """
    import subprocess
    import sys

    if processes > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    else:
        launcher = []
    command = [sys.executable, *launcher, "-m", "reglue.cli", *args]
    result = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=timeout, check=False)
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-6000:]
        pytest.fail(f"exit {result.returncode} from {' '.join(command)}\n{output}", pytrace=False)
