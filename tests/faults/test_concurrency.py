"""Two edgeft processes on one workspace: the second writer is refused, naming the first; a dead one's lock is taken."""

import json
import signal
import subprocess
import sys

from edgeft.core.lock import LOCK
from edgeft.tasks.home import DATA_DIR
from tests.helpers import cli, refused, start, tree, wait_for

DATA = DATA_DIR / "train.jsonl"


def test_a_second_writer_is_refused_with_the_holder_named(workspace):
    ws = workspace("exported")
    proc = start("train", ws, "--data", DATA, "--max-steps", "400", "--batch-size", "4", "--seq-len", "128")
    try:
        wait_for(proc, "step 20/400")
        lock = json.loads((ws / LOCK).read_text())
        assert lock["pid"] == proc.pid and lock["stage"] == "train" and lock["command"].startswith("edgeft train")
        for argv in (["train", ws, "--data", DATA, "--max-steps", "2"], ["export", ws, "--force"], ["merge", ws],
                     ["package", ws], ["eval", ws, "--data", DATA]):
            refused(cli(*argv), f"workspace {ws} is in use", f"(pid {proc.pid}, stage train", "edgeft train",
                    f"kill {proc.pid}", "two writers would overwrite each other's results")
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert not (ws / LOCK).exists()  # the holder removed it on its way out


def test_the_lock_of_a_process_that_died_is_taken_over(workspace):
    ws = workspace("exported")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (ws / LOCK).write_text(json.dumps({"pid": int(dead.stdout), "command": "edgeft train ws --data d.jsonl",
                                       "stage": "train", "started": "2026-12-01 10:00:00", "host": "box"}))
    before = tree(ws)
    result = cli("export", ws)  # unchanged: takes the lock, finds nothing to do
    assert result.code == 0, result.err
    assert "took over the lock" in result.err and "edgeft train ws --data d.jsonl" in result.err
    assert "no longer running" in result.err and "nothing to do" in result.out
    assert not (ws / LOCK).exists()
    assert tree(ws) == {k: v for k, v in before.items() if k != LOCK}
