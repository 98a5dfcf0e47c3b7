"""reglue: latent diffusion jointly modelling SD-VAE latents, compressed DINOv2 semantics
and the DINOv2 [CLS] token in one SiT (REGLUE, arXiv 2512.16636)."""

__version__ = "0.1.0"
