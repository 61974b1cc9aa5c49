"""Recorded losses, gradients and detections of fixed models on fixed inputs (issue 11).

The recording (``tests/fixtures/refactor_reference.*``) was made by
``python tests/reference_cases.py`` from the code before the detector refactor; these tests
rebuild every case with today's code and compare. Floats get a small tolerance (other CPUs
may sum in another order); labels, mask areas and mask hashes are exact.
``python tests/reference_cases.py --check`` compares bit for bit.
"""

import json
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import reference_cases as ref

RECORDED = load_file(str(ref.TENSORS))
META = json.loads(ref.META.read_text())


def _close(key: str, got: torch.Tensor) -> None:
    want = RECORDED[key]
    assert got.shape == want.shape, f"{key}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if want.is_floating_point():
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{key}: {m}")
    else:
        assert torch.equal(got, want), f"{key} differs"


@pytest.mark.parametrize("name", sorted(ref.CASES))
def test_case_matches_recording(name):
    tensors, facts = ref.case_outputs(name)
    recorded = META["cases"][name]
    # Parameter names and shapes: the mmdetection key mapping depends on them.
    assert facts["keys"] == recorded["keys"]
    prefix = f"{name}/"
    assert {k for k in tensors} == {k for k in RECORDED if k.startswith(prefix)}
    for key, value in tensors.items():
        _close(key, value)
    assert facts["mask_hash"] == recorded["mask_hash"]


def test_short_runs_match_recording():
    with tempfile.TemporaryDirectory() as tmp:
        for name in ref.RUNS:
            tensors, _ = ref.run_outputs(name, Path(tmp))
            assert {k for k in tensors} == {k for k in RECORDED if k.startswith(f"{name}/")}
            for key, value in tensors.items():
                torch.testing.assert_close(value, RECORDED[key], rtol=1e-4, atol=1e-5)
