import json
import os
import stat

import pytest

from instseg.fileio import atomic_write_json, atomic_write_text


def test_atomic_write_keeps_old_content_on_failure_and_uses_umask_permissions(tmp_path):
    path = tmp_path / "out.json"
    atomic_write_json(path, {"a": 1})
    old_mask = os.umask(0o022)
    try:
        atomic_write_text(path, '{"b": 2}')
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    finally:
        os.umask(old_mask)
    with pytest.raises(ValueError):
        atomic_write_json(path, {"nan": float("nan")})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"set": {1, 2}})
    assert json.loads(path.read_text()) == {"b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
