"""`reglue sample`: samples independent of batch size and process count, resume, .npz, loading."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from conftest import run_processes, tiny_sit
from reglue.cli import main
from reglue.encoders.vae import VAE
from reglue.generate import SampleSettings, generate
from reglue.models.loading import config_from_weights, load_sampling_model
from reglue.sampling import Guidance, sample_sde
from test_prepare import tiny_vae_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    model = tiny_sit("reglue").eval()  # 8×8 latent, 10 classes, z 12
    model.save_pretrained(root / "ema")
    vae_dir = tiny_vae_dir(root / "vae")
    return root, model, VAE(str(vae_dir)), vae_dir


SETTINGS = SampleSettings(num_samples=7, num_steps=4, guidance=Guidance(scale=2.0, high=0.9), seed=3, micro_batch=4)


def pngs_of(folder, count: int):
    from PIL import Image

    return [np.asarray(Image.open(folder / f"{i:06d}.png")) for i in range(count)]


def pngs(folder):
    return pngs_of(folder, SETTINGS.num_samples)


def test_batch_size_and_process_count_do_not_change_the_images(setup, tmp_path):
    _, model, vae, _ = setup
    generate(model, vae, tmp_path / "b3", SETTINGS, per_device_batch=3)
    generate(model, vae, tmp_path / "b5", SETTINGS, per_device_batch=5)
    generate(model, vae, tmp_path / "w2", SETTINGS, per_device_batch=2, rank=1, world_size=2)
    generate(model, vae, tmp_path / "w2", SETTINGS, per_device_batch=2, rank=0, world_size=2)
    generate(model, vae, tmp_path / "w1", SETTINGS, per_device_batch=2)
    reference = pngs(tmp_path / "w1")
    for other in ("w2", "b3", "b5"):  # bit-identical: every SiT/VAE call has micro_batch rows
        assert all(np.array_equal(a, b) for a, b in zip(reference, pngs(tmp_path / other))), other
    with np.load(tmp_path / "w2" / "samples.npz") as npz:
        assert npz["arr_0"].shape == (7, 64, 64, 3) and npz["arr_0"].dtype == np.uint8
        assert np.array_equal(npz["arr_0"][4], reference[4]) and npz["labels"].shape == (7,)


def test_rerun_generates_only_the_missing_images(setup, tmp_path):
    _, model, vae, _ = setup
    generate(model, vae, tmp_path / "out", SETTINGS, per_device_batch=4)
    before = pngs(tmp_path / "out")
    kept = (tmp_path / "out" / "000001.png").stat().st_mtime_ns
    (tmp_path / "out" / "000005.png").unlink()
    (tmp_path / "out" / "samples.npz").unlink()
    generate(model, vae, tmp_path / "out", SETTINGS, per_device_batch=4)
    assert (tmp_path / "out" / "000001.png").stat().st_mtime_ns == kept
    assert all(np.array_equal(a, b) for a, b in zip(before, pngs(tmp_path / "out")))
    other = SampleSettings(num_samples=7, num_steps=5, seed=3)
    with pytest.raises(ValueError, match="num_steps: was 4, now 5"):
        generate(model, vae, tmp_path / "out", other)
    retrained = tiny_sit("reglue", seed=1).eval()  # same architecture, other weights
    with pytest.raises(ValueError, match="sit_weights: was"):
        generate(retrained, vae, tmp_path / "out", SETTINGS)


@pytest.mark.parametrize("labels", ["foo", "1,x", "", "1,,2"])
def test_bad_label_lists_are_refused_with_the_accepted_forms(labels):
    with pytest.raises(ValueError, match="random, balanced or comma-separated class ids"):
        SampleSettings(labels=labels)


def test_models_load_from_export_training_checkpoint_and_authors_format(setup, tmp_path):
    root, model, _, _ = setup
    x, t, y, cls = torch.randn(2, 20, 8, 8), torch.rand(2), torch.tensor([1, 2]), torch.randn(2, 12)
    expected = model(x, t, y, cls_token=cls)[0]
    exported = load_sampling_model(root / "ema").eval()
    assert torch.equal(exported(x, t, y, cls_token=cls)[0], expected)
    theirs = tiny_sit("reglue", hidden_size=48, num_heads=6).eval()  # SiT-S's 6 heads, fewer blocks and width
    authors = tmp_path / "authors.pt"
    state = {"module." + k: v for k, v in theirs.state_dict().items()}
    torch.save({"model": state, "ema": state, "args": argparse.Namespace(model="SiT-S/2", encoder_depth=1)}, authors)
    loaded = load_sampling_model(authors).eval()
    assert (loaded.config.hidden_size, loaded.config.depth, loaded.config.z_dim) == (48, 2, 12)
    assert loaded.config.path == "linear"  # their default path_type
    cosine = tmp_path / "authors_cosine.pt"
    torch.save({"model": state, "ema": state, "args": argparse.Namespace(model="SiT-S/2", encoder_depth=1,
                                                                          path_type="cosine")}, cosine)
    assert load_sampling_model(cosine).config.path == "cosine"
    assert torch.equal(loaded(x, t, y, cls_token=cls)[0], theirs(x, t, y, cls_token=cls)[0])


def test_config_inferred_from_authors_weights_matches_their_keys(official_vectors):
    c = official_vectors["config"]
    config = config_from_weights(official_vectors["state_dict"], {"model": "SiT-B/2", "encoder_depth": 2})
    assert (config.input_size, config.in_channels, config.hidden_size, config.depth, config.z_dim) == (
        c["input_size"], c["in_ch"], c["hidden"], c["depth"], c["z_dim"])


def test_sample_cli_writes_npz(setup, tmp_path):
    root, _, _, vae_dir = setup
    code = main(["sample", "--ckpt", str(root / "ema"), "--out", str(tmp_path / "cli"), "--num-samples", "3",
                 "--steps", "3", "--mode", "ode", "--heun", "--labels", "balanced", "--vae", str(vae_dir), "--quiet"])
    assert code == 0
    with np.load(tmp_path / "cli" / "samples.npz") as npz:
        assert npz["labels"].tolist() == [0, 1, 2]


def test_model_loads_from_a_training_checkpoint(setup, tmp_path):
    from dataclasses import asdict

    from reglue.checkpoint import save_checkpoint

    _, model, _, _ = setup
    ema = tiny_sit("reglue", seed=1).eval()
    save_checkpoint(tmp_path, 7, {"model": model.state_dict(), "ema": ema.state_dict(),
                                  "sit_config": asdict(model.config)})
    path = tmp_path / "checkpoints" / "step-000000007.pt"
    for weights, expected in (("ema", ema), ("model", model)):
        loaded = load_sampling_model(path, weights)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), expected.state_dict().values()))


def test_the_interpolant_path_travels_with_the_model_into_reglue_sample(setup, tmp_path):
    """A cosine model saved and reloaded is sampled with the cosine score by ``generate``."""
    import json

    from reglue.generate import decode_fixed, initial_noise

    _, _, vae, _ = setup
    cosine = tiny_sit("reglue", path="cosine").eval()
    cosine.save_pretrained(tmp_path / "cosine")
    assert json.loads((tmp_path / "cosine" / "config.json").read_text())["path"] == "cosine"
    loaded = load_sampling_model(tmp_path / "cosine")
    assert loaded.config.path == "cosine"
    settings = SampleSettings(num_samples=2, num_steps=3, guidance=Guidance(scale=2.0), labels="1,2", micro_batch=2)
    generate(loaded, vae, tmp_path / "out", settings, per_device_batch=2)

    def decoded(path):
        noise = [initial_noise(i, settings.seed, loaded) for i in range(2)]
        x = sample_sde(loaded, torch.stack([n[0] for n in noise]), torch.tensor([1, 2]),
                       torch.stack([n[1] for n in noise]), num_steps=3, guidance=settings.guidance, path=path,
                       noise_generators=[n[2] for n in noise], micro_batch=2)
        return decode_fixed(vae, x[:, :4].float(), 2).permute(0, 2, 3, 1).numpy()

    got = np.stack(pngs_of(tmp_path / "out", 2))
    assert np.array_equal(got, decoded("cosine"))
    assert not np.array_equal(got, decoded("linear"))  # what `reglue sample` drew before the path travelled


def test_a_training_state_of_another_kind_is_refused_for_sampling(tmp_path):
    from reglue.checkpoint import save_state_file

    path = save_state_file(tmp_path / "train_state.pt", 3, {"kind": "semantic-compressor", "weights": {}})
    with pytest.raises(ValueError, match="another kind \\(semantic-compressor\\), not a SiT checkpoint"):
        load_sampling_model(path)
    with pytest.raises(ValueError, match="weights must be ema or model"):
        load_sampling_model(path, "best")


def test_configs_without_a_path_load_as_linear_and_checkpoints_take_the_runs_path(setup, tmp_path):
    import json
    from dataclasses import asdict

    from reglue.checkpoint import save_checkpoint

    _, model, _, _ = setup
    model.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["path"]  # written before SiTConfig.path existed
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    assert load_sampling_model(tmp_path / "old").config.path == "linear"
    sit_config = {k: v for k, v in asdict(model.config).items() if k != "path"}
    save_checkpoint(tmp_path, 3, {"model": model.state_dict(), "ema": model.state_dict(), "sit_config": sit_config,
                                  "config": {"loss": {"path": "cosine"}}})
    assert load_sampling_model(tmp_path / "checkpoints" / "step-000000003.pt").config.path == "cosine"
    with pytest.raises(ValueError, match="path must be one of"):
        tiny_sit("reglue", path="vp")


@pytest.mark.parametrize("flags,message", [
    (["--cfg-scale", "0.5"], "guidance scale must be >= 1"),
    (["--cfg-scale", "1", "--cls-cfg-scale", "0.5"], "would be ignored"),
    (["--vae-only-cfg"], "needs a guidance scale > 1"),
    (["--mode", "ode", "--cfg-scale", "2", "--vae-only-cfg"], "SDE sampler only"),
    (["--heun"], "correction of the ODE sampler"),
    (["--guidance-interval", "0.9", "0.1"], "0 <= LOW <= HIGH <= 1"),
])
def test_sample_cli_refuses_guidance_that_would_do_nothing(setup, tmp_path, capsys, flags, message):
    root, _, _, vae_dir = setup
    code = main(["sample", "--ckpt", str(root / "ema"), "--out", str(tmp_path / "x"), "--num-samples", "1",
                 "--steps", "2", "--vae", str(vae_dir), "--quiet", *flags])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_grid_cli_takes_every_guidance_option(setup, tmp_path):
    root, _, _, vae_dir = setup
    from PIL import Image

    common = ["grid", "--ckpt", str(root / "ema"), "--classes", "1,2", "--per-class", "1", "--steps", "3",
              "--vae", str(vae_dir)]  # SDE grid times 1, 0.52, 0.04
    assert main([*common, "--cfg-scale", "3", "--guidance-interval", "0", "0.7", "--out", str(tmp_path / "a.png")]) == 0
    assert main([*common, "--cfg-scale", "3", "--guidance-interval", "0", "0.2", "--out", str(tmp_path / "b.png")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "ab")
    assert not np.array_equal(a, b)  # the interval reaches the sampler
    assert main([*common, "--cfg-scale", "1", "--cls-cfg-scale", "4", "--out", str(tmp_path / "cls.png")]) == 0
    assert main([*common, "--mode", "ode", "--out", str(tmp_path / "ode.png")]) == 0


def test_image_sampler_gives_the_images_of_reglue_sample(setup, tmp_path):
    from reglue.generate import ImageSampler

    root, _, _, vae_dir = setup
    assert main(["sample", "--ckpt", str(root / "ema"), "--out", str(tmp_path / "cli"), "--num-samples", "3",
                 "--steps", "3", "--cfg-scale", "2", "--guidance-interval", "0", "0.9", "--labels", "4,1,7",
                 "--seed", "5", "--micro-batch", "4", "--vae", str(vae_dir), "--quiet"]) == 0
    sampler = ImageSampler.from_pretrained(root / "ema", vae=vae_dir, device="cpu")
    options = {"guidance": Guidance(scale=2.0, high=0.9), "num_steps": 3, "seed": 5, "micro_batch": 4,
               "precision": "fp32"}  # the command's default; ImageSampler's depends on the hardware
    images = sampler([4, 1, 7], output_type="np", batch_size=2, **options)
    assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8
    assert np.array_equal(images, np.stack(pngs_of(tmp_path / "cli", 3)))
    pil = sampler([4, 1, 7], **options)
    assert [p.size for p in pil] == [(64, 64)] * 3 and np.array_equal(np.asarray(pil[2]), images[2])
    with pytest.raises(ValueError, match="labels is empty"):
        sampler([])
    with pytest.raises(ValueError, match="output_type"):
        sampler([1], output_type="tensor")


def test_grid_cli_writes_a_labelled_grid(setup, tmp_path):
    from PIL import Image

    root, _, _, vae_dir = setup
    code = main(["grid", "--ckpt", str(root / "ema"), "--classes", "1,2,3", "--per-class", "2", "--steps", "2",
                 "--out", str(tmp_path / "grid.png"), "--vae", str(vae_dir)])
    assert code == 0
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (3 * 64, 2 * 64 + 16)
    header = np.asarray(grid)[:16]
    assert (header < 128).any()  # the class labels are drawn


def test_two_processes_under_torchrun_give_the_same_images(setup, tmp_path):
    root, _, _, vae_dir = setup
    common = ["sample", "--ckpt", str(root / "ema"), "--num-samples", "5", "--steps", "3", "--cfg-scale", "2",
              "--per-device-batch", "2", "--vae", str(vae_dir), "--quiet"]
    run_processes([*common, "--out", str(tmp_path / "ddp")], processes=2, timeout=240)
    run_processes([*common, "--out", str(tmp_path / "one")], timeout=240)
    for name in ("samples.npz", *[f"{i:06d}.png" for i in range(5)]):
        assert (tmp_path / "ddp" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_killed_run_restarted_gives_the_images_of_an_uninterrupted_one(setup, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    root, _, _, vae_dir = setup
    command = [sys.executable, "-m", "reglue", "sample", "--ckpt", str(root / "ema"), "--num-samples", "12",
               "--steps", "20", "--per-device-batch", "1", "--vae", str(vae_dir), "--quiet", "--out"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([*command, str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "killed").glob("0*.png"))) < 2 and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "samples.npz").exists()  # it died mid-run
    subprocess.run([*command, str(tmp_path / "killed")], env=env, check=True, capture_output=True, timeout=240)
    subprocess.run([*command, str(tmp_path / "clean")], env=env, check=True, capture_output=True, timeout=240)
    assert not list((tmp_path / "killed").glob(".*tmp*"))
    for i in range(12):
        assert (tmp_path / "killed" / f"{i:06d}.png").read_bytes() == (tmp_path / "clean" / f"{i:06d}.png").read_bytes()


def test_authors_checkpoint_loads_for_sampling_and_reproduces_their_sde_samples(official_vectors, tmp_path):

    state = {"module." + k: v for k, v in official_vectors["state_dict"].items()}
    path = tmp_path / "authors.pt"
    args = argparse.Namespace(model="SiT-B/2", encoder_depth=official_vectors["config"]["enc_depth"])
    torch.save({"model": state, "ema": state, "opt": {}, "args": args, "steps": 1000}, path)
    model = load_sampling_model(path, num_heads=official_vectors["config"]["heads"]).eval()
    for case in official_vectors["sde_samples"]:
        p = case["params"]
        torch.manual_seed(case["torch_manual_seed"])
        out = sample_sde(model, case["latents"], case["y"], case["cls_latents"], num_steps=p["num_steps"],
                         guidance=Guidance(scale=p["cfg_scale"], cls_scale=p["cls_cfg_scale"],
                                           low=p["guidance_low"], high=p["guidance_high"]))
        assert (out - case["out"]).abs().max() < 1e-5


def test_sample_and_grid_decode_with_the_weight_free_pixel_autoencoder(setup, tmp_path):
    from PIL import Image

    root = setup[0]
    assert main(["sample", "--ckpt", str(root / "ema"), "--out", str(tmp_path / "px"), "--num-samples", "2",
                 "--steps", "2", "--mode", "ode", "--vae", "pixel", "--quiet"]) == 0
    with np.load(tmp_path / "px" / "samples.npz") as npz:
        assert npz["arr_0"].shape == (2, 64, 64, 3)  # 8×8 latents, factor 8
    assert main(["grid", "--ckpt", str(root / "ema"), "--classes", "1,2", "--steps", "2", "--vae", "pixel",
                 "--out", str(tmp_path / "grid.png")]) == 0
    assert Image.open(tmp_path / "grid.png").width == 2 * 64


def test_image_sampler_computes_only_the_rows_asked_for(setup):
    """Its default (micro_batch None) pads nothing: 2 guided images are calls of 4 rows (2 outside
    the guidance interval), not a micro-batch of 32; the same call gives the same images."""
    from reglue.generate import ImageSampler

    _, model, vae, _ = setup
    sampler = ImageSampler(model, vae)
    rows: list[int] = []
    hook = model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        images = sampler([4, 1], guidance=Guidance(scale=2.0, high=0.9), num_steps=3, output_type="np")
    finally:
        hook.remove()
    assert rows == [2, 4, 4]  # t = 1.0 lies outside [0, 0.9]
    again = sampler([4, 1], guidance=Guidance(scale=2.0, high=0.9), num_steps=3, output_type="np")
    assert np.array_equal(images, again)


def test_reglue_sample_refuses_settings_without_a_fixed_micro_batch(setup, tmp_path):
    from dataclasses import replace

    _, model, vae, _ = setup
    with pytest.raises(ValueError, match="fixed micro_batch"):
        generate(model, vae, tmp_path / "out", replace(SETTINGS, micro_batch=None))
    assert not (tmp_path / "out").exists()


CPUINFO = """processor\t: 0
vendor_id\t: {vendor}
model name\t: a CPU
flags\t\t: fpu sse avx2 {flags}

processor\t: 1
vendor_id\t: {vendor}
"""


@pytest.mark.parametrize(("vendor", "flags", "amx", "expected"), [
    ("AuthenticAMD", "avx512f avx512_bf16", False, "bf16"),   # Zen 4: bf16 matmuls at 2.2-2.3x fp32's rate
    ("GenuineIntel", "avx512f avx512_bf16 avx512_fp16", False, "fp32"),  # Xeon, AMX hidden: bf16 at half
    ("AuthenticAMD", "avx512f", False, "fp32"),               # Zen 3 and older: no bf16 dot products
    ("GenuineIntel", "avx512f avx512_bf16 amx_tile", True, "bf16"),
])
def test_image_sampler_samples_in_the_faster_precision_of_its_device(monkeypatch, tmp_path, vendor, flags, amx,
                                                                      expected):
    from reglue import generate as module

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO.format(vendor=vendor, flags=flags))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert module.cpu_bf16_is_faster(cpuinfo) == (expected == "bf16")
    monkeypatch.setattr(module, "cpu_bf16_is_faster", lambda: expected == "bf16")
    assert module.fast_precision(torch.device("cpu")) == expected
    assert module.fast_precision(torch.device("cuda")) == "bf16"


def test_without_a_readable_cpuinfo_only_amx_counts_as_fast_bf16(monkeypatch, tmp_path):
    from reglue.generate import cpu_bf16_is_faster

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not cpu_bf16_is_faster(tmp_path / "missing")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert cpu_bf16_is_faster(tmp_path / "missing")
