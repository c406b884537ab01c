"""Package's checks of the bundle it built: greedy tokens and logits against transformers on the merged model
(and, with swappable adapters, the base with none active), and the trained int4 base byte for byte in the bundle."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np

from edgeft.core import compare, progress
from edgeft.core.atomic import scratch_dir
from edgeft.core.errors import EdgeftError
from edgeft.core.workspace import Workspace
from edgeft.runtime import jobs, launcher
from edgeft.stages.bundle import generator, load_adapter
from edgeft.stages.package.builder import BuilderError, matmul_nbits


def prompts_of(merged: Path, n: int) -> list[list[int]]:
    """Token ids of the first `n` sample-task prompts, rendered with the merged model's chat template."""
    from transformers import AutoTokenizer

    from edgeft.tasks.home import DATA_DIR

    tok = AutoTokenizer.from_pretrained(merged, local_files_only=True)
    rows = [json.loads(x) for x in (DATA_DIR / "test.jsonl").read_text().splitlines()[:n]]
    out = []
    for row in rows:
        msgs = row["messages"][:-1]
        if tok.chat_template:
            out.append(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
        else:
            out.append(tok(msgs[-1]["content"])["input_ids"])
    return [list(map(int, ids)) for ids in out]



def reference(model_dir: Path, prompts: list[list[int]], max_new: int, trust_remote_code: bool = False,
              weights: str = "auto", steps: progress.Steps | None = None) -> tuple[list[list[int]], list[np.ndarray]]:
    """transformers' greedy tokens and last-prompt-position logits in fp32 for each prompt. Past 4 GiB of fp32
    weights (or `weights="stream"`) the model computes one decoder layer at a time from its files
    (lazy.streamed), so a Phi-3-mini is checked without holding its 15 GB of fp32 weights."""
    import torch

    from edgeft.models import lazy

    model, shards = lazy.base_model(model_dir, trust_remote_code, weights)
    tokens, logits = [], []
    passes = len(prompts) * (1 + max_new) * len(lazy.decoder_layers(model))  # at most: generation may stop early
    step = steps.step(f"transformers' greedy tokens on {model_dir.name} (fp32"
                      f"{', one decoder layer at a time' if shards else ''})", passes if shards else None) \
        if steps else contextlib.nullcontext()
    with step as tick, torch.no_grad(), lazy.streamed(model, shards, on_layer=tick) if shards else contextlib.nullcontext():
        for ids in prompts:
            x = torch.tensor([ids])
            logits.append(model(x).logits[0, -1].numpy())
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new,
                                 pad_token_id=model.config.pad_token_id)
            tokens.append(out[0, len(ids):].tolist())
    return tokens, logits



def provider_here(ep: str) -> bool:
    """Whether onnxruntime-genai on this machine runs the execution provider a bundle was built for."""
    import onnxruntime_genai as og

    return ep == "cpu" or bool(getattr(og, f"is_{ep}_available", lambda: False)())



def genai_generate(model_dir: Path, prompts: list[list[int]], max_new: int,
                   adapter: Path | None = None, cpu: bool = False) -> tuple[list[list[int]], list[np.ndarray]]:
    """Greedy tokens and first-step logits from onnxruntime-genai, with an `.onnx_adapter` active if given;
    `cpu`: on the CPU provider whatever the bundle was built for (the same graph and weights)."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    if cpu:
        config.clear_providers()
    model = og.Model(config)
    active = load_adapter(model, adapter) if adapter is not None else None
    tokens, logits = [], []
    for ids in prompts:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + max_new, do_sample=False)
        gen = generator(model, params, active)
        gen.append_tokens(ids)
        logits.append(np.asarray(gen.get_logits()).reshape(-1))
        out = []
        while not gen.is_done():
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        tokens.append(out)
    return tokens, logits



def max_error(reference: list[np.ndarray], got: list[np.ndarray]) -> float:
    """The largest absolute logit difference over the prompts; infinite if either side is not finite."""
    return max(compare.max_abs_diff(a, b) for a, b in zip(reference, got, strict=True))



def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """The share of positions where two greedy generations agree (over the longer of each pair)."""
    same = total = 0
    for x, y in zip(a, b, strict=True):
        n = max(len(x), len(y))
        same += sum(1 for i in range(min(len(x), len(y))) if x[i] == y[i])
        total += n
    return same / max(total, 1)



SHIPPED_TOLERANCE = 1e-3



def shipped_base_check(ws: Workspace, bundle: Path, prompts: list[list[int]], adapter: Path | None,
                       checkpoint: Path, accuracy_level: int, cpu: bool = False) -> dict:
    """Train what you ship: the int4 blocks the workspace trained against must be the bundle's, byte for
    byte, and the bundle with the trained adapter active must reproduce the training runtime's eval logits
    (within SHIPPED_TOLERANCE where MatMulNBits computes in fp32, accuracy level 0/1; at level 4 it rounds
    activations to int8, and the error is reported)."""
    import hashlib

    from edgeft.graph import frozen_base

    def rows(packed, scales, zero) -> set[bytes]:
        """One digest per output row (codes, scales and zero points of its blocks). The builder may split or
        fuse projections along the output dimension (Phi-3's gate_up into gate and up): rows survive that."""
        n = packed.shape[0]
        flat = [np.ascontiguousarray(a).reshape(n, -1).view(np.uint8) for a in (packed, scales, zero)]
        return {hashlib.blake2b(b"".join(a[i].tobytes() for a in flat), digest_size=16).digest() for i in range(n)}

    trained = {name: rows(*blocks) for name, blocks in frozen_base.stored_int4(ws.artifacts).items()}
    shipped = {b.name: rows(b.packed, b.scales, b.zero) for b in matmul_nbits(bundle) if b.bits == 4}
    shipped_rows = set().union(*shipped.values()) if shipped else set()
    missing = sorted(name for name, digests in trained.items() if not digests <= shipped_rows)
    result = {"trained_int4_weights": len(trained), "bundle_int4_matmuls": len(shipped),
              "trained_rows": sum(len(d) for d in trained.values()), "bundle_rows": len(shipped_rows),
              "identical_weights": len(trained) - len(missing), "not_in_bundle": missing}
    if missing:
        raise EdgeftError(f"package verification failed: {len(missing)} of the {len(trained)} int4 weights this "
                          f"workspace trained against are not in the bundle byte for byte (first: {missing[0]}); "
                          "nothing was written. The profile's int4 settings or the builder changed since export: "
                          "export and train again, or package without --adapters")
    if adapter is not None and checkpoint.exists():
        with scratch_dir(ws.root, "package-work") as work:
            out = work / "logits.npy"
            launcher.run(jobs.PromptLogits(artifacts=str(ws.artifacts), checkpoint=str(checkpoint), prompts=prompts,
                                           out=str(out)), log_path=ws.log("package-runtime"))
            ort_logits = np.load(out)
        _, got = genai_generate(bundle, prompts, 1, adapter, cpu)
        error = max_error(ort_logits, got)
        result["adapter_vs_training_runtime_max_logit_error"] = error
        if not compare.within(error, SHIPPED_TOLERANCE if accuracy_level in (0, 1) else math.inf):
            raise EdgeftError(f"package verification failed: the int4 base with the trained adapter differs from the "
                              f"training runtime's eval logits by {compare.describe(error)} (tolerance "
                              f"{SHIPPED_TOLERANCE:g} with fp32 compute); nothing was written")
    return result



def check_bundle(bundle: Path, merged: Path, base_dir: Path, prompts: list[list[int]], cfg, trust: bool,
                 active: Path | None, steps: progress.Steps) -> dict:
    """The bundle's greedy tokens and first logits (onnxruntime-genai, with its adapter `active`) against
    transformers' on the merged model; with an adapter, the bundle with none active against the base. fp32 must
    agree token for token, and no logit may be non-finite. `cfg` is the PackageConfig. The figures."""
    from edgeft.models import lazy

    ref_tokens, ref_logits = reference(merged, prompts, cfg.max_new_tokens, trust, cfg.weights, steps)
    on_cpu = not provider_here(cfg.ep)  # a bundle for a GPU provider this machine lacks: its graph, on the CPU
    try:
        with steps.step("the bundle's greedy tokens (onnxruntime-genai" + (", adapter active)" if active else ")")):
            got_tokens, got_logits = genai_generate(bundle, prompts, cfg.max_new_tokens, active, on_cpu)
    except RuntimeError as e:  # onnxruntime-genai refuses the model it was given
        hint = (f"package verifies the bundle by running it: build for --ep {cfg.ep} on a machine where "
                f"onnxruntime-genai has that provider" if cfg.ep != "cpu" else
                "onnxruntime-genai 0.18 builds an invalid embedding for asymmetric int4 with tied embeddings; "
                "package with a symmetric profile or another --precision")
        raise BuilderError(f"the built model does not load in onnxruntime-genai here: {str(e)[:300]}\n"
                           f"hint: {hint}") from None
    if not compare.finite(ref_logits) or not compare.finite(got_logits):
        side = "transformers' on the merged model" if not compare.finite(ref_logits) else "the bundle's"
        raise EdgeftError(f"package verification failed: {side} logits are not finite (NaN or infinity): the "
                          f"merged model holds non-finite weights; nothing was written. Merge a checkpoint "
                          f"from before the run diverged (`edgeft merge WS --checkpoint STEP`)")
    verification = {
        "prompts": len(prompts), "max_new_tokens": cfg.max_new_tokens,
        "token_agreement": agreement(ref_tokens, got_tokens), "max_logit_error": max_error(ref_logits, got_logits),
        "reference": f"transformers greedy generate on WS/merged (fp32, "
                     f"{'streamed' if lazy.streams(merged, cfg.weights) else 'loaded'})"
                     + (f"; bundle with adapter {active.stem!r} active" if active else ""),
        "ran_on": f"cpu (no {cfg.ep} provider on this machine)" if on_cpu else cfg.ep,
    }
    if active:
        base_tokens, base_logits = reference(base_dir, prompts, cfg.max_new_tokens, trust, cfg.weights, steps)
        with steps.step("the bundle's greedy tokens with no adapter active (the base model)"):
            plain_tokens, plain_logits = genai_generate(bundle, prompts, cfg.max_new_tokens, cpu=on_cpu)
        verification["no_adapter_vs_base"] = {"token_agreement": agreement(base_tokens, plain_tokens),
                                              "max_logit_error": max_error(base_logits, plain_logits)}
    return verification
