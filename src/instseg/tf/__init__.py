"""TensorFlow bindings (``pip install "instseg[tf]"``).

Precise RoI Pooling (spec §6) as a Keras layer and a function, in plain TensorFlow ops: no
compiled op, so it runs wherever TensorFlow runs (CPU and GPU), where the official binding
needs nvcc, CMake and a CUDA GPU. The rest of instseg never imports TensorFlow.
"""

from __future__ import annotations

try:
    import tensorflow  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "instseg.tf needs TensorFlow, which instseg does not install by default: "
        'pip install "instseg[tf]"'
    ) from exc

from .prroi_pool import PreciseRoIPooling, prroi_pool2d

__all__ = ["PreciseRoIPooling", "prroi_pool2d"]
