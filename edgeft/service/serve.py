"""edgeft serve: the OpenAI fine-tuning and chat API on this box (api.py), its state in STATE/edgeft.db."""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from edgeft.core.errors import EdgeftError
from edgeft.core.schema import spec


@dataclass(frozen=True)
class ServeConfig:
    host: str = spec("address to listen on (loopback unless told otherwise: the API trains and runs models)",
                     "127.0.0.1")
    port: int = spec("TCP port", 8000, min=0, max=65535)
    api_key: str | None = spec("the Bearer key clients must send (default: $EDGEFT_API_KEY, else one made and kept "
                               "in STATE/api_key)", None)
    models: str | None = spec("folder of Hugging Face model folders, each served under its folder's name "
                              "(default: the demo base, home_base)", None)
    state: str = spec("folder for the database, uploads, jobs and bundles", "edgeft-state")
    device: str | None = spec("device profile jobs prepare and train for (name or file)", None)
    seq_len: int = spec("longest training example in tokens (longer ones are cut at the right)", 256, min=16,
                        max=131072)
    max_upload_mb: float = spec("largest file an upload may be, MB", 512.0, gt=0)


def api_key_of(cfg: ServeConfig, state: Path) -> tuple[str, str]:
    """The key, and where it came from."""
    if cfg.api_key:
        return cfg.api_key, "--api-key"
    if os.environ.get("EDGEFT_API_KEY"):
        return os.environ["EDGEFT_API_KEY"], "$EDGEFT_API_KEY"
    path = state / "api_key"
    if not path.is_file():
        tmp = state / ".api_key.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("sk-edgeft-" + secrets.token_urlsafe(24) + "\n")
        os.replace(tmp, path)
    return path.read_text().strip(), str(path)


def serve(cfg: ServeConfig) -> int:
    import uvicorn

    from edgeft.devices import profiles
    from edgeft.service.api import create_app
    from edgeft.service.models import Models
    from edgeft.service.store import Store
    from edgeft.service.worker import Worker

    state = Path(cfg.state).expanduser().resolve()
    if state.exists() and not state.is_dir():
        raise EdgeftError(f"--state {state} is a file; give a folder (made if missing)")
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    device = profiles.load(cfg.device) if cfg.device else None
    key, source = api_key_of(cfg, state)
    if len(key) < 8:
        raise EdgeftError("--api-key: use at least 8 characters (a key anyone can guess protects nothing)")
    try:
        loopback = ipaddress.ip_address(cfg.host).is_loopback
    except ValueError:
        loopback = cfg.host == "localhost"
    _check_port(cfg.host, cfg.port)
    store = Store(state / "edgeft.db")
    models = Models(Path(cfg.models) if cfg.models else None, state, store, device, cfg.seq_len)
    worker = Worker(store, state, models, cfg.device)
    app = create_app(store, models, worker, state, key, int(cfg.max_upload_mb * 2**20))
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    print(f"edgeft serve: http://{cfg.host}:{cfg.port}/v1  models {', '.join(models.bases)}  state {state}  "
          f"API key from {source}", flush=True)
    if not loopback:
        print(f"edgeft serve: listening on {cfg.host}, beyond this machine: anyone who reaches it with the key can "
              "train and run models here; put it behind TLS", file=sys.stderr, flush=True)
    worker.start()
    try:
        server.run()
    finally:
        worker.stop()
        worker.join(timeout=90)
        store.close()
    return 0


def _check_port(host: str, port: int) -> None:
    """Refuse an address this machine cannot listen on, before anything starts."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(info[0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(info[4])
    except OSError as e:
        raise EdgeftError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port (or --host)") \
            from None
