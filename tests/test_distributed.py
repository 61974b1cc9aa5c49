"""Distributed pieces (issue 17, in progress) on CPU with gloo and 2 processes.

- The launch environment (torchrun, srun) is read from its variables; errors name them.
- SyncBN across 2 processes equals BatchNorm over the concatenated batch: outputs, input
  and parameter gradients, running statistics (the reference is ``nn.BatchNorm2d`` in one
  process, not the code under test).
- ``torchrun --nproc-per-node 2 -m instseg eval`` writes the same metrics and results json as
  one process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from instseg.cli import main
from instseg.engine.distributed import DistEnv, environment, gather_to_main, shard
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


def test_commands_other_than_eval_refuse_a_multi_process_launch(monkeypatch, capsys) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert (
        main(["train", "mask_rcnn_r18_fpn_small", "--train-ann", "a", "--train-images", "b"]) == 2
    )
    err = capsys.readouterr().err
    assert "`instseg train` does not run under a multi-process launch yet" in err
    assert "torchrun, 2 processes" in err


# ---------------------------------------------------------------------------------------------
# SyncBN across 2 processes
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _syncbn_rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
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
        dist.destroy_process_group()


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
