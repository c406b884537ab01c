import json
import subprocess
import sys

from edgeft.tasks.home import DATA_DIR


def check(*argv):
    return subprocess.run([sys.executable, "-m", "edgeft", "data", "check", *map(str, argv)],
                          capture_output=True, text=True)


def test_clean_sample_data_exits_0_with_statistics(tiny_model):
    proc = check(DATA_DIR / "val.jsonl", "--model", tiny_model("phi3-mini-4k"), "--json",
                 "--device", "raspberry-pi-5-8gb")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["format"] == "chat" and report["valid_records"] == 150 and report["clean"]
    t = report["tokens"]
    assert t["min"] <= t["median"] <= t["p95"] <= t["max"]
    assert report["tokens_per_epoch"] == t["total"]
    est = report["estimate"]
    assert est["device"] == "raspberry-pi-5-8gb" and est["seconds_per_epoch"] > 0
    # Steps of the largest batch that fits at the longest sample, each priced by the plan for that batch.
    from edgeft.devices import plan, profiles

    assert est["seq_len"] == t["max"] and est["steps"] == -(-150 // est["batch_size"])
    priced = plan.make(tiny_model("phi3-mini-4k"), plan.Run(seq_len=t["max"], batch_size=est["batch_size"],
                                                             backend="torch"), profiles.load("raspberry-pi-5-8gb"))
    assert est["step_s"] == priced.step_s and priced.fits
    assert abs(est["seconds_per_epoch"] - est["steps"] * priced.step_s) < 0.1


def test_problems_exit_1_by_kind_with_lines(tiny_model, tmp_path):
    good = (DATA_DIR / "val.jsonl").read_text().splitlines()[:3]
    lines = good + ["{oops", json.dumps({"messages": [{"role": "user", "content": "hi"}]}), good[0],
                    json.dumps({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]})]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    proc = check(path, "--model", tiny_model("phi3-mini-4k"), "--seq-len", "40")
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout
    assert "line 4: not_json" in out and "line 5: no_assistant" in out and "line 7: unknown_role" in out
    assert "1 exact duplicate(s): lines 1, 6" in out
    assert "longer than --seq-len 40" in out
    assert out.strip().endswith("problems found")


def test_unusable_input_exits_2(tiny_model, tmp_path):
    proc = check(tmp_path, "--model", tiny_model("phi3-mini-4k"))
    assert proc.returncode == 2 and "is a directory" in proc.stderr and "Traceback" not in proc.stderr
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    proc = check(empty, "--model", tiny_model("phi3-mini-4k"))
    assert proc.returncode == 2 and "is empty" in proc.stderr
