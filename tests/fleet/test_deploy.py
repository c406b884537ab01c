"""A fleet on Flower's deployment runtime, with real processes on loopback: a SuperLink with TLS and SuperNode
authentication, two SuperNodes each holding only its own folder from `edgeft fleet node`, and `edgeft fleet run`
submitting edgeft's app. Judged by what the rounds wrote, not by exit codes alone; every process is ended by pid."""

import datetime
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr", reason="the fleet extra (Python 3.11+): pip install -e .[fleet]")
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgeft.fleet import deploy
from tests.helpers import DATA, cli, fresh, stages

BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificates(folder: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeft test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(_pem(key))
    return files


def _node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair: ECDSA P-384 in OpenSSH format, as ssh-keygen -t ecdsa makes."""
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


def _env(home: Path) -> dict:
    home.mkdir(parents=True, exist_ok=True)
    return os.environ | {"FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0",
                         "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def _healthy(port: int, ca: Path, timeout: float = 90) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", context=context, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the SuperLink did not answer on 127.0.0.1:{port}")


def _stop(procs: list[subprocess.Popen]) -> None:
    """End what the test started, by pid (SIGTERM, then SIGKILL), and reap it."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in reversed(procs):
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


class Loopback:
    """A SuperLink with TLS and node authentication, and SuperNodes, as real processes on 127.0.0.1; `stop` ends
    them by pid."""

    def __init__(self, tmp_path: Path):
        self.tmp, self.procs, self.logs = tmp_path, [], []
        self.tls = _certificates(tmp_path)
        self.port = _port()
        self.cli_home = tmp_path / "flwr-cli"
        deploy.connection(self.cli_home, f"127.0.0.1:{self.port}", self.tls["ca"], insecure=False)
        self.link = self._start("superlink", [
            BIN / "flower-superlink", "--ssl-ca-certfile", self.tls["ca"], "--ssl-certfile", self.tls["cert"],
            "--ssl-keyfile", self.tls["key"], "--host", "127.0.0.1", "--port", str(self.port), "--database",
            ":flwr-in-memory:", "--disable-runtime-dependency-installation", "--enable-supernode-auth"],
            tmp_path / "flwr-link")
        _healthy(self.port, self.tls["ca"])
        self.keys: dict[int, Path] = {}

    def _start(self, name: str, cmd: list, home: Path) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "a")
        self.logs.append(log)
        proc = subprocess.Popen(cmd, env=_env(home), stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def node(self, i: int, federation: Path) -> subprocess.Popen:
        """SuperNode i (registered with its own key the first time) serving `federation`."""
        if i not in self.keys:
            private, public = _node_key(self.tmp, f"node-{i}-key")
            registered = subprocess.run([BIN / "flwr", "supernode", "register", public, "edgeft"], capture_output=True,
                                        text=True, env=_env(self.cli_home), timeout=120)
            assert registered.returncode == 0, registered.stdout + registered.stderr
            self.keys[i] = private
        return self._start(f"supernode-{i}", [
            BIN / "flower-supernode", "--superlink", f"127.0.0.1:{self.port}", "--root-certificates", self.tls["ca"],
            "--port", str(_port()), "--auth-supernode-private-key", self.keys[i],
            "--node-config", f"federation='{federation}'"], self.tmp / f"flwr-node-{i}")

    def stop(self) -> None:
        _stop(self.procs)
        for log in self.logs:
            log.close()
        assert all(p.returncode is not None for p in self.procs)


def _fleet_recipe(tmp_path: Path, ws: Path, model: Path, rounds: int, min_clients: int) -> Path:
    recipe = tmp_path / "fleet.yaml"
    recipe.write_text(f"name: deployed\nworkspace: {ws}\nmodel: {{path: {model}}}\n"
                      f"lora: {{r: 8}}\ndata: {{train: {DATA}}}\ntrain: {{batch_size: 4, seq_len: 256, lr: 0.001}}\n"
                      f"stages: [train, merge]\nfleet: {{clients: 2, rounds: {rounds}, local_steps: 2, "
                      f"min_clients: {min_clients}}}\n")
    return recipe


def _node_folders(ws: Path, tmp_path: Path) -> list[Path]:
    """Each device's own data and folder, made on the workstation by `edgeft fleet node`."""
    lines, nodes = DATA.read_text().splitlines(), []
    for i in range(2):
        part = tmp_path / f"device-{i}.jsonl"
        part.write_text("\n".join(lines[i * 60:(i + 1) * 60]) + "\n")
        made = cli("fleet", "node", ws, "--data", part, "--out", tmp_path / f"node-{i}", "--seq-len", "256")
        assert made.code == 0, made.err
        nodes.append(tmp_path / f"node-{i}" / "node.json")
    return nodes


def _train_rows(ws: Path) -> list[dict]:
    rows = [json.loads(line) for line in (ws / "fleet" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == "train"]


def test_a_fleet_on_flowers_deployment_runtime_with_tls_and_node_authentication(exported, tiny_model, tmp_path):
    ws = fresh(exported, tmp_path)
    recipe = _fleet_recipe(tmp_path, ws, tiny_model("phi3-mini-4k"), rounds=2, min_clients=2)
    nodes = _node_folders(ws, tmp_path)
    folder = json.loads(nodes[0].read_text())
    assert folder["artifacts"] == "artifacts" and not Path(folder["devices"][0]["dataset"]).is_absolute()
    fleet = Loopback(tmp_path)
    try:
        for i, node in enumerate(nodes):
            fleet.node(i, node)
        result = cli("fleet", "run", recipe, "--superlink", f"127.0.0.1:{fleet.port}", "--root-certificates",
                     fleet.tls["ca"])
        assert result.code == 0, result.err[-3000:] + (tmp_path / "superlink.log").read_text()[-3000:]
    finally:
        fleet.stop()

    trains = _train_rows(ws)
    assert [r["round"] for r in trains] == [1, 2] and all(r["updates"] == 2 and r["refused"] == 0 for r in trains)
    assert all(np.isfinite(r["train_loss"]) for r in trains)
    start, final = (np.load(ws / "fleet" / "rounds" / f"round-000{r}.npz") for r in (0, 2))
    assert any(np.abs(final[k] - start[k]).max() > 1e-4 for k in start.files)
    recorded = stages(ws)
    assert recorded["train"]["step"] == 4 and "merge" in recorded
    # every device trained in its own folder, from what `fleet node` gave it
    assert all(any((n.parent / "work" / "logs").glob("*-train.log")) for n in nodes)


@pytest.mark.slow  # Flower declares a SIGKILLed node offline after two missed heartbeats: about a minute
def test_a_node_killed_mid_round_leaves_the_round_to_the_others_and_rejoins_the_next(exported, tiny_model, tmp_path):
    ws = fresh(exported, tmp_path)
    recipe = _fleet_recipe(tmp_path, ws, tiny_model("phi3-mini-4k"), rounds=2, min_clients=1)
    nodes = _node_folders(ws, tmp_path)
    fleet = Loopback(tmp_path)
    outcome = {}
    try:
        fleet.node(0, nodes[0])
        victim = fleet.node(1, nodes[1])
        runner = threading.Thread(target=lambda: outcome.update(result=cli(
            "fleet", "run", recipe, "--superlink", f"127.0.0.1:{fleet.port}", "--root-certificates", fleet.tls["ca"])))
        runner.start()
        logs = nodes[1].parent / "work" / "logs"
        deadline = time.time() + 300
        while not any(logs.glob("*round-0001-train.log")) and time.time() < deadline:
            time.sleep(0.2)
        victim.kill()  # mid-round: its training runtime goes with it (it dies with its parent)
        victim.wait()
        time.sleep(65)  # until the SuperLink has declared it offline; then it may come back with its key
        fleet.node(1, nodes[1])
        runner.join(timeout=900)
    finally:
        fleet.stop()
    assert outcome["result"].code == 0, outcome["result"].err[-3000:]
    trains = _train_rows(ws)
    assert [r["round"] for r in trains] == [1, 2]
    assert trains[0]["updates"] == 1 and trains[0]["failed"] == 1 and not trains[0]["kept_previous"]
    assert trains[1]["updates"] == 2, "the restarted node did not rejoin"


def test_the_device_side_imports_neither_torch_nor_transformers():
    """What a SuperNode's ClientApp and its training runtime import: Flower, numpy, ONNX Runtime's side, no more."""
    from edgeft.runtime import launcher, training_build

    code = ("import sys, edgeft.fleet.client, edgeft.trainer.child, edgeft.trainer.ort_engine; "
            "print(sorted({m.split('.')[0] for m in sys.modules}))")
    env = launcher.child_env(training_build.runtime_dir())
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                           check=True).stdout.replace("'", '"')))
    assert "flwr" in loaded and "numpy" in loaded
    assert not loaded & {"torch", "transformers", "tokenizers", "peft", "safetensors", "onnxscript"}
