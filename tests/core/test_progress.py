"""progress.Steps: what a user of a long export, merge or package sees."""

import time

from edgeft.core import progress


def test_steps_announce_tick_with_an_eta_and_report_slow_ones(capsys, monkeypatch):
    monkeypatch.setattr(progress, "EVERY", 0.0)
    monkeypatch.setattr(progress, "SLOW", 0.05)
    steps = progress.Steps("export", 2)
    with steps.step("reference", layer_passes=4) as tick:
        for _ in range(2):
            time.sleep(0.05)
            tick()
    with steps.step("trace") as tick:
        tick()  # no expected count: nothing printed within the step
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "export 1/2: reference"
    assert lines[1].startswith("  1/4 decoder-layer passes, 0 s, ETA 0 s, RSS ")
    assert lines[2].startswith("  2/4 decoder-layer passes, 0 s, ETA ") and lines[2].endswith(" GiB")
    assert lines[3].startswith("  done in 0 s, peak RSS ")
    assert lines[4:] == ["export 2/2: trace"]  # quick: no closing line
