"""Options several commands share, in one vocabulary (docs/configuration.md).

- settings: ``--config FILE.yaml`` and ``KEY=VALUE`` overrides of the command's settings dataclass; its
  common flags are shortcuts for keys (:func:`add_settings`, :func:`load_command_settings`);
- precision: ``--precision fp32|bf16|fp16`` (and ``auto`` where the machine decides, :mod:`reglue.precision`);
- batches: ``--global-batch`` (images per step over all processes) and ``--micro-batch`` (rows per network
  call: memory only);
- runs: rerunning a command resumes it; ``--restart`` starts over (``reglue train`` picks a checkpoint with
  ``--resume auto|PATH``);
- an old spelling is refused, naming the new one (:func:`add_renamed`).
"""

from __future__ import annotations

import argparse

from reglue.errors import InputError
from reglue.resolution import check_resolution, confirm_resolution

PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")


# ----------------------------------------------------------------------------- settings
def add_settings(parser: argparse.ArgumentParser, what: str, example: str) -> None:
    """``--config FILE.yaml`` and trailing ``KEY=VALUE`` overrides of ``what`` (a settings dataclass)."""
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help=f"{what} as YAML (every field; the command's flags and KEY=VALUE win over it)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help=f"any field of {what}, e.g. {example} (values parsed as YAML)")


def load_command_settings(cls, args: argparse.Namespace, shortcuts: dict[str, object], *, base=None):
    """``cls`` from ``base`` (a settings instance), the ``--config`` file, the given flag ``shortcuts``
    (key -> value, None = not given) and the ``KEY=VALUE`` overrides, later ones winning."""
    from reglue.config import load_settings

    return load_settings(cls, args.config, args.overrides, values=shortcuts, base=base)


def save_resolved(settings, out_dir, name: str = "settings.yaml") -> None:
    """Write the resolved settings beside a command's outputs (main process only)."""
    from pathlib import Path

    from reglue.config import save_settings
    from reglue.distributed import process_state

    if process_state().is_main_process:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save_settings(settings, Path(out_dir) / name)


# ----------------------------------------------------------------------------- renamed flags
class _Retired(argparse.Action):
    """An option that is gone: using it is a usage error saying what to write instead."""

    def __init__(self, option_strings, dest, *, why: str, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs="?", help=argparse.SUPPRESS)
        self.why = why

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} {self.why}")


def add_renamed(parser: argparse.ArgumentParser, old: str, new: str, note: str = "") -> None:
    """Refuse ``old`` (hidden from --help), naming ``new``."""
    add_retired(parser, old, f"was renamed {new}{f' ({note})' if note else ''}.")


def add_retired(parser: argparse.ArgumentParser, old: str, why: str) -> None:
    """Refuse ``old`` (hidden from --help) with ``why`` (what to write instead)."""
    parser.add_argument(old, action=_Retired, why=why)


# ----------------------------------------------------------------------------- precision and batches
def add_precision(parser: argparse.ArgumentParser, *, default: str | None, what: str,
                  choices: tuple[str, ...] = PRECISION_CHOICES) -> None:
    shown = f" (default {default})" if default else ""
    parser.add_argument("--precision", choices=choices, default=default,
                        help=f"{what}: {' | '.join(choices)}{shown}; auto = bf16 on a GPU that has it, else fp32")
    add_renamed(parser, "--autocast", "--precision", "none is now fp32")


def autocast(word: str):
    """The autocast type of a ``--precision`` word on this machine's device (None: fp32)."""
    import torch

    from reglue.precision import autocast_dtype

    return autocast_dtype(word, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def add_micro_batch(parser: argparse.ArgumentParser, default: int | None, what: str, *,
                    default_shown: int | None = None) -> None:
    """``--micro-batch``; ``default`` None: a settings field's shortcut, whose default is ``default_shown``."""
    parser.add_argument("--micro-batch", type=int, default=default,
                        help=f"rows per {what} call (memory only; default {default or default_shown})")
    add_renamed(parser, "--batch-size", "--micro-batch")


# ----------------------------------------------------------------------------- resolution
def _resolution(text: str) -> int:
    """argparse type of --resolution: a supported side (reglue.resolution), else a usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"resolution must be an integer, found {text!r}.") from None
    try:
        return check_resolution(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_resolution(parser: argparse.ArgumentParser, default: int | None, what: str, *, extra: str = "") -> None:
    shown = f" (default {default})" if default is not None else ""
    parser.add_argument("--resolution", type=_resolution, default=default, metavar="R",
                        help=f"{what} side R: a multiple of 64 from 64 to 512{shown}; latents R/8, "
                        f"SiT tokens and VFM patches (R/16)²; later steps read it from the data's manifest{extra}")


def add_resolution_check(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--resolution", type=_resolution, default=None, metavar="R",
                        help=f"optional check: the side {what} is at, else refused (default: read from it; "
                        "R is chosen once, by `reglue prepare --resolution R`)")


def confirm_data_resolution(args: argparse.Namespace) -> None:
    """Refuse a --resolution that is not the one DATA was prepared at (before any work)."""
    if args.resolution is not None:
        from reglue.data.store import prepared_resolution

        prepared_resolution(args.data, args.resolution)


def confirm_model_resolution(args: argparse.Namespace, model) -> None:
    """Refuse a --resolution that is not the one the model was trained at (before any work)."""
    confirm_resolution(args.resolution, model.config.image_size, where=f"the model {args.ckpt}", remedy=(
        "A model samples at the resolution it was trained at: leave out --resolution, or pass a model trained "
        f"at {args.resolution}²."))


# ----------------------------------------------------------------------------- the VFM
def add_vfm_options(parser: argparse.ArgumentParser, required_note: str) -> None:
    group = parser.add_argument_group("vision foundation model", required_note)
    group.add_argument("--vfm", default=None, help="registry name (default dinov2_vitb14_reg; also DINOv3, "
                       "clip_vitl14, siglip_vitb16, mae_vitb16, mae_vitl16, ijepa_vith14: docs/vfm.md)")
    group.add_argument("--vfm-weights", default=None,
                       help="the VFM's weights file (official layout or timm's .safetensors; docs/vfm.md lists "
                            "each teacher's), a `reglue train-vfm` folder (its teacher.json gives name and "
                            "architecture), or 'random' for a weight-free demo")
    group.add_argument("--vfm-layers", default=None, help="0-based blocks, e.g. 8,9,10,11 (default: last four)")
    group.add_argument("--vfm-arch", default=None,
                       help="architecture overrides for small models, e.g. embed_dim=64,depth=12,num_heads=2")


def vfm_values(args: argparse.Namespace) -> dict[str, object]:
    """The VFM flags as the settings keys ``vfm.name``, ``vfm.weights``, ``vfm.layers``, ``vfm.arch`` (None:
    not given); the settings resolve them (``VFMSpec.from_mapping``: a `reglue train-vfm` folder as
    --vfm-weights names its own VFM and architecture)."""
    layers = [int(v) for v in args.vfm_layers.split(",")] if args.vfm_layers else None
    arch = {}
    for item in filter(None, (args.vfm_arch or "").split(",")):
        key, _, value = item.partition("=")
        if not value.isdigit():
            raise InputError(f"--vfm-arch expects key=integer pairs like depth=12, found {item!r}.")
        arch[key.strip()] = int(value)
    return {"vfm.name": args.vfm, "vfm.weights": args.vfm_weights, "vfm.layers": layers, "vfm.arch": arch or None}


def add_feature_options(parser: argparse.ArgumentParser, *, vfm_note: str) -> None:
    """The options of a command that runs the frozen VFM over DATA (norm-stats, fit-pca, cache-semantics):
    the shortcuts of ``reglue.pipeline.FeatureSettings`` (:func:`feature_values`), --quiet, and --resolution
    as a check."""
    add_micro_batch(parser, None, "VFM", default_shown=64)
    add_precision(parser, default=None, what="the VFM's autocast (default auto)")
    parser.add_argument("--quiet", action="store_true")
    add_vfm_options(parser, vfm_note)
    add_resolution_check(parser, "DATA was prepared")


def feature_values(args: argparse.Namespace) -> dict[str, object]:
    """The FeatureSettings keys the command line gave (micro_batch, precision, the VFM's); None: not given."""
    return {"micro_batch": args.micro_batch, "precision": args.precision, **vfm_values(args)}


# ----------------------------------------------------------------------------- guidance
def add_guidance_options(parser: argparse.ArgumentParser, defaults: str) -> None:
    group = parser.add_argument_group("classifier-free guidance", f"defaults: {defaults} (docs/sampling.md)")
    group.add_argument("--cfg-scale", type=float, default=None, help="guidance scale w >= 1 (1 = no guidance)")
    group.add_argument("--cls-cfg-scale", type=float, default=None,
                       help="CLS guidance scale (default: --cfg-scale; 0: conditional CLS drift); > 1 guides alone")
    group.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                       help="guide only steps starting at t in [LOW, HIGH]")
    group.add_argument("--vae-only-cfg", action="store_true",
                       help="SDE only: the authors' --vae_cfg rule (docs/architecture.md)")


def guidance_values(args: argparse.Namespace) -> dict[str, object]:
    """The guidance flags as settings keys (``guidance.scale`` ...); None where not given."""
    low, high = args.guidance_interval or (None, None)
    return {"guidance.scale": args.cfg_scale, "guidance.cls_scale": args.cls_cfg_scale, "guidance.low": low,
            "guidance.high": high, "guidance.vae_only": True if args.vae_only_cfg else None}
