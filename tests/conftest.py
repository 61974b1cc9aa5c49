"""Shared test set-up: under pytest-xdist (``make test`` runs two workers), each worker gets
its share of the cores, so that the workers do not oversubscribe them (two workers of two
threads each on two cores took 13 minutes, the serial suite 7). Tests whose numbers depend on
the thread count pin it themselves (tests/test_reference.py)."""

import os

import torch

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _workers > 1:
    _threads = max(1, (os.cpu_count() or 1) // _workers)
    torch.set_num_threads(_threads)
    # Commands the tests launch (instseg, torchrun, python -c) inherit the share too.
    os.environ["OMP_NUM_THREADS"] = str(_threads)
