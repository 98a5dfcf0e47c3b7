"""The five methods of the paper as data (SPEC §7 table).

A preset says which parts of the joint model are switched on; the model builder, the
loss and the samplers read these fields instead of branching on the method's name.

| preset   | latent | local semantics               | CLS modelled | REPA target    | FID (B/2, 400K) |
|----------|--------|-------------------------------|--------------|----------------|-----------------|
| sit      | yes    | -                             | -            | -              | 33.0            |
| repa     | yes    | -                             | -            | patches        | 24.4            |
| redi     | yes    | PCA r=8 of the last layer     | -            | -              | 21.4            |
| reg      | yes    | -                             | yes          | [CLS; patches] | 15.2            |
| reglue   | yes    | compressor, last 4 layers, 16 | yes          | [CLS; patches] | 12.9            |

The FIDs are the paper's Table 1 (FID-50K, no guidance, SiT-B/2 at batch 256); REGLUE's 14.5 at
300K steps is the one earlier point it reports for B/2, and REGLUE SiT-XL/2's unguided curve (50K to 1M
steps) is kept as ``paper_fids_xl2``. ``reglue plot --paper`` draws them as markers (docs/reproduce.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from reglue.errors import InputError

PAPER_MODEL = "SiT-B/2"  # the model size of every paper FID below
PAPER_STEPS = 400_000  # the training step of Preset.paper_fid
PAPER_BATCH = 256  # the paper's global batch: images seen = steps × 256


@dataclass(frozen=True, kw_only=True)
class Preset:
    """Which parts of REGLUE's joint model a method uses, and its loss weights."""

    name: str
    semantics: str | None  # None, "compressor" or "pca": how local VFM semantics are compressed
    semantic_channels: int  # S, stacked after the 4 latent channels
    semantic_layers: int  # how many of the VFM's last blocks feed the local semantics
    cls_token: bool  # jointly model the VFM [CLS] token
    repa: bool  # REPA alignment of the projector at encoder_depth
    lambda_sem: float
    lambda_cls: float
    lambda_rep: float
    paper_fid: float  # SiT-B/2 at 400K steps, no guidance (paper)
    paper_fid_earlier: tuple[tuple[int, float], ...] = ()  # (step, FID) the paper also reports for SiT-B/2
    paper_fids_xl2: tuple[tuple[int, float], ...] = ()  # (step, FID) of SiT-XL/2 without guidance (paper)

    def paper_fids(self, model: str = PAPER_MODEL) -> tuple[tuple[int, float], ...]:
        """(step, FID-50K) of this method at ``model`` without guidance, as the paper reports them (none for
        a size it does not report)."""
        if model == PAPER_MODEL:
            return (*self.paper_fid_earlier, (PAPER_STEPS, self.paper_fid))
        return self.paper_fids_xl2 if model == "SiT-XL/2" else ()

    @property
    def repa_target(self) -> str | None:
        """The VFM tokens the projector aligns to: [CLS; patches] when CLS is modelled."""
        if not self.repa:
            return None
        return "cls_patches" if self.cls_token else "patches"

    def model_kwargs(self, *, latent_channels: int = 4, vfm_dim: int = 768) -> dict:
        """:class:`~reglue.models.SiTConfig` fields this preset fixes."""
        needs_vfm_width = self.repa or self.cls_token
        return {
            "in_channels": latent_channels + self.semantic_channels,
            "use_cls_token": self.cls_token,
            "z_dim": vfm_dim if needs_vfm_width else None,
        }

    def loss_kwargs(self) -> dict:
        """:class:`~reglue.transport.JointLoss` weights of this preset."""
        return {
            "lambda_sem": self.lambda_sem,
            "lambda_cls": self.lambda_cls if self.cls_token else 0.0,
            "lambda_rep": self.lambda_rep if self.repa else 0.0,
        }


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(name="sit", semantics=None, semantic_channels=0, semantic_layers=0, cls_token=False, repa=False,
               lambda_sem=0.0, lambda_cls=0.0, lambda_rep=0.0, paper_fid=33.0),
        Preset(name="repa", semantics=None, semantic_channels=0, semantic_layers=0, cls_token=False, repa=True,
               lambda_sem=0.0, lambda_cls=0.0, lambda_rep=0.5, paper_fid=24.4),
        Preset(name="redi", semantics="pca", semantic_channels=8, semantic_layers=1, cls_token=False, repa=False,
               lambda_sem=1.0, lambda_cls=0.0, lambda_rep=0.0, paper_fid=21.4),
        Preset(name="reg", semantics=None, semantic_channels=0, semantic_layers=0, cls_token=True, repa=True,
               lambda_sem=0.0, lambda_cls=0.03, lambda_rep=0.5, paper_fid=15.2),
        Preset(name="reglue", semantics="compressor", semantic_channels=16, semantic_layers=4, cls_token=True,
               repa=True, lambda_sem=1.0, lambda_cls=0.03, lambda_rep=0.5, paper_fid=12.9,
               paper_fid_earlier=((300_000, 14.5),),
               paper_fids_xl2=((50_000, 20.0), (100_000, 7.8), (200_000, 4.6), (400_000, 3.2), (700_000, 2.7),
                               (1_000_000, 2.5))),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return PRESETS[name]
