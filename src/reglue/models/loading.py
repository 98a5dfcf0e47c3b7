"""A SiT for sampling from any of the three weight formats users hold.

- an exported folder (``config.json`` + ``model.safetensors``, :meth:`SiT.save_pretrained`),
- one of our training checkpoints (``RUN_DIR/checkpoints/step-*.pt``, :mod:`reglue.checkpoint`),
- the authors' ``.pt`` (:mod:`reglue.models.official`; the architecture is read off the weights).
"""

from __future__ import annotations

from pathlib import Path

from reglue.checkpoint import FORMAT, load_checkpoint
from reglue.errors import InputError
from reglue.models.official import load_authors_checkpoint
from reglue.models.sit import SIT_SIZES, SiT, SiTConfig, sit_config
from reglue.state_dict import load_state_dict_strict, strip_module_prefix


def load_sampling_model(path: str | Path, weights: str = "ema", **overrides) -> SiT:
    """A SiT from an exported folder (``config.json`` + ``model.safetensors``), one of our training
    checkpoints (``weights`` = "ema" or "model"), or the authors' ``.pt`` (config inferred from the
    weights and their ``args``; ``overrides`` — e.g. ``num_heads`` for a non-registered size — win)."""
    if weights not in ("ema", "model"):
        raise InputError(f"weights must be ema or model, found {weights!r}.")
    path = Path(path)
    if path.is_dir():
        return SiT.from_pretrained(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; pass RUN_DIR/ema, a checkpoint .pt or the authors' .pt.")
    try:
        payload = load_checkpoint(path)
    except ValueError:
        payload = None
    if payload is not None and payload.get("format") == FORMAT:
        if "sit_config" not in payload:
            raise InputError(f"{path} is a reglue training state of another kind ({payload.get('kind', 'unknown')}), "
                             "not a SiT checkpoint; pass RUN_DIR/ema or RUN_DIR/checkpoints/step-*.pt of `reglue train`.")
        # Checkpoints written before SiTConfig.path existed: the path is the run's loss.path.
        run_path = payload.get("config", {}).get("loss", {}).get("path", "linear")
        model = SiT(SiTConfig(**{"path": run_path, **payload["sit_config"]}))
        model.load_state_dict(payload[weights], strict=True)
        return model
    checkpoint = load_authors_checkpoint(path)
    state = checkpoint.get(weights) or checkpoint.get("ema") or checkpoint["model"]
    model = SiT(config_from_weights(state, checkpoint.get("args") or {}), **overrides)
    load_state_dict_strict(model, state, f"{path} {weights} weights")
    return model


def _size_name(hidden: int, depth: int, patch: int) -> str:
    """The registered size with this width and depth; without one the head count is unknown."""
    for size, (d, h, _, _) in SIT_SIZES.items():
        if (h, d) == (hidden, depth):
            return f"SiT-{size}/{patch}"
    raise InputError(
        f"the checkpoint's width {hidden} and depth {depth} match no registered SiT size and its args name no "
        "model; pass num_heads (load_sampling_model(path, num_heads=...))."
    )


def config_from_weights(state: dict, args: dict) -> SiTConfig:
    """The SiTConfig of an authors' state dict: sizes from the weights, the rest from ``args``."""
    state = strip_module_prefix(state)
    embed = state["x_embedder.proj.weight"]  # (D, C_in, p, p)
    tokens = state["pos_embed"].shape[1]
    use_cls = "cls_projectors2.weight" in state
    grid = round((tokens - int(use_cls)) ** 0.5)
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    z_dim = state["projectors.0.4.weight"].shape[0] if "projectors.0.4.weight" in state else None
    name = args.get("model") or _size_name(embed.shape[0], depth, embed.shape[-1])
    return sit_config(
        name, input_size=grid * embed.shape[-1], patch_size=embed.shape[-1], in_channels=embed.shape[1],
        hidden_size=embed.shape[0], depth=depth, num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1,
        z_dim=z_dim, use_cls_token=use_cls, encoder_depth=args.get("encoder_depth", sit_config(name).encoder_depth),
        projector_dim=state["projectors.0.0.weight"].shape[0] if z_dim else 2048,
        path=args.get("path_type", "linear"),  # their --path-type, the interpolant the weights were trained on
    )
