"""A target device over SSH, with the OpenSSH client as the user runs it: key authentication, host keys checked as
OpenSSH checks them (an unknown or changed key is refused, never accepted on first use), no password prompts.

Every failure of the link is a user error that names the fix: an unreachable host, a refused key, an unknown host
key, a link cut mid-command.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from edgeft.core.errors import EdgeftError

FORM = re.compile(r"^(?:(?P<user>[A-Za-z0-9._][A-Za-z0-9._-]*)@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)"
                  r"(?::(?P<port>\d{1,5}))?$")
SSH_FAILED = 255  # what ssh exits with when the link, not the remote command, failed


@dataclass(frozen=True)
class Target:
    """`[user@]host[:port]`, reached with `key` (else the user's ssh defaults) and checked against `known_hosts`
    (else OpenSSH's own files)."""

    host: str
    user: str | None = None
    port: int = 22
    key: Path | None = None
    known_hosts: Path | None = None
    connect_timeout_s: int = 15

    @classmethod
    def parse(cls, text: str, key: str | None = None, known_hosts: str | None = None) -> Target:
        match = FORM.match(str(text).strip())
        port = int(match["port"]) if match and match["port"] else 22
        if not match or not 0 < port < 65536:
            raise EdgeftError(f"--on {text!r}: give the device as [user@]host[:port], e.g. pi@raspberrypi.local or "
                              "root@10.0.0.7:2222")
        for flag, path in (("--ssh-key", key), ("--known-hosts", known_hosts)):
            if path is not None and not Path(path).is_file():
                raise EdgeftError(f"{flag} {path} does not exist; pass the file (for a key: the private key whose "
                                  "public half is in the device's ~/.ssh/authorized_keys)")
        return cls(match["host"].strip("[]"), match["user"], port, Path(key) if key else None,
                   Path(known_hosts) if known_hosts else None)

    @property
    def name(self) -> str:
        return f"{self.user + '@' if self.user else ''}{self.host}" + (f":{self.port}" if self.port != 22 else "")

    def command(self, remote: str) -> list[str]:
        """The ssh command line that runs `remote` (a shell command) on the device."""
        options = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o",
                   f"ConnectTimeout={self.connect_timeout_s}", "-o", "ServerAliveInterval=5", "-o",
                   "ServerAliveCountMax=3", "-p", str(self.port)]
        if self.key is not None:
            options += ["-i", str(self.key), "-o", "IdentitiesOnly=yes"]
        if self.known_hosts is not None:
            options += ["-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null"]
        return ["ssh", *options, "--", f"{self.user + '@' if self.user else ''}{self.host}", remote]

    def popen(self, remote: str, *, stdin=None, text: bool = True, own_session: bool = False) -> subprocess.Popen:
        """`remote` started on the device, its output on pipes. `own_session`: a Ctrl-C on this terminal does not
        reach ssh (the caller stops the remote command itself, so that it can save first)."""
        return subprocess.Popen(self.command(remote), stdin=stdin if stdin is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=text,
                                start_new_session=own_session)

    def check(self, proc: subprocess.Popen, remote: str, err_lines: list[str]) -> None:
        """Raise for a finished `proc`: EdgeftError naming the fix when the link failed, RemoteError when the
        command did (with the end of its standard error)."""
        if proc.returncode == SSH_FAILED:
            raise EdgeftError(self.link_problem("\n".join(err_lines)))
        if proc.returncode != 0:
            tail = "\n".join(err_lines[-15:])
            raise RemoteError(f"{self.name}: `{_short(remote)}` failed (exit {proc.returncode}):\n{tail}",
                              proc.returncode, tail)

    def run(self, remote: str, *, stdin=None, timeout: float | None = None, stream=None) -> str:
        """`remote`'s standard output; its standard error goes to `stream` line by line (progress) when given.
        Raises EdgeftError naming the fix when the link fails, and when the command does (with its output)."""
        proc = self.popen(remote, stdin=stdin)
        err_lines: list[str] = []
        try:
            if stream is None:
                out, err = proc.communicate(timeout=timeout)
                err_lines = err.splitlines()
            else:
                import threading

                def pump():
                    for line in proc.stderr:
                        err_lines.append(line.rstrip("\n"))
                        stream(line.rstrip("\n"))

                reader = threading.Thread(target=pump, daemon=True)
                reader.start()
                out = proc.stdout.read()
                proc.wait(timeout=timeout)
                reader.join(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise EdgeftError(f"{self.name}: `{_short(remote)}` did not finish within {timeout:.0f} s; the run on the "
                              "device was stopped") from None
        self.check(proc, remote, err_lines)
        return out

    def link_problem(self, stderr: str) -> str:
        """What an ssh failure (exit 255) means, and its fix."""
        text = stderr.lower()
        if "host key verification failed" in text or "no matching host key" in text:
            if "remote host identification has changed" in text:
                return (f"{self.name}: its host key has changed since it was recorded in known_hosts; if the device "
                        "was reinstalled, remove the old key (`ssh-keygen -R HOST`) and check the new one, otherwise "
                        "do not connect")
            return (f"{self.name}: its host key is not known (OpenSSH checks it, edgeft never accepts one "
                    f"unseen); connect once with `ssh -p {self.port} {self.user + '@' if self.user else ''}{self.host}` "
                    "and check the fingerprint, or add the key to known_hosts (--known-hosts FILE)")
        if "permission denied" in text or "too many authentication failures" in text:
            return (f"{self.name}: the device refused the key{f' {self.key}' if self.key else ''}; put its public "
                    "half in the device's ~/.ssh/authorized_keys (`ssh-copy-id`), or pass the right one with "
                    "--ssh-key")
        last = stderr.strip().splitlines()[-1] if stderr.strip() else "no answer"
        if any(s in text for s in ("connection refused", "could not resolve", "no route to host", "timed out",
                                   "network is unreachable", "connection closed", "connection reset")):
            return (f"{self.name}: cannot reach it over SSH ({last}); check the address and port, that the device is "
                    "on and runs sshd, and the network between")
        return (f"{self.name}: the SSH link failed ({last}); if it was cut mid-run, run the command again: what was "
                "copied is checked before it is used")


class RemoteError(EdgeftError):
    """A command on the device failed (the link worked)."""

    def __init__(self, message: str, code: int, stderr: str):
        super().__init__(message)
        self.code, self.stderr = code, stderr


def _short(remote: str) -> str:
    return remote if len(remote) < 80 else remote[:77] + "..."


def quote(*parts: str) -> str:
    return " ".join(shlex.quote(str(p)) for p in parts)


def progress(line: str) -> None:
    print(f"  device: {line}", file=sys.stderr, flush=True)
