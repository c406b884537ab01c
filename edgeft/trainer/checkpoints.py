"""Training checkpoints: folders written atomically, the last N kept plus the best, trainer state in JSON.

WS/train/checkpoints/step-000120/ holds the engine's files (adapter weights and optimizer state) and
trainer_state.json (step, data position, schedule inputs, config hash). A folder without
trainer_state.json is not a checkpoint: it is written last, inside the temporary folder, before the
rename that makes the checkpoint appear. Pruned checkpoints are renamed out of sight before they are
deleted, and what a killed run leaves behind is removed before the next run starts (`sweep`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from edgeft.core import atomic, fingerprint, state
from edgeft.core.atomic import atomic_dir
from edgeft.core.errors import EdgeftError, disk_full
from edgeft.core.fingerprint import sha256_file
from edgeft.core.workspace import checkpoint_dir

STATE = "trainer_state.json"


def complete(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE).is_file())


def latest(root: Path) -> Path | None:
    found = complete(root)
    return found[-1] if found else None


def read_state(path: Path) -> dict:
    path = Path(path)
    return state.read_json(path / STATE, "the checkpoint state", f"remove {path} to use the checkpoint before it, "
                           "or remove the whole run to start over", keys=("position", "config_hash", "identity"))


def verify(path: Path, hashes) -> None:
    """Refuse a checkpoint whose files are not what was saved (`hashes`: a fingerprint.Hashes), naming them."""
    path = Path(path)
    recorded = read_state(path).get("files", {})  # checkpoints saved before file hashes were recorded: not checked
    if changed := hashes.changed(recorded, path):
        raise EdgeftError(f"checkpoint {path} is damaged: {fingerprint.describe(changed, path)} differ from what was "
                          f"saved. Remove {path} to use the checkpoint before it, or remove the run to start over")


def save(root: Path, step: int, write_engine_files, trainer_state: dict) -> Path:
    """Write a checkpoint atomically: engine files, then the state, in a temp folder renamed into place."""
    final = checkpoint_dir(root, step)
    try:
        with atomic_dir(final) as tmp:
            write_engine_files(tmp)
            files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            atomic.write_json(tmp / STATE, {**trainer_state, "files": files})
    except BaseException as e:
        if disk_full(e):
            previous = latest(root)
            kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
            raise EdgeftError(f"no space left on the device of {root} while saving the step {step} checkpoint; "
                              f"{kept}. Free some space, then continue with --resume") from None
        raise
    return final


def prune(root: Path, keep_last: int, best: Path | None) -> None:
    found = complete(root)
    for path in found[:-keep_last] if keep_last > 0 else found:
        if best is None or path.resolve() != Path(best).resolve():
            atomic.remove_dir(path)


def sweep(root: Path) -> list[str]:
    """Remove what a killed run left in `root`: a checkpoint's temporary folder (its save was cut short) or
    one on its way out (a replace or prune cut short), and any step folder without its trainer state. Before
    a run starts, none of them is in use; the folders removed, by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    stray = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and not (p / STATE).is_file()]
    found = atomic.leftovers(root, "step-") + stray
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return sorted(p.name for p in found)


def mark_best(root: Path, path: Path) -> None:
    atomic.write_json(Path(root) / "best.json", {"path": Path(path).name})


def best(root: Path) -> Path | None:
    pointer = Path(root) / "best.json"
    if not pointer.is_file():
        return None
    name = state.read_json(pointer, "the best-checkpoint pointer", "delete it (the run then has no best checkpoint: "
                           "merge with --checkpoint last or a step)", keys=("path",))["path"]
    path = Path(root) / str(name)
    if not str(name).startswith("step-") or path.parent != Path(root):
        raise EdgeftError(f"the best-checkpoint pointer {pointer} is damaged (it points at {str(name)[:80]!r}); "
                          "delete it, and merge with --checkpoint last or a step")
    return path if (path / STATE).is_file() else None
