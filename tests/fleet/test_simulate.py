"""A simulated fleet on Flower's simulation engine: devices train with the ORT engine on their own data, the
server averages; checked against single-device `train` runs of the same data, options and data order."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr", reason="the fleet extra (Python 3.11+): pip install -e .[fleet]")
import psutil
import pytest

from edgeft.core import compare
from edgeft.fleet.config import FleetConfig
from edgeft.fleet.federation import round_seed
from edgeft.fleet.simulate import simulate
from edgeft.stages.train import TrainConfig, train
from tests.helpers import DATA, FAST, cli, fresh, refused, stages


def _no_children_left() -> None:
    """Flower's simulation (a Ray cluster, its actors, the devices' training runtimes) ended with the run."""
    left = [p for p in psutil.Process().children(recursive=True) if p.is_running() and p.status() != "zombie"]
    assert not left, [" ".join(p.cmdline()[:3]) for p in left]


def _trained(ws: Path, tmp_path: Path) -> dict:
    """The trainable tensors of a workspace's last checkpoint."""
    from edgeft.stages.merge import trained_tensors
    from edgeft.trainer import checkpoints

    tmp_path.mkdir(parents=True, exist_ok=True)
    return trained_tensors(checkpoints.latest(ws / "train" / "checkpoints"), "ort", tmp_path)


def test_a_fedavg_round_is_the_sample_weighted_mean_of_each_devices_own_run(exported, tmp_path):
    ws = fresh(exported, tmp_path)
    local = TrainConfig(**FAST, val_fraction=0.0)
    cfg = FleetConfig(clients=2, rounds=1, local_steps=3, evaluate=False)
    record = simulate(ws, DATA, cfg, local, log=print)
    _no_children_left()
    with np.load(ws / "fleet" / "rounds" / "round-0001.npz") as npz:
        federated = {k: npz[k] for k in npz.files}

    # the reference: each device's data trained alone by `edgeft train`, from the same start, in the same order
    runs, weights = [], []
    for device in range(2):
        alone = fresh(exported, tmp_path, f"alone-{device}")
        data = ws / "fleet" / "data" / f"device-{device:05d}.jsonl"
        train(alone, data, TrainConfig(**FAST, val_fraction=0.0, max_steps=3, schedule="constant",
                                       seed=round_seed(0, 1, device)))
        runs.append(_trained(alone, tmp_path / f"read-{device}"))
        weights.append(sum(1 for _ in data.open()))
    assert record.samples == weights
    for name, value in federated.items():
        expected = np.average([r[name] for r in runs], axis=0, weights=weights)
        assert compare.max_abs_diff(value, expected) <= 1e-6, name
    start = np.load(ws / "fleet" / "rounds" / "round-0000.npz")
    assert any(compare.max_abs_diff(federated[k], start[k]) > 1e-4 for k in federated), "the round trained nothing"


def test_fleet_sim_runs_a_recipe_to_a_merged_adapter_and_skips_when_unchanged(tiny_model, tmp_path):
    recipe = tmp_path / "fleet.yaml"
    recipe.write_text(f"""
name: tiny-fleet
workspace: {tmp_path / "ws"}
model: {{path: {tiny_model("phi3-mini-4k")}}}
lora: {{r: 8}}
data: {{train: {DATA}}}
train: {{batch_size: 4, seq_len: 256, lr: 0.001}}
stages: [prepare, export, train, merge]
fleet: {{clients: 3, rounds: 1, local_steps: 2}}
""")
    environment = dict(os.environ)
    result = cli("fleet", "sim", recipe, "--rounds", "2")
    assert result.code == 0, result.err[-3000:]
    _no_children_left()
    assert dict(os.environ) == environment, "Ray's PYTHONPATH and RAY_* were left for later subprocesses"
    ws = tmp_path / "ws"
    assert "fleet: round 2/2: 3/3 updates" in result.out
    rows = [json.loads(line) for line in (ws / "fleet" / "metrics.jsonl").read_text().splitlines()]
    trains = [r for r in rows if r["event"] == "train"]
    evals = [r for r in rows if r["event"] == "eval"]
    assert [r["round"] for r in trains] == [1, 2] and [r["round"] for r in evals] == [1, 2]
    size = sum(a.nbytes for a in np.load(ws / "fleet" / "rounds" / "round-0000.npz").values())
    assert all(r["bytes_sent"] == 3 * size and r["bytes_received"] == 3 * size for r in trains)
    assert all(np.isfinite(r["train_loss"]) for r in trains) and all(np.isfinite(r["eval_loss"]) for r in evals)
    assert (ws / "fleet" / "metrics.png").stat().st_size > 0
    recorded = stages(ws)
    assert recorded["fleet"]["rounds"] == 2 and recorded["fleet"]["devices"] == 3
    assert recorded["train"]["step"] == 4 and recorded["merge"]["checkpoint"].startswith("step-")
    assert set(recorded) >= {"prepare", "export", "train", "merge", "fleet"}

    again = cli("fleet", "sim", recipe, "--rounds", "2")
    assert again.code == 0 and "nothing to do" in again.out, again.out[-2000:]


@pytest.mark.parametrize("flags, phrases", [
    (["--clients", "0"], ["clients: 0 is below the minimum 1"]),
    (["--fraction", "nan"], ["fraction", "finite"]),
    (["--partition", "files"], ["data_dir"]),
    (["--strategy", "fedprox"], ["fedprox", "--backend torch"]),
    (["--privacy", "fixed", "--strategy", "fedadam"], ["privacy"]),
    (["--clients", "5000"], ["fewer than --clients 5000"]),
])
def test_bad_fleet_options_are_refused(exported, tiny_model, tmp_path, flags, phrases):
    ws = fresh(exported, tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nworkspace: {ws}\nmodel: {{path: {tiny_model('phi3-mini-4k')}}}\n"
                      f"lora: {{r: 8}}\ndata: {{train: {DATA}}}\ntrain: {{batch_size: 4, seq_len: 256}}\n"
                      "stages: [train]\n")
    refused(cli("fleet", "sim", recipe, *flags), *phrases)


@pytest.mark.slow  # the default run keeps under 30 min on the 2-core box
def test_a_device_data_folder_gives_one_device_per_file(exported, tmp_path):
    folder = tmp_path / "homes"
    folder.mkdir()
    lines = DATA.read_text().splitlines()
    for i in range(2):
        (folder / f"home-{i}.jsonl").write_text("\n".join(lines[i * 40:(i + 1) * 40]) + "\n")
    ws = fresh(exported, tmp_path)
    record = simulate(ws, DATA, FleetConfig(partition="files", data_dir=str(folder), rounds=1, local_steps=1,
                                            evaluate=False), TrainConfig(**FAST, val_fraction=0.0))
    assert record.devices == 2 and record.samples == [40, 40]


@pytest.mark.slow  # a fleet, two personal runs, three merges and an int4 package: about 2 minutes
def test_personal_adapters_continue_from_the_global_one_and_ship_as_swappable_adapters(exported, tmp_path):
    from edgeft.stages.merge import merge
    from edgeft.stages.package.stage import PackageConfig, package

    ws = fresh(exported, tmp_path)
    simulate(ws, DATA, FleetConfig(clients=2, rounds=1, local_steps=2, evaluate=False),
             TrainConfig(**FAST, val_fraction=0.0))
    merge(ws)
    made = cli("fleet", "personalize", ws, "--steps", "2", "--out", tmp_path / "personal")
    assert made.code == 0, made.err[-2000:]
    personal = sorted((tmp_path / "personal").glob("device-*"))
    assert len(personal) == 2
    start = np.load(ws / "fleet" / "rounds" / "round-0001.npz")
    for folder in personal:
        assert stages(folder)["train"]["step"] == 4
        mine = _trained(folder, tmp_path / f"read-{folder.name}")
        assert any(compare.max_abs_diff(mine[k], start[k]) > 1e-5 for k in start.files), "no personal steps ran"
        merge(folder)  # verifies the personal adapter against the training runtime, as for any trained one
    package(ws, PackageConfig(precision="int4", adapters=True, add_adapters=[str(p) for p in personal]))
    shipped = sorted(p.name for p in (ws / "bundle" / "adapters").glob("*.onnx_adapter"))
    assert len(shipped) == 3 and {f"{p.name}.onnx_adapter" for p in personal} <= set(shipped)


def test_bad_node_run_and_personalize_options_are_refused(exported, tiny_model, tmp_path):
    ws = fresh(exported, tmp_path)
    (tmp_path / "taken").mkdir()
    refused(cli("fleet", "node", ws, "--data", tmp_path / "missing.jsonl", "--out", tmp_path / "n"), "missing.jsonl")
    refused(cli("fleet", "node", ws, "--data", DATA, "--out", tmp_path / "taken"), "exists")
    refused(cli("fleet", "personalize", ws, "--steps", "2", "--out", tmp_path / "p"), "fleet sim")
    refused(cli("fleet", "personalize", ws, "--steps", "0", "--out", tmp_path / "p"), "at least one step")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nworkspace: {ws}\nmodel: {{path: {tiny_model('phi3-mini-4k')}}}\nlora: {{r: 8}}\n"
                      f"data: {{train: {DATA}}}\nstages: [train]\n")
    refused(cli("fleet", "run", recipe, "--superlink", "127.0.0.1:9"), "--root-certificates", "--insecure")
    refused(cli("fleet", "run", recipe, "--superlink", "127.0.0.1:9", "--insecure", "--strategy", "fedprox"),
            "fedprox", "--backend torch")
    refused(cli("fleet", "run", recipe, "--superlink", "nowhere", "--insecure"), "HOST:PORT")
    refused(cli("fleet", "run", recipe, "--superlink", "127.0.0.1:9", "--root-certificates", tmp_path / "no.pem"),
            "no such file")
    assert not (tmp_path / "n").exists()
