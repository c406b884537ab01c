"""A fleet of many virtual devices on this machine: round time, bytes per round and memory, against one process
training the same steps.

    python benchmarks/fleet_scale.py [--devices 100 --fraction 0.1 --rounds 3 --local-steps 4] [--out benchmarks/results]

One tiny Phi-3 workspace (prepared, exported) is copied twice. `edgeft fleet sim` runs `--devices` simulated
devices (Flower's simulation engine; the sample task's training data dealt out evenly), `--fraction` of them
asked each round, each training `--local-steps` steps with the ORT engine in its own training-runtime process
and evaluating the global adapter; the reference is `edgeft train` of the same total steps of one round
(devices asked x local steps) in one process. Both run as children of this script, one after the other; the
peak memory is the largest sum of RSS over the child's whole process tree (Ray's processes and the devices'
training runtimes included), sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import report  # noqa: E402

DATA = REPO / "edgeft" / "tasks" / "home_data" / "train.jsonl"


def tree_peak(cmd: list[str]) -> tuple[float, float, str]:
    """Run `cmd`; (wall seconds, peak RSS of its whole process tree in MB, its output)."""
    peak = 0.0
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            members = [root, *root.children(recursive=True)]
            total = 0
            for p in members:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, total / 2**20)
        except psutil.Error:
            pass
        time.sleep(0.2)
    reader.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{''.join(out)[-3000:]}")
    return time.time() - started, peak, "".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    from tests.tiny_models import build

    edgeft = [sys.executable, "-m", "edgeft"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build("phi3-mini-4k", root / "model")
        base = root / "base"
        subprocess.run([*edgeft, "prepare", str(model), "--out", str(base), "--lora-r", "8"], check=True,
                       capture_output=True)
        subprocess.run([*edgeft, "export", str(base)], check=True, capture_output=True)
        train = {"batch_size": 4, "seq_len": 256, "lr": 1e-3}
        fleet_ws, alone_ws = root / "fleet", root / "alone"
        shutil.copytree(base, fleet_ws)
        shutil.copytree(base, alone_ws)
        recipe = root / "fleet.yaml"
        recipe.write_text(json.dumps({
            "name": "fleet-scale", "workspace": str(fleet_ws), "model": {"path": str(model)}, "lora": {"r": 8},
            "data": {"train": str(DATA)}, "train": train, "stages": ["train"],
            "fleet": {"clients": args.devices, "rounds": args.rounds, "local_steps": args.local_steps,
                      "fraction": args.fraction}}))
        fleet_wall, fleet_peak, _ = tree_peak([*edgeft, "fleet", "sim", str(recipe)])
        asked = max(1, round(args.devices * args.fraction))
        steps = asked * args.local_steps
        alone_wall, alone_peak, _ = tree_peak([*edgeft, "train", str(alone_ws), "--data", str(DATA), "--max-steps",
                                               str(steps), "--batch-size", "4", "--seq-len", "256", "--lr", "1e-3"])
        rows = [json.loads(x) for x in (fleet_ws / "fleet" / "metrics.jsonl").read_text().splitlines()]
        trains = [r for r in rows if r["event"] == "train"]
        evals = [r for r in rows if r["event"] == "eval"]
        round_s = sum(r["seconds"] for r in trains) / len(trains)
        result = {
            "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {psutil.cpu_count()} cores",
            "devices": args.devices, "fraction": args.fraction, "asked_per_round": asked, "rounds": args.rounds,
            "local_steps": args.local_steps, "train": train,
            "round_s": round_s, "round_s_each": [r["seconds"] for r in trains],
            "bytes_per_round": sum(r["bytes_sent"] + r["bytes_received"] for r in trains) / len(trains),
            "updates_per_round": [r["updates"] for r in trains], "eval_loss": [r["eval_loss"] for r in evals],
            "fleet_wall_s": round(fleet_wall, 1), "fleet_tree_peak_mb": round(fleet_peak),
            "device_peak_rss_mb": max(r.get("device_peak_rss_mb", 0) for r in trains),
            "server_peak_rss_mb": max(r["server_peak_rss_mb"] for r in trains),
            "alone_steps": steps, "alone_wall_s": round(alone_wall, 1), "alone_tree_peak_mb": round(alone_peak),
        }
        result["round_vs_alone"] = round_s / alone_wall
        result["memory_vs_alone"] = fleet_peak / alone_peak
    report.save(args.out, "fleet", result, markdown)


def markdown(r: dict) -> str:
    return "\n".join([
        "# Fleet at scale: simulated devices on one machine", "",
        f"Measured {r['date']} on {r['machine']} by `python benchmarks/fleet_scale.py`: {r['devices']} simulated "
        f"devices (tiny Phi-3, LoRA r8, the sample task dealt out evenly), {r['asked_per_round']} asked per round "
        f"(fraction {r['fraction']}), {r['rounds']} rounds of {r['local_steps']} local steps (batch "
        f"{r['train']['batch_size']} x {r['train']['seq_len']}), each device training and evaluating in its own "
        "training-runtime process. Reference: one `edgeft train` process running the same steps as one round "
        f"({r['alone_steps']}).", "",
        "| figure | fleet | one process | ratio |", "|---|---|---|---|",
        f"| seconds per round's training (of {r['alone_steps']} device-steps) | {r['round_s']:.1f} | "
        f"{r['alone_wall_s']:.1f} "
        f"| {r['round_vs_alone']:.2f}x |",
        f"| peak memory, whole process tree | {r['fleet_tree_peak_mb']} MB | {r['alone_tree_peak_mb']} MB "
        f"| {r['memory_vs_alone']:.2f}x |",
        f"| bytes per round (server out + in) | {r['bytes_per_round'] / 1e6:.2f} MB | - | - |",
        f"| peak RSS of one device's training process | {r['device_peak_rss_mb']:.0f} MB | - | - |",
        f"| peak RSS of the server (driver) process | {r['server_peak_rss_mb']:.0f} MB | - | - |", "",
        f"Updates per round: {r['updates_per_round']}; federated eval loss per round: "
        f"{', '.join(f'{x:.3f}' for x in r['eval_loss'])}; whole simulation {r['fleet_wall_s']} s.", "",
        "A round's training phase (the server's configure to aggregate) is mostly process start-up: each device "
        "starts its training runtime for its update (1-3 s here), two at a time on two cores; the one-process "
        "reference's wall time includes its own start-up and tokenizing. The whole simulation adds tokenizing "
        "100 devices' data, Ray's start and each round's evaluation. Only the adapter's trainable tensors travel: "
        "bytes per round = 2 x asked devices x adapter size.", ""])


if __name__ == "__main__":
    main()
