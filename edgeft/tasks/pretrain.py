"""The demo's own base model: a small Phi-3 pretrained here on broad data of the home-automation domain.

Broad data means many homes: requests for devices in any of ~20 rooms, answered in the *generic* JSON
schema ({"intent", "device", "room", "value", "at"}), mixed with plain text that names service and
entity ids the way integration docs do. The fine-tune (`edgeft demo`) then teaches one particular
home's devices in a different schema (`home`: service calls on that home's entity ids), which this base
never sees as answers, so it starts near 0 % exact match.

    python -m edgeft.tasks.pretrain build --out DIR [--steps N] [--seed S]
    python -m edgeft.tasks.pretrain check DIR        # re-run the recipe's first steps, compare fingerprints

The committed model (`edgeft/tasks/home_base/`) was written by `build` with the defaults; its
`edgeft_base.json` records the recipe, the sha256 of the weights at fingerprint steps, a sketch of the
weights at the first one, and the final scores. Training is deterministic on CPU for a fixed thread count
(recorded too) and a fixed set of kernels. Another CPU's kernels round differently: the base was built on an
Intel machine, and an AMD EPYC gives other bits after 50 steps. On one machine, torch's AVX2 kernels against
its AVX-512 ones moved each tensor by at most 6e-7 of its norm in 50 steps (1.2e-6 in the sketch). So `check`
passes on bit-for-bit equal weights, or on a sketch within REPRODUCTION_TOLERANCE of the recorded one (recorded
on that AMD EPYC, 2026-11-23, by re-running the recipe's first 50 steps).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeft.tasks import home

BASE_DIR = Path(__file__).parent / "home_base"
FINGERPRINT_STEPS = (50, 500)
SKETCH_PROJECTIONS = 8
# Of each tensor's norm: about 100x the rounding measured between kernels; 1e-3 of one tensor's norm gives 2e-3.
REPRODUCTION_TOLERANCE = 1e-4

# Phi-3-mini's chat template, in behaviour: no generation markers, EOS after the last turn. Phi-3's own renders no
# tools; this one also renders function calling, with the calls in the Hermes convention Qwen2.5's template uses:
# the declared tools' names first (one a line: onnxruntime-genai hands a template the tools' parameters in its
# own reshaped form, transformers as given, so a template that wrote them would prompt differently in the two),
# an assistant's calls as <tool_call>{"name", "arguments"}</tool_call>, and tool results as their own turn. A
# conversation without tools renders exactly as Phi-3's.
PHI3_TEMPLATE = (
    "{% if tools %}{{ '<|tools|>\n' }}{% for tool in tools %}{% if tool['function'] %}"
    "{{ tool['function']['name'] + '\n' }}{% else %}{{ tool['name'] + '\n' }}{% endif %}{% endfor %}"
    "{{ '<|end|>\n' }}{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content']}}"
    "{% if message['tool_calls'] %}{% for call in message['tool_calls'] %}"
    "{{ '<tool_call>' + (call['function'] | tojson) + '</tool_call>' }}{% endfor %}{% endif %}{{ '<|end|>\n' }}"
    "{% elif message['role'] == 'tool' %}{{'<|tool|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    text_fraction: float = 0.15
    vocab_size: int = 1024
    tokenizer_corpus: int = 20000
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    threads: int = 2


# -- broad data --------------------------------------------------------------------------------------------

ROOMS = ["kitchen", "living room", "bedroom", "hallway", "office", "porch", "bathroom", "basement", "garden",
         "nursery", "dining room", "attic", "guest room", "laundry room", "garage", "patio", "study", "kids room",
         "upstairs", "downstairs", "front door", "back door", "side door", "cellar"]
KIND_NAMES = {
    "light": ["{room} lights", "{room} light", "lights in the {room}", "{room} lamp", "{room} ceiling light"],
    "thermostat": ["{room} thermostat", "heating in the {room}", "{room} heating"],
    "lock": ["{room} lock", "lock on the {room}"],
    "cover": ["{room} blinds", "{room} shades", "blinds in the {room}", "{room} shutters"],
    "speaker": ["{room} speaker", "speaker in the {room}"],
    "tv": ["{room} tv", "tv in the {room}", "{room} television"],
    "switch": ["{room} fan", "{room} heater", "fan in the {room}", "{room} kettle"],
}
DOMAIN = {"light": "light", "thermostat": "climate", "lock": "lock", "cover": "cover", "speaker": "media_player",
          "tv": "media_player", "switch": "switch"}
SLUG_WORD = {"light": ["ceiling", "lamp", "main", "spots"], "thermostat": ["thermostat", "heating"],
             "lock": ["lock", "door"], "cover": ["blinds", "shades"], "speaker": ["speaker"], "tv": ["tv"],
             "switch": ["fan", "heater", "kettle", "plug"]}


def broad_entities() -> list:
    """Every room with every kind of device, plus the sample home's own (phrases only: this is broad data)."""
    entities = []
    for room in ROOMS:
        for kind, names in KIND_NAMES.items():
            if kind == "lock" and "door" not in room and room not in ("garage", "patio"):
                continue
            entities.append(("", room, kind, [n.format(room=room) for n in names]))
    return entities + list(home.ENTITIES)


def _slug(room: str) -> str:
    return room.replace(" ", "_")


def doc_text(rng: random.Random) -> str:
    """Integration-doc style text naming services, fields and entity ids of random homes."""
    kind = rng.choice(list(KIND_NAMES))
    room = rng.choice(ROOMS)
    entity = f"{DOMAIN[kind]}.{_slug(room)}_{rng.choice(SLUG_WORD[kind])}"
    services = sorted({s for (k, _), s in home.SERVICES.items() if k == kind})
    fields = sorted({home.VALUE_FIELD[op] for (k, op) in home.SERVICES if k == kind and op in home.VALUE_FIELD})
    forms = [
        f"The entity {entity} is the {rng.choice(KIND_NAMES[kind]).format(room=room)}.",
        f"Call {rng.choice(services)} with entity_id {entity}.",
        f"Services for a {kind}: {', '.join(services)}." + (f" Fields: {', '.join(fields)}." if fields else ""),
        f"{entity} supports {', '.join(services)}; schedule any call with at, e.g. at 07:30.",
    ]
    if fields:
        forms.append(f"Example: {rng.choice(services)} on {entity} with {rng.choice(fields)} {rng.randint(1, 99)}.")
    return " ".join(rng.sample(forms, k=rng.randint(1, 3)))


def chat_example(rng: random.Random, entities: list) -> dict:
    text, meaning = home.command(rng, entities)
    answer = json.dumps(home.render(meaning, "generic"))
    return {"messages": [{"role": "system", "content": home.SYSTEM["generic"]}, {"role": "user", "content": text},
                         {"role": "assistant", "content": answer}]}


def sample(rng: random.Random, entities: list, text_fraction: float) -> tuple[str, dict]:
    if rng.random() < text_fraction:
        return "text", {"text": doc_text(rng)}
    return "chat", chat_example(rng, entities)


# -- tokenizer and model -----------------------------------------------------------------------------------

def bpe_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `corpus`, with Phi-3's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", additional_special_tokens=SPECIAL[4:])
    fast.chat_template = PHI3_TEMPLATE
    return fast


def build_tokenizer(recipe: Recipe):
    rng = random.Random(f"tokenizer-{recipe.seed}")
    entities = broad_entities()
    corpus = []
    for _ in range(recipe.tokenizer_corpus):
        fmt, data = sample(rng, entities, 0.5)
        corpus.append(data["text"] if fmt == "text" else " ".join(m["content"] for m in data["messages"]))
    # Home-schema words appear in the docs above; this home's answers do not.
    return bpe_tokenizer(corpus, recipe.vocab_size)


def build_config(recipe: Recipe, tok):
    from transformers import Phi3Config

    vocab = len(tok)
    if vocab in (recipe.intermediate_size, 2 * recipe.intermediate_size):
        raise ValueError("the GenAI builder takes any Linear with out_features == vocab for the LM head")
    return Phi3Config(vocab_size=vocab, hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
                      num_hidden_layers=recipe.num_hidden_layers, num_attention_heads=recipe.num_attention_heads,
                      num_key_value_heads=recipe.num_attention_heads, max_position_embeddings=4096,
                      original_max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("<|end|>"),
                      tie_word_embeddings=False)


# -- training ----------------------------------------------------------------------------------------------

def weights_sha(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def weights_sketch(model) -> dict[str, list[float]]:
    """Per tensor: its norm, then its projections on SKETCH_PROJECTIONS random directions seeded by its name
    (standard normal entries, so a change d of the weights moves a projection by about |d|)."""
    import numpy as np

    out = {}
    for name, t in sorted(model.state_dict().items()):
        x = t.detach().double().numpy().ravel()
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little"))
        directions = rng.standard_normal((SKETCH_PROJECTIONS, x.size))
        out[name] = [float(np.linalg.norm(x)), *(float(v) for v in directions @ x)]
    return out


def sketch_distance(recorded: dict[str, list[float]], reproduced: dict[str, list[float]]) -> float:
    """The largest difference of a norm or projection, relative to the tensor's recorded norm."""
    if recorded.keys() != reproduced.keys():
        return float("inf")
    return max(max(abs(a - b) for a, b in zip(rec, rep, strict=True)) / rec[0]
               for rec, rep in ((recorded[k], reproduced[k]) for k in recorded))


def batches(recipe: Recipe, tok):
    """Endless, seeded stream of (input_ids, labels) batches of freshly generated samples."""
    import numpy as np
    import torch

    from edgeft.data.formats import Record
    from edgeft.data.tokenize import encode

    rng = random.Random(f"data-{recipe.seed}")
    entities = broad_entities()
    while True:
        encoded = [encode(tok, Record(0, *sample(rng, entities, recipe.text_fraction)))
                   for _ in range(recipe.batch_size)]
        width = max(len(e.input_ids) for e in encoded)
        ids = np.full((len(encoded), width), tok.pad_token_id, dtype=np.int64)
        labels = np.full((len(encoded), width), -100, dtype=np.int64)
        for i, e in enumerate(encoded):
            ids[i, : len(e.input_ids)] = e.input_ids
            labels[i, : len(e.input_ids)] = np.where(e.loss_mask, e.input_ids, -100)
        yield torch.from_numpy(ids), torch.from_numpy(labels)


def lr_at(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(recipe: Recipe, stop_after: int | None = None, log=print):
    """Train from scratch; returns (tokenizer, model, fingerprints {step: sha256}, the weights_sketch at the
    first fingerprint step or None, final loss)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    tok = build_tokenizer(recipe)
    model = AutoModelForCausalLM.from_config(build_config(recipe, tok), dtype=torch.float32)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))
    fingerprints, sketch, smoothed, start = {}, None, None, time.perf_counter()
    stream = batches(recipe, tok)
    last = min(recipe.steps, stop_after or recipe.steps)
    model.train()
    for step in range(last):
        ids, labels = next(stream)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        if step + 1 in FINGERPRINT_STEPS:
            fingerprints[step + 1] = weights_sha(model)
            if step + 1 == FINGERPRINT_STEPS[0]:
                sketch = weights_sketch(model)
        if (step + 1) % 100 == 0 or step + 1 == last:
            elapsed = time.perf_counter() - start
            log(f"step {step + 1}/{recipe.steps}  loss {smoothed:.4f}  lr {lr_at(step, recipe):.2e}  "
                f"{elapsed:.0f}s elapsed, ETA {elapsed / (step + 1) * (last - step - 1):.0f}s")
    model.eval()
    return tok, model, fingerprints, sketch, smoothed


def greedy_answers(model, tok, rows: list[dict], max_new_tokens: int = 64, batch: int = 32) -> list[str]:
    """Greedy answers to the chat rows (their last, assistant, turn left out), batched with left padding."""
    import torch

    tok.padding_side = "left"
    out = []
    end = tok.convert_tokens_to_ids("<|end|>")
    for i in range(0, len(rows), batch):
        prompts = [tok.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True)
                   for r in rows[i: i + batch]]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=[end],
                                 pad_token_id=tok.pad_token_id)
        out += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def evaluate(model, tok, schema: str, n: int = 150, seed: int = 1) -> dict:
    rows = [json.loads(line) for line in (home.DATA_DIR / "test.jsonl").read_text().splitlines()][:n] \
        if schema == "home" else [chat_example(random.Random(f"eval-{seed}-{i}"), list(home.ENTITIES))
                                  for i in range(n)]
    gold = [json.loads(r["messages"][-1]["content"]) for r in rows]
    return home.score(greedy_answers(model, tok, rows), gold)


def build(out: Path, recipe: Recipe, log=print) -> dict:
    from edgeft.core import atomic

    tok, model, fingerprints, sketch, loss = pretrain(recipe, log=log)
    generic, target = evaluate(model, tok, "generic"), evaluate(model, tok, "home")
    log(f"generic schema exact match {generic['exact_match']:.1%}; home schema {target['exact_match']:.1%}")
    info = {"recipe": asdict(recipe), "fingerprints": {str(k): v for k, v in fingerprints.items()},
            "sketch": {"step": FINGERPRINT_STEPS[0], "tensors": sketch},
            "final_weights_sha256": weights_sha(model), "final_loss": round(loss, 4),
            "exact_match": {"generic_schema": generic["exact_match"], "home_schema_test": target["exact_match"]},
            "parameters": sum(p.numel() for p in model.parameters())}
    with atomic.atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic.write_json(tmp / "edgeft_base.json", info)
    return info


@dataclass(frozen=True)
class Reproduction:
    recorded: str  # sha256 of the weights
    reproduced: str
    distance: float | None  # sketch_distance; None where no sketch was recorded for these steps

    @property
    def bit_for_bit(self) -> bool:
        return self.recorded == self.reproduced

    @property
    def ok(self) -> bool:
        return self.bit_for_bit or (self.distance is not None and self.distance <= REPRODUCTION_TOLERANCE)


def check(model_dir: Path, steps: int = FINGERPRINT_STEPS[0]) -> Reproduction:
    """Re-run the recorded recipe for `steps` steps and compare the weights with the recorded ones."""
    info = json.loads((Path(model_dir) / "edgeft_base.json").read_text())
    recipe = Recipe(**info["recipe"])
    _, model, fingerprints, sketch, _ = pretrain(recipe, stop_after=steps, log=lambda *_: None)
    reproduced = fingerprints.get(steps) or weights_sha(model)
    recorded = info.get("sketch") or {}
    distance = sketch_distance(recorded["tensors"], sketch) if sketch and recorded.get("step") == steps else None
    return Reproduction(info["fingerprints"].get(str(steps)) or info["final_weights_sha256"], reproduced, distance)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgeft.tasks.pretrain", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", type=Path, default=BASE_DIR)
    b.add_argument("--steps", type=int, default=Recipe.steps)
    b.add_argument("--seed", type=int, default=Recipe.seed)
    c = sub.add_parser("check")
    c.add_argument("model_dir", type=Path, nargs="?", default=BASE_DIR)
    c.add_argument("--steps", type=int, default=FINGERPRINT_STEPS[0])
    args = ap.parse_args(argv)
    if args.cmd == "build":
        info = build(args.out, Recipe(steps=args.steps, seed=args.seed))
        print(json.dumps(info, indent=2))
        return 0
    r = check(args.model_dir, args.steps)
    print(f"recorded   {r.recorded}\nreproduced {r.reproduced}")
    if r.bit_for_bit:
        print("bit for bit")
    elif r.distance is not None:
        print(f"other bits (this CPU's kernels round differently); sketch within {r.distance:.1e} of each tensor's "
              f"norm (tolerance {REPRODUCTION_TOLERANCE:g})")
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
