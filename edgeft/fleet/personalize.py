"""Personal adapters: each device of a simulated fleet continues from the fleet's final global adapter for a few
steps on its own data, into a workspace of its own.

Each personal workspace is a copy of the fleet's (prepare and export, no training run) whose training run is
the device's personal adapter: merge, package and eval take it, and `edgeft package FLEET_WS --adapters
--add-adapters PERSONAL_WS ...` ships them as swappable adapters of one base.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from edgeft.core.errors import EdgeftError
from edgeft.core.workspace import Workspace, key_of
from edgeft.fleet.client import close_workers, run_job
from edgeft.fleet.federation import Federation
from edgeft.fleet.simulate import Federated, save_checkpoint
from edgeft.stages import train as train_stage
from edgeft.trainer import checkpoints

CARRIED = ("manifest.json", "adapter_init", "artifacts")  # what a personal workspace shares with the fleet's


def personalize(ws_path: Path, steps: int, out: Path, log=print) -> list[Path]:
    """One workspace per device in `out` (device-NNNNN), each trained `steps` steps from the global adapter."""
    ws = Workspace.existing(ws_path)
    if steps < 1:
        raise EdgeftError(f"--steps {steps}: a personal adapter needs at least one step")
    with ws.lock("personalize"):
        fleet = ws.require(Federated, f"run `edgeft fleet sim` on {ws.root} first (personal adapters start from a "
                                      "simulated fleet's global adapter)")
        fed = Federation.load(ws.root / "fleet" / "federation.json")
        global_adapter = load_global(ws, fleet.rounds)
        made = []
        try:
            for device in range(len(fed.devices)):
                _, arrays = run_job(dataclasses.replace(fed, local_steps=steps), device, "train", global_adapter,
                                    fed.rounds + 1, lr=fed.train["lr"])
                made.append(_workspace(ws, fed, fleet, device, steps, arrays, Path(out)))
                log(f"fleet: device {device}: personal adapter in {made[-1]}")
        finally:
            close_workers()
        return made


def load_global(ws: Workspace, rounds: int) -> dict:
    from edgeft.fleet.client import load_npz

    path = ws.root / "fleet" / "rounds" / f"round-{rounds:04d}.npz"
    if not path.is_file():
        raise EdgeftError(f"{path} is missing: the fleet's global adapter of its last round; run the fleet again")
    return load_npz(path)


def _workspace(ws: Workspace, fed: Federation, fleet: Federated, device: int, steps: int, arrays: dict,
               out: Path) -> Path:
    root = out / f"device-{device:05d}"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for name in CARRIED:
        source = ws.root / name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, root / name)
    personal = Workspace(root)
    train_cfg = fleet.train
    data_key = key_of("personal", fed.devices[device].data_key, fleet.key, steps)
    bound = {"identity": fed.identity, "data_key": data_key, "config_hash": train_stage.config_hash(train_cfg)}
    step = fleet.rounds * fed.local_steps + steps
    last = save_checkpoint(personal, dataclasses.replace(fed, artifacts=str(personal.artifacts)), arrays, step, bound,
                           personal_steps=steps, device=device)
    checkpoints.mark_best(personal.checkpoints, last)  # the personal adapter is the run's result
    personal.write(train_stage.Trained(
        config=train_cfg, **bound, data={"device": device, "samples": fed.devices[device].samples}, step=step,
        total_steps=step, last=str(last), best=str(last), key=train_stage.key(train_cfg, data_key, fed.identity)))
    return root
