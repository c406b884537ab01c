"""Sample task: natural-language commands for one specific home, answered with that home's JSON action.

Two renderings of the same commands:
- `home`: the fine-tuning target, Home-Assistant-style service calls on this home's own entities,
  e.g. {"service": "light.turn_on", "entity_id": "light.kitchen_counter", "brightness_pct": 40}.
- `generic`: a generic schema for broad pretraining data of the domain,
  e.g. {"intent": "set", "device": "light", "room": "kitchen", "value": 40}.

    python -m edgeft.tasks.home generate --out DIR [--schema home|generic] [--train N --val N --test N --seed S]
    python -m edgeft.tasks.home homes --out DIR [--homes N --train N --test N --seed S]   (a fleet's homes)
    python -m edgeft.tasks.home score PREDICTIONS.jsonl GOLD.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

SYSTEM = {
    "home": "You control the Lindqvist home. Answer with exactly one JSON action.",
    "generic": "Turn the request into one JSON command.",
    "tools": "You control the Lindqvist home. Call its tools for each request.",
}

# (entity_id, room, kind, phrases that name it)
ENTITIES = [
    ("light.kitchen_ceiling", "kitchen", "light", ["kitchen lights", "kitchen ceiling light", "lights in the kitchen"]),
    ("light.kitchen_counter", "kitchen", "light", ["counter lights", "kitchen counter lights", "under-cabinet lights"]),
    ("light.living_room_lamp", "living room", "light", ["living room lamp", "floor lamp", "lamp in the living room"]),
    ("light.living_room_ceiling", "living room", "light", ["living room lights", "big light in the living room"]),
    ("light.bedroom_lamp", "bedroom", "light", ["bedroom lamp", "bedside lamp", "lamp in the bedroom"]),
    ("light.hallway", "hallway", "light", ["hallway light", "hall lights", "lights in the hallway"]),
    ("light.office_desk", "office", "light", ["desk lamp", "office light", "light in the office"]),
    ("light.porch", "porch", "light", ["porch light", "outside light", "front porch light"]),
    ("climate.downstairs", "downstairs", "thermostat", ["downstairs thermostat", "heating downstairs"]),
    ("climate.upstairs", "upstairs", "thermostat", ["upstairs thermostat", "heating upstairs"]),
    ("lock.front_door", "front door", "lock", ["front door", "front door lock"]),
    ("lock.back_door", "back door", "lock", ["back door", "back door lock"]),
    ("cover.garage_door", "garage", "cover", ["garage door", "garage"]),
    ("cover.living_room_blinds", "living room", "cover", ["living room blinds", "blinds in the living room"]),
    ("cover.bedroom_blinds", "bedroom", "cover", ["bedroom blinds", "blinds in the bedroom"]),
    ("media_player.kitchen_speaker", "kitchen", "speaker", ["kitchen speaker", "speaker in the kitchen"]),
    ("media_player.living_room_tv", "living room", "tv", ["tv", "living room tv", "television"]),
    ("switch.coffee_maker", "kitchen", "switch", ["coffee maker", "coffee machine"]),
    ("switch.office_fan", "office", "switch", ["office fan", "fan in the office"]),
]

POLITE = ["", "please ", "could you ", "can you ", "hey, ", "i'd like you to "]
TAIL = ["", "", " please", " now", " thanks"]


def _time_phrase(rng: random.Random) -> tuple[str, str]:
    hour, minute = rng.randint(5, 23), rng.choice([0, 0, 15, 30, 45])
    if rng.random() < 0.5:
        spoken = f"{hour:02d}:{minute:02d}"
    else:
        h12 = hour % 12 or 12
        spoken = f"{h12}{f':{minute:02d}' if minute else ''} {'am' if hour < 12 else 'pm'}"
    return f" at {spoken}", f"{hour:02d}:{minute:02d}"


def command(rng: random.Random, entities: list = ENTITIES) -> tuple[str, dict]:  # noqa: C901 - see below
    # One branch per device kind, in one function: its random draws must stay in this order, which is what
    # reproduces the committed data splits and the demo's base (tasks/pretrain.py).
    """One request and its meaning: {entity, room, kind, op, value?, at?}."""
    entity, room, kind, names = rng.choice(entities)
    name = rng.choice(names)
    meaning: dict = {"entity": entity, "room": room, "kind": kind}
    if kind == "light":
        choice = rng.random()
        if choice < 0.35:
            meaning["op"], text = "on", rng.choice([f"turn on the {name}", f"switch the {name} on", f"{name} on"])
        elif choice < 0.65:
            meaning["op"], text = "off", rng.choice([f"turn off the {name}", f"switch the {name} off",
                                                     f"kill the {name}"])
        else:
            pct = rng.choice(range(5, 101, 5))
            meaning.update(op="dim", value=pct)
            text = rng.choice([f"dim the {name} to {pct}%", f"set the {name} to {pct} percent",
                               f"{name} at {pct}%"])
    elif kind == "thermostat":
        temp = rng.choice([x / 2 for x in range(32, 52)])
        temp = int(temp) if temp == int(temp) else temp
        meaning.update(op="set", value=temp)
        text = rng.choice([f"set the {name} to {temp} degrees", f"make it {temp} degrees {room}",
                           f"{name} to {temp}"])
    elif kind == "lock":
        meaning["op"] = rng.choice(["lock", "unlock"])
        text = rng.choice([f"{meaning['op']} the {name}", f"{meaning['op']} {name}"])
    elif kind == "cover":
        choice = rng.random()
        if choice < 0.4:
            meaning["op"], text = "open", rng.choice([f"open the {name}", f"raise the {name}"])
        elif choice < 0.8:
            meaning["op"], text = "close", rng.choice([f"close the {name}", f"shut the {name}"])
        else:
            pos = rng.choice(range(10, 100, 10))
            meaning.update(op="position", value=pos)
            text = rng.choice([f"set the {name} to {pos}%", f"open the {name} {pos} percent"])
    elif kind in ("speaker", "tv"):
        choice = rng.random()
        if choice < 0.4:
            vol = rng.choice(range(5, 101, 5))
            meaning.update(op="volume", value=vol)
            text = rng.choice([f"set the {name} volume to {vol}", f"{name} volume {vol}%"])
        else:
            meaning["op"] = rng.choice(["play", "pause"])
            text = rng.choice([f"{meaning['op']} the {name}", f"{meaning['op']} music on the {name}"])
    else:
        meaning["op"] = rng.choice(["on", "off"])
        text = rng.choice([f"turn {meaning['op']} the {name}", f"switch the {name} {meaning['op']}"])
    if meaning["op"] not in ("play", "pause", "volume") and rng.random() < 0.2:
        phrase, at = _time_phrase(rng)
        meaning["at"] = at
        text += phrase
    return rng.choice(POLITE) + text + rng.choice(TAIL), meaning


SERVICES = {
    ("light", "on"): "light.turn_on", ("light", "off"): "light.turn_off", ("light", "dim"): "light.turn_on",
    ("thermostat", "set"): "climate.set_temperature", ("lock", "lock"): "lock.lock", ("lock", "unlock"): "lock.unlock",
    ("cover", "open"): "cover.open_cover", ("cover", "close"): "cover.close_cover",
    ("cover", "position"): "cover.set_cover_position", ("speaker", "volume"): "media_player.volume_set",
    ("tv", "volume"): "media_player.volume_set", ("speaker", "play"): "media_player.media_play",
    ("tv", "play"): "media_player.media_play", ("speaker", "pause"): "media_player.media_pause",
    ("tv", "pause"): "media_player.media_pause", ("switch", "on"): "switch.turn_on", ("switch", "off"): "switch.turn_off",
}
VALUE_FIELD = {"dim": "brightness_pct", "set": "temperature", "position": "position", "volume": "volume_pct"}
GENERIC_INTENT = {"on": "turn_on", "off": "turn_off", "dim": "set", "set": "set", "lock": "lock", "unlock": "unlock",
                  "open": "open", "close": "close", "position": "set", "volume": "set_volume", "play": "play",
                  "pause": "pause"}


def render(meaning: dict, schema: str) -> dict:
    if schema == "home":
        action = {"service": SERVICES[(meaning["kind"], meaning["op"])], "entity_id": meaning["entity"]}
        if "value" in meaning:
            action[VALUE_FIELD[meaning["op"]]] = meaning["value"]
    else:
        action = {"intent": GENERIC_INTENT[meaning["op"]], "device": meaning["kind"], "room": meaning["room"]}
        if "value" in meaning:
            action["value"] = meaning["value"]
    if "at" in meaning:
        action["at"] = meaning["at"]
    return action


def tool_name(service: str) -> str:
    """The function a service is called through (OpenAI's function names have no dots)."""
    return service.replace(".", "_")


def _tools() -> list[dict]:
    """One tool per service: the entity to act on, the service's value, and a time for later."""
    tools = {}
    for (_, op), service in SERVICES.items():
        properties = {"entity_id": {"type": "string"}}
        if op in VALUE_FIELD:
            properties[VALUE_FIELD[op]] = {"type": "number"}
        if op not in ("play", "pause", "volume"):
            properties["at"] = {"type": "string", "description": "HH:MM"}
        tool = tools.setdefault(service, {"type": "function", "function": {
            "name": tool_name(service), "parameters": {"type": "object", "properties": {}, "required": ["entity_id"]}}})
        tool["function"]["parameters"]["properties"].update(properties)
    return list(tools.values())


TOOLS = _tools()


def calls_of(meanings: list[dict]) -> list[dict]:
    """The tool calls that carry out the requests (one each, in order: parallel calls for a double request)."""
    out = []
    for i, meaning in enumerate(meanings):
        action = render(meaning, "home")
        service = action.pop("service")
        out.append({"id": f"call_{i}", "type": "function",
                    "function": {"name": tool_name(service), "arguments": json.dumps(action)}})
    return out


def example(rng: random.Random, schema: str, home: Home | None = None) -> dict:
    if schema == "tools":  # one request, or two joined (parallel calls), a fifth of the time
        (text, meaning), *more = [command(rng) for _ in range(1 + (rng.random() < 0.2))]
        text = " and ".join([text, *(t for t, _ in more)])
        return {"tools": TOOLS, "messages": [
            {"role": "system", "content": SYSTEM[schema]}, {"role": "user", "content": text},
            {"role": "assistant", "tool_calls": calls_of([meaning, *(m for _, m in more)])}]}
    text, meaning = command(rng, home.entities) if home else command(rng)
    if home:
        text = home.phrase(rng, text)
    return {"messages": [{"role": "system", "content": SYSTEM[schema]}, {"role": "user", "content": text},
                         {"role": "assistant", "content": json.dumps(render(meaning, schema))}]}


def generate(out: Path, schema: str = "home", sizes: dict[str, int] | None = None, seed: int = 0) -> dict[str, Path]:
    """Write train/val/test JSONL; requests never repeat across splits."""
    sizes = sizes or {"train": 1200, "val": 150, "test": 150}
    rng = random.Random(f"{schema}-{seed}")
    seen: set[str] = set()
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in sizes.items():
        rows = []
        while len(rows) < n:
            ex = example(rng, schema)
            key = ex["messages"][1]["content"]
            if key not in seen:
                seen.add(key)
                rows.append(ex)
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


@dataclass(frozen=True)
class Home:
    """One home of a fleet: the devices it has (a share of ENTITIES, some rooms missing altogether) and how its
    people speak (their own few ways of asking). Homes differ in what they ask for and how: non-IID data."""

    entities: list
    polite: list
    tail: list

    def phrase(self, rng: random.Random, text: str) -> str:
        """The request as this home says it: `command` adds a generic politeness; this home's replaces it."""
        for lead in sorted(POLITE, key=len, reverse=True):
            if lead and text.startswith(lead):
                text = text[len(lead):]
                break
        for end in sorted(TAIL, key=len, reverse=True):
            if end and text.endswith(end):
                text = text[: -len(end)]
                break
        return rng.choice(self.polite) + text + rng.choice(self.tail)


def make_home(rng: random.Random) -> Home:
    rooms = sorted({room for _, room, _, _ in ENTITIES})
    absent = set(rng.sample(rooms, k=rng.randint(1, 3)))
    present = [e for e in ENTITIES if e[1] not in absent]
    entities = rng.sample(present, k=max(4, round(len(present) * rng.uniform(0.5, 0.8))))
    return Home(entities=sorted(entities), polite=rng.sample(POLITE, k=2), tail=rng.sample(TAIL, k=2))


def generate_homes(out: Path, homes: int = 8, sizes: dict[str, int] | None = None, seed: int = 0) -> dict[str, Path]:
    """A fleet's homes: out/train/home-NN.jsonl and out/test/home-NN.jsonl, one pair per home (the folders a
    fleet's `partition: files` and a per-home evaluation read), and out/homes.json, what each home has and how
    it speaks; requests never repeat within a home."""
    sizes = sizes or {"train": 150, "test": 40}
    rng = random.Random(f"homes-{seed}")
    for split in sizes:
        (out / split).mkdir(parents=True, exist_ok=True)
    described = {}
    for i in range(homes):
        home, seen = make_home(rng), set()
        described[f"home-{i:02d}"] = {"devices": [e[0] for e in home.entities], "polite": home.polite,
                                      "tail": home.tail}
        for split, n in sizes.items():
            rows = []
            while len(rows) < n:
                ex = example(rng, "home", home)
                if (key := ex["messages"][1]["content"]) not in seen:
                    seen.add(key)
                    rows.append(ex)
            (out / split / f"home-{i:02d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "homes.json").write_text(json.dumps(described, indent=2) + "\n")
    return {split: out / split for split in sizes}


def parse_action(text: str) -> dict | None:
    match = re.search(r"\{.*\}", text, re.S)
    if not match:
        return None
    try:
        value = json.loads(match.group(0))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def score(predictions: list[str], gold: list[dict]) -> dict:
    """Exact match (the parsed action equals the expected one), per-field accuracy, valid-JSON rate."""
    exact = fields_right = fields_total = valid = 0
    per_field: dict[str, list[int]] = {}
    for text, expected in zip(predictions, gold, strict=True):
        pred = parse_action(text)
        valid += pred is not None
        pred = pred or {}
        exact += pred == expected
        for key, value in expected.items():
            ok = pred.get(key) == value
            per_field.setdefault(key, [0, 0])
            per_field[key][0] += ok
            per_field[key][1] += 1
            fields_right += ok
            fields_total += 1
    n = max(len(gold), 1)
    return {"samples": len(gold), "exact_match": exact / n, "field_accuracy": fields_right / max(fields_total, 1),
            "valid_json": valid / n, "per_field": {k: r / t for k, (r, t) in sorted(per_field.items())}}


DATA_DIR = Path(__file__).parent / "home_data"


def gold_actions(path: Path) -> list[dict]:
    return [json.loads(json.loads(line)["messages"][-1]["content"]) for line in Path(path).read_text().splitlines()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgeft.tasks.home", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--out", type=Path, default=DATA_DIR)
    g.add_argument("--schema", choices=tuple(SYSTEM), default="home")
    g.add_argument("--seed", type=int, default=0)
    for split, n in (("train", 1200), ("val", 150), ("test", 150)):
        g.add_argument(f"--{split}", type=int, default=n)
    h = sub.add_parser("homes")
    h.add_argument("--out", type=Path, required=True)
    h.add_argument("--homes", type=int, default=8)
    h.add_argument("--train", type=int, default=150)
    h.add_argument("--test", type=int, default=40)
    h.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("score")
    s.add_argument("predictions", type=Path, help="JSONL with a 'prediction' string per line")
    s.add_argument("gold", type=Path, help="the chat JSONL the predictions answer")
    args = ap.parse_args(argv)
    if args.cmd == "homes":
        paths = generate_homes(args.out, args.homes, {"train": args.train, "test": args.test}, args.seed)
        print("\n".join(str(p) for p in paths.values()))
    elif args.cmd == "generate":
        paths = generate(args.out, args.schema, {"train": args.train, "val": args.val, "test": args.test}, args.seed)
        print("\n".join(str(p) for p in paths.values()))
    else:
        preds = [json.loads(line)["prediction"] for line in args.predictions.read_text().splitlines()]
        print(json.dumps(score(preds, gold_actions(args.gold)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
