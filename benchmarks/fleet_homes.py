"""The sample task as a fleet: is federated fine-tuning worth it over each home alone, and how far is it from
pooling everyone's data?

    python benchmarks/fleet_homes.py [--seeds 0,1,2 --homes 8 --rounds 20 --local-steps 10 --personal-steps 20
                                      --centralized per-device|total]

For each seed, `python -m edgeft.tasks.home homes` makes `--homes` homes (each its own devices and phrasing:
non-IID), 150 training and 40 test commands each. From the demo's base (edgeft:home_base, the demo recipe's
adapter), four ways to fine-tune, each scored by exact match on every home's own test commands (the mean over
homes is reported):
- federated: `edgeft fleet sim`, one device per home, FedAvg, rounds x local steps on each device;
- centralized: `edgeft train` on the union of the homes' data, as many steps as each device trains in the fleet
  (`--centralized per-device`: the same number of updates along the way) or as the whole fleet trains
  (`total`: the same compute, homes times more updates);
- home alone: `edgeft train` on one home's data, the steps one device trains in the fleet;
- personalized: `edgeft fleet personalize`, `--personal-steps` from the global adapter on the home's own data.
Goal (issue 24): federated within 5 points of centralized, clearly above home alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import report  # noqa: E402

METHODS = ("federated", "centralized", "home alone", "personalized")


def exact_match(ws: Path, test: Path) -> float:
    from edgeft.stages.evaluate import EvalConfig, evaluate
    from edgeft.stages.merge import merge

    merge(ws)
    result = evaluate(ws, test, EvalConfig(shots=0, variants=["adapter"]), log=lambda *_: None)
    return next(r["exact_match"] for r in result["results"] if r["variant"] == "adapter")


def one_seed(seed: int, args, root: Path) -> dict:
    from edgeft.fleet.config import FleetConfig
    from edgeft.fleet.personalize import personalize
    from edgeft.fleet.simulate import simulate
    from edgeft.pipeline import run
    from edgeft.stages.train import train
    from edgeft.tasks import home

    homes = root / "homes"
    home.generate_homes(homes, args.homes, {"train": 150, "test": 40}, seed)
    names = sorted(p.stem for p in (homes / "train").glob("home-*.jsonl"))
    union = root / "union.jsonl"
    union.write_text("".join((homes / "train" / f"{n}.jsonl").read_text() for n in names))
    recipe, base = run.load(run.SHIPPED["recipes"] / "home-demo.yaml",
                            [f"lora.seed={seed}", f"train.seed={seed}", f"workspace={root / 'base'}",
                             "stages=[prepare,export]"])
    run.run_recipe(recipe, base, log=lambda *_: None)
    local = dataclasses.replace(recipe.train, epochs=1, warmup_steps=0, eval_every=0, val_fraction=0.05)
    steps_each = args.rounds * args.local_steps
    scores = {m: {} for m in METHODS}
    started = time.time()

    fed = root / "federated"
    shutil.copytree(root / "base", fed)
    simulate(fed, union, FleetConfig(clients=len(names), rounds=args.rounds, local_steps=args.local_steps,
                                     partition="files", data_dir=str(homes / "train"), seed=seed, evaluate=False),
             local, log=print)
    for n in names:
        scores["federated"][n] = exact_match(fed, homes / "test" / f"{n}.jsonl")
    personal = personalize(fed, args.personal_steps, root / "personal", log=print)
    for n, ws in zip(names, personal, strict=True):
        scores["personalized"][n] = exact_match(ws, homes / "test" / f"{n}.jsonl")

    central = root / "centralized"
    shutil.copytree(root / "base", central)
    central_steps = steps_each * (len(names) if args.centralized == "total" else 1)
    train(central, union, dataclasses.replace(local, max_steps=central_steps))
    for n in names:
        scores["centralized"][n] = exact_match(central, homes / "test" / f"{n}.jsonl")
    for n in names:
        alone = root / f"alone-{n}"
        shutil.copytree(root / "base", alone)
        train(alone, homes / "train" / f"{n}.jsonl", dataclasses.replace(local, max_steps=steps_each))
        scores["home alone"][n] = exact_match(alone, homes / "test" / f"{n}.jsonl")
        shutil.rmtree(alone)
    return {"seed": seed, "homes": names, "scores": scores,
            "mean": {m: statistics.mean(scores[m].values()) for m in METHODS},
            "seconds": round(time.time() - started)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--homes", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--centralized", choices=("per-device", "total"), default="per-device")
    ap.add_argument("--personal-steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(one_seed(seed, args, Path(tmp)))
            print(json.dumps(runs[-1]["mean"]))
        # after every seed, so that a long run that is stopped keeps what it measured
        result = {"date": time.strftime("%Y-%m-%d"), "homes": args.homes, "rounds": args.rounds,
                  "local_steps": args.local_steps, "personal_steps": args.personal_steps,
                  "centralized": args.centralized, "runs": runs,
                  "mean": {m: statistics.mean(r["mean"][m] for r in runs) for m in METHODS},
                  "stdev": {m: statistics.stdev(r["mean"][m] for r in runs) if len(runs) > 1 else 0.0
                            for m in METHODS}}
        report.save(args.out, "fleet_homes" if args.centralized == "per-device" else "fleet_homes_total", result,
                    markdown)


READING = {
    "total": "Reading: at equal total device-steps, each home trains 1/{0} of the centralized steps, and FedAvg's "
             "global adapter moves about as far as {1} steps of one device: compare at equal steps per device "
             "(`--centralized per-device`) to see what federation loses to the data staying home.",
    "per-device": "Reading: each round averages {0} homes' updates, so the global adapter takes {1} steps as the "
                  "centralized run does, each seeing {0} homes' data; the fleet does {0} times the compute of the "
                  "centralized run, spread over the homes, and no command leaves its home.",
}


def markdown(r: dict) -> str:
    seeds = ", ".join(str(run["seed"]) for run in r["runs"])
    steps = r["rounds"] * r["local_steps"]
    central = (f"{steps * r['homes']} steps (the fleet's total device-steps)" if r.get("centralized") == "total" else
               f"{steps} steps (as many updates as each device trains)")
    lines = ["# The sample task as a fleet: federated vs centralized vs each home alone", "",
             f"Measured {r['date']} by `python benchmarks/fleet_homes.py`: {r['homes']} homes (each its own devices "
             "and phrasing), 150 training and 40 test commands each, from the demo's base and adapter settings; "
             f"federated = FedAvg, {r['rounds']} rounds x {r['local_steps']} local steps per home; centralized = the "
             f"union, {central}; home alone = one home's data, the steps one device trains in the fleet; "
             f"personalized = {r['personal_steps']} steps from the global adapter on the home's data. Exact match on "
             "each home's own "
             f"test commands, mean over homes; seeds {seeds}.", "",
             "| method | exact match (mean over homes) | per seed |", "|---|---|---|"]
    for m in METHODS:
        per = ", ".join(f"{run['mean'][m]:.1%}" for run in r["runs"])
        lines.append(f"| {m} | {r['mean'][m]:.1%} ± {r['stdev'][m]:.1%} | {per} |")
    gap = r["mean"]["federated"] - r["mean"]["centralized"]
    lines += ["", f"Federated minus centralized: {gap * 100:+.1f} points (goal: no worse than -5); federated minus "
              f"each home alone: {(r['mean']['federated'] - r['mean']['home alone']) * 100:+.1f} points.", "",
              READING[r.get("centralized", "total")].format(r["homes"], steps), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
