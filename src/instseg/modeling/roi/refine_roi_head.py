"""The RefineMask RoI head (official ``RefineRoIHead`` / ``SimpleRefineRoIHead``, spec §3).

Mask R-CNN's RoI head with the RefineMask head (:mod:`.refinemask`) in place of the FCN
mask head. Training: the positive RoIs' targets at every stage size (14, 28, 56, 112), the
semantic target (union of the image's GT masks) for the semantic branch on P2, and the
losses ``loss_mask`` (per-stage, boundary-aware) and ``loss_semantic``. Inference: the
semantic branch once per batch, then the detections in chunks of ``test_chunk_size`` RoIs
(any image mix); the stages are merged as in §3.8 and the 112 x 112 probabilities are pasted
by the shared, memory-bounded paste.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...structures import InstanceTargets
from .refinemask import RefineMaskHead, merge_stages, semantic_target
from .standard import StandardRoIHead, _check_width, boxes_to_rois, crop_mask_targets


class RefineRoIHead(StandardRoIHead):
    """``StandardRoIHead`` whose mask branch is RefineMask; P2 is ``feats[0]``."""

    mask_head: RefineMaskHead

    def _build_mask_head(self, in_channels: int) -> nn.Module:
        cfg = self.cfg.refine_mask
        _check_width(self.mask_roi_extractor, cfg.in_channels, "refine_mask")
        if cfg.semantic_in_channels != in_channels:
            raise ValueError(
                f"roi_head.refine_mask.semantic_in_channels is {cfg.semantic_in_channels} but "
                f"the FPN gives {in_channels} channels; set them equal"
            )
        if self.cfg.mask_extractor.output_size != cfg.stage_sizes[0]:
            raise ValueError(
                f"roi_head.mask_extractor.output_size is {self.cfg.mask_extractor.output_size} "
                f"but roi_head.refine_mask.stage_sizes starts at {cfg.stage_sizes[0]}; set "
                "them equal"
            )
        return RefineMaskHead(cfg, self.cfg.num_classes)

    def _mask_losses(
        self,
        feats: list[Tensor],
        pos_boxes: list[Tensor],
        pos_gt: list[Tensor],
        pos_labels: Tensor,
        targets: list[InstanceTargets],
    ) -> dict[str, Tensor]:
        cfg = self.cfg.refine_mask
        rois = boxes_to_rois(pos_boxes)
        p2 = feats[0]
        stage_logits, semantic_logits = self.mask_head(
            self.mask_roi_extractor(feats, rois), p2, rois, pos_labels
        )
        stage_targets = crop_mask_targets(pos_boxes, pos_gt, targets, cfg.stage_sizes)
        target_map = None
        if cfg.with_semantic_loss:
            masks = [t.masks for t in targets]
            if any(m is None for m in masks):
                raise ValueError("RefineMask training needs targets with masks (with_masks=True)")
            padded = (p2.shape[-2] * cfg.semantic_stride, p2.shape[-1] * cfg.semantic_stride)
            target_map = semantic_target(masks, padded, tuple(p2.shape[-2:]))  # type: ignore[arg-type]
        losses = self.mask_head.loss(stage_logits, stage_targets, semantic_logits, target_map)
        losses["loss_mask"] = self.cfg.loss_mask_weight * losses["loss_mask"]
        return losses

    def _mask_probs(self, feats: list[Tensor], rois: Tensor, labels: Tensor) -> Tensor:
        """Merged 112 x 112 probabilities (§3.8), ``test_chunk_size`` RoIs at a time; the
        semantic branch runs once for the batch (the official code reruns it per chunk)."""
        semantic = self.mask_head.semantic(feats[0])
        chunk = self.cfg.refine_mask.test_chunk_size
        probs = []
        for start in range(0, rois.shape[0], chunk):
            chunk_rois, chunk_labels = rois[start : start + chunk], labels[start : start + chunk]
            stage_logits = self.mask_head.instances(
                self.mask_roi_extractor(feats, chunk_rois), semantic, chunk_rois, chunk_labels
            )
            probs.append(merge_stages(stage_logits).sigmoid())
        return torch.cat(probs)
