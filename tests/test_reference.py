"""Recorded losses, gradients and detections of fixed models on fixed inputs (issue 11).

The recording (``tests/fixtures/refactor_reference.*``) was made by
``python tests/reference_cases.py`` from the code before the detector refactor; these tests
rebuild every case with today's code and compare. Floats get a small tolerance: another CPU
(the recording was made on an Intel machine; AMD EPYC machines sum float32 in another order)
moves boxes by up to 4e-5 px and flips a mask pixel near the 0.5 threshold now and then.
Labels are exact; mask areas within one pixel per detection and three per case, and the
mask hash exact whenever the areas are. ``python tests/reference_cases.py --check``
compares bit for bit (on the recording machine).
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


@pytest.fixture(autouse=True)
def recorded_thread_count():
    """The recording's thread count: float32 sums are split by thread, and one thread (a
    pytest-xdist worker's share of two cores) moves a box by 1.3e-4 px and flips 7 mask
    pixels, beyond the tolerances below, which are those of another CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(ref.RECORDED_THREADS)
    yield
    torch.set_num_threads(threads)


def _close(key: str, got: torch.Tensor) -> int:
    """Compare one recorded tensor; returns the mask pixels that differ (mask areas)."""
    want = RECORDED[key]
    assert got.shape == want.shape, f"{key}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if want.is_floating_point():
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4, msg=lambda m: f"{key}: {m}")
    elif key.endswith("mask_area"):
        diff = (got - want).abs()
        assert bool((diff <= 1).all()), f"{key}: a mask area differs by more than one pixel"
        return int(diff.sum())
    else:
        assert torch.equal(got, want), f"{key} differs"
    return 0


@pytest.mark.parametrize("name", sorted(ref.CASES))
def test_case_matches_recording(name):
    tensors, facts = ref.case_outputs(name)
    recorded = META["cases"][name]
    # Parameter names and shapes: the mmdetection key mapping depends on them.
    assert facts["keys"] == recorded["keys"]
    prefix = f"{name}/"
    assert {k for k in tensors} == {k for k in RECORDED if k.startswith(prefix)}
    flipped = sum(_close(key, value) for key, value in tensors.items())
    assert flipped <= 3, f"{name}: {flipped} mask pixels differ"
    if flipped == 0:
        assert facts["mask_hash"] == recorded["mask_hash"]


def test_short_runs_match_recording():
    """Per-iteration losses of short runs. The first two iterations are tight; later ones
    follow updates at lr 0.02 with gradient norms near 1e3 (RefineMask), which amplify a
    float32 reordering on another CPU to 0.5%: 2% there."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in ref.RUNS:
            tensors, _ = ref.run_outputs(name, Path(tmp))
            assert {k for k in tensors} == {k for k in RECORDED if k.startswith(f"{name}/")}
            for key, value in tensors.items():
                want = RECORDED[key]
                torch.testing.assert_close(value[:2], want[:2], rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(value[2:], want[2:], rtol=2e-2, atol=1e-5)
