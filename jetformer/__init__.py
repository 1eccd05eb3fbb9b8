"""JetFormer: an autoregressive model of raw images and text
(Tschannen et al., arXiv 2411.19722)."""
__version__ = "0.1.0"
