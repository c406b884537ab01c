"""What edgeft keeps on a target device, under ~/.cache/edgeft/ there (or --device-dir): a minimal runtime (a venv with only the
packages a step needs, at this workstation's versions; never torch or transformers unless the step is torch
training, never edgeft itself) and the files a step needs, each cached by content hash.

Nothing half-made is taken as complete: a runtime counts once its `.complete` marker is written after the last
install, and a file is written to a temporary name and renamed; what a cut link leaves behind is redone.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
from pathlib import Path

from edgeft.core import fingerprint
from edgeft.core.errors import EdgeftError
from edgeft.targets.ssh import RemoteError, Target, progress, quote

ROOT = ".cache/edgeft"  # under the device user's home, unless --device-dir names another folder
MIN_PYTHON = (3, 10)
MIN_FREE_GB = 1.0


def pinned(*packages: str) -> list[str]:
    """`package==version` at this workstation's version of each (the device computes what was measured here)."""
    return [f"{p}=={md.version(p)}" for p in packages]


class Device:
    """A target with its Python checked; `runtime(packages)` and `put(file)` prepare it, `python(...)` runs there."""

    def __init__(self, target: Target, python: str = "python3", folder: str | None = None):
        self.target, self.base_python = target, python
        out = target.run(f"{quote(python)} -c {quote(PROBE_PYTHON)} {quote(folder or '~/' + ROOT)} 2>&1 || "
                         "echo missing", timeout=120)
        try:
            facts = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise EdgeftError(f"{target.name}: no Python at `{python}` ({out.strip()[-200:] or 'no answer'}); install "
                              "Python 3.10 or later on the device, or name it with --device-python") from None
        if tuple(facts["version"]) < MIN_PYTHON:
            raise EdgeftError(f"{target.name}: `{python}` is Python {'.'.join(map(str, facts['version']))}; edgeft's "
                              f"device runtime needs {'.'.join(map(str, MIN_PYTHON))} or later (install it, or name "
                              "another with --device-python)")
        if not facts["venv"]:
            raise EdgeftError(f"{target.name}: `{python}` has no venv module; install it (Debian and Raspberry Pi OS: "
                              "`sudo apt install python3-venv`)")
        self.root, self.version = facts["root"], tuple(facts["version"])
        self.free_gb, self.machine = facts["free_gb"], facts["machine"]

    def require_disk(self, gb: float = MIN_FREE_GB) -> None:
        if self.free_gb < gb:
            raise EdgeftError(f"{self.target.name}: {self.free_gb:.2f} GB free in {self.root}; this step needs about "
                              f"{gb:g} GB there: free some space on the device")

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def runtime(self, packages: list[str], no_deps: bool = False) -> str:
        """The device's Python with exactly `packages` installed (made once per set, reused after); its path. Run it
        with -I: a device's PYTHONPATH (ROS on a Jetson sets one) or user site must not reach the runtime.
        `no_deps`: `packages` is the whole list (a package's declared dependencies that the step never imports stay
        off the device)."""
        key = hashlib.sha256(json.dumps([sorted(packages), self.version] + (["no-deps"] if no_deps else []))
                             .encode()).hexdigest()[:16]
        venv = self.path(f"runtime-{key}")
        python = f"{venv}/bin/python"
        if self.target.run(f"test -f {quote(venv + '/.complete')} && echo yes || echo no").strip() == "yes":
            return python
        self.require_disk(MIN_FREE_GB + 0.5)
        progress(f"making the runtime {venv} ({', '.join(packages)})")
        self.target.run(" && ".join([f"rm -rf {quote(venv)}", f"mkdir -p {quote(self.path())}",
                                     f"{quote(self.base_python)} -m venv {quote(venv)}",
                                     f"{quote(python)} -I -m pip install --disable-pip-version-check -q "
                                     + ("--no-deps " if no_deps else "") +
                                     f"{quote(*packages)} 1>&2", f"touch {quote(venv + '/.complete')}"]),
                        stream=progress, timeout=1800)
        return python

    def put(self, local: Path) -> str:
        """`local` on the device (copied once per content); its path there."""
        digest = fingerprint.sha256_file(local)
        folder = self.path("files", digest)
        final = f"{folder}/{local.name}"
        if self.target.run(f"test -f {quote(final)} && echo yes || echo no").strip() == "yes":
            return final
        self.require_disk(local.stat().st_size / 1e9 + 0.1)
        partial = f"{final}.partial"
        with open(local, "rb") as f:
            try:
                self.target.run(f"mkdir -p {quote(folder)} && cat > {quote(partial)} && "
                                f"test $(wc -c < {quote(partial)}) -eq {local.stat().st_size} && "
                                f"mv {quote(partial)} {quote(final)}", stdin=f, timeout=3600)
            except RemoteError as e:
                why = e.stderr.strip()[-200:] or "a short copy"
                raise EdgeftError(f"{self.target.name}: copying {local.name} failed ({why}); nothing was kept under "
                                  "its name, run the command again") from None
        return final

    def folder(self, files: dict[str, Path], kind: str) -> str:
        """A folder on the device holding `files` (its relative paths: local files), each copied once per content
        (`put`) and hard-linked in (ONNX Runtime refuses external data behind a symbolic link); named by its
        content under `kind`/, made under a temporary name and renamed. Its path there."""
        self.require_disk(sum(p.stat().st_size for p in files.values()) / 1e9 + 0.2)
        placed = {rel: self.put(path) for rel, path in sorted(files.items())}
        digest = hashlib.sha256(json.dumps(placed, sort_keys=True).encode()).hexdigest()[:16]
        folder = self.path(kind, digest)
        links = " && ".join(f"mkdir -p {quote(str(Path(folder + '.partial', rel).parent))} && "
                            f"{{ ln -f {quote(path)} {dst} || cp {quote(path)} {dst}; }}"
                            for rel, path in placed.items() for dst in [quote(folder + '.partial/' + rel)])
        self.target.run(f"test -d {quote(folder)} || {{ rm -rf {quote(folder + '.partial')} && {links} && "
                        f"mv {quote(folder + '.partial')} {quote(folder)}; }}", timeout=600)
        return folder


def files_of(folder: Path) -> dict[str, Path]:
    """Every file under `folder`, by its path relative to it."""
    return {p.relative_to(folder).as_posix(): p for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# Run by the device's Python with edgeft's folder there: its version, whether it has venv, the folder (made) and
# the free space in it.
PROBE_PYTHON = ("import json, os, platform, shutil, sys, importlib.util as u; "
                "r = os.path.abspath(os.path.expanduser(sys.argv[1])); os.makedirs(r, exist_ok=True); "
                "print(json.dumps({'version': list(sys.version_info[:2]), 'machine': platform.machine().lower(), "
                "'venv': u.find_spec('venv') is not None, 'root': r, 'free_gb': shutil.disk_usage(r).free / 1e9}))")
