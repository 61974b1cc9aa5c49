"""instseg: pure-PyTorch instance segmentation."""

__version__ = "0.1.0"
