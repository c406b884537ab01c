"""The demo's committed base model: its script reproduces it, and it loads through the real loading code."""

import json

import pytest

from edgeft.tasks import base


def committed() -> dict:
    return json.loads((base.BASE_DIR / "edgeft_base.json").read_text())


def test_committed_base_is_small_and_loads_as_a_phi3_folder():
    from edgeft import families
    from edgeft.data.tokenize import load_tokenizer

    info = committed()
    size = sum(p.stat().st_size for p in base.BASE_DIR.iterdir())
    assert size <= 20 * 2**20, f"{size / 2**20:.1f} MB"
    config = families.read_config(base.BASE_DIR)
    assert families.detect(config).name == "phi3"
    tok = load_tokenizer(base.BASE_DIR)
    assert tok.chat_template and len(tok) == config["vocab_size"]
    assert info["exact_match"]["generic_schema"] >= 0.9  # it learned its own (generic) schema
    assert info["exact_match"]["home_schema_test"] <= 0.05  # and has never answered in the home schema


def test_the_script_reproduces_the_committed_base_bit_for_bit():
    """The first fingerprint step of the recorded recipe gives the recorded weights (sha256 of every tensor)."""
    recorded, reproduced = base.check(base.BASE_DIR, steps=base.FINGERPRINT_STEPS[0])
    assert reproduced == recorded


@pytest.mark.slow
def test_the_script_reproduces_the_whole_committed_base():
    info = committed()
    _, model, _, _ = base.pretrain(base.Recipe(**info["recipe"]), log=lambda *_: None)
    assert base.weights_sha(model) == info["final_weights_sha256"]
