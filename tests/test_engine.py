"""Training engine: schedule, safetensors checkpoints, exact resume, signals, NaN, logs.

A toy model (conv + batch norm + dropout + tied head, two losses, noise from the global
torch RNG) and a toy dataset (augmentation from the sample seed and from the global torch
and python RNGs) stand in for the detectors, so these tests only exercise the engine.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import re
import signal
from dataclasses import FrozenInstanceError, dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import instseg.engine.checkpoint as checkpoint_module
import instseg.engine.trainer as trainer_module
from instseg.data.loader import GroupedBatchSampler, make_loader
from instseg.engine import (
    CheckpointError,
    ScheduleConfig,
    TrainConfig,
    build_optimizer,
    latest_checkpoint,
    load_checkpoint,
    load_weights_only,
    lr_at,
    save_checkpoint,
    train,
)
from instseg.engine.schedule import set_lr
from instseg.structures import ImageBatch, ImageInfo, InstanceTargets, TrainingContext

MAX_ITERS = 14
EPOCH_LEN = 6  # 7 landscape + 4 portrait images, batch 2: 4 + 2 batches per epoch


# ---------------------------------------------------------------------------- toy parts


@dataclass
class _Record:
    width: int
    height: int

    @property
    def aspect_ratio(self) -> float:
        return self.width / self.height


class ToyDataset(torch.utils.data.Dataset):
    """Eleven small images; randomness from the sample seed and from the global RNGs."""

    def __init__(self) -> None:
        landscape, portrait = _Record(24, 16), _Record(16, 24)
        self.records = [landscape, portrait] * 4 + [landscape] * 3

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        record = self.records[index]
        h, w = record.height, record.width
        g = torch.Generator().manual_seed(seed)
        image = torch.rand(3, h, w, generator=g)
        image = image + 0.1 * torch.randn(3, h, w)  # global torch RNG
        x0 = int(torch.randint(0, w // 2, (1,), generator=g))
        y0 = int(torch.randint(0, h // 2, (1,), generator=g))
        size = 4 + int(random.random() * 6)  # global python RNG
        boxes = torch.tensor([[x0, y0, min(x0 + size, w), min(y0 + size, h)]], dtype=torch.float32)
        if torch.rand((), generator=g) < 0.5:
            image = image.flip(-1)
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
        targets = InstanceTargets(boxes, torch.tensor([index % 3]))
        info = ImageInfo(index, f"{index}.png", (h, w), (h, w))
        return image, targets, info


class ToyModel(nn.Module):
    """Two losses; dropout and additive noise draw from the global torch RNG; the head is
    registered twice (tied weights share storage in the state dict)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Conv2d(8, 2, 1)
        self.tied = self.head
        self.poison = False

    def forward(
        self,
        images: ImageBatch,
        targets: list[InstanceTargets],
        context: TrainingContext | None = None,
    ) -> dict:
        x = self.drop(F.relu(self.norm(self.conv(images.tensor))))
        out = self.tied(x)
        fg = torch.zeros_like(out[:, 0])
        level = torch.zeros_like(out[:, 1])
        for i, t in enumerate(targets):
            for (x0, y0, x1, y1), label in zip(
                t.boxes.round().long().tolist(), t.labels, strict=True
            ):
                fg[i, y0:y1, x0:x1] = 1
                level[i, y0:y1, x0:x1] = float(label) + 1
        noise = 0.05 * torch.randn_like(level)
        loss_mask = F.binary_cross_entropy_with_logits(out[:, 0], fg)
        if self.poison:
            loss_mask = loss_mask * float("nan")
        return {"loss_mask": loss_mask, "loss_level": F.mse_loss(out[:, 1], level + noise)}


def _model() -> ToyModel:
    torch.manual_seed(1234)
    return ToyModel()


def _cfg(**overrides) -> TrainConfig:
    kwargs = dict(
        max_iters=MAX_ITERS,
        batch_size=2,
        log_every=1,
        seed=3,
        size_divisor=8,
        schedule=ScheduleConfig(
            base_lr=0.05, warmup_iters=4, warmup_ratio=0.1, steps=(9,), grad_clip=5.0
        ),
    )
    kwargs.update(overrides)
    return TrainConfig(**kwargs)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def _perturb_global_rngs() -> None:
    """Draw from every global RNG, as other code between two runs would."""
    torch.rand(17)
    random.random()
    np.random.rand(3)


def _signal_at(k: int, sig: int = signal.SIGTERM):
    def on_iteration(iteration: int, losses: dict) -> None:
        if iteration == k:
            os.kill(os.getpid(), sig)

    return on_iteration


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run: final weights, result and work_dir."""
    work_dir = tmp_path_factory.mktemp("reference")
    model = _model()
    result = train(model, ToyDataset(), _cfg(), work_dir)
    return _weights(model), result, work_dir


# ----------------------------------------------------------------------------- schedule


def test_lr_at_warmup_and_steps():
    cfg = ScheduleConfig(base_lr=0.02, warmup_iters=500, warmup_ratio=0.001, steps=(1000, 2000))
    assert lr_at(cfg, 0) == pytest.approx(0.02 * 0.001)
    assert lr_at(cfg, 250) == pytest.approx(0.02 * (1 - 0.5 * 0.999))
    assert lr_at(cfg, 499) == pytest.approx(0.02 * (1 - (1 / 500) * 0.999))
    assert lr_at(cfg, 500) == pytest.approx(0.02)
    assert lr_at(cfg, 999) == pytest.approx(0.02)
    assert lr_at(cfg, 1000) == pytest.approx(0.002)
    assert lr_at(cfg, 1999) == pytest.approx(0.002)
    assert lr_at(cfg, 2000) == pytest.approx(0.0002)
    # A step inside the warmup scales the warmed-up rate too (mmdet's order).
    early = ScheduleConfig(base_lr=0.1, warmup_iters=4, warmup_ratio=0.5, steps=(2,), gamma=0.5)
    assert lr_at(early, 1) == pytest.approx(0.1 * (1 - 0.75 * 0.5))
    assert lr_at(early, 3) == pytest.approx(0.05 * (1 - 0.25 * 0.5))
    assert lr_at(ScheduleConfig(warmup_iters=0), 0) == pytest.approx(0.02)


def test_constant_warmup_and_bias_lr_multiplier():
    """mmdet's FCOS recipe: ``ConstantLR`` (factor 1/3 for 500 iterations) and
    ``bias_lr_mult=2`` on every bias outside norm layers; norm parameters keep the base lr."""
    cfg = ScheduleConfig(base_lr=0.01, warmup_iters=500, warmup_ratio=1 / 3, warmup="constant")
    assert lr_at(cfg, 0) == lr_at(cfg, 499) == pytest.approx(0.01 / 3)
    assert lr_at(cfg, 500) == pytest.approx(0.01)
    model = _NormNet()
    names = {id(p): n for n, p in model.named_parameters()}
    cfg = ScheduleConfig(bias_lr_mult=2.0, bias_decay_mult=0.0)
    optimizer = build_optimizer(model, cfg)
    set_lr(optimizer, 0.05)
    lrs = {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lrs["conv.bias"] == lrs["fc.bias"] == pytest.approx(0.1)
    assert lrs["bn.bias"] == lrs["conv.weight"] == lrs["my_bias"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="warmup"):
        ScheduleConfig(warmup="cosine")


def test_configs_name_the_bad_field():
    with pytest.raises(ValueError, match="steps"):
        ScheduleConfig(steps=(5, 3))
    with pytest.raises(ValueError, match="warmup_ratio"):
        ScheduleConfig(warmup_ratio=2.0)
    with pytest.raises(ValueError, match="grad_clip"):
        ScheduleConfig(grad_clip=0.0)
    with pytest.raises(ValueError, match="norm_decay_mult"):
        ScheduleConfig(norm_decay_mult=-0.5)
    with pytest.raises(ValueError, match="bias_decay_mult"):
        ScheduleConfig(bias_decay_mult="0")
    with pytest.raises(ValueError, match="bias_decay_mult"):
        ScheduleConfig(bias_decay_mult=float("nan"))
    with pytest.raises(ValueError, match="max_iters"):
        TrainConfig(max_iters=0)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(max_iters=1, batch_size=0)
    with pytest.raises(ValueError, match="base_lr"):
        TrainConfig(max_iters=1, schedule={"base_lr": -1.0})
    assert TrainConfig(max_iters=1, schedule={"steps": [3, 4]}).schedule.steps == (3, 4)


def test_build_optimizer_skips_frozen_parameters():
    model = _model()
    model.conv.weight.requires_grad_(False)
    optimizer = build_optimizer(model, ScheduleConfig(momentum=0.8, weight_decay=1e-3))
    params = optimizer.param_groups[0]["params"]
    assert all(p is not model.conv.weight for p in params)
    assert len(params) == sum(1 for p in model.parameters() if p.requires_grad)
    assert optimizer.param_groups[0]["momentum"] == 0.8
    assert optimizer.param_groups[0]["weight_decay"] == 1e-3


# --------------------------------------------------------------------------- checkpoints


def _stepped(seed: int = 0) -> tuple[ToyModel, torch.optim.Optimizer]:
    """A model and optimizer after two steps (so momentum buffers exist)."""
    model = _model()
    optimizer = build_optimizer(model, ScheduleConfig(base_lr=0.1))
    data = ToyDataset()
    for step in range(2):
        image, target, _ = data[(step, seed + step)]
        losses = model(ImageBatch(image[None], [tuple(image.shape[1:])]), [target])
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    return model, optimizer


@pytest.fixture
def no_pickle(monkeypatch):
    """Fail the test if anything unpickles (torch.load included)."""

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling is not allowed")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def test_checkpoint_round_trip(tmp_path, no_pickle):
    model, optimizer = _stepped()
    state = {"iteration": 2, "epoch": 0, "batch": 2, "categories": ["a", "b"]}
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    save_checkpoint(tmp_path, "iter_00000002", model, optimizer, state)
    expected_draws = (torch.rand(4), random.random(), np.random.rand(2))
    _perturb_global_rngs()

    restored = ToyModel()  # different initialisation
    restored_optimizer = build_optimizer(restored, ScheduleConfig(base_lr=0.5))
    assert load_checkpoint(tmp_path, "iter_00000002", restored, restored_optimizer) == state
    draws = (torch.rand(4), random.random(), np.random.rand(2))
    assert torch.equal(draws[0], expected_draws[0])
    assert draws[1] == expected_draws[1]
    assert np.array_equal(draws[2], expected_draws[2])

    _assert_identical(_weights(restored), _weights(model))
    original, loaded = optimizer.state_dict(), restored_optimizer.state_dict()
    assert original["param_groups"] == loaded["param_groups"]
    assert original["state"].keys() == loaded["state"].keys()
    for pid, entries in original["state"].items():
        assert torch.equal(entries["momentum_buffer"], loaded["state"][pid]["momentum_buffer"])
    assert restored.tied is restored.head

    # Continuing from both gives the same next step.
    for m, opt in ((model, optimizer), (restored, restored_optimizer)):
        torch.manual_seed(9)
        image, target, _ = ToyDataset()[(3, 7)]
        losses = m(ImageBatch(image[None], [tuple(image.shape[1:])]), [target])
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    _assert_identical(_weights(restored), _weights(model))


def test_checkpoint_handles_shared_and_strided_tensors(tmp_path):
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(3, 4)
            self.b.weight = self.a.weight  # tied
            self.register_buffer("transposed", torch.arange(12.0).reshape(3, 4).t())
            self.register_buffer("window", torch.arange(10.0)[2:5])

    model = Odd()
    save_checkpoint(tmp_path, "odd", model, None, {})
    other = Odd()
    other.transposed.zero_()
    other.window.zero_()
    load_checkpoint(tmp_path, "odd", other)
    _assert_identical(_weights(other), _weights(model))


def test_crash_between_files_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer = _stepped()
    save_checkpoint(tmp_path, "iter_00000002", model, optimizer, {"iteration": 2})
    good = _weights(model)
    real_write = checkpoint_module.atomic_write_bytes

    def crash_on(suffix: str):
        def write(path: Path, data: bytes) -> None:
            if path.name.endswith(suffix):
                raise OSError("simulated crash")
            real_write(path, data)

        return write

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    # Crash after the tensors, before the json (the commit marker).
    monkeypatch.setattr(checkpoint_module, "atomic_write_bytes", crash_on(".json"))
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path, "iter_00000004", model, optimizer, {"iteration": 4})
    assert (tmp_path / "iter_00000004.safetensors").exists()
    assert latest_checkpoint(tmp_path) == "iter_00000002"
    with pytest.raises(FileNotFoundError, match=r"iter_00000004\.json"):
        load_checkpoint(tmp_path, "iter_00000004", _model())
    # Crash between the weights and the optimizer file: the same.
    monkeypatch.setattr(checkpoint_module, "atomic_write_bytes", crash_on(".optim.safetensors"))
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path, "iter_00000006", model, optimizer, {"iteration": 6})
    assert latest_checkpoint(tmp_path) == "iter_00000002"
    # No temporary files are left behind.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    monkeypatch.setattr(checkpoint_module, "atomic_write_bytes", real_write)
    restored = _model()
    assert load_checkpoint(tmp_path, "iter_00000002", restored, optimizer)["iteration"] == 2
    _assert_identical(_weights(restored), good)
    # Saving a name again un-commits it first: a crash leaves no stale json behind.
    monkeypatch.setattr(checkpoint_module, "atomic_write_bytes", crash_on(".json"))
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, "iter_00000002", model, optimizer, {"iteration": 2})
    assert latest_checkpoint(tmp_path) is None


def test_corrupt_and_mismatched_files_are_named(tmp_path):
    model, optimizer = _stepped()
    save_checkpoint(tmp_path, "ckpt", model, optimizer, {"iteration": 2})
    weights = tmp_path / "ckpt.safetensors"
    optim = tmp_path / "ckpt.optim.safetensors"
    data = weights.read_bytes()

    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"ckpt\.safetensors"):
        load_checkpoint(tmp_path, "ckpt", _model())
    with pytest.raises(CheckpointError, match=r"ckpt\.safetensors"):
        load_weights_only(weights, _model())
    weights.write_bytes(data)

    flipped = bytearray(optim.read_bytes())
    flipped[-3] ^= 0xFF
    optim.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"ckpt\.optim\.safetensors"):
        load_checkpoint(tmp_path, "ckpt", _model(), build_optimizer(_model(), ScheduleConfig()))
    optim.unlink()
    with pytest.raises(FileNotFoundError, match=r"ckpt\.optim\.safetensors"):
        load_checkpoint(tmp_path, "ckpt", _model(), build_optimizer(_model(), ScheduleConfig()))

    meta = tmp_path / "ckpt.json"
    meta.write_bytes(meta.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"ckpt\.json"):
        load_checkpoint(tmp_path, "ckpt", _model())
    with pytest.warns(UserWarning, match=r"ckpt\.json"):
        assert latest_checkpoint(tmp_path) is None

    wider = _model()
    wider.head = nn.Conv2d(8, 3, 1)
    wider.tied = wider.head
    with pytest.raises(CheckpointError, match=r"'head\.weight'"):
        load_weights_only(weights, wider)
    fewer = _model()
    del fewer.tied
    with pytest.raises(CheckpointError, match=r"'tied\.weight'"):
        load_weights_only(weights, fewer)
    load_weights_only(weights, fewer, strict=False)


def test_engine_never_unpickles():
    """The engine's sources neither import pickle nor call torch.load."""
    for name in ("__init__", "schedule", "checkpoint", "trainer"):
        source = (Path(trainer_module.__file__).parent / f"{name}.py").read_text()
        assert not re.search(r"(?<!safetensors\.)torch\.load\b", source)
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill)\b", source, re.MULTILINE)


# ------------------------------------------------------------------------------ training


def test_uninterrupted_run_writes_final_weights_and_log(reference, capsys):
    weights, result, work_dir = reference
    assert result.status == "finished"
    assert result.iteration == MAX_ITERS
    assert result.weights == work_dir / "model_final.safetensors"
    assert len(result.history) == MAX_ITERS
    assert latest_checkpoint(work_dir) == "model_final"

    model = ToyModel()
    load_weights_only(work_dir / "model_final.safetensors", model)
    _assert_identical(_weights(model), weights)

    lines = (work_dir / "log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["iteration"] for r in records] == list(range(1, MAX_ITERS + 1))
    for record, entry in zip(records, result.history, strict=True):
        for key in ("lr", "loss_mask", "loss_level", "total"):
            assert record[key] == pytest.approx(entry[key])
        assert record["total"] == pytest.approx(record["loss_mask"] + record["loss_level"])
        assert record["seconds_per_iter"] >= 0 and record["eta_seconds"] >= 0
    assert records[0]["lr"] == pytest.approx(lr_at(_cfg().schedule, 0))
    assert records[-1]["lr"] == pytest.approx(0.005)


def test_log_every_writes_window_means(tmp_path, capsys):
    result = train(_model(), ToyDataset(), _cfg(max_iters=7, log_every=3), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [3, 6, 7]
    window = [h["loss_mask"] for h in result.history[3:6]]
    assert records[1]["loss_mask"] == pytest.approx(sum(window) / 3)
    err = capsys.readouterr().err  # not a terminal: one plain line per window
    assert "iter 3/7" in err and "iter 6/7" in err and "eta" in err
    assert "\r" not in err


@pytest.mark.parametrize(
    ("k", "sig"),
    [
        (1, signal.SIGTERM),
        (4, signal.SIGTERM),  # mid-epoch
        (EPOCH_LEN, signal.SIGTERM),  # epoch boundary
        (EPOCH_LEN + 3, signal.SIGINT),  # mid second epoch, Ctrl-C
        (2 * EPOCH_LEN, signal.SIGTERM),  # second epoch boundary
        (MAX_ITERS - 1, signal.SIGTERM),
    ],
)
def test_signal_then_resume_is_bit_identical(reference, tmp_path, k, sig):
    previous = signal.getsignal(sig)
    first = train(_model(), ToyDataset(), _cfg(), tmp_path, on_iteration=_signal_at(k, sig))
    assert signal.getsignal(sig) is previous
    assert first.status == "interrupted"
    assert first.iteration == k
    assert latest_checkpoint(tmp_path) == f"iter_{k:08d}"
    assert first.weights == tmp_path / f"iter_{k:08d}.safetensors"
    state = json.loads((tmp_path / f"iter_{k:08d}.json").read_text())["state"]
    assert (state["epoch"], state["batch"]) == divmod(k, EPOCH_LEN)

    _perturb_global_rngs()
    model = ToyModel()  # any initialisation: the checkpoint replaces it
    second = train(model, ToyDataset(), _cfg(), tmp_path, resume=True)
    assert second.status == "finished"
    assert second.iteration == MAX_ITERS
    assert [h["iteration"] for h in second.history] == list(range(k + 1, MAX_ITERS + 1))
    _assert_identical(_weights(model), reference[0])
    # The resumed log continues the first one.
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(1, MAX_ITERS + 1))


def test_resume_with_two_workers_is_bit_identical(reference, tmp_path):
    cfg = _cfg(num_workers=2)
    k = EPOCH_LEN + 2
    first = train(_model(), ToyDataset(), cfg, tmp_path, on_iteration=_signal_at(k))
    assert (first.status, first.iteration) == ("interrupted", k)
    _perturb_global_rngs()
    model = ToyModel()
    assert train(model, ToyDataset(), cfg, tmp_path, resume=True).status == "finished"
    # Samples are a pure function of (index, seed): workers change nothing.
    _assert_identical(_weights(model), reference[0])


def test_crash_resumes_from_last_periodic_checkpoint(reference, tmp_path):
    def crash(iteration: int, losses: dict) -> None:
        if iteration == 8:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_model(), ToyDataset(), _cfg(checkpoint_every=3), tmp_path, on_iteration=crash)
    assert latest_checkpoint(tmp_path) == "iter_00000006"
    model = ToyModel()
    result = train(model, ToyDataset(), _cfg(checkpoint_every=3), tmp_path, resume=True)
    assert result.history[0]["iteration"] == 7
    _assert_identical(_weights(model), reference[0])
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(1, MAX_ITERS + 1))
    # Only the two latest periodic checkpoints are kept, plus the final one.
    names = sorted(p.name for p in tmp_path.glob("*.json"))
    assert names == ["iter_00000009.json", "iter_00000012.json", "model_final.json"]
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "iter_00000009.optim.safetensors",
        "iter_00000009.safetensors",
        "iter_00000012.optim.safetensors",
        "iter_00000012.safetensors",
        "model_final.optim.safetensors",
        "model_final.safetensors",
    ]


def test_extending_a_finished_run_matches_a_longer_run(tmp_path):
    longer = _model()
    train(longer, ToyDataset(), _cfg(max_iters=MAX_ITERS + 4), tmp_path / "long")
    train(_model(), ToyDataset(), _cfg(), tmp_path / "short")
    model = ToyModel()
    result = train(model, ToyDataset(), _cfg(max_iters=MAX_ITERS + 4), tmp_path / "short", True)
    assert (result.status, result.iteration) == ("finished", MAX_ITERS + 4)
    _assert_identical(_weights(model), _weights(longer))
    # Resuming a finished run trains nothing.
    again = train(ToyModel(), ToyDataset(), _cfg(max_iters=MAX_ITERS + 4), tmp_path / "short", True)
    assert again.status == "finished" and again.history == []


def test_second_ctrl_c_while_saving_is_ignored(tmp_path, monkeypatch):
    real_save = trainer_module.save_checkpoint
    saves = []

    def save_under_fire(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the checkpoint is written
        saves.append(args[1])
        return real_save(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_under_fire)
    result = train(
        _model(),
        ToyDataset(),
        _cfg(checkpoint_every=2),
        tmp_path,
        on_iteration=_signal_at(3, signal.SIGINT),
    )
    assert saves == ["iter_00000002", "iter_00000003"]
    assert (result.status, result.iteration) == ("interrupted", 3)
    assert latest_checkpoint(tmp_path) == "iter_00000003"
    load_checkpoint(tmp_path, "iter_00000003", ToyModel())


def test_second_ctrl_c_before_saving_stops_at_once(tmp_path):
    def double_ctrl_c(iteration: int, losses: dict) -> None:
        if iteration == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(
            _model(), ToyDataset(), _cfg(checkpoint_every=2), tmp_path, on_iteration=double_ctrl_c
        )
    assert signal.getsignal(signal.SIGINT) is previous
    assert latest_checkpoint(tmp_path) == "iter_00000002"
    load_checkpoint(tmp_path, "iter_00000002", ToyModel())


def test_nan_loss_raises_and_keeps_last_checkpoint(tmp_path):
    model = _model()

    def poison(iteration: int, losses: dict) -> None:
        if iteration == 5:
            model.poison = True

    with pytest.raises(FloatingPointError, match=r"iteration 6: loss_mask=nan, loss_level=") as e:
        train(model, ToyDataset(), _cfg(checkpoint_every=2), tmp_path, on_iteration=poison)
    assert "last checkpoint" in str(e.value)
    assert latest_checkpoint(tmp_path) == "iter_00000004"
    assert not list(tmp_path.glob("iter_00000006*"))
    restored = ToyModel()
    assert load_checkpoint(tmp_path, "iter_00000004", restored)["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in restored.state_dict().values())


def test_resume_without_pickle(tmp_path, no_pickle):
    train(_model(), ToyDataset(), _cfg(max_iters=4), tmp_path, on_iteration=_signal_at(2))
    result = train(ToyModel(), ToyDataset(), _cfg(max_iters=4), tmp_path, resume=True)
    assert result.status == "finished"


def test_bad_starts_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train(_model(), ToyDataset(), _cfg(), tmp_path, resume=True)
    train(_model(), ToyDataset(), _cfg(max_iters=4), tmp_path, on_iteration=_signal_at(2))
    with pytest.raises(FileExistsError, match="resume=True"):
        train(_model(), ToyDataset(), _cfg(), tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        train(_model(), ToyDataset(), _cfg(batch_size=3), tmp_path, resume=True)
    with pytest.raises(ValueError, match="reserved"):
        train(_model(), ToyDataset(), _cfg(), tmp_path / "x", extra_state={"iteration": 1})
    with pytest.raises(TypeError, match="JSON"):
        train(_model(), ToyDataset(), _cfg(), tmp_path / "x", extra_state={"a": object()})


def test_extra_state_is_stored(tmp_path):
    extra = {"config": {"name": "toy"}, "categories": [{"id": 1, "name": "a"}]}
    train(_model(), ToyDataset(), _cfg(max_iters=2), tmp_path, extra_state=extra)
    state = load_checkpoint(tmp_path, "model_final", ToyModel(), restore_rng=False)
    assert state["config"] == extra["config"]
    assert state["categories"] == extra["categories"]
    assert state["iteration"] == 2
    assert state["train_config"]["schedule"]["steps"] == [9]


def test_amp_is_ignored_on_cpu(tmp_path):
    with pytest.warns(UserWarning, match="amp"):
        result = train(_model(), ToyDataset(), _cfg(max_iters=1, amp=True), tmp_path)
    assert result.status == "finished"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_run_and_resume(tmp_path):
    model = _model().cuda()
    cfg = _cfg(max_iters=4, amp=True)
    first = train(model, ToyDataset(), cfg, tmp_path, on_iteration=_signal_at(2))
    assert (first.status, first.iteration) == ("interrupted", 2)
    assert json.loads((tmp_path / "iter_00000002.json").read_text())["rng"]["cuda"]
    resumed = ToyModel().cuda()
    result = train(resumed, ToyDataset(), cfg, tmp_path, resume=True)
    assert (result.status, result.iteration) == ("finished", 4)
    assert all(torch.isfinite(v).all() for v in resumed.state_dict().values())


# ------------------------------------------------------- model outputs, context, groups


class DiagnosticModel(ToyModel):
    """ToyModel plus entries that are not losses: a residual with a gradient path into the
    head (it would change the weights if it were optimised), a constant accuracy, and a
    residual that is NaN on the third step."""

    def forward(self, images, targets, context=None) -> dict:
        outputs = super().forward(images, targets, context)
        outputs["residual"] = 100.0 * (self.head.weight**2).sum()
        outputs["acc"] = torch.tensor(0.5)
        bad = context is not None and context.iteration == 2
        outputs["solver_gap"] = torch.tensor(float("nan") if bad else 1.0)
        return outputs


def test_diagnostics_are_logged_not_optimised(reference, tmp_path, capsys):
    torch.manual_seed(1234)
    model = DiagnosticModel()
    result = train(model, ToyDataset(), _cfg(), tmp_path)
    assert result.status == "finished"  # a NaN diagnostic is not fatal
    _assert_identical(_weights(model), reference[0])
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    for record, entry, ref in zip(records, result.history, reference[1].history, strict=True):
        assert entry["total"] == ref["total"] == entry["loss_mask"] + entry["loss_level"]
        assert record["total"] == pytest.approx(entry["total"])
        assert record["residual"] > 0 and record["acc"] == 0.5
    assert math.isnan(records[2]["solver_gap"]) and records[3]["solver_gap"] == 1.0
    assert "residual" in capsys.readouterr().err


class _Outputs(nn.Module):
    """A model returning the entries it is given (each times a parameter)."""

    def __init__(self, **shapes: tuple[int, ...]) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.shapes = shapes

    def forward(self, images, targets, context=None) -> dict:
        return {k: self.scale * torch.ones(shape) for k, shape in self.shapes.items()}


def test_model_outputs_are_checked_and_named(tmp_path):
    with pytest.raises(TypeError, match=r"no loss term.*\['acc', 'residual'\]"):
        train(_Outputs(acc=(), residual=()), ToyDataset(), _cfg(max_iters=1), tmp_path / "a")
    with pytest.raises(TypeError, match=r"'residual' is not a scalar tensor \(shape \(2,\)\)"):
        model = _Outputs(loss_a=(), residual=(2,))
        train(model, ToyDataset(), _cfg(max_iters=1), tmp_path / "b")
    with pytest.raises(TypeError, match=r"'lr' clashes"):
        train(_Outputs(loss_a=(), lr=()), ToyDataset(), _cfg(max_iters=1), tmp_path / "c")
    # A single-element tensor of any shape is a scalar, as before.
    result = train(_Outputs(loss_a=(1, 1), n=(1,)), ToyDataset(), _cfg(max_iters=1), tmp_path)
    assert result.history[0]["total"] == result.history[0]["loss_a"] == 1.0


class ContextModel(ToyModel):
    """ToyModel that records the training context of every call."""

    seen: list

    def forward(self, images, targets, context=None) -> dict:
        self.seen.append(context)
        return super().forward(images, targets, context)


def test_model_sees_the_training_context_across_a_resume(reference, tmp_path):
    seen: list = []
    k = EPOCH_LEN + 1
    torch.manual_seed(1234)
    first = ContextModel()
    first.seen = seen
    train(first, ToyDataset(), _cfg(), tmp_path, on_iteration=_signal_at(k))
    assert len(seen) == k
    model = ContextModel()
    model.seen = seen
    train(model, ToyDataset(), _cfg(), tmp_path, resume=True)
    assert [(c.iteration, c.max_iters) for c in seen] == [(i, MAX_ITERS) for i in range(MAX_ITERS)]
    _assert_identical(_weights(model), reference[0])
    # The batch seeds (of random choices over a batch) are those of a run that never stopped.
    straight = ContextModel()
    straight.seen = []
    train(straight, ToyDataset(), _cfg(), tmp_path / "straight")
    assert [c.batch_seed for c in seen] == [c.batch_seed for c in straight.seen]
    assert len({c.batch_seed for c in seen}) == MAX_ITERS
    with pytest.raises(FrozenInstanceError):
        seen[0].iteration = 3


class _NormNet(nn.Module):
    """Every kind of layer the decay multipliers tell apart."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(4)
        self.sync = nn.SyncBatchNorm(4)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))
        self.fc = nn.Linear(4, 2)
        self.fc_no_bias = nn.Linear(2, 2, bias=False)
        self.frozen = nn.Linear(2, 2).requires_grad_(False)
        self.tied = self.fc  # registered twice: optimised once
        self.scale = nn.Parameter(torch.ones(1))
        self.my_bias = nn.Parameter(torch.zeros(1))  # not named "bias": regular decay


def test_decay_multipliers_pick_norm_and_bias_parameters():
    wd, norm_mult, bias_mult = 0.01, 0.0, 0.5
    expected = {
        "conv.weight": wd,
        "conv.bias": wd * bias_mult,
        "bn.weight": 0.0,
        "bn.bias": 0.0,
        "gn.weight": 0.0,
        "gn.bias": 0.0,
        "ln.weight": 0.0,
        "ln.bias": 0.0,
        "sync.weight": 0.0,
        "sync.bias": 0.0,
        "inorm.weight": 0.0,
        "inorm.bias": 0.0,
        "block.0.weight": wd,
        "block.1.weight": 0.0,
        "block.1.bias": 0.0,
        "fc.weight": wd,
        "fc.bias": wd * bias_mult,
        "fc_no_bias.weight": wd,
        "scale": wd,
        "my_bias": wd,
    }
    model = _NormNet()
    names = {id(p): n for n, p in model.named_parameters()}
    cfg = ScheduleConfig(weight_decay=wd, norm_decay_mult=norm_mult, bias_decay_mult=bias_mult)
    optimizer = build_optimizer(model, cfg)
    got = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert names[id(p)] not in got, f"{names[id(p)]} is in two groups"
            got[names[id(p)]] = group["weight_decay"]
    assert got.keys() == expected.keys()
    for name, decay in expected.items():
        assert got[name] == pytest.approx(decay), name
    # One group per decay value, each in model order, the groups in order of first use.
    order = list(names.values())
    groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    assert [g[0] for g in groups] == ["scale", "conv.bias", "bn.weight"]  # root first
    assert all(g == sorted(g, key=order.index) for g in groups)
    again = build_optimizer(_NormNet(), cfg)
    assert [len(g["params"]) for g in again.param_groups] == [len(g) for g in groups]
    # Equal multipliers share one group.
    same = ScheduleConfig(weight_decay=wd, norm_decay_mult=0.0, bias_decay_mult=0.0)
    assert len(build_optimizer(model, same).param_groups) == 2


@pytest.mark.parametrize(
    "cfg",
    [
        ScheduleConfig(momentum=0.8, weight_decay=1e-3),
        ScheduleConfig(weight_decay=0, norm_decay_mult=0.0, bias_decay_mult=3.0),
    ],
)
def test_one_group_is_the_plain_optimizer(cfg):
    model = _NormNet()
    params = [p for p in model.parameters() if p.requires_grad]
    plain = torch.optim.SGD(
        params, lr=cfg.base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    optimizer = build_optimizer(model, cfg)
    assert len(optimizer.param_groups) == 1
    assert all(a is b for a, b in zip(optimizer.param_groups[0]["params"], params, strict=True))
    assert optimizer.state_dict() == plain.state_dict()
    assert type(optimizer.param_groups[0]["weight_decay"]) is type(cfg.weight_decay)


def test_several_groups_resume_bit_identical(tmp_path):
    groups = dict(weight_decay=0.05, norm_decay_mult=0.0, bias_decay_mult=2.0, bias_lr_mult=2.0)
    schedule = ScheduleConfig(
        base_lr=0.05, warmup_iters=4, warmup_ratio=0.1, steps=(9,), grad_clip=5.0, **groups
    )
    whole = _model()
    train(whole, ToyDataset(), _cfg(schedule=schedule), tmp_path / "whole")
    plain = _model()
    plain_schedule = ScheduleConfig(**{**vars(schedule), "norm_decay_mult": 1.0})
    train(plain, ToyDataset(), _cfg(schedule=plain_schedule), tmp_path / "plain")
    assert not torch.equal(whole.norm.weight, plain.norm.weight)  # the multiplier acts

    work_dir = tmp_path / "split"
    train(_model(), ToyDataset(), _cfg(schedule=schedule), work_dir, on_iteration=_signal_at(5))
    meta = json.loads((work_dir / "iter_00000005.json").read_text())
    decays = [g["weight_decay"] for g in meta["optimizer"]["param_groups"]]
    assert decays == pytest.approx([0.05, 0.1, 0.0])
    assert [g.get("lr_mult", 1) for g in meta["optimizer"]["param_groups"]] == [1, 2.0, 1]
    model = ToyModel()
    result = train(model, ToyDataset(), _cfg(schedule=schedule), work_dir, resume=True)
    assert result.status == "finished"
    _assert_identical(_weights(model), _weights(whole))
    # A one-group optimizer cannot take the three-group state.
    with pytest.raises(CheckpointError, match="optimizer state does not match"):
        load_checkpoint(
            work_dir, "model_final", _model(), build_optimizer(_model(), _cfg().schedule)
        )


def test_make_loader_batches_in_sampler_order_off_the_global_rng():
    dataset = trainer_module._SeededSamples(ToyDataset())
    sampler = GroupedBatchSampler([r.aspect_ratio for r in dataset.dataset.records], 2, seed=4)
    state = torch.get_rng_state()
    loader = make_loader(dataset, sampler, size_divisor=8, generator=torch.Generator())
    batches = list(loader)
    assert torch.equal(torch.get_rng_state(), state)
    order = [[i for i, _ in b] for b in sampler.batches(0)]
    assert [[info.image_id for info in infos] for _, _, infos in batches] == order
    assert all(images.tensor.shape[-1] % 8 == 0 for images, _, _ in batches)


def test_base_batch_size_scales_the_lr_linearly_and_nothing_else(tmp_path, capsys):
    plain = train(_model(), ToyDataset(), _cfg(max_iters=3), tmp_path / "plain")
    scaled = train(
        _model(), ToyDataset(), _cfg(max_iters=3, base_batch_size=8), tmp_path / "scaled"
    )
    # batch 2 for a schedule set for 8: a quarter of the lr at every iteration (warmup too).
    assert [h["lr"] for h in scaled.history] == pytest.approx([h["lr"] / 4 for h in plain.history])
    assert "lr 0.05 x 2 / 8 = 0.0125 (linear scaling rule)" in capsys.readouterr().err
    # The first forward runs on the same weights and data: same losses.
    assert scaled.history[0]["loss_mask"] == plain.history[0]["loss_mask"]


def test_accumulate_and_base_batch_size_are_validated():
    with pytest.raises(ValueError, match=r"TrainConfig.accumulate must be an integer >= 1"):
        _cfg(accumulate=0)
    with pytest.raises(ValueError, match=r"base_batch_size must be None or an integer >= 1"):
        _cfg(base_batch_size=0.5)


def test_accumulated_micro_batches_update_once_per_batch(tmp_path, capsys):
    """``accumulate=2``: each batch of 2 runs as 2 micro-batches of 1 image (each padded on
    its own) before one update; the iterations and the lr schedule are the batches'."""
    seen: list = []
    model = ContextModel()
    model.seen = seen
    result = train(model, ToyDataset(), _cfg(max_iters=4, accumulate=2), tmp_path)
    assert [h["iteration"] for h in result.history] == [1, 2, 3, 4]
    # Two forwards per full batch; a partial batch of one image (the last of the landscape
    # group) runs as one micro-batch.
    sampler = GroupedBatchSampler([r.aspect_ratio for r in ToyDataset().records], 2, seed=3)
    sizes = [len(b) for b in sampler.batches(0)[:4]]
    assert 1 in sizes and 2 in sizes
    assert [c.iteration for c in seen] == [i for i, n in enumerate(sizes) for _ in range(n)]
    assert "global batch 2 = 1 process(es) x 2 micro-batch(es) of ~1 image(s)" in (
        capsys.readouterr().err
    )
