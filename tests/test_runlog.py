"""Run directories, metric logs and atomic writes: exact file contents, names and failure paths."""

import json
import os

import pytest

from textenv.agents import runlog
from textenv.agents.runlog import (
    RunLogger,
    atomic_write_json,
    atomic_write_text,
    check_writable_dir,
    make_run_dir,
)


def test_atomic_write_text_takes_a_string_path_and_gives_the_users_file_mode(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(str(path), "hello")
    assert path.read_text() == "hello"
    assert path.stat().st_mode & 0o777 == 0o666 & ~runlog._umask()
    assert os.listdir(tmp_path) == ["a.txt"]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(TypeError):
        atomic_write_text(path, b"not text")  # fails inside the write
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_atomic_write_json_is_indented_and_sorted(tmp_path):
    atomic_write_json(tmp_path / "c.json", {"b": 1, "a": [1]})
    assert (tmp_path / "c.json").read_text() == '{\n  "a": [\n    1\n  ],\n  "b": 1\n}\n'


def test_umask_is_read_without_changing_it():
    before = os.umask(0o022)
    try:
        assert runlog._umask() == 0o022 and runlog._umask() == 0o022
    finally:
        os.umask(before)


def test_check_writable_dir_creates_missing_parents_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "x" / "y"
    check_writable_dir(target, "--runs-dir")
    assert target.is_dir() and os.listdir(target) == []


def test_a_named_run_directory_is_created_under_missing_parents_and_reused_until_it_holds_a_run(
    tmp_path,
):
    run = make_run_dir(tmp_path / "a" / "b", "mine", "Task__1")
    assert run == tmp_path / "a" / "b" / "mine" and run.is_dir()
    assert make_run_dir(tmp_path / "a" / "b", "mine", "Task__1") == run  # empty: still usable
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="already holds a run; choose another --run-name"):
        make_run_dir(tmp_path / "a" / "b", "mine", "Task__1")


def test_unnamed_run_directories_started_in_the_same_second_get_numbered_names(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(runlog.time, "strftime", lambda fmt: "20260101-000000")
    root = tmp_path / "runs" / "deep"
    names = [make_run_dir(root, None, "ns/Env__1").name for _ in range(3)]
    assert names == [
        "ns-Env__1__20260101-000000",
        "ns-Env__1__20260101-000000-2",
        "ns-Env__1__20260101-000000-3",
    ]


def test_make_run_dir_gives_up_with_an_error_when_every_name_is_taken(tmp_path, monkeypatch):
    def taken(self, *args, **kwargs):
        if self.name.startswith("E__"):
            raise FileExistsError(self)
        return original(self, *args, **kwargs)

    original = runlog.Path.mkdir
    monkeypatch.setattr(runlog.Path, "mkdir", taken)
    with pytest.raises(RuntimeError, match="could not create a run directory under"):
        make_run_dir(tmp_path, None, "E")


def _events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_run_logger_writes_jsonl_at_once_and_tensorboard_by_default(tmp_path):
    import threading

    run_dir = tmp_path / "nested" / "run"
    threads = threading.active_count()
    logger = RunLogger(run_dir)  # TensorBoard on by default
    logger.log(3, {"loss": 0.5, "name": "not a scalar"})
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()  # flushed before close
    assert [json.loads(line) for line in lines] == [
        {"global_step": 3, "loss": 0.5, "name": "not a scalar"}
    ]
    logger.text("samples", "| a | b |", 3)
    logger.close()
    assert threading.active_count() == threads  # TensorBoard's writer thread is stopped, not leaked
    acc = _events(run_dir)
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(3, 0.5)]
    assert any("samples" in tag for tag in acc.Tags()["tensors"])


def test_run_logger_without_tensorboard_writes_no_events(tmp_path):
    logger = RunLogger(tmp_path, tensorboard=False)
    logger.log(1, {"x": 1.0})
    logger.close()
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


def test_a_named_run_directory_whose_run_failed_before_logging_can_be_used_again(tmp_path):
    run_dir = runlog.make_run_dir(tmp_path, "r", "x")
    (run_dir / "config.json").write_text("{}")
    (run_dir / "metrics.jsonl").write_text("")  # failed after start-up: nothing logged
    assert runlog.make_run_dir(tmp_path, "r", "x") == run_dir
    (run_dir / "metrics.jsonl").write_text('{"iteration": 1}\n')
    with pytest.raises(ValueError, match="already holds a run"):
        runlog.make_run_dir(tmp_path, "r", "x")


def test_a_resumed_logger_drops_what_was_logged_after_the_checkpoint_and_a_torn_line(tmp_path):
    rows = [json.dumps({"global_step": 10 * i, "iteration": i}) + "\n" for i in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(rows) + '{"global_step": 60, "itera')
    samples = [json.dumps({"iteration": i, "prompt": "p"}) + "\n" for i in (1, 3, 4)]
    (tmp_path / "samples.jsonl").write_text("".join(samples))
    logger = RunLogger(tmp_path, tensorboard=True, resumed_at=(3, 30))
    logger.log(40, {"iteration": 4})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3, 4]
    assert (tmp_path / "samples.jsonl").read_text() == "".join(samples[:2])


def test_a_torn_line_in_the_middle_ends_what_is_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1}\n{"iteration": 2, "x\n{"iteration": 3}\n')
    runlog.rewind_jsonl(path, 10)
    assert path.read_text() == '{"iteration": 1}\n'


def test_a_checkpoint_swap_cut_by_a_kill_is_finished_on_resume(tmp_path):
    from textenv.agents.text_checkpoint import recover_checkpoint

    (tmp_path / ".policy.old").mkdir()
    (tmp_path / ".policy.old" / "model.safetensors").write_text("old")
    recover_checkpoint(tmp_path / "policy")  # killed between moving the old aside and the new in
    assert (tmp_path / "policy" / "model.safetensors").read_text() == "old"
    recover_checkpoint(tmp_path / "policy")  # nothing to do
    assert not (tmp_path / ".policy.old").exists()
