"""`edgeft devices probe --on [user@]host[:port]`: measure a device over SSH into a profile written here.

The device gets a runtime of numpy, psutil and onnxruntime (this workstation's versions) and two files:
devices/measure.py, which needs nothing else, and the MatMul graph it times. It prints its measurements as JSON,
and the profile is made from them here, as `devices probe` makes one of this machine.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from edgeft.core.errors import EdgeftError
from edgeft.devices import measure, probe, profiles
from edgeft.targets.device import Device, pinned
from edgeft.targets.ssh import Target, progress, quote

PACKAGES = ("numpy", "psutil", "onnxruntime")


def probe_on(target: Target, name: str, python: str = "python3",
             folder: str | None = None) -> tuple[profiles.Profile, dict]:
    """The device's profile, and its raw measurements (with the modules the measuring process imported)."""
    device = Device(target, python, folder)
    runtime = device.runtime(pinned(*PACKAGES))
    with tempfile.TemporaryDirectory(prefix="edgeft-probe-") as tmp:
        script = device.put(Path(measure.__file__))
        model = device.put(probe.matmul_model(Path(tmp) / "matmul.onnx"))
        int8 = device.put(probe.matmul_model(Path(tmp) / "matmul_int8.onnx", int8=True))
    progress("measuring (cores, ISA, fp32 and int8 MatMul, memory bandwidth)")
    out = target.run(f"{quote(runtime)} -I {quote(script)} {quote(model)} {probe.MATMUL_N} {quote(int8)}", timeout=1800)
    try:
        measured = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise EdgeftError(f"{target.name}: the measurement printed no result ({out.strip()[-300:]!r})") from None
    return probe.profile_of(measured, name, where=f" --on {target.name}"), measured
