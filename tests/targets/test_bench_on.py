"""`bench --on`: a bundle's inference figures measured on the device over a real SSH link, with only numpy,
onnxruntime and onnxruntime-genai there, judged here against the profile's budgets."""

import json

import pytest

from edgeft.devices import profiles
from tests.helpers import cli


@pytest.fixture(scope="module")
def bundle(built):
    from edgeft.stages.package.stage import PackageConfig, package

    import shutil

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
