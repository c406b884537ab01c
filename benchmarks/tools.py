"""The sample task as function calling: the demo's recipe on the tool-calling variant of the data, scored by call
exact match.

    python benchmarks/tools.py [--seed 0 --out benchmarks/results]

`python -m edgeft.tasks.home generate --schema tools` writes the splits: every record declares one tool per
service (13), the system prompt asks for calls, and the assistant answers with `tool_calls` (two parallel calls
for a fifth of the requests, "... and ..."). The demo recipe (edgeft/recipes/home-demo.yaml) runs on them with
the sequence length raised to 256 (the declarations make the samples about twice as long): prepare, export,
ORT training, merge, int4 package, eval. Eval parses the calls out of each reply (the <tool_call> JSON) and
counts a reply right when its calls equal the expected ones, names and arguments, in any order. Then `edgeft
chat` on the bundle with a request alone (the bundle declares the training data's tools by default) must show the
call.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import report  # noqa: E402

REQUEST = "turn on the porch light"
WANT = 'call: light_turn_on({"entity_id": "light.porch"})'


def run(seed: int, work: Path) -> dict:
    from edgeft.tasks import home

    data = home.generate(work / "data", "tools", seed=seed)
    recipe = yaml.safe_load((REPO / "edgeft" / "recipes" / "home-demo.yaml").read_text())
    recipe |= {"name": "home-tools", "workspace": str(work / "ws")}
    recipe["data"] = {split: str(path) for split, path in (("train", data["train"]), ("eval", data["val"]),
                                                             ("test", data["test"]))}
    recipe["train"] |= {"seq_len": 256, "seed": seed}
    recipe.pop("bench", None)
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "edgeft", "run", str(work / "recipe.yaml")], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"edgeft run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    wall = time.time() - started
    results = json.loads((work / "ws" / "eval" / "report.json").read_text())["results"]
    chat = subprocess.run([sys.executable, "-m", "edgeft", "chat", str(work / "ws" / "bundle"), "--prompt", REQUEST],
                          capture_output=True, text=True)
    train = json.loads((work / "ws" / "manifest.json").read_text())["stages"]["train"]
    return {"seed": seed, "wall_s": round(wall, 1), "train_steps": train["step"],
            "train_tokens_per_s": train["tokens_per_s"],
            "samples": results[0]["samples"] if results else 0,
            "results": [{k: r[k] for k in ("variant", "runner", "loss", "exact_match", "name_match") if k in r}
                        for r in results],
            "chat": {"request": REQUEST, "stdout": chat.stdout.strip(), "calls": [
                line for line in chat.stderr.splitlines() if line.startswith("call: ")], "exit": chat.returncode,
                "shows_the_call": WANT in chat.stderr},
            "machine": platform.processor() or platform.machine()}


def markdown(result: dict) -> str:
    lines = ["# The sample task as function calling", "",
             f"The demo recipe on the tool-calling variant (13 tools, one per service; 20 % parallel calls), seed "
             f"{result['seed']}, {result['train_steps']} steps at {result['train_tokens_per_s']:.0f} tokens/s; the "
             f"whole run {result['wall_s']:.0f} s. Call exact match on {result['samples']} test requests: the calls "
             "parsed from the reply equal the expected ones (names and arguments, any order).", "",
             "| variant | runner | loss | call exact match | right tools called |", "|---|---|---|---|---|"]
    for r in result["results"]:
        name = f"{r['name_match']:.1%}" if "name_match" in r else "-"
        lines.append(f"| {r['variant']} | {r['runner']} | {r['loss']:.4f} | **{r['exact_match']:.1%}** | {name} |")
    chat = result["chat"]
    lines += ["", f"`edgeft chat bundle --prompt \"{chat['request']}\"` (no tools or system prompt given: the bundle's "
              f"defaults): `{chat['stdout']}`, and on stderr `{'; '.join(chat['calls'])}`.", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgeft-tools-") as tmp:
        result = run(args.seed, Path(tmp))
    report.save(args.out, "tools", result, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
