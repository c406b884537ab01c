"""A fleet on Flower's deployment runtime: a SuperLink on the workstation, a SuperNode on each device.

`edgeft fleet node WS --data FILE --out DIR` makes what one device needs: the training artifacts, its data
tokenized with the workspace's tokenizer, and `node.json`; copy DIR to the device and start Flower's SuperNode
there with `--node-config "federation='DIR/node.json'"` (the ClientApp is `edgeft.fleet.client:app`). `edgeft
fleet run RECIPE --superlink HOST:PORT` submits edgeft's app to the SuperLink with `flwr run`, follows the rounds
as the ServerApp records them, and makes the final global adapter the workspace's training run, as a simulation
does. Flower's TLS (`--root-certificates`) and SuperNode authentication are Flower's own: see the README.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from edgeft.core import atomic, state
from edgeft.core.errors import EdgeftError
from edgeft.core.workspace import Workspace, key_of
from edgeft.data import formats
from edgeft.data.dataset import build
from edgeft.fleet.config import FleetConfig
from edgeft.fleet.federation import Device, Federation
from edgeft.stages import train as train_stage
from edgeft.stages.export import Exported
from edgeft.stages.prepare import Prepared
from edgeft.trainer import checkpoints

APP = """[project]
name = "edgeft-fleet"
version = "1.0.0"
description = "edgeft's federated fine-tuning app: the ServerApp and ClientApp live in the installed edgeft"

[tool.flwr.app]
publisher = "edgeft"

[tool.flwr.app.components]
serverapp = "edgeft.fleet.server:app"
clientapp = "edgeft.fleet.client:app"

[tool.flwr.app.config]
plan = ""
"""
CONNECTION = "edgeft"


def node(ws_path: Path, data: Path, out: Path, train_cfg: train_stage.TrainConfig) -> Path:
    """A device's folder (written whole, or not at all): artifacts, tokenized data and node.json."""
    ws = Workspace.existing(ws_path)
    data = formats.check_path(Path(data), "--data")
    out = Path(out)
    if out.exists():
        raise EdgeftError(f"--out {out} exists; choose a new folder (a device's folder is written whole)")
    prep = ws.require(Prepared, f"run `edgeft prepare MODEL_DIR --out {ws.root}` first")
    train_cfg = train_stage.default_seq_len(train_cfg, prep.max_seq_len, quiet=True)
    identity = train_stage.trained_from(ws, train_cfg.backend)
    with atomic.atomic_dir(out) as tmp:
        if train_cfg.backend == "ort":
            ws.require(Exported, f"run `edgeft export {ws.root}` first")
            shutil.copytree(ws.artifacts, tmp / "artifacts")
            model_dir = adapter_init = ""
        else:
            shutil.copytree(prep.model_dir, tmp / "model")
            shutil.copytree(ws.adapter_init, tmp / "adapter_init")
            model_dir, adapter_init = "model", "adapter_init"
        ds = build(data, prep.model_dir, tmp / "data", train_stage.data_config(train_cfg))
        fed = Federation(
            backend=train_cfg.backend, ep=train_cfg.ep, artifacts="artifacts", model_dir=model_dir,
            adapter_init=adapter_init, identity=identity, train=_train_options(ws, train_cfg), rounds=1, local_steps=1,
            seed=train_cfg.seed, work="work",
            devices=[Device(dataset=str(Path("data") / ds.root.name), data_key=ds.meta["key"],
                            pad_token_id=ds.meta["pad_token_id"], samples=ds.meta["splits"]["train"]["samples"])])
        fed.save(tmp / "node.json")
    return out / "node.json"


def _train_options(ws: Workspace, train_cfg) -> dict:
    return train_stage.job_config(ws.read(Prepared), train_cfg, train_stage.recomputes(ws, train_cfg))


def _flwr(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Flower's own CLI (the `flwr` beside this Python), with its state in `home`."""
    binary = Path(sys.executable).parent / "flwr"
    env = os.environ | {"FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0",
                        "PATH": f"{binary.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        return subprocess.run([str(binary), *args], capture_output=True, text=True, env=env, timeout=timeout)
    except FileNotFoundError:
        raise EdgeftError(f"Flower's `flwr` is not installed beside {sys.executable}: pip install -e .[fleet]") from None


def check_link(superlink: str, root_certificates: Path | None, insecure: bool) -> None:
    host, sep, port = str(superlink).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c in host for c in "\"'\n "):
        raise EdgeftError(f"--superlink {str(superlink)[:80]!r}: expected HOST:PORT, e.g. 192.168.1.20:8000")
    if not insecure and root_certificates is None:
        raise EdgeftError("--superlink needs --root-certificates CA.pem (the SuperLink's TLS), or --insecure for a "
                          "SuperLink started with --insecure on a trusted network")
    if root_certificates is not None and not Path(root_certificates).is_file():
        raise EdgeftError(f"--root-certificates {root_certificates}: no such file (the CA that signed the "
                          "SuperLink's certificate, PEM)")


def connection(home: Path, superlink: str, root_certificates: Path | None, insecure: bool) -> None:
    """Flower's config.toml naming the SuperLink (TLS with the CA file, or insecure)."""
    check_link(superlink, root_certificates, insecure)
    tls = "insecure = true" if insecure else f'root-certificates = "{Path(root_certificates).resolve()}"'
    atomic.write_text(home / "config.toml", f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                            f'address = "{superlink}"\n{tls}\n')


def run(ws_path: Path, cfg: FleetConfig, train_cfg: train_stage.TrainConfig, superlink: str,
        root_certificates: Path | None = None, insecure: bool = False, log=print):
    """Submit the fleet to a SuperLink, follow its rounds, and make its final global adapter the training run."""
    from edgeft.fleet import server, simulate

    check_link(superlink, root_certificates, insecure)
    ws = Workspace.existing(ws_path)
    with ws.lock("fleet"):
        prep = ws.require(Prepared, f"run `edgeft prepare MODEL_DIR --out {ws.root}` first")
        train_cfg = train_stage.default_seq_len(train_cfg, prep.max_seq_len, quiet=True)
        simulate.check_backend(cfg, train_cfg)
        identity = train_stage.trained_from(ws, train_cfg.backend)
        fed = Federation(backend=train_cfg.backend, ep=train_cfg.ep, artifacts=str(ws.artifacts),
                         model_dir=str(prep.model_dir), adapter_init=str(ws.adapter_init), identity=identity,
                         train=_train_options(ws, train_cfg), rounds=cfg.rounds, local_steps=cfg.local_steps,
                         seed=cfg.seed, work=str(ws.root / "fleet" / "work"), devices=[])
        root = ws.root / "fleet"
        run_key = key_of("fleet-deployed", dataclasses.asdict(cfg), fed.train, identity)
        if (previous := ws.unchanged(simulate.Federated, run_key)) and checkpoints.latest(ws.checkpoints):
            log(f"fleet: finished with these options at {previous.finished_at}; nothing to do")
            return previous
        recorder = server.Recorder(root, run_key, cfg.rounds, log)
        if not recorder.completed():
            recorder.start_over(simulate.initial_weights(dataclasses.replace(fed, devices=[Device(
                dataset="", data_key="", pad_token_id=0, samples=0)]), root))
        plan = server.Plan(config=dataclasses.asdict(cfg), train=fed.train, devices=cfg.clients, root=str(root),
                           key=run_key).save(root / "plan.json")
        home = root / "flwr"
        connection(home, superlink, root_certificates, insecure)
        app = root / "app"
        atomic.write_text(app / "pyproject.toml", APP)
        started = time.time()
        _submit_and_follow(home, app, plan, recorder, cfg, log)
        if (reached := recorder.completed()) < cfg.rounds:
            raise EdgeftError(f"the fleet stopped after round {reached} of {cfg.rounds}; run the same command again "
                              "to resume from there")
        return simulate.finish(ws, cfg, train_cfg, fed, recorder, run_key, time.time() - started)


def _submit_and_follow(home: Path, app: Path, plan: Path, recorder, cfg: FleetConfig, log) -> None:
    from edgeft.fleet import server

    submitted = _flwr(home, "run", str(app), CONNECTION, "--run-config", f"plan='{plan}'", "--format", "json")
    try:
        run_id = json.loads(submitted.stdout)["run-id"]
    except (ValueError, KeyError, TypeError):
        raise EdgeftError(f"Flower did not take the run: {(submitted.stderr or submitted.stdout).strip()[-600:]}; is "
                          "the SuperLink up at that address, and are its certificates the ones given?") from None
    log(f"fleet: Flower run {run_id} submitted; waiting for {cfg.rounds} rounds")
    shown = 0
    while True:
        time.sleep(2)
        rows, _ = state.read_jsonl(recorder.metrics) if recorder.metrics.exists() else ([], 0)
        for row in rows[shown:]:
            log(server.round_line(row, cfg.rounds))
        shown = len(rows)
        listed = _flwr(home, "ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            status = json.loads(listed.stdout)["runs"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            continue
        if str(status.get("status", "")).startswith("finished"):
            if status["status"] != "finished:completed":
                raise EdgeftError(f"Flower run {run_id} ended {status['status']}: {status.get('status-details', '')}; "
                                  f"{shown} round records were kept, and the same command resumes after the last")
            return
