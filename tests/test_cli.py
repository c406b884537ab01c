import json
import subprocess
import sys

import pytest

from edgeft.cli import main
from edgeft.devices import profiles


def run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "edgeft", *argv], capture_output=True, text=True)


def test_doctor_json_reports_both_runtimes():
    proc = run_cli("doctor", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    for key in ("python", "onnxruntime", "onnxruntime_genai", "torch", "training_runtime"):
        assert report[key]["ok"] is True, key
    assert report["training_runtime"]["version"] == "1.19.2"
    assert report["training_runtime"]["path"].endswith("ort-training-cpu-1.19.2")
    assert "CPUExecutionProvider" in report["execution_providers"]["training"]
    assert "CPUExecutionProvider" in report["execution_providers"]["inference"]


def test_user_error_exits_2_without_traceback():
    proc = run_cli("devices", "show", "jetson-orin-nano")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown device 'jetson-orin-nano'; did you mean jetson-orin-nano-8gb")
    assert "Traceback" not in proc.stderr


def test_devices_show_says_what_runs_on_the_device_over_ssh():
    pi, n100 = run_cli("devices", "show", "raspberry-pi-5-8gb"), run_cli("devices", "show", "intel-n100-mini-pc-8gb")
    for proc in (pi, n100):
        assert proc.returncode == 0 and "over SSH: bench --on: the bundle under onnxruntime-genai" in proc.stdout
        assert "over SSH: devices probe --on" in proc.stdout
    assert "train --on --backend torch: torch, numpy and safetensors there" in pi.stdout  # aarch64
    assert "train --on: the ONNX Runtime training build there" in n100.stdout  # x86-64


def test_devices_show_json(capsys):
    assert main(["devices", "show", "jetson-agx-orin-64gb", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["memory"]["bandwidth_gbs"]["value"] == 204.8


def test_devices_list_shows_every_profile(capsys):
    assert main(["devices", "list"]) == 0
    out = capsys.readouterr().out
    assert "invalid" not in out  # an invalid profile is listed too, flagged: none of the shipped ones may be
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    for name in profiles.available():
        assert name in rows and " cores" in rows[name], rows.get(name)


def test_devices_list_flags_an_invalid_profile(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken.yaml").write_text("name: broken\n")
    monkeypatch.setenv("EDGEFT_DEVICES_PATH", str(tmp_path))
    assert main(["devices", "list"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("broken"))
    assert "invalid: device profile" in row


def test_runtime_path(capsys):
    assert main(["runtime", "path"]) == 0
    assert capsys.readouterr().out.strip().endswith("ort-training-cpu-1.19.2")


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "this-box.yaml"
    assert main(["devices", "probe", "--out", str(out)]) == 0
    return out


def test_probe_writes_a_loadable_profile(probed):
    profile = profiles.load(str(probed))
    assert profile.name == "this-box"
    assert profile.cpu.cores >= 1
    assert profile.cpu.peak_fp32_gflops.source == "measured" and profile.cpu.peak_fp32_gflops.value > 1
    assert profile.cpu.peak_int8_gops.source == "measured" and "MatMulInteger" in profile.cpu.peak_int8_gops.ref
    assert profile.cpu.peak_int8_gops.value > 1
    assert profile.memory.bandwidth_gbs.value > 0.5
    assert profile.budgets is None
    assert "cpu" in profile.execution_providers.inference


def test_probe_refuses_to_overwrite(probed, capsys):
    assert main(["devices", "probe", "--out", str(probed)]) == 2
    assert "pass --force" in capsys.readouterr().err
