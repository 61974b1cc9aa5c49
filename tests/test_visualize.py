import numpy as np
import torch

from instseg.structures import Instances
from instseg.visualize import draw_instances, palette


def test_overlay_tints_masks_draws_boxes_and_respects_the_threshold():
    image = np.full((60, 80, 3), 100, np.uint8)
    masks = torch.zeros(2, 60, 80, dtype=torch.bool)
    masks[0, 10:30, 10:40] = True
    masks[1, 35:55, 45:75] = True
    instances = Instances(
        torch.tensor([[10.0, 10, 40, 30], [45, 35, 75, 55]]),
        torch.tensor([0.9, 0.2]),
        torch.tensor([0, 1]),
        masks,
    )
    out = np.asarray(draw_instances(image, instances, ["cat", "dog"], score_thr=0.5))
    assert out.shape == image.shape
    colour = np.asarray(palette(2)[0], np.float32)
    inside = out[20, 25].astype(np.float32)
    np.testing.assert_allclose(inside, 0.55 * 100 + 0.45 * colour, atol=1.5)
    assert (out[45, 60] == 100).all()  # below the threshold: untouched
    assert (out[40, 10] == palette(2)[0]).all() or (out[30, 10] == palette(2)[0]).all()
    assert len(set(palette(10))) == 10
