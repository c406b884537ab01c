"""edgeft serve against the real openai client, on loopback: files, jobs, their refusals, auth, models. The server
is a real process (uvicorn), started by the fixture and ended by pid."""

import json

import httpx
import openai
import pytest

from tests.service.server import DATA, KEY, Server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("serve")) as s:
        yield s


def test_a_file_uploads_lists_reads_back_and_deletes(server):
    client = server.client()
    sent = (DATA / "val.jsonl").read_bytes()
    f = client.files.create(file=("home.jsonl", sent), purpose="fine-tune")
    assert f.id.startswith("file-") and f.bytes == len(sent) and f.filename == "home.jsonl" and f.status == "processed"
    assert f.id in [x.id for x in client.files.list()]
    assert client.files.retrieve(f.id).bytes == len(sent)
    assert client.files.content(f.id).read() == sent
    assert client.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    assert not list((server.state / "files").glob(f"{f.id}*"))


def test_the_api_key_is_required(server):
    with pytest.raises(openai.AuthenticationError) as e:
        server.client("wrong-key-1234").models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    bare = httpx.get(f"http://127.0.0.1:{server.port}/v1/models")  # no Authorization header at all
    assert bare.status_code == 401 and bare.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("purpose, body, status, param", [
    ("assistants", b"{}\n", 400, "purpose"),
    ("fine-tune", b"", 400, "file"),
    ("fine-tune", b"x" * (2 * 2**20), 413, "file"),  # the fixture's limit is 1 MB
])
def test_bad_uploads_are_refused_and_leave_nothing(server, purpose, body, status, param):
    before = sorted(p.name for p in (server.state / "files").iterdir())
    with pytest.raises(openai.APIStatusError) as e:
        server.client().files.create(file=("x.jsonl", body), purpose=purpose)
    assert e.value.status_code == status and e.value.body["param"] == param and e.value.body["message"]
    assert sorted(p.name for p in (server.state / "files").iterdir()) == before


def test_an_upload_of_undeclared_length_is_refused(server):
    def body():  # chunked: no Content-Length
        yield b"--x\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n--x--\r\n"

    response = httpx.post(f"http://127.0.0.1:{server.port}/v1/files", content=body(),
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "multipart/form-data; boundary=x"})
    assert response.status_code == 411 and response.json()["error"]["code"] == "length_required"


def test_ids_never_reach_the_filesystem(server):
    client = server.client()
    for given in ("../edgeft.db", "..%2Fedgeft.db", "file-../../etc/passwd", "ftjob-0"):
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(given)
        with pytest.raises(openai.NotFoundError):
            client.fine_tuning.jobs.retrieve(given)


@pytest.mark.parametrize("change, param", [
    ({"model": "gpt-4o-mini"}, "model"),
    ({"training_file": "file-000000000000000000000000"}, "training_file"),
    ({"validation_file": "ftjob-000000000000000000000000"}, "validation_file"),
    ({"suffix": "has spaces"}, "suffix"),
    ({"seed": -1}, "seed"),
    ({"method": {"type": "dpo"}}, "method.type"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}},
     "hyperparameters.n_epochs"),
    ({"hyperparameters": {"learning_rate_multiplier": "fast"}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"warmup": 3}}, "hyperparameters.warmup"),
])
def test_bad_job_requests_are_refused_with_the_parameter(server, change, param):
    client = server.client()
    f = client.files.create(file=("t.jsonl", (DATA / "val.jsonl").read_bytes()), purpose="fine-tune")
    request = {"model": "home_base", "training_file": f.id, **change}
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(**request)
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"


def test_a_bad_training_file_fails_validation_with_its_line_numbers(server):
    client = server.client()
    lines = (DATA / "val.jsonl").read_text().splitlines()[:20]
    lines[4] = "{not json"
    lines[11] = json.dumps({"messages": [{"role": "user", "content": 3}]})
    f = client.files.create(file=("bad.jsonl", "\n".join(lines).encode()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="home_base", training_file=f.id)
    assert job.status == "validating_files" and job.id.startswith("ftjob-")
    job = server.wait(job.id, ("failed",), timeout=120)
    assert job.error.code == "invalid_training_file" and job.error.param == "training_file"
    assert "line 5" in job.error.message and "line 12" in job.error.message
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=50)]
    assert any("line 5" in m for m in messages)
    with pytest.raises(openai.BadRequestError):  # finished: nothing to cancel, and a retry would not help
        client.fine_tuning.jobs.cancel(job.id)


def test_a_queued_job_cancels_and_keeps_its_events(server):
    client = server.client()
    f = client.files.create(file=("t.jsonl", (DATA / "val.jsonl").read_bytes()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="home_base", training_file=f.id, suffix="gone")
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    if cancelled.status != "cancelled":  # the worker had already started it: it stops at a step boundary
        cancelled = server.wait(job.id, ("cancelled",), timeout=300)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=50))
    assert any(e.message.startswith("Created fine-tuning job") for e in events)
    listed = client.fine_tuning.jobs.list(limit=100)
    assert job.id in [j.id for j in listed]


def test_job_lists_page_with_after_and_limit(server):
    client = server.client()
    ids = [j.id for j in client.fine_tuning.jobs.list(limit=100)]
    assert len(ids) >= 2
    first = client.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in first.data] == ids[:1] and first.has_more
    assert [j.id for j in client.fine_tuning.jobs.list(limit=1, after=ids[0]).data] == ids[1:2]


def test_models_list_the_base_and_unknown_models_are_404(server):
    client = server.client()
    assert "home_base" in [m.id for m in client.models.list()]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="ft:nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="home_base", messages=[])
