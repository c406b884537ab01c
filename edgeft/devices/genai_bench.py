"""The inference bench's measurement: time to first token and decode time of an onnxruntime-genai bundle, with
the standard library, numpy and onnxruntime-genai only, so that the same code runs on a target device over SSH
(`bench --on`, targets/) with nothing of edgeft installed there. Run as a script it prints JSON:

    python genai_bench.py BUNDLE PROMPT.json NEW_TOKENS RUNS [ADAPTER]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def time_generation(model, prompt: list[int], new: int, runs: int, adapter: tuple | None = None,
                    on_run=None) -> dict:
    """`runs` greedy generations of `new` tokens after `prompt` (one more first, to warm up): each run's time to the
    first token and the decode time of the rest. `adapter`: (og.Adapters, name) to make active."""
    import numpy as np
    import onnxruntime_genai as og

    ids = np.asarray(prompt, dtype=np.int32)
    ttft, decode = [], []
    for i in range(runs + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + new, min_length=len(ids) + new, do_sample=False)
        gen = og.Generator(model, params)
        if adapter is not None:
            gen.set_active_adapter(*adapter)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        gen.generate_next_token()
        t1 = time.perf_counter()
        produced = 1
        while not gen.is_done():
            gen.generate_next_token()
            produced += 1
        t2 = time.perf_counter()
        if produced != new:
            raise RuntimeError(f"the generator stopped after {produced} of {new} tokens")
        if i:
            ttft.append(t1 - t0)
            decode.append(t2 - t1)
        if on_run is not None:
            on_run(i, t1 - t0)
    return {"ttft_s": ttft, "decode_s": decode}


def main(argv: list[str]) -> dict:
    import resource

    import onnxruntime_genai as og

    bundle, prompt, new, runs = Path(argv[0]), json.loads(Path(argv[1]).read_text()), int(argv[2]), int(argv[3])
    model = og.Model(str(bundle))
    adapter = None
    if len(argv) > 4:
        adapters = og.Adapters(model)
        adapters.load(str(bundle / argv[4]), Path(argv[4]).stem)
        adapter = (adapters, Path(argv[4]).stem)
    result = time_generation(model, prompt, new, runs, adapter,
                             lambda i, t: print(f"run {i}/{runs}: first token {1000 * t:.1f} ms", file=sys.stderr,
                                                flush=True))
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return result | {"peak_rss_mb": peak_kb / 1024, "onnxruntime_genai": og.__version__,
                     "modules": sorted({m.split(".")[0] for m in sys.modules})}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
