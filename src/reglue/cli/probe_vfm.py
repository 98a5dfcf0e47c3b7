"""``reglue probe-vfm``: k-NN / linear probe and spatial structure (LDS, CDS) of any VFM, or of a finished
teacher against its untrained self."""

from __future__ import annotations

import argparse

from reglue.cli.options import add_resolution, add_vfm_options, vfm_values
from reglue.errors import InputError

NAME = "probe-vfm"
HELP = "rank VFMs before training: k-NN / linear probe and spatial structure (LDS) on held-out images"
DESCRIPTION = ("`reglue probe-vfm DATA --vfm NAME --vfm-weights FILE --out DIR`: k-NN and linear-probe accuracy of "
               "the VFM's CLS features and the spatial structure of its patch tokens (iREPA's LDS and CDS) on "
               "held-out labelled images of DATA, to rank teachers before training. `reglue probe-vfm TEACHER "
               "DATA`: the same for a finished `reglue train-vfm` folder on the data it was trained on (its own "
               "held-out split), against the same network untrained. Writes report.json and report.md "
               "(docs/teacher.md).")
MODE_FIX = ("pass either DATA with --vfm-weights (any VFM; a teacher folder too) and --out, or TEACHER DATA "
            "(a teacher against its untrained self)")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("teacher", nargs="?", metavar="TEACHER",
                        help="a finished `reglue train-vfm` output folder, probed against its untrained self on the "
                        "data it was trained on (leave out to probe the VFM given by --vfm-weights)")
    parser.add_argument("data", metavar="DATA", help="labelled images: a prepared dataset, or an image folder or zip "
                        "with one sub-folder per class (the teacher's own data with TEACHER)")
    parser.add_argument("--out", default=None,
                        help="folder for report.json / report.md (required with --vfm-weights; default: TEACHER)")
    parser.add_argument("--probe-train-images", type=int, default=None,
                        help="training images the probes fit on at most (default: the teacher's setting, 50,000)")
    parser.add_argument("--probe-held-out-images", type=int, default=None,
                        help="held-out images scored at most (default: the teacher's setting, 10,000)")
    parser.add_argument("--max-held-out-fraction", type=float, default=None,
                        help="with --vfm-weights: at most this share of each class is held out (default 0.25, a "
                        "default teacher's, so its held-out images are the same ones)")
    parser.add_argument("--seed", type=int, default=None,
                        help="with --vfm-weights: the held-out split's seed (default 0)")
    add_resolution(parser, None, "with --vfm-weights, an image folder's crop", extra=" (default 256)")
    parser.add_argument("--device", default=None, help="default: cuda if available (with --vfm-weights, each "
                        "process's own GPU under torchrun / accelerate launch), else cpu")
    add_vfm_options(parser, "with DATA alone, required: --vfm-weights (and --vfm, --vfm-arch where it is not DINOv2-B "
                    "or a teacher folder)")


def run(args: argparse.Namespace) -> int:
    return _teacher(args) if args.teacher else _vfm(args)


def _teacher(args: argparse.Namespace) -> int:
    import torch

    from reglue.training.teacher import probe_teacher

    options = {"--vfm*": any(v is not None for v in vfm_values(args).values()),
               "--max-held-out-fraction": args.max_held_out_fraction is not None, "--seed": args.seed is not None,
               "--resolution": args.resolution is not None}
    given = [flag for flag, value in options.items() if value]
    if given:
        raise InputError(f"{', '.join(given)} cannot go with TEACHER (its held-out split and VFM are its own); "
                         f"{MODE_FIX}.")
    report = probe_teacher(args.teacher, args.data, out=args.out, probe_train_images=args.probe_train_images,
                           probe_held_out_images=args.probe_held_out_images,
                           device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"{report.verdict}; linear probe {report.trained.linear:.3f} trained vs {report.untrained.linear:.3f} "
          f"untrained; LDS {report.trained.lds:.3f} trained vs {report.untrained.lds:.3f} untrained; report in "
          f"{args.out or args.teacher}")
    return 0


def _vfm(args: argparse.Namespace) -> int:
    from reglue.distributed import process_state
    from reglue.encoders.semantics import VFMSpec
    from reglue.metrics.vfm_probe import probe_vfm

    vfm = {key.removeprefix("vfm."): value for key, value in vfm_values(args).items() if value is not None}
    if "weights" not in vfm or args.out is None:
        raise InputError(f"probing a VFM needs --vfm-weights and --out; {MODE_FIX}.")
    caps = {"train_images": args.probe_train_images, "held_out_images": args.probe_held_out_images,
            "max_held_out_fraction": args.max_held_out_fraction, "seed": args.seed}
    report = probe_vfm(VFMSpec.from_mapping(vfm), args.data, args.out, resolution=args.resolution,
                       device=args.device, **{key: value for key, value in caps.items() if value is not None})
    if process_state().is_main_process:
        print(f"{report.headline}; report in {args.out}")
    return 0
