"""The cost of GRoIE: its RoI extractor against the single-level one, side by side.

For 512 RoIs (sides log-uniform in 16..512 px, two 800x1088 images) on 256-channel FPN maps
P2-P5, times forward+backward (gradients w.r.t. the features and the module weights) at
7x7 (box branch) and 14x14 (mask branch) for:

- ``single``: mmdet's SingleRoIExtractor (RoIAlign, sampling_ratio 0, one level per RoI),
- ``groie-pool``: GRoIE's pooling alone (every level, sampling 2, summed, no modules),
- ``groie-pre``: plus the shared 5x5 pre-module,
- ``groie``: the official extractor (pre-module, sum, '0100' attention post-module),

and reports each as a ratio to ``single``. Memory is the activation memory kept for the
backward pass (distinct storages saved by autograd, inputs and weights excluded), and on
CUDA also the peak allocated during forward+backward above the inputs.

    python benchmarks/groie.py [--device cpu|cuda|all] [--repeat N] [--rois N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import asdict, dataclass

import torch

from _timing import median_seconds
from instseg.modeling.features import pyramid_specs
from instseg.modeling.roi import (
    GRoIEConfig,
    RoIExtractorChoice,
    RoIExtractorConfig,
    build_roi_extractor,
)

STRIDES = (4, 8, 16, 32)
IMAGE_H, IMAGE_W = 800, 1088
CHANNELS = 256


@dataclass
class Row:
    device: str
    size: int
    extractor: str
    fwd_bwd_ms: float
    time_ratio: float
    saved_mib: float
    saved_ratio: float
    peak_mib: float | None


def make_rois(n: int, gen: torch.Generator) -> torch.Tensor:
    log_lo, log_hi = torch.log(torch.tensor(16.0)), torch.log(torch.tensor(512.0))
    sides = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, 2, generator=gen))
    w = sides[:, 0].clamp(max=IMAGE_W - 1)
    h = sides[:, 1].clamp(max=IMAGE_H - 1)
    x1 = torch.rand(n, generator=gen) * (IMAGE_W - w)
    y1 = torch.rand(n, generator=gen) * (IMAGE_H - h)
    batch = (torch.arange(n) % 2).float()
    return torch.stack([batch, x1, y1, x1 + w, y1 + h], 1)


def extractors() -> dict[str, RoIExtractorChoice]:
    return {
        "single": RoIExtractorConfig(sampling_ratio=0),
        "groie-pool": GRoIEConfig(pre="none", post="none"),
        "groie-pre": GRoIEConfig(pre="conv", post="none"),
        "groie": GRoIEConfig(pre="conv", post="attention"),
    }


def saved_bytes(fn, exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs, less ``exclude``'s."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def bench(device: torch.device, num_rois: int, repeat: int) -> list[Row]:
    gen = torch.Generator().manual_seed(0)
    specs = pyramid_specs(CHANNELS, STRIDES)
    feats = {
        spec.name: torch.randn(
            2, CHANNELS, IMAGE_H // spec.stride, IMAGE_W // spec.stride, generator=gen
        ).to(device)
        for spec in specs
    }
    for f in feats.values():
        f.requires_grad_(True)
    rois = make_rois(num_rois, gen).to(device)
    rows: list[Row] = []
    for size in (7, 14):
        base_ms = base_saved = None
        for name, cfg in extractors().items():
            torch.manual_seed(0)
            module = build_roi_extractor(cfg, specs, size).to(device)
            for p in module.parameters():  # a trained-like gamma, so attention is not skipped
                p.data.normal_(0, 0.02)
            grad = torch.randn(num_rois, module.out_channels, size, size, device=device)

            def forward(module=module) -> torch.Tensor:
                return module(feats, rois)

            def step(module=module, grad=grad) -> None:
                module.zero_grad(set_to_none=True)
                for f in feats.values():
                    f.grad = None
                forward(module).backward(grad)

            seconds = median_seconds(step, device, repeat)
            saved = saved_bytes(forward, [*feats.values(), *module.parameters()])
            peak = None
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
                step()
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
            ms = seconds * 1e3
            base_ms = base_ms or ms
            base_saved = base_saved or saved
            row = Row(
                device.type,
                size,
                name,
                round(ms, 2),
                round(ms / base_ms, 2),
                round(saved / 2**20, 1),
                round(saved / base_saved, 2),
                None if peak is None else round(peak, 1),
            )
            rows.append(row)
            print(
                f"{row.device:5} {size:2}x{size:<2} {name:11} {row.fwd_bwd_ms:10.1f} ms "
                f"x{row.time_ratio:6.2f}   saved {row.saved_mib:8.1f} MiB x{row.saved_ratio:6.2f}"
                + ("" if peak is None else f"   peak {row.peak_mib:8.1f} MiB"),
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rois", type=int, default=512)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        print("CUDA unavailable: CPU only")
        devices = [d for d in devices if d != "cuda"]
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, {args.rois} RoIs, median of {args.repeat}"
    )
    print("device size extractor    fwd+bwd          vs single   saved for backward")
    rows = [row for d in devices for row in bench(torch.device(d), args.rois, args.repeat)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
