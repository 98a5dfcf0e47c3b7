"""``reglue evaluate``: the ADM suite (FID, sFID, IS, precision, recall) and FD_DINOv2 of a samples .npz."""

from __future__ import annotations

import argparse

from reglue.cli.options import (
    add_micro_batch,
    add_resolution_check,
    add_settings,
    load_command_settings,
    vfm_values,
)

NAME = "evaluate"
HELP = ("ADM suite (FID, sFID, IS, precision, recall) and FD_DINOv2; only the metrics asked for "
        "(docs/evaluation.md)")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ref", required=True, help="ADM reference batch .npz (e.g. VIRTUAL_imagenet256_labeled.npz)")
    parser.add_argument("--samples", required=True, help="samples .npz from `reglue sample`")
    add_settings(parser, "the EvaluateSettings (reglue.metrics.evaluate)", "metrics=[fid,fd_dinov2]")
    parser.add_argument("--metrics", default=None,
                        help="comma-separated: fid,sfid,is,pr (Inception), fd_dinov2,pr_dinov2 (fd_NAME,pr_NAME "
                        "with --vfm NAME); default: the ADM suite if --inception is given, plus fd_dinov2 if "
                        "--vfm-weights is")
    parser.add_argument("--inception", default=None,
                        help="weights-inception-2015-12-05-6726825d.pth (torch-fidelity's port), or its folder; "
                        "needed for fid, sfid, is, pr")
    group = parser.add_argument_group("feature space of fd_dinov2 / pr_dinov2", "needed for those metrics")
    group.add_argument("--vfm", default=None,
                       help="registry name (default dinov2_vitl14: DINOv2 ViT-L/14 without registers, FD_DINOv2)")
    group.add_argument("--vfm-weights", default=None,
                       help="e.g. weights/dinov2_vitl14_pretrain.pth (official), a timm file, a `reglue train-vfm` "
                            "folder, or 'random' for tests")
    group.add_argument("--vfm-arch", default=None,
                       help="architecture overrides for small test models, e.g. embed_dim=32,depth=4,num_heads=2")
    parser.set_defaults(vfm_layers=None)  # the feature space uses the final CLS token only
    add_micro_batch(parser, None, "feature network", default_shown=250)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--cache-dir", default=None, help="where computed reference statistics are cached")
    parser.add_argument("--out", default=None, help="JSON results (default SAMPLES.metrics.json)")
    parser.add_argument("--quiet", action="store_true")
    add_resolution_check(parser, "the samples are")


def run(args: argparse.Namespace) -> int:
    import torch

    from reglue.metrics.evaluate import EvaluateSettings, evaluate, format_table, write_results

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    given = [name.strip() for name in args.metrics.split(",") if name.strip()] if args.metrics else None
    settings = load_command_settings(EvaluateSettings, args, {
        "metrics": given, "micro_batch": args.micro_batch, **vfm_values(args)})
    results = evaluate(args.ref, args.samples, metrics=settings.metrics, inception_weights=args.inception,
                       vfm=settings.spec(), batch_size=settings.micro_batch, device=device,
                       cache_dir=args.cache_dir, resolution=args.resolution, progress=not args.quiet)
    out = args.out or str(args.samples).removesuffix(".npz") + ".metrics.json"
    write_results(results, out)
    print(format_table(results))
    print(f"wrote {out}")
    return 0
