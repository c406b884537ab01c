"""Real width, past 2 GB: a Phi-3-mini slice (hidden 3072, ffn 8192, vocab 32064, 32 heads, 4 layers = 2.6 GB fp32).

Opt in: `make test-slow` (about 4 minutes and 5 GB of memory on 2 cores).
"""


import numpy as np
import pytest

from edgeft.graph.trace import probe_batch
from edgeft.runtime import jobs, launcher
from edgeft.stages.export import export
from edgeft.stages.prepare import PrepareConfig, prepare
from tests.helpers import stages

pytestmark = pytest.mark.slow


def test_phi3_mini_slice_over_2gb_exports_verifies_and_trains(tmp_path):
    from tests.tiny_models import phi3_slice as build

    model_dir = build("slice", tmp_path / "model", layers=4)
    ws = prepare(PrepareConfig(model_dir=str(model_dir)), tmp_path / "ws")
    out = export(ws)
    rec = stages(ws)["export"]
    weights_mb = rec["memory_mb"]["fp32_weights"]
    assert weights_mb * 2**20 > 2 * 2**30
    assert rec["verification"]["relative_difference"] <= 1e-4
    peaks = [v for k, v in rec["memory_mb"].items() if k.endswith("peak_rss")]
    assert max(peaks) <= 2.5 * weights_mb, rec["memory_mb"]
    assert (out / "checkpoint").stat().st_size < 100 * 2**20

    batch = probe_batch(32064, seq_len=64, pad_id=32000, seed=1)
    batch = {k: v[:1] for k, v in batch.items()}
    np.savez(tmp_path / "b.npz", **batch)
    result = launcher.run(jobs.Steps(artifacts=str(out), batch=str(tmp_path / "b.npz"), steps=2, lr=1e-3))
    assert len(result["losses"]) == 2 and all(np.isfinite(result["losses"]))
