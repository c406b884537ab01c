"""`devices probe --on`: a device measured over a real SSH link, with only numpy, psutil and onnxruntime there;
and each way the link can fail, refused with its fix."""

import subprocess
from pathlib import Path

import pytest
import yaml

from edgeft.devices import profiles
from tests.helpers import cli, refused
from tests.targets.conftest import DEVICE_PYTHON


@pytest.fixture(scope="module")
def probed(sshd, tmp_path_factory):
    from edgeft.targets.probe import probe_on
    from edgeft.targets.ssh import Target

    target = Target.parse(sshd.on, str(sshd.key), str(sshd.known_hosts))
    profile, measured = probe_on(target, "the-box", DEVICE_PYTHON, str(sshd.device_dir))
    return profile, measured


def test_the_device_is_measured_with_its_minimal_runtime(probed, sshd):
    profile, measured = probed
    assert profile.cpu.cores >= 1 and profile.cpu.peak_fp32_gflops.value > 0
    assert profile.memory.total_gb.value > 0 and profile.memory.bandwidth_gbs.value > 0
    assert profile.cpu.peak_int8_gops.value > 0  # MatMulInteger, measured there too
    assert measured["python"].startswith("3.11") and "onnxruntime" in profile.cpu.peak_fp32_gflops.ref
    # the device side imported neither torch nor transformers, and its runtime has neither installed
    assert "onnxruntime" in measured["modules"] and not {"torch", "transformers", "edgeft"} & set(measured["modules"])
    (runtime,) = sshd.device_dir.glob("runtime-*")
    assert (runtime / ".complete").is_file()
    for module in ("torch", "transformers", "edgeft"):
        proc = subprocess.run([str(runtime / "bin" / "python"), "-I", "-c", f"import {module}"], capture_output=True,
                              cwd=sshd.device_dir)
        assert proc.returncode != 0, module
    assert f"--on {sshd.on}" in profile.description


def test_the_cli_writes_the_profile_and_a_second_probe_reuses_what_is_there(sshd, tmp_path, probed):
    out = tmp_path / "the-box.yaml"
    before = {p: p.stat().st_mtime_ns for p in sshd.device_dir.rglob("*") if p.is_file()}
    result = cli("devices", "probe", "--out", out, *sshd.flags())
    assert result.code == 0, result.err
    assert profiles.load(str(out)).cpu.cores >= 1 and yaml.safe_load(out.read_text())["name"] == "the-box"
    after = {p: p.stat().st_mtime_ns for p in sshd.device_dir.rglob("*") if p.is_file()}
    assert {p: after[p] for p in before} == before  # runtime and files reused, by content hash


def test_a_half_made_runtime_and_a_half_copied_file_are_redone(sshd, probed, tmp_path):
    (runtime,) = sshd.device_dir.glob("runtime-*")
    (runtime / ".complete").unlink()  # as a link cut during the install leaves it
    (script,) = sshd.device_dir.glob("files/*/measure.py")
    script.unlink()
    (script.parent / "measure.py.partial").write_text("cut")  # as a link cut mid-copy leaves it
    result = cli("devices", "probe", "--out", tmp_path / "again.yaml", *sshd.flags())
    assert result.code == 0, result.err
    from edgeft.devices import measure

    assert (runtime / ".complete").is_file() and script.read_bytes() == Path(measure.__file__).read_bytes()


def test_link_failures_are_user_errors_with_the_fix(sshd, tmp_path):
    out = str(tmp_path / "x.yaml")
    flags = {k: v for k, v in zip(sshd.flags()[::2], sshd.flags()[1::2], strict=True)}
    args = lambda **over: [a for k, v in {**flags, **over}.items() for a in (k, v)]  # noqa: E731
    # nobody listens on the port
    from tests.targets.conftest import free_port

    refused(cli("devices", "probe", "--out", out, *args(**{"--on": f"{sshd.user}@127.0.0.1:{free_port()}"})),
            "cannot reach it over SSH", "check the address and port")
    # a key the device does not know
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    refused(cli("devices", "probe", "--out", out, *args(**{"--ssh-key": str(tmp_path / "other")})),
            "refused the key", "authorized_keys")
    # a host key that is not in known_hosts
    (tmp_path / "empty_known_hosts").write_text("")
    refused(cli("devices", "probe", "--out", out, *args(**{"--known-hosts": str(tmp_path / "empty_known_hosts")})),
            "host key is not known", "check the fingerprint")
    # no such Python, and one too old
    refused(cli("devices", "probe", "--out", out, *args(**{"--device-python": "/nonexistent/python3"})),
            "no Python at", "--device-python")
    (tmp_path / "old-python").write_text("#!/bin/sh\necho '{\"version\": [3, 8], \"venv\": true, \"root\": \"/tmp\", "
                                         "\"free_gb\": 100}'\n")
    (tmp_path / "old-python").chmod(0o755)
    refused(cli("devices", "probe", "--out", out, *args(**{"--device-python": str(tmp_path / "old-python")})),
            "Python 3.8", "3.10 or later")
    refused(cli("devices", "probe", "--out", out, "--on", "not a host!"), "[user@]host[:port]")
    refused(cli("devices", "probe", "--out", out, "--on", "x@y", "--ssh-key", str(tmp_path / "nokey")),
            "--ssh-key", "does not exist")
    assert not (tmp_path / "x.yaml").exists()


def test_a_device_out_of_disk_is_refused_before_anything_is_copied(sshd, tmp_path):
    """A device Python that reports 0.2 GB free (the check the real one runs, with its answer changed)."""
    fake = tmp_path / "full-python"
    fake.write_text(f"#!/bin/sh\ncase \"$2\" in *free_gb*) {DEVICE_PYTHON} \"$@\" | sed 's/\"free_gb\": [0-9.e+-]*/\"free_gb\": 0.2/';;"
                    f" *) exec {DEVICE_PYTHON} \"$@\";; esac\n")
    fake.chmod(0o755)
    flags = sshd.flags()
    flags[flags.index("--device-python") + 1] = str(fake)
    flags[flags.index("--device-dir") + 1] = str(tmp_path / "fresh-device")
    refused(cli("devices", "probe", "--out", tmp_path / "x.yaml", *flags), "0.20 GB free", "free some space")
    assert not list((tmp_path / "fresh-device").glob("runtime-*"))
