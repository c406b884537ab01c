import pytest
import yaml

from edgeft.core import schema
from edgeft.core.errors import ConfigError, EdgeftError
from edgeft.devices import profiles

SHIPPED = sorted(profiles.available())
REQUIRED = {"x86-avx512-workstation", "raspberry-pi-5-8gb", "jetson-orin-nano-8gb", "jetson-agx-orin-64gb",
            "snapdragon-x-elite-laptop", "rtx-4090-desktop"}


def test_required_profiles_are_shipped():
    assert REQUIRED <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_loads_with_sourced_figures(name):
    profile = profiles.load(name)
    assert profile.name == name
    figs = profiles.figures(profile)
    assert len(figs) >= 5
    for path, fig in figs:
        assert fig.source in profiles.SOURCES, path
        assert fig.ref.strip(), f"{name}: {path} has no reference"
    assert profile.memory.budget_gb.value <= profile.memory.total_gb.value


def test_load_by_path_equals_load_by_name():
    path = profiles.available()["raspberry-pi-5-8gb"]
    assert profiles.load(str(path)) == profiles.load("raspberry-pi-5-8gb")


def test_pi5_figures_match_datasheet_arithmetic():
    pi = profiles.load("raspberry-pi-5-8gb")
    assert pi.cpu.peak_fp32_gflops.value == pytest.approx(4 * 16 * 2.4)
    assert pi.memory.bandwidth_gbs.value == pytest.approx(4 * 4.267, rel=1e-2)
    assert pi.execution_providers.training_backend == "torch"


def test_unknown_name_suggests_close_match():
    with pytest.raises(EdgeftError, match="did you mean raspberry-pi-5-8gb"):
        profiles.load("raspbery-pi-5")


def _write(tmp_path, name, mutate):
    data = yaml.safe_load(profiles.available()["raspberry-pi-5-8gb"].read_text())
    data["name"] = name
    mutate(data)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["cpu"].update(turbo=True), r"cpu\.turbo: unknown key; accepted keys here: arch, model"),
    (lambda d: d["memory"].pop("bandwidth_gbs"), r"memory\.bandwidth_gbs: missing"),
    (lambda d: d["cpu"].update(cores=0), r"cpu\.cores: 0 is below the minimum 1"),
    (lambda d: d["cpu"].update(arch="riscv"), r"cpu\.arch: 'riscv' is not accepted; accepted: x86_64, aarch64"),
    (lambda d: d["memory"]["total_gb"].update(value=-8), r"memory\.total_gb\.value: -8.0 must be greater than 0"),
    (lambda d: d["memory"]["budget_gb"].update(value=9), r"memory\.budget_gb: 9\.0 exceeds memory\.total_gb"),
    (lambda d: d["execution_providers"].update(inference=["cuda"]), r"'cuda' needs a GPU"),
    (lambda d: d["cpu"]["max_freq_ghz"].update(source="rumour"), r"source: 'rumour' is not accepted"),
    (lambda d: d["cpu"]["max_freq_ghz"].update(source="measured"), r"max_freq_ghz\.date: missing"),
    (lambda d: d.update(quantisation={}), r"quantisation: unknown key \(did you mean 'quantization'\?\)"),
])
def test_bad_profile_names_file_field_and_accepted_values(tmp_path, mutate, expected):
    path = _write(tmp_path, "bad", mutate)
    with pytest.raises(ConfigError, match=expected) as info:
        profiles.load(str(path))
    assert str(path) in str(info.value)


def test_all_problems_reported_at_once(tmp_path):
    def mutate(d):
        d["cpu"]["cores"] = -1
        d["memory"].pop("total_gb")
        d["colour"] = "red"
    with pytest.raises(ConfigError) as info:
        profiles.load(str(_write(tmp_path, "multi", mutate)))
    assert len(info.value.problems) == 3


def test_name_must_match_file(tmp_path):
    path = _write(tmp_path, "mine", lambda d: None)
    renamed = path.with_name("other.yaml")
    path.rename(renamed)
    with pytest.raises(ConfigError, match="differs from the file name; use 'other'"):
        profiles.load(str(renamed))


def test_not_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("cpu: [unclosed\n")
    with pytest.raises(EdgeftError, match="not valid YAML"):
        profiles.load(str(bad))
    with pytest.raises(EdgeftError, match="does not exist"):
        profiles.load(str(tmp_path / "nothing.yaml"))


def test_extra_search_path(tmp_path, monkeypatch):
    _write(tmp_path, "my-board", lambda d: None)
    monkeypatch.setenv("EDGEFT_DEVICES_PATH", str(tmp_path))
    assert profiles.load("my-board").name == "my-board"


def test_yaml_round_trip():
    profile = profiles.load("rtx-4090-desktop")
    assert schema.parse(profiles.Profile, yaml.safe_load(profiles.to_yaml(profile)), "x") == profile
