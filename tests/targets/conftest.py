"""A real OpenSSH server on 127.0.0.1 for the target tests: a throwaway host key, one authorized user key, no
passwords; started per module and ended by its process id. The device's Python is the system's /usr/bin/python3
(a separate install with no torch and no transformers), as a board's would be. Skipped where sshd is not
installed (`apt install openssh-server`; .ci/run installs it)."""

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
DEVICE_PYTHON = "/usr/bin/python3"


@dataclass
class Sshd:
    port: int
    key: Path
    known_hosts: Path
    pid: int
    user: str
    device_dir: Path

    @property
    def on(self) -> str:
        return f"{self.user}@127.0.0.1:{self.port}"

    def flags(self) -> list[str]:
        return ["--on", self.on, "--ssh-key", str(self.key), "--known-hosts", str(self.known_hosts),
                "--device-python", DEVICE_PYTHON, "--device-dir", str(self.device_dir)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if SSHD is None or not Path(DEVICE_PYTHON).exists():
        pytest.skip("needs OpenSSH's server (apt install openssh-server) and a system python3")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "user.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    port = free_port()
    (d / "sshd_config").write_text("\n".join([
        "ListenAddress 127.0.0.1", f"Port {port}", f"HostKey {d / 'host'}", f"AuthorizedKeysFile {d / 'authorized_keys'}",
        f"PidFile {d / 'sshd.pid'}", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes", "PermitRootLogin prohibit-password", "StrictModes no", "UsePAM no",
        "LoginGraceTime 30", "ClientAliveInterval 10", ""]))
    try:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    except PermissionError:
        pytest.skip("sshd needs /run/sshd, which only root can make here")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=subprocess.DEVNULL,
                            stderr=open(d / "sshd.log", "w"), start_new_session=True)
    host_key = (d / "host.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    deadline = time.time() + 20
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail(f"sshd did not listen: {(d / 'sshd.log').read_text()[-1000:]}")
    import pwd

    try:
        yield Sshd(port, d / "user", d / "known_hosts", proc.pid, pwd.getpwuid(os.getuid()).pw_name, d / "device")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the sessions it forked
        proc.wait(10)
