"""Jobs the launcher tests run inside the training runtime."""

import os
import signal
import sys
from dataclasses import dataclass
from typing import ClassVar

from edgeft.core.errors import EdgeftError
from edgeft.runtime.jobs import Job
from edgeft.trainer import events


@dataclass(frozen=True)
class UserError(Job):
    ENTRY: ClassVar[str] = "tests.runtime.entries:user_error"


@dataclass(frozen=True)
class Bug(Job):
    ENTRY: ClassVar[str] = "tests.runtime.entries:bug"


@dataclass(frozen=True)
class Killed(Job):
    ENTRY: ClassVar[str] = "tests.runtime.entries:killed"


@dataclass(frozen=True)
class Chatty(Job):
    ENTRY: ClassVar[str] = "tests.runtime.entries:chatty"
    steps: int


@dataclass(frozen=True)
class Pid(Job):
    ENTRY: ClassVar[str] = "tests.runtime.entries:pid"
    said: str = ""


def pid(job: Pid):
    print(job.said, flush=True)
    return {"pid": os.getpid()}


def user_error(job):
    raise EdgeftError("the data file has 3 malformed lines; run `edgeft data check`")


def bug(job):
    return 1 / 0


def killed(job):
    print("about to die", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def chatty(job: Chatty):
    print("library noise on stdout")
    print("library noise on stderr", file=sys.stderr)
    for step in range(job.steps):
        events.progress(step=step + 1, loss=1.0 / (step + 1))
    events.log("done")
    return {"steps": job.steps, "modules": sorted(m for m in sys.modules if m.startswith("onnxruntime_genai"))}
