"""TensorFlow is an optional extra: instseg imports and runs without it, and ``instseg.tf``
says what to install. Checked in fresh interpreters, with TensorFlow hidden from the import
system (a ``None`` entry in ``sys.modules`` makes ``import tensorflow`` fail)."""

from __future__ import annotations

import subprocess
import sys


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def test_instseg_never_imports_tensorflow():
    code = (
        "import sys\n"
        "import instseg, instseg.cli, instseg.ops, instseg.runner, instseg.export\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_instseg_tf_without_tensorflow_says_what_to_install():
    code = (
        "import sys\n"
        "sys.modules['tensorflow'] = None\n"
        "from instseg.ops import prroi_pool2d\n"  # the PyTorch operator is unaffected
        "try:\n"
        "    import instseg.tf\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    print('imported')\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "instseg.tf needs TensorFlow" in result.stdout
    assert 'pip install "instseg[tf]"' in result.stdout
