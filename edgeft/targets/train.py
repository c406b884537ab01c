"""`edgeft train WS --on [user@]host[:port]`: the training loop run on the device, and its checkpoints brought
back as they are written.

With the ORT backend (x86-64 devices) the device gets a runtime of onnxruntime-training-cpu, onnx, numpy,
protobuf, flatbuffers and packaging (the training build's pins, this workstation's versions of the rest; nothing
else: no torch, no transformers) and the artifacts folder. With the torch backend (aarch64 boards, where the
training build has no wheel) it gets torch, numpy and safetensors, and the workspace's loss module exported here
with torch.export (trainer/torch_engine.py: export_program, ProgramEngine): no transformers, no PEFT. Both get the
training side of edgeft as one zip (`edgeft.trainer` and what it imports: `core`, `runtime`, the graph helpers)
and the tokenized arrays, each file cached by content (Device.folder). The loop runs there as it runs here
(trainer/child.py, the job on its stdin); its events come back over the SSH link on their own descriptor, its
output stays in a log that comes back at the end.

Each checkpoint the device writes is brought back into WS/train/checkpoints (a temporary folder checked against
the hashes the checkpoint records, then renamed), and the device's pruning and best pointer are mirrored, so the
workspace always holds what a local run would have held up to the last checkpoint. A dropped link ends the run
on the device (it dies with its SSH session) and leaves that: `--resume` sends the latest checkpoint back and
continues. Ctrl-C here asks the device's loop to save and stop, as Ctrl-C does locally.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata as md
import io
import json
import re
import subprocess
import tarfile
import tempfile
import threading
import zipfile
from pathlib import Path

import edgeft
from edgeft.core import atomic
from edgeft.core.atomic import atomic_dir
from edgeft.core.errors import EdgeftError
from edgeft.core.fingerprint import sha256_file
from edgeft.runtime import jobs, launcher, training_build
from edgeft.targets.device import Device, files_of, pinned
from edgeft.targets.ssh import SSH_FAILED, Target, progress, quote
from edgeft.trainer import checkpoints

# what the training side imports (trainer/__init__.py: it reads only an artifacts folder and tokenized arrays)
CODE = ("__init__.py", "core/*.py", "runtime/*.py", "trainer/*.py", "graph/__init__.py", "graph/frozen_base.py",
        "graph/recompute.py", "graph/trace.py")
DATA = ("train.npz", "val.npz")
STEP = re.compile(r"^step-\d{6,}$")
# Run by the device's runtime (python -I): edgeft's zip first on the path, then the child as `python -m` runs it
BOOT = ("import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
        "runpy.run_module('edgeft.trainer.child', run_name='__main__', alter_sys=True)")


def packages(backend: str) -> list[str]:
    """The device's training runtime. ORT: the training build and the onnx it reads artifacts with
    (training_build's pins) and what they import, installed without their other dependencies; torch: torch
    (this workstation's release, the device's build of it), numpy and safetensors. Else this workstation's
    versions."""
    if backend == "torch":
        return [f"torch=={md.version('torch').split('+')[0]}", *pinned("numpy", "safetensors")]
    return [f"onnxruntime-training-cpu=={training_build.ORT_TRAINING_VERSION}",
            f"onnx=={training_build.ONNX_VERSION}", *pinned("numpy", "protobuf", "flatbuffers", "packaging")]


def unsupported(device: Device, backend: str = "ort") -> str | None:
    """Why `backend` cannot train on `device`, or None (torch: any device with Python 3.10+, which Device checks)."""
    version = training_build.ORT_TRAINING_VERSION
    if backend == "torch":
        return None
    if device.machine not in ("x86_64", "amd64"):
        return (f"{device.target.name} is {device.machine}: onnxruntime-training {version} has wheels for x86-64 "
                "only; add --backend torch (torch and the model exported with torch.export go to the device)")
    if device.version > (3, 12):
        return (f"{device.target.name}: its Python is {'.'.join(map(str, device.version))}, and onnxruntime-training "
                f"{version} has wheels for Python 3.8 to 3.12; name one with --device-python (e.g. python3.12)")
    return None


def trainer_zip(out: Path) -> Path:
    """The training side of edgeft as one zip (the same bytes for the same code, so the device caches it)."""
    root = Path(edgeft.__file__).parent
    files = sorted({p for pattern in CODE for p in root.glob(pattern)})
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for path in files:
            info = zipfile.ZipInfo(f"edgeft/{path.relative_to(root).as_posix()}", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            z.writestr(info, path.read_bytes())
    return out


class TrainOn:
    """A device to train on (stages.train's `on`): its runtime and files prepared, the run followed."""

    def __init__(self, target: Target, python: str = "python3", folder: str | None = None):
        self.target, self.name = target, target.name
        self.device = Device(target, python, folder)
        self.flags = ["--on", target.name, *(["--ssh-key", str(target.key)] if target.key else []),
                      *(["--known-hosts", str(target.known_hosts)] if target.known_hosts else []),
                      *(["--device-python", python] if python != "python3" else []),
                      *(["--device-dir", folder] if folder else [])]  # for the command that resumes
        if problem := unsupported(self.device):
            raise EdgeftError(problem)

    def check(self, backend: str) -> None:
        if problem := unsupported(self.device, backend):
            raise EdgeftError(problem)

    def run(self, job: jobs.Train, on_event: launcher.EventHandler, log_path: Path, resume_hint: str,
            programs: Path) -> dict:
        """Run `job` (its paths this workstation's) on the device; its result with this workstation's paths.
        `resume_hint`: the command that continues the run, for a link that drops; `programs`: where the torch
        backend's exported programs are kept here."""
        local = Path(job.checkpoints)
        remote_job, run = self._place(job, programs)
        events = Mirror(self, on_event, run + "/checkpoints", local)
        command = (f"cd {quote(run)} && echo $$ > pid && EDGEFT_EVENT_FD=3 exec {quote(self.runtime)} -I -c "
                   f"{quote(BOOT)} {quote(self.code)} {quote(remote_job.name)} 3>&1 >train.log 2>&1")
        progress(f"training on {self.name} (its output: {run}/train.log there, {log_path} here at the end)")
        proc = self.target.popen(command, stdin=subprocess.PIPE, own_session=True)
        err_lines: list[str] = []
        reader = threading.Thread(target=lambda: err_lines.extend(line.rstrip("\n") for line in proc.stderr),
                                  daemon=True)
        reader.start()
        try:
            proc.stdin.write(remote_job.to_json())
            proc.stdin.close()
        except OSError:
            pass  # the link is gone: reported below
        outcome = launcher.Outcome(events)
        launcher.listen(lambda: outcome.read(proc.stdout), outcome, lambda e: self._stop(run))
        code = proc.wait()
        reader.join(5)
        if code != SSH_FAILED:  # the link is up: the log, and what was saved since the last event
            self._fetch_log(run, log_path)
            events.sync()
        if outcome.result is None and outcome.error is None and not outcome.interrupted:
            why = (self.target.link_problem("\n".join(err_lines)) if code == SSH_FAILED else
                   f"{self.name}: the run on the device ended without a report (exit {code}): its SSH session or the "
                   "device went away")
            last = checkpoints.latest(local)
            kept = f"the last checkpoint brought back is {last.name}" if last else "no checkpoint was brought back"
            raise EdgeftError(f"{why}\n  training on the device stopped with it; {kept}: continue with "
                              f"`{resume_hint}`" + (" (with the same options)" if last else " without --resume"))
        result = outcome.result_of(job.name, code, log_path)
        for key in ("last", "best", "checkpoint"):
            if isinstance(result.get(key), str) and result[key] not in ("", "None"):
                result[key] = str(local / Path(result[key]).name)
        if not result.get("interrupted"):
            self.target.run(f"rm -rf {quote(run)}", timeout=120)  # everything it held is here now
        return result

    def _place(self, job: jobs.Train, programs: Path) -> tuple[jobs.Train, str]:
        """The runtime, the code, the model (the artifacts, or the exported program), the arrays and (resuming)
        the checkpoint on the device; the job with the device's paths, and the run's folder there."""
        torch_backend = isinstance(job, jobs.TorchTrain)
        self.runtime = self.device.runtime(packages("torch" if torch_backend else "ort"), no_deps=not torch_backend)
        model = {"program": self.device.put(program(job, programs))} if torch_backend else \
            {"artifacts": self.device.folder(files_of(Path(job.artifacts)), "artifacts")}
        progress("copying edgeft's training side and the tokenized data (files already there are kept)")
        with tempfile.TemporaryDirectory(prefix="edgeft-train-on-") as tmp:
            self.code = self.device.put(trainer_zip(Path(tmp) / "edgeft-trainer.zip"))
        dataset = self.device.folder({name: Path(job.dataset) / name for name in DATA}, "datasets")
        local = Path(job.checkpoints)
        key = hashlib.sha256(f"{local.resolve()}\n{job.identity}".encode()).hexdigest()[:16]
        run = self.device.path("runs", key)
        self.target.run(f"rm -rf {quote(run)} && mkdir -p {quote(run + '/checkpoints')}", timeout=120)
        resume_path = None
        if job.resume_path:
            sent = {Path(job.resume_path)} | ({best} if (best := checkpoints.best(local)) else set())
            self._send(sent, local, run + "/checkpoints")
            resume_path = f"{run}/checkpoints/{Path(job.resume_path).name}"
        return dataclasses.replace(job, **model, dataset=dataset, checkpoints=f"{run}/checkpoints",
                                   work=f"{run}/work", model_dir="", adapter_init="", resume_path=resume_path), run

    def _send(self, folders: set[Path], local: Path, remote: str) -> None:
        """Checkpoints (and the best pointer) into the device's run, as one tar over the link."""
        with tempfile.TemporaryFile() as f:
            with tarfile.open(fileobj=f, mode="w") as tar:
                for folder in sorted(folders):
                    tar.add(folder, arcname=folder.name)
                if (local / "best.json").is_file():
                    tar.add(local / "best.json", arcname="best.json")
            f.seek(0)
            progress(f"sending {', '.join(sorted(p.name for p in folders))} to continue from")
            self.target.run(f"tar -C {quote(remote)} -xf -", stdin=f, timeout=3600)

    def _stop(self, run: str) -> None:
        """Ctrl-C here: the device's loop saves and stops (SIGINT, as a Ctrl-C there would)."""
        progress("stopping the run on the device (it saves a checkpoint first)")
        try:
            self.target.run(f"kill -INT $(cat {quote(run + '/pid')}) 2>/dev/null; true", timeout=30)
        except EdgeftError:
            pass  # the link is gone, and the run with it

    def _fetch_log(self, run: str, log_path: Path) -> None:
        try:
            atomic.write_text(log_path, self.target.run(f"cat {quote(run + '/train.log')}", timeout=120))
        except EdgeftError as e:
            atomic.write_text(log_path, f"(the device's log could not be brought back: {e})\n")


def program(job: jobs.TorchTrain, programs: Path) -> Path:
    """The workspace's loss module exported with torch.export for the device's torch (made once per model,
    adapter, base and sequence length, in `programs`)."""
    import torch

    cfg = job.config
    key = hashlib.sha256(json.dumps([job.identity, cfg.get("base_quant"), cfg["seq_len"], torch.__version__],
                                    sort_keys=True).encode()).hexdigest()[:16]
    out = programs / f"program-{key}.pt2"
    if not out.is_file():
        progress("exporting the model for the device's torch (torch.export; once per model and options)")
        programs.mkdir(parents=True, exist_ok=True)
        launcher.run(jobs.ExportProgram(
            model_dir=job.model_dir, adapter_init=job.adapter_init, base_quant=cfg.get("base_quant") or
            {"precision": "fp32"}, dataset=job.dataset, pad_token_id=job.pad_token_id, seq_len=int(cfg["seq_len"]),
            out=str(out)), log_path=programs / "export.log")
    return out


class Mirror:
    """The device's events to `on_event`, each checkpoint brought back first (its path then this workstation's)."""

    def __init__(self, on: TrainOn, on_event: launcher.EventHandler, remote: str, local: Path):
        self.on, self.on_event, self.remote, self.local = on, on_event, remote, local

    def __call__(self, event: dict) -> None:
        if event.get("event") == "checkpoint" and isinstance(event.get("path"), str):
            self.sync()
            event = event | {"path": str(self.local / Path(event["path"]).name)}
        self.on_event(event)

    def sync(self) -> None:
        """WS/train/checkpoints as the device's: its new checkpoints brought back, those it pruned removed, its
        best pointer copied. A checkpoint that cannot be brought back (pruned meanwhile, a link cut) is skipped:
        the next one supersedes it."""
        target = self.on.target
        try:
            listing = target.run(f"cd {quote(self.remote)} && for d in step-*; do test -f \"$d\"/{checkpoints.STATE} "
                                 "&& echo \"$d\"; done; echo '#'; cat best.json 2>/dev/null; true", timeout=120)
        except EdgeftError:
            return
        names, _, best = listing.partition("#\n")
        remote = [n for n in names.split() if STEP.match(n)]
        for name in remote:
            if not (self.local / name / checkpoints.STATE).is_file():
                try:
                    self.pull(name)
                except EdgeftError as e:
                    if "No such file" not in str(e):  # else the device pruned it meanwhile: a newer one is there
                        progress(f"{name} was not brought back ({e}); the next checkpoint supersedes it")
        for path in checkpoints.complete(self.local):
            if path.name not in remote:
                atomic.remove_dir(path)
        try:
            pointer = json.loads(best) if best.strip() else None
        except ValueError:
            pointer = None
        if isinstance(pointer, dict) and STEP.match(str(pointer.get("path", ""))):
            checkpoints.mark_best(self.local, self.local / pointer["path"])

    def pull(self, name: str) -> Path:
        """The device's checkpoint `name` into the workspace: a temporary folder, its files checked against the
        hashes its state records, renamed into place."""
        proc = self.on.target.popen(f"tar -C {quote(self.remote + '/' + name)} -cf - .", text=False)
        with atomic_dir(self.local / name) as tmp:
            data = io.BytesIO(proc.stdout.read())
            err = proc.stderr.read().decode(errors="replace").splitlines()
            proc.wait()
            self.on.target.check(proc, f"tar {name}", err)
            with tarfile.open(fileobj=data, mode="r:") as tar:
                tar.extractall(tmp, filter="data")  # a device is a network peer: no links out, no absolute paths
            recorded = checkpoints.read_state(tmp).get("files", {})
            if not recorded or any(not (tmp / rel).is_file() or sha256_file(tmp / rel) != digest
                                   for rel, digest in recorded.items()):
                raise EdgeftError(f"{name} arrived damaged (its files differ from the hashes it records)")
        return self.local / name
