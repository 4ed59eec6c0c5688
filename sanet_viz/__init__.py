"""sanet-viz: see what Shuffle Attention (SA-Net, ICASSP 2021) changes inside a ResNet50."""

__version__ = "0.1.0"
