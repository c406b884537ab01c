"""A fine-tuning job through edgeft serve, driven by the real openai client: upload the sample task, create the job,
follow its events to the end, read its checkpoints, and chat with the fine-tuned model and the base, streaming
too. The job runs the real pipeline (prepare, export, ORT training, merge, int4 package with adapters)."""

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
from safetensors.numpy import load_file

from tests.service.server import DATA, Server

SYSTEM = json.loads((DATA / "test.jsonl").read_text().splitlines()[0])["messages"][0]["content"]
HYPER = {"n_epochs": 6, "batch_size": 16, "learning_rate_multiplier": 2.0}  # 450 steps: about 2 minutes here


def sample(n: int = 5) -> list[tuple[list[dict], str]]:
    """Held-out requests of the sample task and their JSON actions."""
    out = []
    for line in (DATA / "test.jsonl").read_text().splitlines()[:n]:
        messages = json.loads(line)["messages"]
        out.append((messages[:-1], messages[-1]["content"]))
    return out


def create(client, seed: int = 0):
    train = client.files.create(file=("train.jsonl", (DATA / "train.jsonl").read_bytes()), purpose="fine-tune")
    val = client.files.create(file=("val.jsonl", (DATA / "val.jsonl").read_bytes()), purpose="fine-tune")
    return client.fine_tuning.jobs.create(
        model="home_base", training_file=train.id, validation_file=val.id, suffix="home", seed=seed,
        method={"type": "supervised", "supervised": {"hyperparameters": HYPER}})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("serve"), max_upload_mb=8) as server:
        job = create(server.client())
        yield server, server.wait(job.id, ("succeeded",), timeout=1500)


def test_the_job_succeeds_with_a_fine_tuned_model(finished):
    server, job = finished
    assert job.fine_tuned_model == f"ft:home_base:edgeft:home:{job.id.removeprefix('ftjob-')}"
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at and job.error is None
    assert job.hyperparameters.n_epochs == 6 and job.hyperparameters.batch_size == 16
    assert job.fine_tuned_model in [m.id for m in server.client().models.list()]


def test_events_tell_the_job_with_its_metrics(finished):
    server, job = finished
    events = list(server.client().fine_tuning.jobs.list_events(job.id, limit=100))
    assert events[0].message == "The job has successfully completed"  # newest first
    metrics = [e.data for e in events if e.type == "metrics"]
    steps = sorted(m["step"] for m in metrics)
    assert steps == list(range(1, steps[-1] + 1)) or len(events) == 100  # every step once (the page may cut)
    assert all(m["train_loss"] == m["train_loss"] and m["train_loss"] > 0 for m in metrics)  # finite, not NaN
    assert any("valid_loss" in m for m in metrics)
    assert [e.message for e in events if e.type == "message"][-1].startswith("Created fine-tuning job")


def test_checkpoints_list_the_kept_steps_with_their_metrics(finished):
    server, job = finished
    checkpoints = server.client().fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and all(c.fine_tuning_job_id == job.id for c in checkpoints)
    last = max(c.step_number for c in checkpoints)
    assert last == max(e.data["step"] for e in server.client().fine_tuning.jobs.list_events(job.id, limit=100)
                       if e.type == "metrics")
    assert all(c.fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-{c.step_number}"
               for c in checkpoints)


def test_the_fine_tuned_model_answers_the_sample_task(finished):
    server, job = finished
    client = server.client()
    right = 0
    for messages, action in sample():
        reply = client.chat.completions.create(model=job.fine_tuned_model, messages=messages, max_tokens=64)
        assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens > 0
        right += json.loads(action) == _json(reply.choices[0].message.content)
    assert right >= 3, right  # this tiny base gets the times wrong most often; the rest it learns


def test_the_base_and_the_adapter_switch_per_request(finished):
    server, job = finished
    client = server.client()
    messages, action = sample(1)[0]
    answers = [client.chat.completions.create(model=m, messages=messages, max_tokens=48).choices[0].message.content
               for m in ("home_base", job.fine_tuned_model, "home_base", job.fine_tuned_model)]
    assert answers[0] == answers[2] and answers[1] == answers[3] and answers[0] != answers[1]
    assert _json(answers[1]) == json.loads(action)


def test_streaming_sends_the_same_reply_in_pieces(finished):
    server, job = finished
    client = server.client()
    messages, _ = sample(1)[0]
    whole = client.chat.completions.create(model=job.fine_tuned_model, messages=messages, max_tokens=48)
    chunks = list(client.chat.completions.create(model=job.fine_tuned_model, messages=messages, max_tokens=48,
                                                 stream=True))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1 and "".join(pieces) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_more_concurrent_streams_than_server_threads_all_finish(finished):
    """48 streams at once (the server reads streams with 40 threads): each holds the model one step at a time,
    never while its reader is away, so none waits on another forever."""
    server, job = finished
    messages = [m for m, _ in sample(8)]

    def stream(i):
        chunks = server.client().chat.completions.create(model=job.fine_tuned_model, messages=messages[i % 8],
                                                         max_tokens=12, stream=True, timeout=300)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(48) as pool:
        streamed = list(pool.map(stream, range(48)))
    alone = [server.client().chat.completions.create(model=job.fine_tuned_model, messages=m, max_tokens=12)
             .choices[0].message.content for m in messages]
    assert streamed == [alone[i % 8] for i in range(48)]


def test_max_tokens_cuts_the_reply_with_finish_reason_length(finished):
    server, job = finished
    messages, _ = sample(1)[0]
    reply = server.client().chat.completions.create(model=job.fine_tuned_model, messages=messages, max_tokens=3)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3


def test_a_prompt_past_the_context_is_refused_with_its_code(finished):
    server, job = finished
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model=job.fine_tuned_model,
                                                messages=[{"role": "user", "content": "lights " * 5000}])
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "messages"


def test_a_running_job_cancels_at_a_step_and_keeps_its_events(finished):
    server, _ = finished
    client = server.client()
    job = create(client, seed=1)
    deadline = time.time() + 600
    while time.time() < deadline and not any(
            e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id, limit=5)):
        time.sleep(0.5)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "running"
    client.fine_tuning.jobs.cancel(job.id)
    done = server.wait(job.id, ("cancelled",), timeout=300)
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    assert done.fine_tuned_model is None and events[0].message == "Fine-tuning job cancelled"
    assert any(e.type == "metrics" for e in events) and events[-1].message.startswith("Created fine-tuning job")
    assert done.fine_tuned_model not in [m.id for m in client.models.list()]


def test_files_jobs_and_models_survive_a_restart(finished):
    server, job = finished
    client = server.client()
    before = (sorted(f.id for f in client.files.list()), client.fine_tuning.jobs.retrieve(job.id).model_dump(),
              [e.id for e in client.fine_tuning.jobs.list_events(job.id, limit=100)],
              [c.id for c in client.fine_tuning.jobs.checkpoints.list(job.id)])
    messages, _ = sample(1)[0]
    answer = client.chat.completions.create(model=job.fine_tuned_model, messages=messages).choices[0].message.content
    server.kill(signal.SIGTERM)
    server.start()
    client = server.client()
    after = (sorted(f.id for f in client.files.list()), client.fine_tuning.jobs.retrieve(job.id).model_dump(),
             [e.id for e in client.fine_tuning.jobs.list_events(job.id, limit=100)],
             [c.id for c in client.fine_tuning.jobs.checkpoints.list(job.id)])
    assert after == before
    assert client.chat.completions.create(model=job.fine_tuned_model,
                                          messages=messages).choices[0].message.content == answer


@pytest.mark.slow
def test_a_job_killed_with_its_server_resumes_to_the_uninterrupted_adapter(finished):
    """SIGKILL the server mid-training; restarted on the same state, the job resumes from its last checkpoint and
    ends with the adapter of the same job run without interruption (the module's first job)."""
    server, first = finished
    job = create(server.client(), seed=0)
    deadline = time.time() + 900
    while time.time() < deadline:  # past the first epoch's checkpoint (step 75), before the end
        steps = [e.data["step"] for e in server.client().fine_tuning.jobs.list_events(job.id, limit=5)
                 if e.type == "metrics"]
        if steps and steps[0] >= 100:
            break
        time.sleep(1)
    runner = _pipeline_pids(job.id)
    assert runner, "the job's pipeline is not running"
    server.kill(signal.SIGKILL)
    time.sleep(3)
    assert not [pid for pid in runner if _alive(pid)], "the pipeline outlived its server"
    assert server.client_state(job.id) == "running"
    server.start()
    done = server.wait(job.id, ("succeeded",), timeout=1200)
    messages = [e.message for e in server.client().fine_tuning.jobs.list_events(job.id, limit=100)]
    assert "Fine-tuning job resumed after a restart" in messages
    ours = load_file(str(server.state / "jobs" / done.id / "adapter" / "adapter_model.safetensors"))
    theirs = load_file(str(server.state / "jobs" / first.id / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        assert np.isfinite(value).all() and np.abs(value - theirs[name]).max() <= 1e-6, name


def _pipeline_pids(job_id: str) -> list[int]:
    """The processes running the job's recipe (edgeft run, and its training runtime child)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if job_id in cmdline or ("edgeft.trainer.child" in cmdline and _has_ancestor_with(int(pid), job_id)):
            found.append(int(pid))
    return found


def _has_ancestor_with(pid: int, text: str) -> bool:
    while pid > 1:
        try:
            stat = open(f"/proc/{pid}/stat").read()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
            if text in open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace"):
                return True
        except (OSError, ValueError, IndexError):
            return False
    return False


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None
