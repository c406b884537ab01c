"""Progress of the stages that are not a training loop (export, merge, package).

At full size each runs for minutes (export of a Phi-3-mini: 12), mostly inside steps that compute the model one
decoder layer at a time. Each step is announced as it starts; one that ran for more than a few seconds says
how long it took and the process's peak memory; and within a step that counts its decoder-layer passes, a line
every EVERY seconds gives the passes done, an ETA and the memory now. Small models stay terse: their steps
end before the first tick.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from edgeft.core import rss

EVERY = 15.0  # seconds between lines within a step
SLOW = 5.0  # a step that took longer reports its time and peak memory


class Steps:
    def __init__(self, stage: str, total: int):
        self.stage, self.total, self.index = stage, total, 0

    @contextlib.contextmanager
    def step(self, what: str, layer_passes: int | None = None) -> Iterator[Callable[[], None]]:
        """Announce a step; yield `tick`, to call once per decoder-layer pass (`layer_passes` expected)."""
        self.index += 1
        print(f"{self.stage} {self.index}/{self.total}: {what}", flush=True)
        started = last = time.time()
        done = 0

        def tick() -> None:
            nonlocal done, last
            done += 1
            now = time.time()
            if layer_passes and now - last >= EVERY:
                last = now
                eta = (now - started) / done * max(layer_passes - done, 0)
                print(f"  {done}/{layer_passes} decoder-layer passes, {now - started:.0f} s, ETA {eta:.0f} s, "
                      f"RSS {rss.current_mb() / 1024:.2f} GiB", flush=True)

        yield tick
        took = time.time() - started
        if took >= SLOW:
            print(f"  done in {took:.0f} s, peak RSS {rss.peak_mb() / 1024:.2f} GiB", flush=True)
