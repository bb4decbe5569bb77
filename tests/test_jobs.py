"""The one job system (studio.jobs): the executors' registry, the thread executor (start, cancel, wait, a
failure kept for the caller), the local executor (a bad job fails alone), the recorder's rows, and the
imports that run one way (jobs <- ray_batch <- batch)."""

from __future__ import annotations

import ast
import json
import threading
from pathlib import Path

import pytest

from studio.errors import InvalidArgumentError, StudioError
from studio.jobs import EXECUTORS, Job, Recorder, run_job, started
from studio.library import Library

ROOT = Path(__file__).resolve().parents[1]


def adapter_file(path: Path, name: str) -> Path:
    """A file the library indexes as an adapter (a manifest, one tensor)."""
    import numpy as np
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    manifest = {"kind": "lora", "family": "sd1", "name": name, "trigger_words": [name]}
    save_file({"x": np.zeros(2, np.float32)}, str(path), metadata={"studio.manifest": json.dumps(manifest)})
    return path


def stepping(steps: int = 3, gate: threading.Event | None = None):
    """A work that tells it started, logs, steps (waiting on `gate` after the first step) and writes its adapter;
    stopped early by `should_stop` (as training is: TrainingCancelled)."""

    def work(config, emit, should_stop=None):
        from studio.training.trainer import TrainingCancelled

        emit(started())
        emit({"event": "log", "line": "hello"})
        for step in range(1, steps + 1):
            emit({"event": "step", "step": step, "total": steps, "loss": 1.0 / step})
            if gate is not None:
                gate.wait(10)
            if should_stop is not None and should_stop():
                raise TrainingCancelled(f"cancelled at step {step}")
        return adapter_file(Path(config["out"]), config["name"])

    return work


def test_the_registry_names_every_executor_and_train_batch_takes_those_that_wait(tmp_path):
    from studio.training.batch import train_batch

    assert list(EXECUTORS) == ["local", "thread", "ray"]
    assert [EXECUTORS[name].waits for name in EXECUTORS] == [True, False, True]
    with pytest.raises(InvalidArgumentError, match=r"executor='thread'; choose one of local, ray\."):
        train_batch(tmp_path, tmp_path / "out", executor="thread", library=Library(tmp_path / "lib.db"))


def test_a_thread_job_runs_in_the_background_into_the_library(tmp_path):
    library = Library(tmp_path / "lib.db")
    threads = EXECUTORS["thread"]
    gate = threading.Event()
    out = tmp_path / "adapters" / "star.safetensors"
    job_id = threads.start("ui", "star", {"out": str(out), "name": "star", "steps": 3}, stepping(gate=gate),
                           library=library, tags=["trained"], thumbnail=lambda path: str(tmp_path / "thumb.png"))
    assert threads.running(job_id) and threads.running_named("star").id == job_id
    with pytest.raises(InvalidArgumentError, match="'star' is already running"):
        threads.start("ui", "star", {}, stepping(), library=library)
    gate.set()
    job = threads.wait(job_id)
    assert not threads.running(job_id) and threads.running_named("star") is None
    assert job.status == "done" and job.error is None and job.attempts == 1
    assert [e["event"] for e in job.events] == ["started", "log", "step", "step", "step"]
    row = library.job(job_id)
    assert (row["batch"], row["status"], row["step"], row["attempts"]) == ("ui", "done", 3, 1)
    assert json.loads(row["result"]) == {"path": str(out)} and "hello" in row["log"]
    (adapter,) = library.adapters()
    assert json.loads(adapter["tags"]) == ["trained"] and adapter["thumbnail"] == str(tmp_path / "thumb.png")


def test_a_thread_job_cancels_on_its_stop_event_and_a_failure_is_kept_for_the_caller(tmp_path):
    library = Library(tmp_path / "lib.db")
    threads = EXECUTORS["thread"]
    gate = threading.Event()
    config = {"out": str(tmp_path / "slow.safetensors"), "name": "slow", "steps": 5}
    job_id = threads.start("ui", "slow", config, stepping(5, gate), library=library)
    threads.cancel(job_id)
    threads.cancel(-1)  # unknown ids are ignored
    gate.set()
    job = threads.wait(job_id)
    row = library.job(job_id)
    assert job.status == row["status"] == "cancelled" and row["error"] == "cancelled at step 1"
    assert json.loads(row["result"]) == {"loss": 1.0, "total": 5}  # the last step's, for the page

    def broken(config, emit, should_stop=None):
        raise StudioError("no usable images in 'x'")

    job = threads.wait(threads.start("erase", "broken", {"out": "x"}, broken, library=library))
    row = library.job(job.id)
    assert isinstance(job.error, StudioError) and row["status"] == "failed"
    assert row["error"] == "StudioError: no usable images in 'x'" and "failed: " in row["log"]
    with pytest.raises(InvalidArgumentError, match="not started by this process"):
        threads.wait(10**9)


def test_the_local_executor_runs_one_job_after_another_and_a_bad_one_fails_alone(tmp_path):
    library = Library(tmp_path / "lib.db")
    configs = {name: {"out": str(tmp_path / f"{name}.safetensors"), "name": name, "steps": 3}
               for name in ("bad", "good")}
    library.add_jobs("batch", configs)
    jobs = [Job(row["id"], row["name"], json.loads(row["config"]), batch="batch") for row in library.jobs("batch")]
    lines, progress = [], []
    recorder = Recorder(library, jobs, log=lines.append, progress=lambda done, total: progress.append((done, total)))

    def work(config, emit, should_stop=None):
        if config["name"] == "bad":
            raise StudioError("no usable images")
        return stepping()(config, emit)

    EXECUTORS["local"].run(jobs, recorder, work=work)
    rows = {row["name"]: row for row in library.jobs("batch")}
    assert (rows["bad"]["status"], rows["bad"]["error"]) == ("failed", "no usable images")
    assert rows["good"]["status"] == "done" and rows["good"]["result"] == configs["good"]["out"]
    assert progress[-1] == (6, 6) and any("[good] step 3/3 (100%), loss 0.3333" in line for line in lines)
    assert [job.status for job in jobs] == ["failed", "done"]


def test_run_job_is_the_training_work(tmp_path):
    from studio.world.folder import write_reference_folder

    write_reference_folder(tmp_path / "refs", n=2, seed=1, shape="star", trigger="sks")
    events = []
    config = {"folder": str(tmp_path / "refs"), "out": str(tmp_path / "a.safetensors"), "recipe": "any/lora",
              "steps": 2, "batch": 2, "rank": 2, "trigger": "sks"}
    assert run_job(config, events.append, every=1) == tmp_path / "a.safetensors"
    assert events[0]["event"] == "started" and not events[0]["resume"]
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2]


def test_ray_lands_a_task_file_atomically(tmp_path):
    from studio.training.ray_batch import _land

    out = _land((False, {"a.safetensors": b"weights"}), tmp_path / "a.safetensors")
    folder = _land((True, {"config.json": b"{}", "sub/w.bin": b"w"}), tmp_path / "edges")
    assert out.read_bytes() == b"weights" and (folder / "sub" / "w.bin").read_bytes() == b"w"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.safetensors", "config.json", "edges", "sub", "w.bin"]


def imports(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_the_job_imports_run_one_way():
    jobs = imports(ROOT / "studio" / "jobs.py")
    assert not {m for m in jobs if m in ("app", "studio.cli", "studio.training.batch", "studio.training.ray_batch")
                or m.startswith("studio.ui")}
    assert "studio.jobs" in imports(ROOT / "studio" / "training" / "ray_batch.py")
    assert "studio.training.batch" not in imports(ROOT / "studio" / "training" / "ray_batch.py")
    assert "studio.jobs" in imports(ROOT / "studio" / "training" / "batch.py")
