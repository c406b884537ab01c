"""The two runtimes side by side: the parent has the inference build, the child the training build."""

import pytest

from edgeft.core.errors import EdgeftError
from edgeft.runtime import jobs, launcher, training_build
from tests.runtime import entries


def test_parent_has_inference_build_and_genai():
    import onnxruntime
    import onnxruntime_genai

    assert tuple(int(x) for x in onnxruntime.__version__.split(".")[:2]) >= (1, 31)
    assert not onnxruntime.__file__.startswith(str(training_build.root_dir()))
    assert onnxruntime_genai.__version__


def test_child_has_training_build():
    info = launcher.run(jobs.Info())
    assert info["onnxruntime_version"] == training_build.ORT_TRAINING_VERSION == "1.19.2"
    assert info["onnx_version"] == training_build.ONNX_VERSION
    assert info["onnxruntime_path"].startswith(str(training_build.runtime_dir("cpu")))
    assert info["training_importable"] is True
    assert info["genai_loaded"] is False
    assert "CPUExecutionProvider" in info["providers"]


def test_events_stream_in_order_and_library_output_stays_out(tmp_path):
    seen = []
    log = tmp_path / "child.log"
    result = launcher.run(entries.Chatty(steps=5), on_event=seen.append, log_path=log)
    assert result == {"steps": 5, "modules": []}
    assert [e["step"] for e in seen if e["event"] == "progress"] == [1, 2, 3, 4, 5]
    assert seen[-1] == {**seen[-1], "event": "log", "message": "done"}
    assert "library noise on stdout" in log.read_text()


def test_user_error_in_child_is_a_plain_message():
    with pytest.raises(EdgeftError) as info:
        launcher.run(entries.UserError())
    assert type(info.value) is EdgeftError
    assert str(info.value) == "the data file has 3 malformed lines; run `edgeft data check`"


def test_bug_in_child_names_exception_and_log(tmp_path):
    log = tmp_path / "child.log"
    with pytest.raises(launcher.TrainingRuntimeError) as info:
        launcher.run(entries.Bug(), log_path=log)
    message = str(info.value)
    assert "ZeroDivisionError: division by zero" in message and str(log) in message
    assert "Traceback" not in message
    assert "1 / 0" in info.value.traceback


def test_killed_child_is_reported_with_its_last_output(tmp_path):
    with pytest.raises(launcher.TrainingRuntimeError, match=r"killed by signal 9(.|\n)*about to die"):
        launcher.run(entries.Killed(), log_path=tmp_path / "child.log")


def test_a_worker_runs_jobs_in_one_process_each_with_its_log_and_starts_again_after_a_death(tmp_path):
    import os

    with launcher.Worker("training") as worker:
        first = worker.run(entries.Pid(said="first"), log_path=tmp_path / "1.log")["pid"]
        with pytest.raises(EdgeftError, match="3 malformed lines"):
            worker.run(entries.UserError(), log_path=tmp_path / "2.log")
        assert worker.run(entries.Pid(said="third"), log_path=tmp_path / "3.log")["pid"] == first
        first_log, third_log = (tmp_path / "1.log").read_text(), (tmp_path / "3.log").read_text()
        assert "first\n" in first_log and "third" not in first_log and "third\n" in third_log
        with pytest.raises(launcher.TrainingRuntimeError, match=r"killed by signal 9(.|\n)*about to die"):
            worker.run(entries.Killed(), log_path=tmp_path / "4.log")
        with pytest.raises(launcher.TrainingRuntimeError, match="ZeroDivisionError"):
            worker.run(entries.Bug(), log_path=tmp_path / "5.log")
        again = worker.run(entries.Pid(said="sixth"), log_path=tmp_path / "6.log")["pid"]
        assert again not in (first, os.getpid())
        child = worker.child.proc
    assert child.poll() == 0  # closing ends the child
    with pytest.raises(ValueError, match="cannot run"):
        launcher.Worker("main").run(entries.Pid())


def test_install_is_idempotent():
    path = training_build.runtime_dir("cpu")
    stamp = path / training_build.STAMP
    before = stamp.stat().st_mtime_ns
    assert training_build.install() == path
    assert stamp.stat().st_mtime_ns == before
