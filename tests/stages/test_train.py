"""Training: ORT vs PyTorch parity, exact resume after SIGKILL, Ctrl-C, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from edgeft.core.errors import EdgeftError
from edgeft.runtime import jobs, launcher
from edgeft.stages.prepare import PrepareConfig, prepare
from edgeft.stages.train import TrainConfig, train
from edgeft.trainer import checkpoints
from edgeft.trainer.torch_engine import ADAPTER
from tests.helpers import DATA, FAST, default_sigint, fresh, losses, stages


def trained(checkpoint, tmp_path):
    out = tmp_path / f"{checkpoint.parent.parent.parent.name}-{checkpoint.name}.npz"
    launcher.run(jobs.ReadTrained(checkpoint=str(checkpoint / "ort_checkpoint"), out=str(out)))
    return dict(np.load(out))


def test_ort_and_torch_agree_over_20_steps(exported, tmp_path):
    cfg = dict(FAST, max_steps=20, eval_every=10)
    ort_ws, torch_ws = fresh(exported, tmp_path, "ort"), fresh(exported, tmp_path, "torch")
    ort = train(ort_ws, DATA, TrainConfig(**cfg))
    ref = train(torch_ws, DATA, TrainConfig(**cfg, backend="torch"))
    a, b = np.array(losses(ort_ws)), np.array(losses(torch_ws))
    assert len(a) == len(b) == 20
    assert abs(a[0] - b[0]) < 1e-5  # same init, data and rate: the first step is the same computation
    # Stated tolerance: 1e-4 absolute per step (both run torch's AdamW; see ort_engine.torch_adamw).
    assert np.max(np.abs(a - b)) < 1e-4, np.abs(a - b)
    assert a[-1] < a[0] - 0.1 and b[-1] < b[0] - 0.1
    assert abs(ort.best_eval_loss - ref.best_eval_loss) < 1e-4
    for ws in (ort_ws, torch_ws):
        assert (ws / "train" / "metrics.png").stat().st_size > 10_000
    rec = stages(ort_ws)["train"]
    assert rec["step"] == 20 and rec["tokens_per_s"] > 0 and rec["peak_rss_mb"] > 0


def test_training_runs_the_optimizer_graph_the_artifacts_ship(exported, tmp_path, capsys):
    """The artifacts' optimizer_model.onnx is the graph a run with train's defaults runs (torch's AdamW, clipped in a
    fixed order; the ORT-vs-torch parity above trains with it); other options build their own."""
    from edgeft.trainer.ort_engine import optimizer_for, optimizer_settings

    artifacts = exported / "artifacts"
    shipped = artifacts / "optimizer_model.onnx"
    defaults = TrainConfig()
    assert optimizer_settings(shipped) == {"weight_decay": defaults.weight_decay, "adam_mode": 0,
                                           "max_grad_norm": defaults.max_grad_norm}
    assert (jobs.GenerateArtifacts.weight_decay, jobs.GenerateArtifacts.max_grad_norm) == (
        defaults.weight_decay, defaults.max_grad_norm)
    assert optimizer_for(artifacts, tmp_path, defaults.weight_decay, defaults.max_grad_norm) == shipped
    for other in ((0.01, 1.0), (0.0, None), (0.0, 0.5)):
        assert callable(optimizer_for(artifacts, tmp_path, *other)), other
    ws = fresh(exported, tmp_path)
    train(ws, DATA, TrainConfig(**FAST, max_steps=1))
    assert "engine ready, optimizer graph: the artifacts'" in capsys.readouterr().out


def run_clip(gradients, max_norm):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edgeft.trainer.ort_engine import clip_nodes

    nodes, out = clip_nodes("gradients", max_norm)
    seq = lambda name: helper.make_tensor_sequence_value_info(name, TensorProto.FLOAT, None)  # noqa: E731
    graph = helper.make_graph(nodes, "clip", [seq("gradients")], [seq(out)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(model.SerializeToString()).run(None, {"gradients": gradients})[0]


def test_gradient_clipping_does_not_depend_on_the_order_of_the_tensors():
    # ONNX Runtime hands the optimizer its gradients in an order that changes between sessions, and its own
    # clip (InplaceClipGradNorm) adds the squared norms up in that order. Here one tensor's squared norm is 1
    # and a thousand are below half of float32's step at 1: added after the 1 each one is lost, added before
    # it they count. So the sum, and its clip coefficient, depend on the order; this clip's must not.
    rng = np.random.default_rng(0)
    grads = [np.array([1.0], np.float32)] + [np.array([2.0**-12.5], np.float32) for _ in range(1000)]
    orders = [np.arange(len(grads)), np.arange(len(grads))[::-1], rng.permutation(len(grads))]
    coefficients = set()
    for order in orders:  # as InplaceClipGradNorm computes it
        total = np.float32(0)
        for i in order:
            total += np.float32(grads[i] @ grads[i])
        coefficients.add(min(np.float32(0.5) / (np.sqrt(total) + np.float32(1e-6)), np.float32(1)))
    assert len(coefficients) > 1  # the case is order-sensitive
    clipped = [run_clip([grads[i] for i in order], 0.5) for order in orders]
    for order, out in zip(orders, clipped, strict=True):
        for position, i in enumerate(order):
            np.testing.assert_array_equal(out[position], clipped[0][i])
    # torch's clip_grad_norm_: g * min(1, max_norm / (norm + 1e-6)); float64 reference, float32 rounding
    norm = np.sqrt(sum(float(g.astype(np.float64) @ g) for g in grads))
    for g, c in zip(grads, clipped[0], strict=True):
        np.testing.assert_allclose(c, g * min(1.0, 0.5 / (norm + 1e-6)), rtol=1e-6)
    small = [g * np.float32(0.4 / norm) for g in grads]  # total norm 0.4: left as it is
    for g, c in zip(small, run_clip(small, 0.5), strict=True):
        np.testing.assert_array_equal(c, g)


def cli(ws, *extra):
    # --max-grad-norm 0.05: clipping active on every step, so an exact resume also needs the clip to be exact
    return [sys.executable, "-m", "edgeft", "train", str(ws), "--data", str(DATA), "--batch-size", "4",
            "--seq-len", "256", "--lr", "1e-3", "--max-steps", "12", "--save-every", "3", "--max-grad-norm", "0.05",
            *extra]


def wait_for_step(ws, step, proc, timeout=120):
    metrics = ws / "train" / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if metrics.exists():
            steps = [json.loads(x).get("step", 0) for x in metrics.read_text().splitlines() if x.strip()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.05)
    raise TimeoutError


@pytest.mark.parametrize("backend", ["ort", pytest.param("torch", marks=pytest.mark.slow)])  # torch: distributed tests too
def test_sigkill_then_resume_ends_with_the_same_adapter(exported, tmp_path, backend):
    run = lambda ws, *extra: cli(ws, "--backend", backend, *extra)  # noqa: E731
    straight = fresh(exported, tmp_path, "straight")
    assert subprocess.run(run(straight), capture_output=True).returncode == 0
    killed = fresh(exported, tmp_path, "killed")
    proc = subprocess.Popen(run(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_step(killed, 7, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    states = [checkpoints.read_state(p)["position"]["step"] for p in checkpoints.complete(killed / "train" / "checkpoints")]
    assert max(states) < 12  # it really was cut short
    done = subprocess.run(run(killed, "--resume"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming at step" in done.stdout
    read = trained if backend == "ort" else lambda checkpoint, _: load_file(checkpoint / ADAPTER)
    a = read(straight / "train" / "checkpoints" / "step-000012", tmp_path)
    b = read(killed / "train" / "checkpoints" / "step-000012", tmp_path)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert losses(straight) == losses(killed)
    # whatever the kill left half-written or half-deleted is gone
    left = {p.name for p in (killed / "train" / "checkpoints").iterdir()} - {"best.json"}
    assert left == {p.name for p in checkpoints.complete(killed / "train" / "checkpoints")}


def test_a_new_run_sweeps_what_a_killed_one_left(tmp_path):
    root = tmp_path / "checkpoints"
    kept = checkpoints.save(root, 3, lambda folder: (folder / "adapter.bin").write_bytes(b"w"), {"position": {}})
    leftovers = [root / ".step-000006.abc123.tmp", root / ".step-000003.old", root / ".step-000000.old",
                 root / "step-000009"]  # save cut short, replace cut short, prune cut short, and a stray folder
    for path in leftovers:
        path.mkdir()
        (path / "adapter.bin").write_bytes(b"w")
    assert checkpoints.sweep(root) == sorted(p.name for p in leftovers)
    assert sorted(root.iterdir()) == [kept] and (kept / "adapter.bin").is_file()
    checkpoints.prune(root, keep_last=0, best=None)
    assert list(root.iterdir()) == []


def test_ctrl_c_saves_and_prints_the_resume_command(exported, tmp_path):
    ws = fresh(exported, tmp_path)
    # As from a terminal: a test run started in the background by a non-interactive shell ignores SIGINT, and
    # an ignored signal stays ignored in every process it starts; the run must see Ctrl-C as a user's would.
    proc = subprocess.Popen(cli(ws, "--max-steps", "400"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=default_sigint)
    wait_for_step(ws, 2, proc)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "--resume" in out and "Traceback" not in err
    import re

    step, path = re.search(r"interrupted at step (\d+)/400; checkpoint (\S+)", out).groups()
    state = json.loads((Path(path) / "trainer_state.json").read_text())
    assert state["position"]["step"] == int(step) >= 2  # saved then (or just before, by --save-every)


def test_bad_input(exported, tiny_model, tmp_path):
    unexported = tmp_path / "unexported"
    prepare(PrepareConfig(model_dir=str(tiny_model("phi3-mini-4k")), lora_r=8), unexported)
    with pytest.raises(EdgeftError, match="run `edgeft export"):
        train(unexported, DATA, TrainConfig(**FAST, max_steps=1))
    ws = fresh(exported, tmp_path)
    with pytest.raises(EdgeftError, match="exceeds 4096"):
        train(ws, DATA, TrainConfig(batch_size=4, seq_len=8192, max_steps=1))
    with pytest.raises(EdgeftError, match="nothing to resume"):
        train(ws, DATA, TrainConfig(**FAST, max_steps=2), resume=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(EdgeftError, match="edgeft data check"):
        train(ws, bad, TrainConfig(**FAST, max_steps=1))
    train(ws, DATA, TrainConfig(**FAST, max_steps=2))
    with pytest.raises(EdgeftError, match="holds checkpoints of another run"):
        train(ws, DATA, TrainConfig(**FAST, max_steps=3))
    with pytest.raises(EdgeftError, match=r"its training options differ from this run's \(lr 0.001 -> 0.0005\)"):
        train(ws, DATA, TrainConfig(**{**FAST, "lr": 5e-4}, max_steps=2), resume=True)
    again = train(ws, DATA, TrainConfig(**FAST, max_steps=2))
    assert again.step == 2  # unchanged: nothing to do


def test_cli_bad_input_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edgeft", "train", str(tmp_path / "none"), "--data", str(DATA)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "edgeft", "train", str(tmp_path), "--data", str(DATA),
                           "--lr", "-1"], capture_output=True, text=True)
    assert proc.returncode == 2 and "lr: -1.0 must be greater than 0" in proc.stderr


def test_full_disk_while_saving_keeps_the_previous_checkpoint(exported, tmp_path):
    ws = fresh(exported, tmp_path)
    root = ws / "train" / "checkpoints"
    root.mkdir(parents=True)
    # one tiny-model checkpoint (LoRA r8 + AdamW moments) is ~170 kB: room for one, not for two
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(root)], capture_output=True).returncode:
        pytest.skip("needs permission to mount a small tmpfs")
    try:
        with pytest.raises(EdgeftError, match=r"no space left .* while saving the step 4 checkpoint; the previous "
                                              r"checkpoint step-000002 is intact.*--resume"):
            train(ws, DATA, TrainConfig(**FAST, max_steps=6, save_every=2, keep_last=1, val_fraction=0.0))
        assert sorted(p.name for p in root.iterdir()) == ["step-000002"]
        state = json.loads((root / "step-000002" / "trainer_state.json").read_text())
        assert state["position"]["step"] == 2
    finally:
        subprocess.run(["umount", str(root)], check=False)
