import pytest

from edgeft import atomic


def test_failed_write_leaves_nothing(tmp_path):
    final = tmp_path / "manifest.json"
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(final) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_failed_dir_keeps_the_previous_one(tmp_path):
    final = tmp_path / "bundle"
    with atomic.atomic_dir(final) as tmp:
        (tmp / "model.onnx").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic.atomic_dir(final) as tmp:
            (tmp / "model.onnx").write_text("v2 partial")
            raise RuntimeError("interrupted")
    assert (final / "model.onnx").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
