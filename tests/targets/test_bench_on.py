"""`bench --on`: a bundle's inference figures measured on the device over a real SSH link, with only numpy,
onnxruntime and onnxruntime-genai there, judged here against the profile's budgets."""

import json

import pytest

from edgeft.devices import profiles
from tests.helpers import cli


@pytest.fixture(scope="module")
def bundle(built):
    import shutil

    from edgeft.stages.package.stage import PackageConfig, package

    ws = built("merged", lora_r=8)
    copy = ws.parent / "for-bench"
    shutil.copytree(ws, copy, ignore=shutil.ignore_patterns("bundle", ".builder-cache"))
    return package(copy, PackageConfig(precision="int4", prompts=1, max_new_tokens=2))


def test_the_bundle_is_benched_on_the_device_and_judged_here(bundle, sshd, tmp_path):
    out = tmp_path / "report"
    result = cli("bench", bundle, "--device", "raspberry-pi-5-8gb", "--runs", "2", "--prompt-tokens", "16",
                 "--new-tokens", "8", "--out", out, "--json", *sshd.flags())
    assert result.code == 0, result.err
    report = json.loads((out / "bench.json").read_text())
    assert report["machine"] == sshd.on and report["device"] == "raspberry-pi-5-8gb"
    i = report["inference"]
    assert i["bundle"].startswith(f"{sshd.on}:{sshd.device_dir}/bundles/")
    assert i["decode_tokens_per_s"]["runs"] == 2 and i["decode_tokens_per_s"]["median"] > 0 and i["peak_rss_mb"] > 0
    budgets = profiles.load("raspberry-pi-5-8gb").budgets
    decode = next(r for r in report["judged"] if r["figure"] == "decode tokens/s (median)")
    assert decode["budget"] == budgets.decode_tokens_per_s.value and decode["verdict"] in ("pass", "fail")
    assert "training" not in report
    # the device ran it with its own runtime: no torch, transformers or edgeft in the measuring process
    (log,) = [line for line in result.err.splitlines() if "run 2/2" in line]
    assert "device:" in log
    from edgeft.targets.bench import OnDevice
    from edgeft.targets.ssh import Target

    device = OnDevice(Target.parse(sshd.on, str(sshd.key), str(sshd.known_hosts)), "/usr/bin/python3",
                      str(sshd.device_dir))
    device.bench_inference(bundle, 1, 16, 4, None)
    modules = set(device.measured["modules"])
    assert "onnxruntime_genai" in modules and not {"torch", "transformers", "edgeft"} & modules


def test_the_bundle_is_copied_once_and_a_cut_copy_is_redone(bundle, sshd, tmp_path):
    (folder,) = sshd.device_dir.glob("bundles/*[!l]")  # not a .partial
    stamp = {p: p.stat().st_mtime_ns for p in (sshd.device_dir / "files").rglob("*") if p.is_file()}
    folder.rename(folder.with_name(folder.name + ".partial"))  # as a link cut while linking it leaves it
    result = cli("bench", bundle, "--runs", "1", "--prompt-tokens", "8", "--new-tokens", "2", "--out", tmp_path,
                 *sshd.flags())
    assert result.code == 0, result.err
    assert folder.is_dir() and not folder.with_name(folder.name + ".partial").exists()
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp  # every file was already there, by content


def test_a_link_cut_mid_run_is_a_clear_error_and_leaves_no_report(bundle, sshd, tmp_path):
    """The SSH session's processes on the device are killed while the bench runs there (as a dropped link ends
    them): a user error that says to run it again, no traceback, no report."""
    import subprocess
    import sys
    import time

    import psutil

    out = tmp_path / "report"
    proc = subprocess.Popen([sys.executable, "-m", "edgeft", "bench", str(bundle), "--runs", "400", "--prompt-tokens",
                             "64", "--new-tokens", "64", "--out", str(out), *map(str, sshd.flags())],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        err = ""
        deadline = time.time() + 300
        while "run 3/400" not in err and time.time() < deadline:
            err += proc.stderr.readline()
        assert "run 3/400" in err, err
        for child in psutil.Process(sshd.pid).children(recursive=True):  # the sessions, not the server
            child.kill()
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err += rest
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert "the SSH link failed (Connection to 127.0.0.1 closed by remote host.)" in err, err
    assert "run the command again" in err
    assert not (out / "bench.json").exists()
    assert psutil.pid_exists(sshd.pid)  # the server is still there for the next test
