"""`edgeft bench BUNDLE|WS --on [user@]host[:port]`: the bundle's inference figures measured on the device.

The device gets a runtime of numpy and onnxruntime-genai (this workstation's versions), the bundle (a folder of
its files, each cached by content: Device.folder) and devices/genai_bench.py, which needs nothing else. The figures
come back as JSON and are judged here against the profile, as `bench` judges its own.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from edgeft.core.errors import EdgeftError
from edgeft.devices import genai_bench
from edgeft.stages import bench
from edgeft.stages.bundle import own_adapter
from edgeft.targets.device import Device, files_of, pinned
from edgeft.targets.ssh import Target, progress, quote

PACKAGES = ("numpy", "onnxruntime", "onnxruntime-genai")


class OnDevice:
    """A device to bench bundles on (bench.bench's `device`)."""

    def __init__(self, target: Target, python: str = "python3", folder: str | None = None):
        self.target, self.device = target, Device(target, python, folder)
        self.name = target.name
        self.measured: dict = {}

    def bundle(self, bundle: Path) -> str:
        """The bundle on the device, its files cached by content; the folder's path there."""
        return self.device.folder(files_of(bundle), "bundles")

    def bench_inference(self, bundle: Path, runs: int, prompt_tokens: int, new_tokens: int, data: Path | None) -> dict:
        runtime = self.device.runtime(pinned(*PACKAGES))
        progress(f"copying the bundle {bundle.name} (files already there are kept)")
        remote = self.bundle(bundle)
        adapter = own_adapter(bundle)
        with tempfile.TemporaryDirectory(prefix="edgeft-bench-") as tmp:
            prompt = Path(tmp) / "prompt.json"
            prompt.write_text(json.dumps(bench.bench_prompt(bundle, prompt_tokens, data)))
            prompt_path, script = self.device.put(prompt), self.device.put(Path(genai_bench.__file__))
        rel = adapter.relative_to(bundle).as_posix() if adapter else None
        progress(f"benchmarking on {self.name}: {runs} runs of {prompt_tokens} prompt + {new_tokens} new tokens")
        out = self.target.run(f"{quote(runtime)} -I {quote(script)} {quote(remote)} {quote(prompt_path)} {new_tokens} "
                              f"{runs}" + (f" {quote(rel)}" if rel else ""), stream=progress, timeout=3600)
        try:
            self.measured = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise EdgeftError(f"{self.name}: the bench printed no result ({out.strip()[-300:]!r})") from None
        return bench.inference_figures(self.measured, prompt_tokens, new_tokens, rel, f"{self.name}:{remote}")
