"""IFR's mask head, implicit against explicit, side by side in one run (spec §5).

For the same block and the same RoI features, one training step of the mask head (forward,
loss, backward) in four forms:

- ``implicit``: Broyden to the fixed point (at most ``--solve-steps``), one differentiable
  application, the implicit backward (Broyden with vector-Jacobian products);
- ``explicit-4``: the block unrolled 4 times with backprop (the pretrain phase and the
  weight-sharing variant);
- ``explicit-N``: unrolled as deep as the solve evaluates it (``--solve-steps + 1``);

and prints the wall time per step, the peak memory allocated during the step (from the
profiler's allocation events, CPU), the memory autograd keeps for the backward, the
solver's steps and final residuals. Then the mask-head parameter counts of Mask R-CNN's
4-conv head and IFR's.

    python benchmarks/ifr.py [--rois 64] [--channels 256] [--repeats 3] [--solve-steps 15]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from instseg.modeling.roi import FCNMaskHeadConfig, IFRMaskHeadConfig
from instseg.modeling.roi.ifr import IFRMaskHead


def _step(head: IFRMaskHead, x: torch.Tensor, target: torch.Tensor, mode: str) -> None:
    head.zero_grad(set_to_none=True)
    if mode == "implicit":
        z = head.refine(x, train_step=head.cfg.pretrain_steps)
    else:
        depth = int(mode.split("-")[1])
        weights = head.repeat_block.weights()
        z = torch.zeros_like(x)
        for _ in range(depth):
            z = head.repeat_block(z, x, weights)
    logits = head.predictor(F.relu(head.deconv(z)))[:, 0]
    F.binary_cross_entropy_with_logits(logits, target).backward()


def _saved_bytes(head: IFRMaskHead, x: torch.Tensor, target: torch.Tensor, mode: str) -> int:
    """Bytes of the distinct tensors autograd saves for the backward of one step."""
    seen: dict[int, int] = {}
    held: list[torch.Tensor] = []  # no storage is freed (and its address reused) meanwhile

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        held.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _step(head, x, target, mode)
    return sum(seen.values())


def _peak_bytes(head: IFRMaskHead, x: torch.Tensor, target: torch.Tensor, mode: str) -> int:
    """Peak of the running sum of the allocations and frees the profiler records (each
    event's own, in time order), from the start of the step."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(head, x, target, mode)
    events = sorted(
        (e for e in prof.events() if e.self_cpu_memory_usage != 0),
        key=lambda e: e.time_range.start,
    )
    current = peak = 0
    for event in events:
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rois", type=int, default=64)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--solve-steps", type=int, default=15)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    cfg = IFRMaskHeadConfig(
        pretrain_steps=0,
        forward_max_steps=args.solve_steps,
        backward_max_steps=args.solve_steps,
    )
    head = IFRMaskHead(cfg, args.channels, num_classes=1)
    x = torch.randn(args.rois, args.channels, 14, 14)
    target = (torch.rand(args.rois, 28, 28) > 0.5).float()
    print(
        f"{args.rois} RoIs x {args.channels} x 14 x 14, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; solve capped at {args.solve_steps} steps"
    )
    modes = ["implicit", "explicit-4", f"explicit-{args.solve_steps + 1}"]
    rows = []
    for mode in modes:
        _step(head, x, target, mode)  # warm-up
        start = time.perf_counter()
        for _ in range(args.repeats):
            _step(head, x, target, mode)
        seconds = (time.perf_counter() - start) / args.repeats
        stats = ""
        if mode == "implicit":
            fwd, bwd = head.last_solve, head.last_backward
            assert fwd is not None and bwd is not None
            stats = (
                f"forward {fwd.steps} steps, residual {fwd.residual:.3g}; "
                f"backward {bwd.steps} steps, residual {bwd.residual:.3g}"
            )
        saved = _saved_bytes(head, x, target, mode)
        peak = _peak_bytes(head, x, target, mode)
        rows.append((mode, seconds, peak, saved, stats))
    print(f"{'mask-head step':<14} {'s/step':>8} {'peak MiB':>9} {'saved MiB':>10}  solver")
    for mode, seconds, peak, saved, stats in rows:
        print(f"{mode:<14} {seconds:8.3f} {peak / 2**20:9.1f} {saved / 2**20:10.1f}  {stats}")
    base = rows[0]
    for mode, seconds, peak, saved, _ in rows[1:]:
        print(
            f"{mode} / implicit: time {seconds / base[1]:.2f}x, peak memory "
            f"{peak / base[2]:.2f}x, saved for backward {saved / base[3]:.2f}x"
        )

    fcn = FCNMaskHeadConfig().build(256, [], 80)
    ifr = IFRMaskHeadConfig().build(256, [], 80)

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    convs = count(fcn.convs)
    block = count(ifr.repeat_block)
    print(
        "\nmask-head parameters (256 channels, 80 classes): "
        f"Mask R-CNN 4 convs {convs:,} + deconv {count(fcn.upsample):,} + logits "
        f"{count(fcn.conv_logits):,} = {count(fcn):,}; IFR block {block:,} + deconv "
        f"{count(ifr.deconv):,} + logits {count(ifr.predictor):,} = {count(ifr):,} "
        f"(refinement {block / convs:.1%} of the 4 convs, whole head {count(ifr) / count(fcn):.1%})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
