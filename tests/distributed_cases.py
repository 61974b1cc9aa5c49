"""Short training runs of every detector kind, for the "2 processes x 2 images equals 1
process x 4 images" test (tests/test_distributed.py).

``python tests/distributed_cases.py OUT ANN IMAGES CASE...`` trains each case into
``OUT/CASE`` (``log.jsonl``, ``model_final.safetensors``) through ``run_train``, as one
process, or data-parallel when started by ``torchrun`` (the process group is joined once
for all cases). A case is a zoo config name, narrowed to CPU widths, optionally followed
by ``+KEY=VALUE`` overrides.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from instseg.configs import apply_overrides, get_config
from instseg.engine.distributed import (
    environment,
    init_process_group,
    leave_process_group,
)
from instseg.runner import run_train
from test_training import narrow

# Two scales, so that the images of a batch differ in size and the ranks' padded shapes
# differ; no warmup and a real learning rate, so that the second iteration runs on weights
# the first update changed. Backbone BatchNorm in eval mode (the small configs train it):
# a BN in training mode normalises each process's images (use SyncBN for the global batch's
# statistics; a case below does). The backbone keeps the official conv-then-norm order:
# with its norms folded into the convs (float32 rounding that differs between a batch of 4
# and two of 2) IFR's iteration-2 loss_cls moved by 2e-4, and with SyncBN in training the
# one process's iteration-2 gradient norm by 1.2e-4, while the losses agreed to 1e-6: the
# sensitivity of random-weight near-ties and of batch statistics, not of the split, which
# this compares at 1e-4 (test_backbone checks the folding itself, exactly, in float64).
COMMON = [
    "model.backbone.norm_eval=true",
    "model.backbone.fold_norm=false",
    "data.train_scales=((128,96),(160,120))",
    "data.test_scale=(128,96)",
    "train.batch_size=4",
    "train.max_iters=2",
    "train.log_every=1",
    "train.schedule.warmup_iters=0",
    "train.schedule.base_lr=0.02",
]


def run_case(case: str, out: Path, ann: str, images: str) -> None:
    name, *extra = case.split("+")
    cfg = apply_overrides(get_config(name), [*narrow(name), *COMMON, *extra])
    cfg.num_classes = None  # the dataset's categories
    cfg.data.train_ann, cfg.data.train_images = ann, images
    cfg.data.val_ann = cfg.data.val_images = None
    run_train(cfg, out / case)


def main(argv: list[str]) -> int:
    out, ann, images, *cases = argv
    env = environment()
    if env is not None:
        init_process_group(env, "cpu", timeout_s=300)
    try:
        for case in cases:
            run_case(case, Path(out), ann, images)
    finally:
        leave_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
