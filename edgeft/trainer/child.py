"""Entry point of the training-runtime subprocess: `python -m edgeft.trainer.child MODULE:JOB [JOB.json]`.

Rebuilds the job (a runtime/jobs.py dataclass) from the JSON on stdin (or in JOB.json), calls its entry function with it and
sends the return value as the `result` event. A user error (EdgeftError) becomes an `error` event of kind `user`
and exit 2; anything else an `error` of kind `bug` with the traceback, and exit 1.

`python -m edgeft.trainer.child --serve` (launcher.Worker) runs jobs one after another, one per line of stdin
({"name", "job", "log"}), each with its output in its own log; a user error is reported and the next job
served, a bug or an interruption ends it as above, and so does the end of stdin (exit 0).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
import traceback
import types
from pathlib import Path

from edgeft.core.errors import EdgeftError, storage_problem, terminate_like_interrupt
from edgeft.runtime.jobs import Job
from edgeft.trainer import events


def _check_runtime() -> None:
    expected_dir = os.environ.get("EDGEFT_RUNTIME_PATH", "")
    if not expected_dir:
        return
    import onnxruntime

    if not os.path.abspath(onnxruntime.__file__).startswith(os.path.abspath(expected_dir)):
        raise RuntimeError(f"the training subprocess imported onnxruntime from {onnxruntime.__file__}, "
                           f"not from the training runtime at {expected_dir}")


def _training_api_without_torch() -> None:
    """onnxruntime-training 1.19.2's package __init__ imports its PyTorch front end (amp and optim `import torch`),
    which training with the artifacts never uses (microsoft/onnxruntime#22070, open). Where torch is not installed
    (a device's runtime: targets/train.py), `onnxruntime.training` is entered without running that __init__: its
    api, onnxblock and checkpoint modules load as they are."""
    if "onnxruntime.training" in sys.modules or importlib.util.find_spec("torch") is not None:
        return
    if importlib.util.find_spec("onnxruntime") is None:
        return
    import onnxruntime

    package = types.ModuleType("onnxruntime.training")
    package.__path__ = [os.path.join(os.path.dirname(onnxruntime.__file__), "training")]
    package.__package__ = "onnxruntime.training"
    sys.modules["onnxruntime.training"] = onnxruntime.training = package


def _die_with_parent() -> None:
    """A SIGKILLed parent must not leave the child training (and writing checkpoints) on its own."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


def main() -> int:
    if os.environ.get("EDGEFT_RUNTIME_PATH"):
        # The training runtime never uses DeepSpeed, but onnxruntime.training imports it where it is installed (the
        # `distributed` extra): 0.4 s more per start, accelerator chatter, and an import that can lose a Ctrl-C.
        sys.modules.setdefault("deepspeed", None)
    _die_with_parent()
    _training_api_without_torch()
    terminate_like_interrupt()  # `kill` on the training runtime saves a checkpoint as Ctrl-C does
    events.open_channel()
    if sys.argv[1] == "--serve":
        return serve()
    if len(sys.argv) > 2:  # the job in a file (torchrun's ranks share no stdin)
        return run(lambda: Job.load(sys.argv[1], Path(sys.argv[2]).read_text(encoding="utf-8")))
    return run(lambda: Job.load(sys.argv[1], sys.stdin.read()))


def serve() -> int:
    for line in iter(sys.stdin.readline, ""):
        request = json.loads(line)
        _output_to(request["log"])
        code = run(functools.partial(Job.load, request["name"], json.dumps(request["job"])))
        if code not in (0, 2):
            return code
    return 0


def _output_to(log: str) -> None:
    """This job's output (the libraries' chatter, native code's included) to its own log."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def run(load) -> int:
    """Load the job and run it; the exit code its outcome stands for (0, user error 2, interrupted 130, bug 1)."""
    try:
        job = load()
        _check_runtime()
        events.emit("result", data=job.call())
        return 0
    except EdgeftError as e:
        events.emit("error", kind="user", type=type(e).__name__, message=str(e))
        return 2
    except KeyboardInterrupt:
        events.emit("error", kind="interrupted", type="KeyboardInterrupt", message="interrupted")
        return 130
    except BaseException as e:  # noqa: BLE001 - reported to the parent with its traceback, then exit 1
        if (problem := storage_problem(e)) is not None:
            events.emit("error", kind="user", type=type(e).__name__, message=problem)
            return 2
        events.emit("error", kind="bug", type=type(e).__name__, message=str(e), traceback=traceback.format_exc())
        traceback.print_exc()  # into the log too
        return 1


def exit_rank(code: int) -> None:
    """End a torchrun rank without the interpreter's finalization. Gloo's worker threads can still hold tensors
    then, and freeing them as the interpreter goes down aborts the process ('terminate called without an active
    exception', SIGABRT; pytorch/pytorch#179291) after a run that succeeded, which torchrun reports as the rank's
    failure and ends the others for (seen once in 2-rank fsdp runs, after the result was sent). By then the process
    group is destroyed and the checkpoints, the log and the result are written and flushed. A rank that failed
    exits as usual, so torchrun still names the rank that failed first."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    code = main()
    if code == 0 and os.environ.get("TORCHELASTIC_RUN_ID"):  # set by torchrun for each rank it starts
        exit_rank(code)
    sys.exit(code)
