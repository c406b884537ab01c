"""A fleet's homes from the sample task: each its own devices and phrasing (non-IID), reproducible by seed."""

import json

from edgeft.tasks import home


def _entities(path):
    return {json.loads(json.loads(line)["messages"][-1]["content"])["entity_id"] for line in path.open()}


def test_homes_differ_in_their_devices_and_are_reproducible(tmp_path):
    home.generate_homes(tmp_path / "a", homes=8, sizes={"train": 60, "test": 20}, seed=3)
    home.generate_homes(tmp_path / "b", homes=8, sizes={"train": 60, "test": 20}, seed=3)
    files = sorted((tmp_path / "a" / "train").glob("home-*.jsonl"))
    assert len(files) == 8
    assert all(f.read_bytes() == (tmp_path / "b" / "train" / f.name).read_bytes() for f in files)
    devices = [_entities(f) for f in files]
    assert len({frozenset(d) for d in devices}) == 8, "every home has its own set of devices"
    assert all(len(d) < len(home.ENTITIES) for d in devices)
    described = json.loads((tmp_path / "a" / "homes.json").read_text())
    for f in files:  # a home's commands ask for its own devices only; its test requests are not its training ones
        test = tmp_path / "a" / "test" / f.name
        assert _entities(f) | _entities(test) <= set(described[f.stem]["devices"])
        train_requests = {json.loads(x)["messages"][1]["content"] for x in f.open()}
        assert not train_requests & {json.loads(x)["messages"][1]["content"] for x in test.open()}
