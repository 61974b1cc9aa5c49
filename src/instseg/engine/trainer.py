"""The training loop: exact resume, atomic checkpoints, clean stop on SIGINT/SIGTERM.

Exactness rests on three facts. The learning rate is a pure function of the iteration. The
data of iteration ``n`` is a pure function of ``(seed, n)``: the batch order comes from
:class:`~instseg.data.loader.GroupedBatchSampler`, each sample is built from its own seed
with the global RNGs seeded from it too (so a transform drawing from ``torch.rand`` gives
the same result in any worker process), and the loaders never draw from the global RNG. And
a checkpoint holds everything else that changes: weights, optimizer buffers, the global RNG
states and the data position. A run stopped at any iteration and resumed therefore ends
with bit-identical weights to one that never stopped (same device, same number of threads).

Data-parallel runs (``torchrun``, ``srun``: a default process group is initialised) split
each global batch of ``batch_size`` images across the processes and train a DDP model; the
batches, their order, each image's augmentation and random choices, the padded batch shape
and every loss normaliser are those of one process holding the whole batch, so losses and
weights do not depend on the number of processes (up to float summation order). Rank 0
alone writes checkpoints and the log. ``accumulate`` runs each global batch as that many
micro-batches before one update.

Two mmdet options act at the start of a run: ``TrainConfig.load_from`` initialises the
detector from a weights file (fresh runs only; :func:`load_initial_weights`), and
``TrainConfig.by_epoch`` counts the schedule in epochs of the training list, which
repeat-factor sampling (``train(..., repeat_threshold=...)``) lengthens.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import random
import re
import signal
import sys
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..data.loader import GroupedBatchSampler, make_loader, repeat_counts, repeat_factors
from ..errors import DistributedError
from ..fileio import atomic_write_text
from ..modeling.global_batch import across_ranks, collective_device
from ..structures import ImageBatch, InstanceTargets, TrainingContext
from .checkpoint import (
    FINAL_NAME,
    JSON_SUFFIX,
    WEIGHTS_SUFFIX,
    CheckpointError,
    checkpoint_files,
    latest_checkpoint,
    load_checkpoint,
    remove_checkpoint,
    save_checkpoint,
)
from .distributed import rank_and_world
from .schedule import ScheduleConfig, _is_int, build_optimizer, lr_at, set_lr

LOG_NAME = "log.jsonl"
KEEP_PERIODIC = 2
_PERIODIC = re.compile(r"^iter_(\d+)$")
_ENGINE_KEYS = (
    "iteration",
    "epoch",
    "batch",
    "train_config",
    "num_images",
    "repeat_threshold",
    "world_size",
)
# Keys of a log record the trainer writes itself: a model output may not take them.
_LOG_KEYS = ("iteration", "lr", "total", "grad_norm", "seconds_per_iter", "eta_seconds")


@dataclass
class TrainConfig:
    """How long and how to train.

    ``batch_size`` is the global batch: the images of one update, over every process of a
    data-parallel run and every micro-batch (so a recipe's batch does not change with the
    number of devices). ``accumulate`` splits it into that many micro-batches, each run
    forward and backward before the one update (gradient accumulation: keeps a recipe's
    batch on fewer devices; a micro-batch's losses are normalised over the micro-batch, so
    the update equals the whole batch's exactly only for fixed-count normalisers).
    ``base_batch_size``: the batch the schedule's ``base_lr`` was set for; when given, the
    learning rate is scaled by ``batch_size / base_batch_size`` (the linear scaling rule,
    Goyal et al. 2017; mmdet's ``auto_scale_lr``). None keeps ``base_lr`` as written.

    ``checkpoint_every`` iterations a checkpoint is written (0: only at the end);
    ``log_every`` iterations a line goes to ``log.jsonl`` and the progress display; ``amp``
    runs the forward pass under bf16 autocast on CUDA (ignored with a warning on CPU).

    ``by_epoch``: ``max_iters`` and ``schedule.steps`` count epochs instead (mmdet's
    ``EpochBasedTrainLoop`` and by-epoch ``MultiStepLR``); when training starts each becomes
    that many times the batches of one epoch, a pass over the training list with its
    repeat-factor copies, whose length is known only from the data. Warmup stays in
    iterations, as mmdet's. ``load_from``: a ``.safetensors`` weights file that initialises
    the model at the start of a fresh run (mmdet's ``load_from``; never on resume), skipping
    tensors whose shapes differ (:func:`load_initial_weights`).
    """

    max_iters: int
    batch_size: int = 2
    checkpoint_every: int = 0
    log_every: int = 20
    seed: int = 0
    num_workers: int = 0
    amp: bool = False
    size_divisor: int = 32
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    by_epoch: bool = False
    load_from: str | None = None
    accumulate: int = 1
    base_batch_size: int | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        minimum = {
            "max_iters": 1,
            "batch_size": 1,
            "checkpoint_every": 0,
            "log_every": 1,
            "seed": 0,
            "num_workers": 0,
            "size_divisor": 1,
            "accumulate": 1,
        }
        for key, low in minimum.items():
            value = getattr(self, key)
            if not _is_int(value) or value < low:
                raise ValueError(f"{name}.{key} must be an integer >= {low}, got {value!r}")
        for key in ("amp", "by_epoch"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{name}.{key} must be true or false, got {getattr(self, key)!r}")
        if self.base_batch_size is not None and (
            not _is_int(self.base_batch_size) or self.base_batch_size < 1
        ):
            raise ValueError(
                f"{name}.base_batch_size must be None or an integer >= 1, "
                f"got {self.base_batch_size!r}"
            )
        if self.load_from is not None and (
            not isinstance(self.load_from, str) or not self.load_from.strip()
        ):
            raise ValueError(
                f"{name}.load_from must be None or the path of a .safetensors weights file, "
                f"got {self.load_from!r}"
            )
        if isinstance(self.schedule, dict):
            self.schedule = ScheduleConfig(**self.schedule)
        if not isinstance(self.schedule, ScheduleConfig):
            raise ValueError(f"{name}.schedule must be a ScheduleConfig, got {self.schedule!r}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["schedule"]["steps"] = list(self.schedule.steps)
        return out


@dataclass
class TrainResult:
    """What :func:`train` did: the iterations completed, whether it ran to ``max_iters``
    or was stopped by a signal, the weights file of the final model (or of the checkpoint
    written on stopping), and one entry per iteration run by this call."""

    iteration: int
    status: Literal["finished", "interrupted"]
    weights: Path
    history: list[dict[str, float]]


# ------------------------------------------------------------------------ data and RNG


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class _SeededSamples(torch.utils.data.Dataset):
    """Wraps a dataset so that each sample sees global RNGs seeded from its own seed.

    The caller's global RNG states are restored afterwards, so data loading neither
    consumes nor depends on them, in the main process or in any worker.
    """

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        _, seed = item
        derived = (int(seed) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**63
        saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
        torch.default_generator.manual_seed(derived)  # CPU only: CUDA RNG untouched
        random.seed(derived)
        np.random.seed(derived % 2**32)
        try:
            sample = self.dataset[item]
        finally:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])
        if (
            isinstance(sample, tuple)
            and len(sample) == 3
            and isinstance(sample[1], InstanceTargets)
        ):
            # The model's random choices for this image (anchor and RoI sampling...) draw
            # from the image's own streams, whichever process holds it.
            sample = (sample[0], replace(sample[1], seed=int(seed)), sample[2])
        return sample


def _worker_init(_: int) -> None:
    """Loader workers leave SIGINT/SIGTERM to the main process, which stops cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _train_loader(
    dataset: torch.utils.data.Dataset,
    batches: list[list[tuple[int, int]]],
    cfg: TrainConfig,
    epoch: int,
) -> torch.utils.data.DataLoader:
    """The loader of ``epoch``: seeded samples in the order of ``batches`` (this process's
    micro-batches)."""
    return make_loader(
        _SeededSamples(dataset),
        batches,
        size_divisor=cfg.size_divisor,
        num_workers=cfg.num_workers,
        # The loader draws a base seed when iterated; its own generator keeps that draw
        # off the global RNG, which belongs to the model.
        generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch),
        worker_init_fn=_worker_init if cfg.num_workers > 0 else None,
    )


# ---------------------------------------------------- initial weights, epochs, repeats


@dataclass
class InitialWeights:
    """What :func:`load_initial_weights` did: the keys loaded, those skipped because the
    file's shape differs from the model's (``(key, file shape, model shape)``), the model's
    keys absent from the file and the file's keys the model does not have."""

    path: Path
    loaded: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
    missing: list[str]
    unexpected: list[str]

    def summary(self) -> str:
        lines = [f"train.load_from: loaded {len(self.loaded)} tensors from {self.path}"]
        if self.mismatched:
            shapes = ", ".join(f"{k} (file {a}, model {b})" for k, a, b in self.mismatched)
            lines.append(f"  skipped {len(self.mismatched)} with another shape: {shapes}")
        if self.missing:
            lines.append(f"  {len(self.missing)} not in the file: {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"  {len(self.unexpected)} not in the model: {', '.join(self.unexpected)}")
        return "\n".join(lines)


def load_initial_weights(model: nn.Module, path: str | Path) -> InitialWeights:
    """Initialise ``model`` from the ``.safetensors`` file ``path``, as mmdet's ``load_from``
    (mmengine ``load_checkpoint(..., strict=False)``): every tensor whose key and shape
    match is copied; one whose shape differs (a class-specific layer of another class
    count, e.g. COCO's 80 classes into Cityscapes' 8), the model's keys absent from the
    file and the file's keys the model lacks are skipped and reported, keeping the
    model's own initialisation. BatchNorm ``num_batches_tracked`` counters are not
    reported missing (mmengine ignores them too). A missing or unreadable file, or one
    with no tensor the model can use, is an error naming ``train.load_from``."""
    path = Path(path)
    if path.suffix == JSON_SUFFIX:
        path = path.with_suffix(WEIGHTS_SUFFIX)
    if not path.is_file():
        raise FileNotFoundError(
            f"train.load_from: weights file not found: {path} (relative paths are taken "
            "from the current folder; set train.load_from=none to start from the "
            "model's own initialisation)"
        )
    if path.suffix != WEIGHTS_SUFFIX:
        raise CheckpointError(
            f"train.load_from: {path} is not a {WEIGHTS_SUFFIX} weights file (the model "
            "weights instseg writes; other formats are not read)"
        )
    try:
        tensors = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(
            f"train.load_from: {path}: truncated or corrupt safetensors file ({exc})"
        ) from exc
    expected = model.state_dict()
    loaded, mismatched = [], []
    for key, wanted in expected.items():
        if key not in tensors:
            continue
        if tuple(tensors[key].shape) == tuple(wanted.shape):
            loaded.append(key)
        else:
            mismatched.append((key, tuple(tensors[key].shape), tuple(wanted.shape)))
    if not loaded:
        raise CheckpointError(
            f"train.load_from: no tensor of {path} matches the model by name and shape "
            f"(the file has {len(tensors)}, e.g. {list(tensors)[:3]}; the model "
            f"{len(expected)}, e.g. {list(expected)[:3]})"
        )
    model.load_state_dict({k: tensors[k] for k in loaded}, strict=False)
    return InitialWeights(
        path=path,
        loaded=loaded,
        mismatched=mismatched,
        missing=[k for k in expected if k not in tensors and "num_batches_tracked" not in k],
        unexpected=[k for k in tensors if k not in expected],
    )


def _repeats(records: list, threshold: float | None) -> list[int] | None:
    """Copies of each record per epoch under repeat-factor sampling (None: no repeats)."""
    if threshold is None:
        return None
    if not all(hasattr(r, "category_ids") for r in records):
        raise TypeError("repeat-factor sampling needs records with `category_ids`")
    return repeat_counts(repeat_factors([r.category_ids.tolist() for r in records], threshold))


def _resolve_epochs(cfg: TrainConfig, epoch_len: int) -> TrainConfig:
    """``cfg`` with a ``by_epoch`` schedule in iterations: ``max_iters`` and the lr steps
    counted in epochs of ``epoch_len`` batches (epoch ``e`` ends after ``e * epoch_len``
    iterations, where mmdet's by-epoch milestones change the lr)."""
    if not cfg.by_epoch:
        return cfg
    schedule = replace(cfg.schedule, steps=tuple(s * epoch_len for s in cfg.schedule.steps))
    return replace(cfg, max_iters=cfg.max_iters * epoch_len, schedule=schedule, by_epoch=False)


# ------------------------------------------------------------------------------ signals


class _StopRequest:
    """Set by SIGINT/SIGTERM; the loop stops after the current iteration and saves.

    While a checkpoint is being written every signal is ignored; outside a save, a second
    SIGINT raises KeyboardInterrupt at once (nothing is written, earlier checkpoints stay).
    """

    def __init__(self, announce: bool = True) -> None:
        self.requested: str | None = None
        self.saving = False
        self.announce = announce  # False on data-parallel processes other than rank 0

    def _say(self, text: str) -> None:
        if self.announce:
            print(text, file=sys.stderr, flush=True)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.saving:
            self._say(f"\n{name}: writing a checkpoint, please wait")
            return
        if self.requested is None:
            self.requested = name
            self._say(
                f"\n{name}: stopping after this iteration and saving a checkpoint "
                "(Ctrl-C again to stop at once without saving)"
            )
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def saving_guard(self) -> Iterator[None]:
        self.saving = True
        try:
            yield
        finally:
            self.saving = False


@contextlib.contextmanager
def _signal_handlers(stop: _StopRequest) -> Iterator[None]:
    """Install the stop handlers for SIGINT and SIGTERM, restoring the previous ones."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for sig in previous:
            signal.signal(sig, stop.handle)
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


# ------------------------------------------------------------------------------ logging


def _format_seconds(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class _Progress:
    """A JSON line per window in ``log.jsonl`` and a one-line display on stderr.

    Logged values are the means over the window since the previous line (over the
    iterations that returned them). On a terminal the display is rewritten in place;
    otherwise a plain line is printed per window.
    """

    def __init__(self, path: Path | None, max_iters: int, log_every: int, append: bool) -> None:
        self.path = path
        self.max_iters = max_iters
        self.log_every = log_every
        self.quiet = path is None  # a data-parallel process other than rank 0
        self.tty = sys.stderr.isatty() and not self.quiet
        self.file = None if path is None else path.open("a" if append else "w", encoding="utf-8")
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.count = 0
        self.window_start = time.perf_counter()
        self.last_draw = 0.0
        self.drawn = False

    def close(self) -> None:
        if self.drawn:
            print(file=sys.stderr, flush=True)
            self.drawn = False
        if self.file is not None:
            self.file.close()

    def message(self, text: str) -> None:
        if self.quiet:
            return
        if self.drawn:
            print(file=sys.stderr)
            self.drawn = False
        print(text, file=sys.stderr, flush=True)
        self.last_draw = 0.0  # redraw the progress line at the next iteration

    def _line(self, iteration: int, lr: float, values: dict[str, float], sec: float) -> str:
        parts = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        eta = _format_seconds(sec * (self.max_iters - iteration))
        return (
            f"iter {iteration}/{self.max_iters} | {parts} | lr {lr:.3e} | "
            f"{sec:.3f} s/it | eta {eta}"
        )

    def update(self, iteration: int, lr: float, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1
        self.count += 1
        now = time.perf_counter()
        sec = (now - self.window_start) / self.count
        if iteration % self.log_every == 0 or iteration == self.max_iters:
            means = {k: v / self.counts[k] for k, v in self.sums.items()}
            record = {
                "iteration": iteration,
                "lr": lr,
                **means,
                "seconds_per_iter": sec,
                "eta_seconds": sec * (self.max_iters - iteration),
            }
            if self.file is not None:
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
            if not self.tty and not self.quiet:
                print(self._line(iteration, lr, means, sec), file=sys.stderr, flush=True)
            self.sums, self.counts, self.count, self.window_start = {}, {}, 0, now
        if self.tty and (now - self.last_draw > 0.1 or iteration == self.max_iters):
            sys.stderr.write("\r" + self._line(iteration, lr, values, sec) + "\x1b[K")
            sys.stderr.flush()
            self.last_draw, self.drawn = now, True


def _trim_log(path: Path, iteration: int) -> None:
    """Drop log lines past ``iteration`` (written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["iteration"] > iteration:
                continue
        except (ValueError, KeyError, TypeError):
            continue
        kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


# ----------------------------------------------------------------------------- the loop


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _is_loss(key: object) -> bool:
    """A loss term: its name, or the last dotted part of it (a cascade's ``s0.loss_cls``),
    starts with "loss"."""
    return isinstance(key, str) and key.rsplit(".", 1)[-1].startswith("loss")


def _loss_values(outputs: dict[str, Tensor], iteration: int) -> tuple[Tensor, dict[str, float]]:
    """The sum of the ``loss*`` terms, and every entry plus ``total`` as floats (one sync).

    Other entries (diagnostics such as a solver residual or an accuracy) are logged only:
    neither summed nor backpropagated. ``total`` is the sum of the loss terms.
    """
    if not isinstance(outputs, dict) or not outputs:
        raise TypeError(
            f"iteration {iteration}: the model must return a non-empty dict of losses in "
            f"train mode, got {type(outputs).__name__}"
        )
    for key, value in outputs.items():
        if not isinstance(value, Tensor) or value.numel() != 1:
            what = (
                f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
            )
            raise TypeError(
                f"iteration {iteration}: output {key!r} is not a scalar tensor ({what})"
            )
        if key in _LOG_KEYS:
            raise TypeError(
                f"iteration {iteration}: output {key!r} clashes with a key the trainer logs "
                f"({', '.join(_LOG_KEYS)})"
            )
    loss_keys = [key for key in outputs if _is_loss(key)]
    if not loss_keys:
        raise TypeError(
            f"iteration {iteration}: the model returned no loss term (a key starting with "
            f"'loss') to optimise; got keys {list(outputs)}"
        )
    total = sum(outputs[key] for key in loss_keys)
    assert isinstance(total, Tensor)
    values = torch.stack([v.detach().float().reshape(()) for v in outputs.values()])
    floats = dict(zip(outputs, values.tolist(), strict=True))
    floats["total"] = sum(floats[key] for key in loss_keys)
    return total, floats


def _check_finite(values: dict[str, float], iteration: int) -> None:
    """Stop on a non-finite loss term or total; a non-finite diagnostic is only logged."""
    if all(math.isfinite(v) for k, v in values.items() if _is_loss(k) or k == "total"):
        return
    terms = ", ".join(f"{k}={v}" for k, v in values.items())
    raise FloatingPointError(
        f"non-finite loss at iteration {iteration}: {terms}; "
        "training stopped, the last checkpoint is left as it was"
    )


def _periodic_iterations(work_dir: Path) -> list[tuple[int, str]]:
    """``(iteration, name)`` of every periodic checkpoint name with any file present."""
    found: dict[str, int] = {}
    for path in work_dir.glob("iter_*"):
        stem = path.name.split(".", 1)[0]
        match = _PERIODIC.match(stem)
        if match:
            found[stem] = int(match.group(1))
    return sorted((n, name) for name, n in found.items())


def _prune_periodic(work_dir: Path, keep: int) -> None:
    """Keep the ``keep`` most advanced complete periodic checkpoints; remove the rest and
    any incomplete leftovers below them."""
    entries = _periodic_iterations(work_dir)
    complete = [n for n, name in entries if checkpoint_files(work_dir, name)[2].is_file()]
    kept = set(complete[-keep:])
    newest = complete[-1] if complete else -1
    for n, name in entries:
        if n not in kept and n < newest:
            remove_checkpoint(work_dir, name)


Item = tuple[int, int]  # (dataset index, sample seed)

# DDP without the buffer broadcast of every forward (mmdet's default): frozen or SyncBN
# norms keep buffers equal; rank 0's are the ones saved. The keyword changed in torch 2.13.
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def split_evenly(items: list[Item], parts: int) -> list[list[Item]]:
    """``items`` in ``parts`` consecutive chunks whose sizes differ by at most one (the
    larger first)."""
    size, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for part in range(parts):
        end = start + size + (1 if part < extra else 0)
        chunks.append(items[start:end])
        start = end
    return chunks


def micro_batches(batch: list[Item], accumulate: int, world_size: int) -> list[list[Item]]:
    """The micro-batches one update over the global ``batch`` runs: ``min(accumulate,
    len(batch) // world_size)`` consecutive chunks, so that each process gets at least one
    image of each; none (the batch is skipped) when it has fewer images than processes,
    which only the last, partial batch of an aspect-ratio group can have."""
    count = min(accumulate, len(batch) // world_size)
    return split_evenly(batch, count) if count else []


@dataclass
class _Planned:
    """One update of an epoch: the index of its batch in the sampler's order (a checkpoint's
    position) and its micro-batches over all processes."""

    index: int
    micro: list[list[Item]]


def _epoch_plan(
    sampler: GroupedBatchSampler, epoch: int, accumulate: int, world_size: int
) -> list[_Planned]:
    """The updates of ``epoch``: the sampler's global batches, split into micro-batches,
    without those that cannot give every process an image."""
    plan = []
    for index, batch in enumerate(sampler.batches(epoch)):
        micro = micro_batches(batch, accumulate, world_size)
        if micro:
            plan.append(_Planned(index, micro))
    return plan


def _batch_seed(micro: list[Item]) -> int:
    """The seed of a micro-batch's random choices over the whole batch: a function of its
    images' sample seeds, which every process knows."""
    seed = 0
    for _, sample_seed in micro:
        seed = (seed * 0x100000001B3 + int(sample_seed) + 1) % 2**63
    return seed


def _pad_across_ranks(images: ImageBatch) -> ImageBatch:
    """``images`` zero-padded to the largest padded shape of the processes' micro-batches:
    the shape one process padding the whole micro-batch gives."""
    shape = torch.tensor(images.tensor.shape[-2:], dtype=torch.int64, device=collective_device())
    dist.all_reduce(shape, op=dist.ReduceOp.MAX)
    height, width = shape.tolist()
    tensor = images.tensor
    if (height, width) != tuple(tensor.shape[-2:]):
        tensor = F.pad(tensor, (0, width - tensor.shape[-1], 0, height - tensor.shape[-2]))
    return ImageBatch(tensor, images.image_sizes)


@dataclass
class _Position:
    """Iterations completed, and the epoch and the index (in the sampler's order) of the
    batch that come next."""

    iteration: int = 0
    epoch: int = 0
    batch: int = 0

    def advance(self, done: int, last_of_epoch: bool) -> None:
        """Count one iteration done, on the batch of index ``done``."""
        self.iteration += 1
        self.batch = done + 1
        if last_of_epoch:
            self.epoch, self.batch = self.epoch + 1, 0


def _check_arguments(
    cfg: TrainConfig, dataset: torch.utils.data.Dataset, extra_state: dict[str, Any] | None
) -> tuple[dict[str, Any], list]:
    """A copy of ``extra_state`` and the dataset's records, or an error naming the problem."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    extra_state = dict(extra_state or {})
    for key in _ENGINE_KEYS:
        if key in extra_state:
            raise ValueError(f"extra_state key {key!r} is reserved for the training engine")
    try:
        json.dumps(extra_state)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"extra_state is not JSON-serialisable: {exc}") from exc
    records = getattr(dataset, "records", None)
    if records is None:
        raise TypeError("the dataset needs a `records` list whose items have `.aspect_ratio`")
    if len(records) == 0:
        raise ValueError("the dataset is empty: nothing to train on")
    return extra_state, records


def _restore(
    work_dir: Path,
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    num_images: int,
    repeat_threshold: float | None,
    device: torch.device,
) -> _Position:
    """Load checkpoint ``name`` (weights, optimizer, RNG states) and its position, refusing
    one that ``cfg`` and a dataset of ``num_images`` (repeated by ``repeat_threshold``)
    cannot continue exactly."""
    state = load_checkpoint(work_dir, name, model, optimizer, device=device)
    saved_cfg = state.get("train_config", {})
    for key, now in (
        ("batch_size", cfg.batch_size),
        ("seed", cfg.seed),
        ("num_images", num_images),
    ):
        before = state.get(key, saved_cfg.get(key))
        if before is not None and before != now:
            raise ValueError(
                f"cannot resume {work_dir / name} exactly: {key} was {before}, now "
                f"{now}; start a new work_dir to train with different data or batching"
            )
    # Checkpoints written before repeat-factor sampling existed never repeated.
    before = state.get("repeat_threshold")
    if before != repeat_threshold:
        raise ValueError(
            f"cannot resume {work_dir / name} exactly: the repeat threshold "
            f"(data.repeat_threshold) was {before}, now {repeat_threshold}; start a new "
            "work_dir to train with different data or batching"
        )
    for key in ("iteration", "epoch", "batch"):
        if not _is_int(state.get(key)):
            raise ValueError(
                f"cannot resume from {work_dir / name}: its state has no integer "
                f"{key!r} (not written by instseg.engine.train?)"
            )
    position = _Position(state["iteration"], state["epoch"], state["batch"])
    if position.iteration > cfg.max_iters:
        raise ValueError(
            f"TrainConfig.max_iters is {cfg.max_iters} but the checkpoint "
            f"{name} is already at iteration {position.iteration}"
        )
    return position


def _start(
    work_dir: Path,
    resume: bool,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    num_images: int,
    repeat_threshold: float | None,
    device: torch.device,
) -> tuple[_Position, str | None]:
    """Where the run starts, and the checkpoint it resumes from (None for a new run).

    A new run seeds the global RNGs from ``cfg.seed``; a resumed one restores the latest
    complete checkpoint and drops the log lines written after it.
    """
    last_name = latest_checkpoint(work_dir)
    if not resume:
        if last_name is not None:
            raise FileExistsError(
                f"{work_dir} already holds checkpoint {last_name!r}: pass resume=True to "
                "continue it, or choose another work_dir"
            )
        _seed_everything(cfg.seed)
        return _Position(), None
    if last_name is None:
        raise FileNotFoundError(f"cannot resume: no complete checkpoint in {work_dir}")
    position = _restore(
        work_dir, last_name, model, optimizer, cfg, num_images, repeat_threshold, device
    )
    if rank_and_world()[0] == 0:
        _trim_log(work_dir / LOG_NAME, position.iteration)
    return position, last_name


class _Run:
    """One call of :func:`train` from ``position``: the iterations until ``cfg.max_iters``
    or a stop signal, the progress log and the checkpoints written on the way.

    In a data-parallel run ``model`` is wrapped in DDP for the forward pass, each process
    loads its share of every micro-batch, and rank 0 alone writes."""

    def __init__(
        self,
        model: nn.Module,
        dataset: torch.utils.data.Dataset,
        cfg: TrainConfig,
        work_dir: Path,
        *,
        optimizer: torch.optim.Optimizer,
        sampler: GroupedBatchSampler,
        position: _Position,
        resumed_from: str | None,
        num_images: int,
        repeat_threshold: float | None,
        extra_state: dict[str, Any],
        device: torch.device,
        amp: bool,
        on_iteration: Callable[[int, dict[str, float]], None] | None,
    ) -> None:
        self.model, self.dataset, self.cfg, self.work_dir = model, dataset, cfg, work_dir
        self.optimizer, self.sampler, self.position = optimizer, sampler, position
        self.resumed_from, self.num_images, self.extra_state = resumed_from, num_images, extra_state
        self.repeat_threshold = repeat_threshold
        self.device, self.amp, self.on_iteration = device, amp, on_iteration
        self.rank, self.world = rank_and_world()
        self.forward_model: nn.Module = model
        if self.world > 1:
            self.forward_model = DistributedDataParallel(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                **_NO_BUFFER_SYNC,
            )
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.history: list[dict[str, float]] = []
        self.stop = _StopRequest(announce=self.rank == 0)
        self.stop_agreed = False
        resumed = resumed_from is not None
        self.last_saved = position.iteration if resumed else -1
        self.weights = checkpoint_files(work_dir, resumed_from)[0] if resumed_from else work_dir
        log = work_dir / LOG_NAME if self.rank == 0 else None
        self.progress = _Progress(log, cfg.max_iters, cfg.log_every, resumed)

    def run(self) -> TrainResult:
        """Train until ``max_iters`` or a stop signal, then save and say how it ended."""
        try:
            with _signal_handlers(self.stop):
                while self.position.iteration < self.cfg.max_iters and not self._stopping():
                    self._run_epoch()
                return self._finish()
        finally:
            self.progress.close()

    def _stopping(self) -> bool:
        """Whether to stop after this iteration: a signal here, or (data-parallel) on any
        process, as agreed at the last iteration so that every process stops at once."""
        return self.stop_agreed if self.world > 1 else self.stop.requested is not None

    def _run_epoch(self) -> None:
        """Iterate from the position to the end of its epoch, ``max_iters`` or a stop."""
        pos = self.position
        plan = _epoch_plan(self.sampler, pos.epoch, self.cfg.accumulate, self.world)
        todo = [step for step in plan if step.index >= pos.batch]
        if not todo:
            pos.epoch, pos.batch = pos.epoch + 1, 0
            return
        last_index = plan[-1].index
        mine = [split_evenly(micro, self.world)[self.rank] for s in todo for micro in s.micro]
        batches = iter(_train_loader(self.dataset, mine, self.cfg, pos.epoch))
        try:
            for step in todo:
                inputs = [next(batches)[:2] for _ in step.micro]
                lr = lr_at(self.cfg.schedule, pos.iteration)
                values = self._step(inputs, step, lr, pos.iteration)
                pos.advance(step.index, step.index == last_index)
                self._record(lr, values)
                if pos.iteration >= self.cfg.max_iters:
                    break
                every = self.cfg.checkpoint_every
                if every and pos.iteration % every == 0:
                    self.weights = self._save(f"iter_{pos.iteration:08d}")
                    self.last_saved = pos.iteration
                if self._stopping():
                    break
        finally:
            del batches  # shuts loader workers down now, even on an error

    def _record(self, lr: float, values: dict[str, float]) -> None:
        """The history, log line and callback of the iteration just counted."""
        pos = self.position
        self.history.append({"iteration": pos.iteration, "lr": lr, **values})
        self.progress.update(pos.iteration, lr, values)
        if self.on_iteration is not None:
            self.on_iteration(pos.iteration, values)

    def _step(
        self,
        inputs: list[tuple[ImageBatch, list[InstanceTargets]]],
        step: _Planned,
        lr: float,
        iteration: int,
    ) -> dict[str, float]:
        """Forward and backward of each micro-batch (its loss terms summed, divided by the
        number of micro-batches), optional clipping and the SGD update at ``lr``; returns
        the logged values (averaged over processes and micro-batches)."""
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        number = iteration + 1
        count = len(inputs)
        sums: dict[str, float] = {}
        seen: dict[str, int] = {}
        for k, ((images, targets), micro) in enumerate(zip(inputs, step.micro, strict=True)):
            images = images.to(self.device)
            targets = [t.to(self.device) for t in targets]
            if self.world > 1:
                images = _pad_across_ranks(images)
            context = TrainingContext(iteration, self.cfg.max_iters, _batch_seed(micro))
            with self._gradient_sync(last=k == count - 1):
                with self._autocast(), self._across_ranks():
                    outputs = self.forward_model(images, targets, context=context)
                total, values = _loss_values(outputs, number)
                values = self._reduce(values)
                _check_finite(values, number)
                with warnings.catch_warnings():
                    # DDP's buckets are laid out contiguous; the gradient of a channels-last
                    # 1x1 conv has other (equivalent) strides and is copied: not worth a
                    # warning per run.
                    warnings.filterwarnings("ignore", "Grad strides do not match bucket view")
                    (total if count == 1 else total / count).backward()
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value
                seen[key] = seen.get(key, 0) + 1
        values = {key: sums[key] / seen[key] for key in sums}
        if self.cfg.schedule.grad_clip is not None:
            norm = float(
                torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.schedule.grad_clip)
            )
            if not math.isfinite(norm):
                raise FloatingPointError(
                    f"non-finite gradient norm at iteration {number} "
                    f"(losses {values}); the last checkpoint is left as it was"
                )
            values["grad_norm"] = norm
        self.optimizer.step()
        return values

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _across_ranks(self) -> contextlib.AbstractContextManager:
        """Loss normalisers over the global batch (data-parallel runs)."""
        return across_ranks() if self.world > 1 else contextlib.nullcontext()

    def _gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP reduces the gradients in the backward pass of the last micro-batch only."""
        if self.world > 1 and not last:
            assert isinstance(self.forward_model, DistributedDataParallel)
            return self.forward_model.no_sync()
        return contextlib.nullcontext()

    def _reduce(self, values: dict[str, float]) -> dict[str, float]:
        """``values`` averaged over the processes (as is in one process); the stop requests
        travel with them, so that every process agrees when to stop."""
        if self.world == 1:
            return values
        keys = list(values)
        fingerprint = float(zlib.crc32("\0".join(keys).encode()))
        stop = 1.0 if self.stop.requested is not None else 0.0
        buffer = torch.tensor(
            [*values.values(), stop, fingerprint], dtype=torch.float64, device=collective_device()
        )
        dist.all_reduce(buffer)
        reduced = buffer.tolist()
        if reduced[-1] != fingerprint * self.world:
            raise DistributedError(
                f"rank {self.rank}: the processes' models returned different loss terms "
                f"(here {keys}); every process must compute the same terms"
            )
        self.stop_agreed = self.stop_agreed or reduced[-2] > 0
        return {key: value / self.world for key, value in zip(keys, reduced, strict=False)}

    def _save(self, name: str) -> Path:
        """Write checkpoint ``name`` (pruning old periodic ones; rank 0 writes, the other
        processes wait for it); returns its weights file."""
        pos = self.position
        state = {
            "iteration": pos.iteration,
            "epoch": pos.epoch,
            "batch": pos.batch,
            "num_images": self.num_images,
            "repeat_threshold": self.repeat_threshold,
            "world_size": self.world,
            "train_config": self.cfg.to_dict(),
            **self.extra_state,
        }
        if self.rank == 0:
            with self.stop.saving_guard():
                save_checkpoint(self.work_dir, name, self.model, self.optimizer, state)
                if name != FINAL_NAME:
                    _prune_periodic(self.work_dir, KEEP_PERIODIC)
            self.progress.message(
                f"saved checkpoint {self.work_dir / name} (iteration {pos.iteration})"
            )
        if self.world > 1:
            with self.stop.saving_guard():
                dist.barrier()
        return self.work_dir / f"{name}{WEIGHTS_SUFFIX}"

    def _finish(self) -> TrainResult:
        """Save the final model (or the position at a stop) and build the result."""
        pos, max_iters = self.position, self.cfg.max_iters
        status: Literal["finished", "interrupted"]
        if pos.iteration >= max_iters:
            if self.resumed_from != FINAL_NAME or self.history:
                self.weights = self._save(FINAL_NAME)
            else:  # resumed a finished run: nothing new to save
                self.weights = checkpoint_files(self.work_dir, FINAL_NAME)[0]
            status = "finished"
        else:
            if self.last_saved != pos.iteration:
                self.weights = self._save(f"iter_{pos.iteration:08d}")
            status = "interrupted"
            reason = self.stop.requested or "a stop signal to another process"
            self.progress.message(
                f"stopped at iteration {pos.iteration}/{max_iters} ({reason}); resume to continue"
            )
        return TrainResult(pos.iteration, status, self.weights, self.history)


def train(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    cfg: TrainConfig,
    work_dir: str | Path,
    resume: bool = False,
    extra_state: dict[str, Any] | None = None,
    on_iteration: Callable[[int, dict[str, float]], None] | None = None,
    repeat_threshold: float | None = None,
) -> TrainResult:
    """Train ``model`` on ``dataset`` until ``cfg.max_iters`` iterations are done.

    ``model(images, targets, context=TrainingContext(iteration, max_iters))`` returns a dict
    of scalar tensors: the ``loss*`` entries are summed for the update, any other entry (a
    diagnostic) is only logged. Checkpoints go to ``work_dir`` (``iter_{n:08d}`` every
    ``cfg.checkpoint_every``, the two latest kept; ``model_final`` at the end, whose
    ``.safetensors`` is the weights file for eval/predict). ``resume`` continues exactly
    from the latest complete checkpoint. SIGINT/SIGTERM stop after the current iteration
    with a checkpoint and status "interrupted". ``extra_state`` (JSON-serialisable:
    config, categories...) is stored in every checkpoint. ``on_iteration(n, values)`` is
    called after iteration ``n``.

    ``repeat_threshold`` turns on repeat-factor sampling (mmdet's ``ClassBalancedDataset``,
    ``oversample_thr``): each epoch lists record ``i`` ``ceil(r(i))`` times, ``r`` from the
    records' ``category_ids`` (:func:`instseg.data.loader.repeat_factors`); a resumed run
    must use the threshold it started with. ``cfg.load_from`` initialises the model before
    the first iteration of a fresh run, ``cfg.by_epoch`` resolves the schedule to
    iterations once the epoch length is known (both reported on stderr).
    """
    extra_state, records = _check_arguments(cfg, dataset, extra_state)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    device = _model_device(model)
    amp = cfg.amp
    if amp and device.type != "cuda":
        warnings.warn("TrainConfig.amp is ignored: bf16 autocast needs CUDA", stacklevel=2)
        amp = False

    world = rank_and_world()[1]
    if cfg.batch_size < world:
        raise ValueError(
            f"train.batch_size={cfg.batch_size} is the global batch (all processes "
            f"together): it cannot give each of the {world} processes an image"
        )
    notes = []
    if cfg.base_batch_size is not None:
        lr = cfg.schedule.base_lr * cfg.batch_size / cfg.base_batch_size
        notes.append(
            f"train.base_batch_size: lr {cfg.schedule.base_lr:g} x {cfg.batch_size} / "
            f"{cfg.base_batch_size} = {lr:g} (linear scaling rule)"
        )
        cfg = replace(cfg, schedule=replace(cfg.schedule, base_lr=lr))
    if world > 1 or cfg.accumulate > 1:
        share = cfg.batch_size / (world * cfg.accumulate)
        notes.append(
            f"global batch {cfg.batch_size} = {world} process(es) x {cfg.accumulate} "
            f"micro-batch(es) of ~{share:g} image(s)"
        )

    model.train()
    optimizer = build_optimizer(model, cfg.schedule)
    sampler = GroupedBatchSampler(
        [r.aspect_ratio for r in records],
        cfg.batch_size,
        shuffle=True,
        seed=cfg.seed,
        repeats=_repeats(records, repeat_threshold),
    )
    if repeat_threshold is not None:
        notes.append(
            f"repeat-factor sampling (threshold {repeat_threshold}): {sampler.num_samples} "
            f"images per epoch from {len(records)}"
        )
    if cfg.by_epoch:
        epoch_len = len(_epoch_plan(sampler, 0, cfg.accumulate, world))
        epochs, steps = cfg.max_iters, cfg.schedule.steps
        cfg = _resolve_epochs(cfg, epoch_len)
        notes.append(
            f"train.by_epoch: {epochs} epochs of {epoch_len} iterations = {cfg.max_iters} "
            f"iterations, lr steps after epochs {list(steps)} = iterations "
            f"{list(cfg.schedule.steps)}"
        )
    position, resumed_from = _start(
        work_dir, resume, model, optimizer, cfg, len(records), repeat_threshold, device
    )
    if resumed_from is None and cfg.load_from is not None:
        notes.append(load_initial_weights(model, cfg.load_from).summary())
    run = _Run(
        model,
        dataset,
        cfg,
        work_dir,
        optimizer=optimizer,
        sampler=sampler,
        position=position,
        resumed_from=resumed_from,
        num_images=len(records),
        repeat_threshold=repeat_threshold,
        extra_state=extra_state,
        device=device,
        amp=amp,
        on_iteration=on_iteration,
    )
    for note in notes:
        run.progress.message(note)
    return run.run()
