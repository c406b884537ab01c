"""edgeft serve under load: 50 concurrent chat requests and 20 concurrent uploads, against the same generations run
directly on onnxruntime-genai in this process (the reference), side by side in one process tree.

    python benchmarks/serve.py [--chats 50 --uploads 20 --out benchmarks/results]

A server is started on 127.0.0.1 with a fresh state folder; one fine-tuning job on the sample task (the demo
base, 6 epochs) gives the fine-tuned model. Then:
- reference: the job's bundle opened here with og.Model, its adapter active, the same requests one after another
  (greedy): completion tokens per second and each request's latency;
- the service: the same requests, all at once from as many threads of the openai client (non-streaming), then
  again streamed (time to the first content chunk); every reply must equal the reference's;
- uploads: the sample task's training file, `--uploads` at once.
Reported: wall time, throughput and the ratio to the reference, latency p50/p95, errors (must be none).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import report  # noqa: E402
from tests.service.server import DATA, Server  # noqa: E402


def requests(n: int) -> list[list[dict]]:
    lines = (DATA / "test.jsonl").read_text().splitlines()
    return [json.loads(lines[i % len(lines)])["messages"][:-1] for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def reference(bundle: Path, adapter: Path, chats: list[list[dict]], max_tokens: int) -> dict:
    """The same greedy generations on onnxruntime-genai directly, one after another."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(bundle))
    tok = og.Tokenizer(model)
    adapters = og.Adapters(model)
    adapters.load(str(adapter), "ft")
    texts, latencies, tokens = [], [], 0
    started = time.time()
    for messages in chats:
        t = time.time()
        ids = tok.encode(tok.apply_chat_template(json.dumps(messages), add_generation_prompt=True))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + max_tokens, do_sample=False)
        gen = og.Generator(model, params)
        gen.set_active_adapter(adapters, "ft")
        gen.append_tokens(ids)
        new = []
        while not gen.is_done():
            gen.generate_next_token()
            new.append(int(gen.get_next_tokens()[0]))
        texts.append(tok.decode(np.asarray(new, dtype=np.int32)))
        tokens += len(new)
        latencies.append(time.time() - t)
    wall = time.time() - started
    return {"texts": texts, "wall_s": wall, "tokens": tokens, "latencies": latencies}


def concurrent_chats(server: Server, model: str, chats: list[list[dict]], max_tokens: int, stream: bool) -> dict:
    def one(messages):
        client = server.client()
        t = time.time()
        try:
            if stream:
                first, pieces = None, []
                for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                            stream=True):
                    if chunk.choices and chunk.choices[0].delta.content:
                        first = first or time.time() - t
                        pieces.append(chunk.choices[0].delta.content)
                return {"text": "".join(pieces), "latency": time.time() - t, "ttft": first, "tokens": None}
            reply = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens)
            return {"text": reply.choices[0].message.content, "latency": time.time() - t,
                    "tokens": reply.usage.completion_tokens}
        except Exception as e:  # noqa: BLE001 - counted as an error
            return {"error": f"{type(e).__name__}: {e}"}

    started = time.time()
    with ThreadPoolExecutor(len(chats)) as pool:
        results = list(pool.map(one, chats))
    return {"wall_s": time.time() - started, "results": results}


def concurrent_uploads(server: Server, n: int) -> dict:
    body = (DATA / "train.jsonl").read_bytes()

    def one(i):
        t = time.time()
        try:
            f = server.client().files.create(file=(f"train-{i}.jsonl", body), purpose="fine-tune")
            return {"latency": time.time() - t, "ok": f.bytes == len(body)}
        except Exception as e:  # noqa: BLE001 - counted as an error
            return {"error": f"{type(e).__name__}: {e}"}

    started = time.time()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    return {"wall_s": time.time() - started, "results": results, "bytes": len(body)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chats", type=int, default=50)
    ap.add_argument("--uploads", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    chats = requests(args.chats)
    with tempfile.TemporaryDirectory() as tmp, Server(Path(tmp) / "state", max_upload_mb=8) as server:
        client = server.client()
        train = client.files.create(file=("train.jsonl", (DATA / "train.jsonl").read_bytes()), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="home_base", training_file=train.id, suffix="home", seed=0,
                                             method={"type": "supervised", "supervised": {"hyperparameters": {
                                                 "n_epochs": 6, "batch_size": 16, "learning_rate_multiplier": 2.0}}})
        started = time.time()
        job = server.wait(job.id, ("succeeded",), timeout=3600)
        job_s = time.time() - started
        client.chat.completions.create(model=job.fine_tuned_model, messages=chats[0], max_tokens=4)  # loads it
        bundle = server.state / "jobs" / job.id / "bundle"
        ref = reference(bundle, bundle / "adapters" / f"{job.id}.onnx_adapter", chats, args.max_tokens)
        plain = concurrent_chats(server, job.fine_tuned_model, chats, args.max_tokens, stream=False)
        streamed = concurrent_chats(server, job.fine_tuned_model, chats, args.max_tokens, stream=True)
        uploads = concurrent_uploads(server, args.uploads)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.node(), "chats": args.chats,
              "uploads": args.uploads, "max_tokens": args.max_tokens, "job_s": round(job_s, 1),
              "reference": summary_of_reference(ref), "service": summary_of_chats(plain, ref),
              "service_streamed": summary_of_chats(streamed, ref), "upload": summary_of_uploads(uploads)}
    report.save(args.out, "serve", result, markdown)


def summary_of_reference(ref: dict) -> dict:
    return {"wall_s": round(ref["wall_s"], 2), "tokens": ref["tokens"],
            "tokens_per_s": round(ref["tokens"] / ref["wall_s"], 1),
            "latency_p50_s": round(statistics.median(ref["latencies"]), 3),
            "latency_p95_s": round(percentile(ref["latencies"], 0.95), 3)}


def summary_of_chats(run: dict, ref: dict) -> dict:
    errors = [r["error"] for r in run["results"] if "error" in r]
    done = [r for r in run["results"] if "error" not in r]
    same = sum(r["text"] == t for r, t in zip(run["results"], ref["texts"], strict=True) if "error" not in r)
    tokens = ref["tokens"]  # the same replies: the reference's token count
    out = {"requests": len(run["results"]), "errors": len(errors), "error_examples": errors[:3],
           "same_reply_as_reference": same, "wall_s": round(run["wall_s"], 2),
           "tokens_per_s": round(tokens / run["wall_s"], 1),
           "throughput_vs_reference": round(ref["wall_s"] / run["wall_s"], 3),
           "latency_p50_s": round(statistics.median(r["latency"] for r in done), 3) if done else None,
           "latency_p95_s": round(percentile([r["latency"] for r in done], 0.95), 3) if done else None}
    ttfts = [r["ttft"] for r in done if r.get("ttft") is not None]
    if ttfts:
        out["ttft_p50_s"] = round(statistics.median(ttfts), 3)
        out["ttft_p95_s"] = round(percentile(ttfts, 0.95), 3)
    return out


def summary_of_uploads(run: dict) -> dict:
    errors = [r["error"] for r in run["results"] if "error" in r]
    done = [r for r in run["results"] if "error" not in r]
    return {"uploads": len(run["results"]), "errors": len(errors), "error_examples": errors[:3],
            "all_whole": all(r["ok"] for r in done), "bytes_each": run["bytes"], "wall_s": round(run["wall_s"], 2),
            "mb_per_s": round(len(done) * run["bytes"] / 2**20 / run["wall_s"], 1),
            "latency_p50_s": round(statistics.median(r["latency"] for r in done), 3) if done else None,
            "latency_p95_s": round(percentile([r["latency"] for r in done], 0.95), 3) if done else None}


def markdown(r: dict) -> str:
    ref, s, st, up = r["reference"], r["service"], r["service_streamed"], r["upload"]
    return "\n".join([
        "# edgeft serve under load", "",
        f"Measured {r['date']} by `python benchmarks/serve.py` on this 2-core box: the demo base fine-tuned through "
        f"the API (the job took {r['job_s']:.0f} s), then {r['chats']} chat requests of the sample task (greedy, up "
        f"to {r['max_tokens']} new tokens) all at once, against the same generations run one after another on "
        "onnxruntime-genai directly in the benchmark's process; and "
        f"{r['uploads']} uploads of the training file ({up['bytes_each'] / 1024:.0f} KiB) at once.", "",
        "| run | requests | errors | same reply as reference | wall (s) | tokens/s | vs reference | "
        "latency p50 / p95 (s) | first chunk p50 / p95 (s) |", "|---|---|---|---|---|---|---|---|---|",
        f"| onnxruntime-genai directly, one at a time | {r['chats']} | 0 | - | {ref['wall_s']:.2f} | "
        f"{ref['tokens_per_s']:.1f} | 1.00 | {ref['latency_p50_s']:.3f} / {ref['latency_p95_s']:.3f} | - |",
        f"| edgeft serve, {r['chats']} at once | {s['requests']} | {s['errors']} | {s['same_reply_as_reference']} | "
        f"{s['wall_s']:.2f} | {s['tokens_per_s']:.1f} | {s['throughput_vs_reference']:.2f} | "
        f"{s['latency_p50_s']:.3f} / {s['latency_p95_s']:.3f} | - |",
        f"| edgeft serve, streamed, {r['chats']} at once | {st['requests']} | {st['errors']} | "
        f"{st['same_reply_as_reference']} | {st['wall_s']:.2f} | {st['tokens_per_s']:.1f} | "
        f"{st['throughput_vs_reference']:.2f} | {st['latency_p50_s']:.3f} / {st['latency_p95_s']:.3f} | "
        f"{st.get('ttft_p50_s', 0):.3f} / {st.get('ttft_p95_s', 0):.3f} |", "",
        f"Uploads: {up['uploads']} at once, {up['errors']} errors, every file whole: {up['all_whole']}; "
        f"{up['wall_s']:.2f} s in all ({up['mb_per_s']:.1f} MiB/s), latency p50 {up['latency_p50_s']:.3f} s, "
        f"p95 {up['latency_p95_s']:.3f} s.", "",
        "Reading: concurrent requests on one base take turns on its og.Model one generation step at a time (each "
        "request its own og.Generator), so the service's throughput is the reference's less the HTTP, JSON and "
        "turn-taking around each token, and under load every request's latency approaches the whole batch's wall "
        "time.", ""])


if __name__ == "__main__":
    main()
