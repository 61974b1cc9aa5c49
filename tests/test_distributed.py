"""Distributed pieces on CPU with gloo and 2 processes.

- The launch environment (torchrun, srun) is read from its variables; errors name them.
- SyncBN across 2 processes equals BatchNorm over the concatenated batch: outputs, input
  and parameter gradients, running statistics (the reference is ``nn.BatchNorm2d`` in one
  process, not the code under test).
- 2 processes train every detector kind as 1 process with the whole batch.
- A NaN on one rank stops every rank with the reason, and leaving the group frees it.
- SIGTERM to torchrun saves one checkpoint and the resume continues exactly; a killed rank
  ends the run, naming it.
- ``torchrun --nproc-per-node 2 -m instseg eval`` writes the same metrics and results json as
  one process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from instseg.cli import main
from instseg.engine.distributed import (
    DistEnv,
    environment,
    gather_to_main,
    init_process_group,
    leave_process_group,
    shard,
)
from instseg.engine.trainer import micro_batches, split_evenly
from instseg.errors import DistributedError
from instseg.layers.norm import SyncBatchNorm2d
from test_cli import TINY

# ---------------------------------------------------------------------------------------------
# The launch environment
# ---------------------------------------------------------------------------------------------


def test_environment_of_torchrun_and_srun() -> None:
    assert environment({}) is None
    assert environment({"RANK": "0", "WORLD_SIZE": "1"}) is None  # one process: plain run
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h"}
    assert environment(torchrun) == DistEnv(3, 4, 1, "torchrun")
    srun = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1"}
    srun |= {"MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
    assert environment(srun) == DistEnv(5, 8, 1, "slurm")
    # A plain python in an sbatch script of several tasks (no srun step): one process.
    assert environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}) is None
    with pytest.raises(DistributedError, match="without MASTER_ADDR and MASTER_PORT"):
        environment({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"})
    with pytest.raises(DistributedError, match="rank 4 is outside a world of 4"):
        environment({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(DistributedError, match="WORLD_SIZE='two'"):
        environment({"RANK": "0", "WORLD_SIZE": "two"})


def test_shard_and_gather_without_a_group() -> None:
    items = list(range(11))
    shares = [shard(items, r, 3) for r in range(3)]
    assert sorted(i for s in shares for i in s) == items
    assert [len(s) for s in shares] == [4, 4, 3]
    assert gather_to_main({"a": 1}) == [{"a": 1}]


def test_commands_that_are_not_data_parallel_refuse_a_multi_process_launch(
    monkeypatch, capsys
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["score", "--ann", "a.json", "--results", "r.json"]) == 2
    err = capsys.readouterr().err
    assert "`instseg score` does not run under a multi-process launch" in err
    assert "torchrun, 2 processes" in err
    assert "train, eval, predict" in err


def test_global_batches_split_into_micro_batches_and_ranks() -> None:
    items = [(i, 100 + i) for i in range(7)]
    assert split_evenly(items, 3) == [items[:3], items[3:5], items[5:]]
    assert split_evenly(items[:2], 3) == [items[:1], items[1:2], []]
    # A full batch runs as `accumulate` micro-batches whatever the number of processes.
    batch = items[:4]
    assert micro_batches(batch, 2, 1) == micro_batches(batch, 2, 2) == [batch[:2], batch[2:]]
    assert micro_batches(batch, 1, 4) == [batch]
    # A partial batch: fewer micro-batches, each giving every process an image; none at all
    # (the batch is skipped) when it has fewer images than processes.
    assert micro_batches(items[:3], 2, 2) == [items[:3]]
    assert micro_batches(items[:1], 1, 2) == []


# ---------------------------------------------------------------------------------------------
# SyncBN across 2 processes
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    """Join a gloo group of ``world`` processes on this machine, as the commands do."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_process_group(DistEnv(rank, world, rank, "torchrun"), "cpu", timeout_s=120)


def _syncbn_rank(rank: int, world: int, port: int, out: str) -> None:
    _join(rank, world, port)
    try:
        torch.manual_seed(0)
        x = torch.randn(4, 3, 5, 6, dtype=torch.float64) * 3 + 2
        w = torch.randn(4, 3, 5, 6, dtype=torch.float64)
        bn = SyncBatchNorm2d(3).double()
        with torch.no_grad():
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
        share = x[2 * rank : 2 * rank + 2].clone().requires_grad_(True)
        y = bn(share)
        (y * w[2 * rank : 2 * rank + 2]).sum().backward()
        torch.save(
            {
                "y": y.detach(),
                "dx": share.grad,
                "dweight": bn.weight.grad,
                "dbias": bn.bias.grad,
                "running": (bn.running_mean, bn.running_var, bn.num_batches_tracked),
            },
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        leave_process_group()


def test_syncbn_across_two_processes_equals_batchnorm_over_the_whole_batch(tmp_path) -> None:
    mp.spawn(_syncbn_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    torch.manual_seed(0)
    x = (torch.randn(4, 3, 5, 6, dtype=torch.float64) * 3 + 2).requires_grad_(True)
    w = torch.randn(4, 3, 5, 6, dtype=torch.float64)
    bn = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    y = bn(x)
    (y * w).sum().backward()

    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach())
    torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]), x.grad)
    # Each rank's parameter gradient is its share's; their sum is the whole batch's (DDP
    # averages them, with the loss averaged the same way).
    torch.testing.assert_close(ranks[0]["dweight"] + ranks[1]["dweight"], bn.weight.grad)
    torch.testing.assert_close(ranks[0]["dbias"] + ranks[1]["dbias"], bn.bias.grad)
    for r in ranks:
        torch.testing.assert_close(r["running"][0], bn.running_mean)
        torch.testing.assert_close(r["running"][1], bn.running_var)
        assert int(r["running"][2]) == int(bn.num_batches_tracked) == 1


def test_syncbn_in_one_process_is_batchnorm() -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 4, 3, 3)
    sync, bn = SyncBatchNorm2d(4), nn.BatchNorm2d(4)
    sync.load_state_dict(bn.state_dict())
    assert torch.equal(sync(x), bn(x))
    assert torch.equal(sync.running_var, bn.running_var)


def _poisoned_rank(rank: int, world: int, port: int, out: str) -> None:
    """Train the engine's toy model on 2 ranks; rank 1's loss turns NaN at iteration 3."""
    from instseg.engine import train
    from test_engine import ToyDataset, _cfg, _model

    _join(rank, world, port)
    group = dist.group.WORLD
    model = _model()

    def poison(iteration: int, values: dict) -> None:
        model.poison = rank == 1 and iteration == 2

    try:
        train(model, ToyDataset(), _cfg(max_iters=6), Path(out) / "work", on_iteration=poison)
        message = "finished"
    except FloatingPointError as exc:
        message = f"FloatingPointError: {exc}"
    finally:
        leave_process_group()
    # References to the group left after leaving it, besides `group` and getrefcount's own:
    # any would keep gloo's threads running into interpreter shutdown (init_process_group).
    holders = sys.getrefcount(group) - 2
    (Path(out) / f"rank{rank}.txt").write_text(f"{message}\nholders={holders}")


def test_a_nan_loss_on_one_rank_stops_every_rank_with_the_reason(tmp_path) -> None:
    mp.spawn(_poisoned_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert message.startswith("FloatingPointError: non-finite loss at iteration 3"), message
        assert "loss_mask=nan" in message
        # DDP did not keep the group alive: leaving it freed it and joined its threads.
        assert message.endswith("holders=0"), message
    # Nothing was saved on the way, and nothing half-written is left.
    assert not list((tmp_path / "work").glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------
# Distributed evaluation through torchrun
# ---------------------------------------------------------------------------------------------


def test_torchrun_eval_equals_one_process(tmp_path) -> None:
    from instseg.data import ShapesConfig, generate_shapes

    data = tmp_path / "data"
    ann = generate_shapes(
        data, ShapesConfig(num_images=5, image_size=(96, 128), max_size=40, seed=3), "val"
    )
    work = tmp_path / "work"
    argv = ["train", "mask_rcnn_r18_fpn_small", "--work-dir", str(work)]
    argv += ["--train-ann", str(ann), "--train-images", str(data), "--max-iters", "2"]
    assert main([*argv, "--set", *TINY, "model.roi_head.score_thr=0.0"]) == 0
    weights = str(work / "model_final.safetensors")
    common = ["eval", "--checkpoint", weights, "--ann", str(ann), "--images", str(data)]

    # torchrun gives each process one thread; the single process gets one too, so that float
    # sums run in the same order and the two runs can be compared bit for bit.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    one = tmp_path / "one"
    cmd = [sys.executable, "-m", "instseg", *common]
    cmd += ["--out", str(one / "m.json"), "--results", str(one / "r.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    two = tmp_path / "two"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    cmd = [*launch, "2", "-m", "instseg", *common]
    cmd += ["--out", str(two / "m.json"), "--results", str(two / "r.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((one / "r.json").read_text())
    assert len({r["image_id"] for r in results}) >= 3  # several images, on both ranks
    assert (two / "r.json").read_text() == (one / "r.json").read_text()
    assert (two / "m.json").read_text() == (one / "m.json").read_text()
    assert done.stdout.count("bbox ") == 1  # rank 0 alone prints the table

    # predict: each rank draws its images' overlays; rank 0 writes the json files.
    predict = ["predict", str(data / "images"), "--checkpoint", weights, "--score-thr", "0.0"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*predict, "--out", str(one / "pred")]) == 0
    finally:
        torch.set_num_threads(threads)
    cmd = [*launch, "2", "-m", "instseg", *predict, "--out", str(two / "pred")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("results.json", "images.json"):
        assert (two / "pred" / name).read_text() == (one / "pred" / name).read_text()
    assert len(json.loads((two / "pred" / "images.json").read_text())) == 5
    overlays = sorted(p.name for p in (two / "pred").glob("*_pred.png"))
    assert overlays == sorted(p.name for p in (one / "pred").glob("*_pred.png"))
    assert len(overlays) == 5


# ---------------------------------------------------------------------------------------------
# Data-parallel training through torchrun
# ---------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]

# Every detector kind, as tests/distributed_cases.py trains them (a config name, then
# +KEY=VALUE overrides). Small subsets where a model draws some of the batch at random, so
# that those draws happen: Grid R-CNN's positives over the whole batch, CondInst's per image.
EVERY_KIND = [
    "faster_rcnn_r18_fpn_small",
    "mask_rcnn_r18_fpn_small",
    "mask_rcnn_r18_fpn_groie_small",
    "refinemask_r18_fpn_small",
    # IFR's unrolled pretraining phase at iteration 1, its equilibrium phase (implicit
    # backward) at iteration 2.
    "mask_rcnn_r18_fpn_ifr_small+model.roi_head.mask_head.pretrain_steps=1",
    "cascade_mask_rcnn_r18_fpn_small",
    "cascade_rcnn.res50.fpn.coco.800size.1x",  # detectron2's: later stages relabel all boxes
    "grid_rcnn_r18_fpn_small+model.roi_head.grid_head.max_num_grid=8",
    "fcos_r50_fpn_1x_coco",
    "condinst_r18_fpn_small+model.mask_head.branch_norm=SyncBN"
    "+model.mask_head.max_masks_to_train=5",
    # SyncBN training the backbone: statistics of the global batch across the processes.
    "fcos_r50_fpn_1x_coco+model.backbone.norm=SyncBN+model.backbone.norm_eval=false",
    # Two micro-batches of two images per update: one image per process in each.
    "mask_rcnn_r18_fpn_small+train.accumulate=2",
]


def _launch_env() -> dict[str, str]:
    """The environment of a launched command: no inherited launch variables, one thread
    per process (torchrun's default) in both runs so that float sums run alike."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _landscape_shapes(root: Path) -> Path:
    """8 landscape images: one aspect-ratio group, so batches of 4 are full."""
    from instseg.data import ShapesConfig, generate_shapes

    ann = generate_shapes(
        root, ShapesConfig(num_images=8, image_size=(80, 144), max_size=40, seed=7), "train"
    )
    images = json.loads(ann.read_text())["images"]
    assert len(images) == 8 and all(i["width"] > i["height"] for i in images)
    return ann


def _log(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_two_processes_train_every_detector_kind_as_one_process_with_the_whole_batch(tmp_path):
    """2 processes x 2 images = 1 process x 4 images, two iterations of every kind: same
    losses and weights up to float summation order. The second iteration runs on weights the
    first update changed (lr 0.02, no warmup): a gradient not averaged right, a loss
    normalised per process or a random choice made per process would differ by far more."""
    ann = _landscape_shapes(tmp_path / "data")
    script = [str(REPO / "tests" / "distributed_cases.py")]
    runs = {}
    for name, launch in (("one", [sys.executable]), ("two", TORCHRUN)):
        cmd = [*launch, *script, str(tmp_path / name), str(ann), str(tmp_path / "data")]
        runs[name] = subprocess.run(
            [*cmd, *EVERY_KIND], capture_output=True, text=True, timeout=600, env=_launch_env()
        )
        assert runs[name].returncode == 0, runs[name].stderr[-3000:]
    split = runs["two"].stderr.count("global batch 4 = 2 process(es) x 1 micro-batch(es)")
    assert split == len(EVERY_KIND) - 1  # rank 0 alone reports; the accumulate case below
    assert "global batch 4 = 2 process(es) x 2 micro-batch(es) of ~1 image(s)" in runs["two"].stderr
    for case in EVERY_KIND:
        one, two = tmp_path / "one" / case, tmp_path / "two" / case
        log_one, log_two = _log(one), _log(two)
        assert [r["iteration"] for r in log_one] == [r["iteration"] for r in log_two] == [1, 2]
        for a, b in zip(log_one, log_two, strict=True):
            assert a.keys() == b.keys(), case
            # Loss terms, their total, the gradient norm and the lr; not the timings nor
            # IFR's solver diagnostics (each process solves its own RoIs' fixed points, so
            # its step counts and residuals are its own; the logged values are their means).
            compared = [k for k in a if k.rsplit(".", 1)[-1].startswith("loss")]
            assert len(compared) >= 2, case
            for key in [*compared, "total", "lr", *(["grad_norm"] if "grad_norm" in a else [])]:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (case, key)
        assert log_one[0]["total"] != log_one[1]["total"]
        w_one, w_two = (_weights(w / "model_final.safetensors") for w in (one, two))
        assert w_one.keys() == w_two.keys()
        for key in w_one:
            torch.testing.assert_close(w_two[key], w_one[key], atol=2e-5, rtol=1e-4, msg=key)


def _train_command(launch: list[str], work: Path, ann: Path, max_iters: int, *extra: str):
    """``instseg train`` of the tiny Mask R-CNN (backbone BN in eval mode) on ``ann``."""
    cmd = [*launch, "-m", "instseg", "train", "mask_rcnn_r18_fpn_small", "--work-dir", str(work)]
    cmd += ["--train-ann", str(ann), "--train-images", str(ann.parent)]
    cmd += ["--max-iters", str(max_iters), "--dist-timeout", "60", *extra]
    return [*cmd, "--set", *TINY, "model.backbone.norm_eval=true"]


def _wait_for(condition, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, "the run ended before the test could interrupt it"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


def _checkpoint_iterations(work: Path) -> list[int]:
    """Iterations of the complete periodic checkpoints in ``work`` (json written last)."""
    return sorted(int(p.stem.split("_")[1]) for p in work.glob("iter_*.json"))


def test_sigterm_to_torchrun_saves_one_checkpoint_and_resume_continues_exactly(tmp_path):
    """SIGTERM to the launcher: every process stops after the same iteration and rank 0
    writes one complete checkpoint. Resumed by 2 processes, the run ends with the weights of
    one that never stopped, bit for bit; resumed by 1 process, to float tolerance."""
    ann = _landscape_shapes(tmp_path / "data")
    # Short enough that float-order differences (1 process vs 2) cannot yet flip a discrete
    # choice (a proposal near a tie) and grow: they do after about 10 iterations here.
    env, iters = _launch_env(), 8
    ref = tmp_path / "ref"
    done = subprocess.run(
        _train_command(TORCHRUN, ref, ann, iters), capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]

    stopped = tmp_path / "stopped"
    run = subprocess.Popen(
        _train_command(TORCHRUN, stopped, ann, iters), stderr=subprocess.PIPE, text=True, env=env
    )
    log = stopped / "log.jsonl"
    _wait_for(lambda: log.is_file() and len(log.read_text().splitlines()) >= 2, run)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert err.count("SIGTERM: stopping after this iteration") == 1  # rank 0 speaks
    (k,) = _checkpoint_iterations(stopped)
    assert 2 <= k < iters and not (stopped / "model_final.json").exists()
    assert f"stopped at iteration {k}/{iters} (SIGTERM)" in err
    shutil.copytree(stopped, tmp_path / "stopped_one")

    resume = ["--resume"]
    done = subprocess.run(
        _train_command(TORCHRUN, stopped, ann, iters, *resume),
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    expected = _weights(ref / "model_final.safetensors")
    resumed = _weights(stopped / "model_final.safetensors")
    assert all(torch.equal(resumed[key], expected[key]) for key in expected)
    assert [r["iteration"] for r in _log(stopped)] == list(range(1, iters + 1))

    # Another world size continues the same global batches (one process holds all 2 images).
    one = tmp_path / "stopped_one"
    done = subprocess.run(
        _train_command([sys.executable], one, ann, iters, *resume),
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for a, b in zip(_log(ref), _log(one), strict=True):
        assert b["total"] == pytest.approx(a["total"], rel=1e-4), a["iteration"]
    resumed = _weights(one / "model_final.safetensors")
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], atol=2e-5, rtol=1e-4, msg=key)


def _children_by_rank(pid: int) -> dict[int, int]:
    """``{RANK: pid}`` of the worker processes torchrun ``pid`` started (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid:
            for item in environ:
                if item.startswith(b"RANK="):
                    found[int(item[5:])] = int(entry.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers in /proc")
def test_a_killed_rank_ends_the_run_naming_it_and_resume_completes(tmp_path):
    ann = _landscape_shapes(tmp_path / "data")
    env, work = _launch_env(), tmp_path / "work"
    run = subprocess.Popen(
        _train_command(TORCHRUN, work, ann, 200, "--checkpoint-every", "2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    _wait_for(lambda: bool(_checkpoint_iterations(work)), run)
    workers = _children_by_rank(run.pid)
    assert sorted(workers) == [0, 1]
    killed_at = time.monotonic()
    os.kill(workers[1], signal.SIGKILL)
    out, _ = run.communicate(timeout=120)
    assert run.returncode != 0
    assert time.monotonic() - killed_at < 60  # --dist-timeout: nobody waits longer
    # torchrun's report names the failed rank and its signal; the survivor says why it ended.
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", out) and "SIGKILL" in out, out[-3000:]
    assert "(rank 0 of 2): error: an operation with the other processes failed" in out

    last = max(_checkpoint_iterations(work))
    assert not (work / "model_final.json").exists()
    done = subprocess.run(
        _train_command(TORCHRUN, work, ann, last + 2, "--resume"),
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((work / "model_final.json").read_text())["state"]["iteration"] == last + 2
    assert [r["iteration"] for r in _log(work)] == list(range(1, last + 3))
