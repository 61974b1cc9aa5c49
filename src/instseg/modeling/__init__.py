"""Models: backbones, necks, dense and RoI heads, and the detectors built from them."""
