"""Entries the launcher tests run inside the training runtime."""

import os
import signal
import sys

from edgeft.core.errors import EdgeftError
from edgeft.trainer import events


def user_error(args):
    raise EdgeftError("the data file has 3 malformed lines; run `edgeft data check`")


def bug(args):
    return 1 / 0


def killed(args):
    print("about to die", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def chatty(args):
    print("library noise on stdout")
    print("library noise on stderr", file=sys.stderr)
    for step in range(args["steps"]):
        events.progress(step=step + 1, loss=1.0 / (step + 1))
    events.log("done")
    return {"steps": args["steps"], "modules": sorted(m for m in sys.modules if m.startswith("onnxruntime_genai"))}
