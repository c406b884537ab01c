"""The models the service answers with: base models (Hugging Face folders) and the fine-tuned models its jobs made.

Chat runs on onnxruntime-genai. Each base model has one og.Model: the bundle `package --adapters` builds for its
adapters, built once from a prepared workspace (`package.stage.base_bundle`, in state/bases/ID/). A fine-tuned
model is its job's .onnx_adapter, loaded into that og.Model once and made active per request: no model is loaded
per job, and the base answers with no adapter active. A job's bundle whose base graph is not byte-identical to
the base's (built with other settings) is opened as a model of its own, so that an adapter only ever runs on the
graph it was built for.

Calls into one og.Model are serialized, one generation step at a time: concurrent requests on a base take turns
token by token (each its own og.Generator), and none holds the model while its reader is away.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft.core.errors import EdgeftError
from edgeft.service.store import Store, job_workspace

DEMO_BASE = Path(__file__).resolve().parents[1] / "tasks" / "home_base"
DEMO_ID = "home_base"


class UnknownModel(EdgeftError):
    pass


def discover(models_dir: Path | None) -> dict[str, Path]:
    """Model id -> folder: each subfolder of `models_dir` with a config.json (the demo base without one)."""
    if models_dir is None:
        return {DEMO_ID: DEMO_BASE}
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        raise EdgeftError(f"--models {models_dir}: no such folder; give a folder whose subfolders are Hugging Face "
                          "model folders (the subfolder's name is the model id)")
    found = {p.name: p.resolve() for p in sorted(models_dir.iterdir()) if (p / "config.json").is_file()}
    if not found:
        raise EdgeftError(f"--models {models_dir}: no subfolder with a config.json; put each Hugging Face model "
                          "folder in it (its name is the model id)")
    return found


def _digest(folder: Path) -> str:
    """The base graph's identity: model.onnx, and each initializer's bytes by name (the builder may lay out the same
    tensors in another order in model.onnx.data from one build to the next)."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    initializers = sorted(model.graph.initializer, key=lambda t: t.name)
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    del graph.initializer[:]  # their bytes below; where they lie in the data file is no part of the identity
    h = hashlib.sha256(graph.SerializeToString())
    for t in initializers:
        h.update(t.name.encode())
        where = {e.key: e.value for e in t.external_data}
        if "location" not in where:
            h.update(t.raw_data)
            continue
        with open(folder / Path(where["location"]).name, "rb") as f:  # the bundle's own file, never a path elsewhere
            f.seek(int(where.get("offset", 0)))
            h.update(f.read(int(where["length"])) if "length" in where else f.read())
    return h.hexdigest()


class Engine:
    """One og.Model with its tokenizer and the adapters loaded into it."""

    def __init__(self, bundle: Path):
        import onnxruntime_genai as og

        from edgeft.stages.bundle import context_length, open_model

        self.model = open_model(bundle)
        self.tok = og.Tokenizer(self.model)
        self.adapters = og.Adapters(self.model)
        self.loaded: set[str] = set()
        self.context = context_length(bundle)
        self.lock = threading.Lock()

    def load(self, name: str, path: Path) -> None:
        with self.lock:
            self._load(name, path)

    def _load(self, name: str, path: Path) -> None:
        if name not in self.loaded:
            try:
                self.adapters.load(str(path), name)
            except Exception as e:  # noqa: BLE001 - onnxruntime-genai raises RuntimeError with its reason
                raise EdgeftError(f"cannot load the adapter of {name}: {str(e)[:300]}") from None
            self.loaded.add(name)


@dataclass
class Reply:
    """A generation in progress: iterate for text pieces; then `finish_reason` and the token counts."""

    engine: Engine
    adapter: str | None
    ids: np.ndarray
    max_tokens: int
    stop: list[str]
    finish_reason: str = "stop"
    completion_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[str]:
        """The reply's text, piece by piece. The engine is held for one step at a time, never across a yield:
        a streamed reply waits on its reader between pieces, and holding the model then would leave every other
        request (and the threads the server reads streams with) waiting on a reader that waits on them."""
        import onnxruntime_genai as og

        e = self.engine
        with e.lock:
            params = og.GeneratorParams(e.model)
            params.set_search_options(max_length=len(self.ids) + self.max_tokens, do_sample=False)
            gen = og.Generator(e.model, params)
            if self.adapter is not None:
                gen.set_active_adapter(e.adapters, self.adapter)
            gen.append_tokens(self.ids)
        new: list[int] = []
        shown, cut = "", -1
        while True:
            with e.lock:
                if gen.is_done():
                    break
                gen.generate_next_token()
                new.append(int(gen.get_next_tokens()[0]))
                text = e.tok.decode(np.asarray(new, dtype=np.int32))
            cut = min((text.find(s) for s in self.stop if s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
            if text.startswith(shown) and not text.endswith("\ufffd") and len(text) > len(shown):
                yield text[len(shown):]
                shown = text
            if cut >= 0:
                break
        self.completion_tokens = len(new)
        if cut < 0 and len(new) >= self.max_tokens:
            self.finish_reason = "length"


class Models:
    def __init__(self, models_dir: Path | None, state: Path, store: Store, device=None, seq_len: int = 256):
        self.bases = discover(models_dir)
        self.state, self.store, self.device, self.default_seq_len = Path(state), store, device, seq_len
        self.engines: dict[str, Engine] = {}  # by base graph digest
        self.base_of: dict[str, str] = {}  # base model id -> its engine's digest
        self._digests: dict[Path, str] = {}  # bundle -> its base graph's digest
        self.lock = threading.Lock()

    # -- what jobs need --------------------------------------------------------------------------------------
    def base_dir(self, model_id: str) -> Path:
        if model_id not in self.bases:
            raise UnknownModel(f"model {model_id!r} is not a base model of this service; it serves "
                               f"{', '.join(self.bases)}")
        return self.bases[model_id]

    def lora(self, model_id: str) -> dict:
        """The adapter settings a job on this base prepares with (the base bundle's too, so that adapters fit)."""
        return {"r": 32, "alpha": 64}

    def seq_len(self, model_id: str) -> int:
        config = json.loads((self.base_dir(model_id) / "config.json").read_text())
        longest = config.get("max_position_embeddings") or self.default_seq_len
        return int(min(self.default_seq_len, longest))

    # -- what chat needs -------------------------------------------------------------------------------------
    def listing(self) -> list[dict]:
        """The models, as the API lists them: the bases, then the fine-tuned ones."""
        bases = [{"id": i, "object": "model", "created": int(p.stat().st_mtime), "owned_by": "edgeft"}
                 for i, p in self.bases.items()]
        tuned = [{"id": j["fine_tuned_model"], "object": "model", "created": j["finished_at"],
                  "owned_by": "edgeft", "root": j["model"]} for j in self.store.fine_tuned_models()]
        return bases + tuned

    def engine(self, model_id: str) -> tuple[Engine, str | None]:
        """The og.Model that answers `model_id`, and the adapter to make active (None: the base)."""
        if model_id in self.bases:
            return self._base_engine(model_id), None
        job = next((j for j in self.store.fine_tuned_models() if j["fine_tuned_model"] == model_id), None)
        if job is None:
            raise UnknownModel(f"the model {model_id!r} does not exist; GET /v1/models lists them")
        bundle = job_workspace(self.state, job["id"]) / "bundle"
        adapter = bundle / "adapters" / f"{job['id']}.onnx_adapter"
        if not adapter.is_file():
            raise EdgeftError(f"the bundle of {model_id} is missing from {bundle}; run the job again")
        base = self._base_engine(job["model"])
        digest = self._digest_of(bundle)
        with self.lock:
            engine = base if digest == self.base_of[job["model"]] else self.engines.get(digest)
            if engine is None:  # built with other settings than the base bundle: its own model
                engine = self.engines[digest] = Engine(bundle)
            engine.load(job["id"], adapter)
        return engine, job["id"]

    def _digest_of(self, bundle: Path) -> str:
        if bundle not in self._digests:
            self._digests[bundle] = _digest(bundle)
        return self._digests[bundle]

    def _base_engine(self, model_id: str) -> Engine:
        with self.lock:
            if model_id not in self.base_of:
                bundle = self._base_bundle(model_id)
                digest = self._digest_of(bundle)
                self.engines.setdefault(digest, Engine(bundle))
                self.base_of[model_id] = digest
            return self.engines[self.base_of[model_id]]

    def _base_bundle(self, model_id: str) -> Path:
        """state/bases/ID/bundle, built the first time the base is asked for (prepared as its jobs are)."""
        from edgeft.stages import prepare
        from edgeft.stages.package.stage import base_bundle
        from edgeft.stages.prepare import PrepareConfig

        ws = self.state / "bases" / model_id
        if not (ws / "bundle" / "genai_config.json").is_file():
            lora = self.lora(model_id)
            cfg = PrepareConfig(model_dir=str(self.base_dir(model_id)), lora_r=lora["r"], lora_alpha=lora["alpha"])
            prepare.prepare(cfg, ws, self.device)
            base_bundle(ws, ws / "bundle", self.device)
        return ws / "bundle"

    def reply(self, model_id: str, messages: list[dict], max_tokens: int | None, stop: list[str]) -> Reply:
        engine, adapter = self.engine(model_id)
        with engine.lock:  # every call into an og.Model's objects is made holding it
            try:
                prompt = engine.tok.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
            except Exception:  # noqa: BLE001 - a model without a chat template: the last message as it is
                prompt = messages[-1]["content"]
            ids = np.asarray(engine.tok.encode(prompt), dtype=np.int32)
        room = (engine.context or len(ids) + 4096) - len(ids)
        if room <= 0:
            raise ContextExceeded(f"the messages are {len(ids)} tokens and {model_id}'s context is {engine.context}: "
                                  "nothing is left for a reply; send fewer or shorter messages")
        wanted = room if max_tokens is None else min(max_tokens, room)
        return Reply(engine, adapter, ids, wanted, stop)


class ContextExceeded(EdgeftError):
    pass
