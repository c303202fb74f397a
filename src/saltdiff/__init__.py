"""saltdiff: layout-controlled text-to-image generation with spatial-aware latent initialization."""

__version__ = "0.1.0"
