"""What the torchvision reference fixture (``fixtures/torchvision``) and its test share: the
rule that fills a state dict of given key names and shapes with deterministic weights and
the rule that draws the two test images. Both use only integer seeds and ``torch.rand``
(uniform draws, the same bytes in any torch build on any CPU), so the fixture script, run
beside torchvision in its own virtualenv, and the test, run here, build the same weights and
images without a large file in the repository. Imports torch only."""

from __future__ import annotations

import math
import zlib

import torch

# (height, width) of the two test images: one is shrunk (x0.96), one enlarged (x1.01), and
# they are padded together to 288 x 288, whose 5-cell P6 makes torchvision's anchors step by
# 288 // 5 = 57 pixels instead of 64.
IMAGE_SIZES = ((200, 300), (260, 190))
MIN_SIZE, MAX_SIZE = 192, 320
DETECTIONS = 50  # per image (torchvision's box_detections_per_img)
PROPOSALS = 300  # per image (rpn_post_nms_top_n_test; its pre-NMS 1000 per level stays)
CLASSIFIER_GAIN = 6.0  # spreads the 91-way softmax so that detections clear 0.05


def _uniform(shape: tuple[int, ...], key: str, low: float, high: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float32)


def rule_weights(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Deterministic weights for torchvision key names: normalisation buffers near their
    identity, biases small, weights uniform with variance ``1 / fan_in`` (the classifier's
    ``CLASSIFIER_GAIN`` times larger in scale)."""
    out = {}
    for key, shape in sorted(shapes.items()):
        shape = tuple(shape)
        if key.endswith("running_var"):
            t = _uniform(shape, key, 0.5, 1.5)
        elif key.endswith("running_mean"):
            t = _uniform(shape, key, -0.1, 0.1)
        elif len(shape) == 1 and key.endswith("weight"):  # a norm layer's scale
            t = _uniform(shape, key, 0.5, 1.0)
        elif key.endswith("bias"):
            t = _uniform(shape, key, -0.05, 0.05)
        else:
            bound = math.sqrt(3.0 / math.prod(shape[1:]))
            if "cls_score" in key:
                bound *= CLASSIFIER_GAIN
            t = _uniform(shape, key, -bound, bound)
        out[key] = t
    return out


def rule_image(index: int) -> torch.Tensor:
    """Test image ``index`` as ``(H, W, 3)`` uint8 RGB: 10-pixel blocks of random colour with
    a diagonal ramp (integer arithmetic only)."""
    height, width = IMAGE_SIZES[index]
    gen = torch.Generator().manual_seed(1000 + index)
    blocks = (torch.rand((height // 10 + 1, width // 10 + 1, 3), generator=gen) * 200).long()
    image = blocks.repeat_interleave(10, 0).repeat_interleave(10, 1)[:height, :width]
    ramp = (torch.arange(height)[:, None] + torch.arange(width)[None, :]) // 8
    return ((image + ramp[..., None]) % 256).to(torch.uint8)
