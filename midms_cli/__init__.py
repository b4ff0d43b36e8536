"""midms: Matching Interleaved Diffusion Models for exemplar-based image translation."""

__version__ = "0.1.0.dev0"
