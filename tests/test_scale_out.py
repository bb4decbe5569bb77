"""Scale-out: batch training on a local Ray instance (parallel jobs, a killed job retried from its checkpoint,
a batch whose driver died resumed) and one job over two processes (gloo) equal to the one-process run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from studio.world.folder import write_reference_folder

OPTIONS = dict(steps=4, batch=2, rank=2, lr=1e-3)


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def concepts(parent, names=("star", "heart", "moon")):
    for i, name in enumerate(names):
        write_reference_folder(parent / name, n=2, seed=10 + i, trigger=name)
    return parent


def test_ray_trains_three_adapters_in_parallel_into_the_library(ray_local, tmp_path):
    from studio.library import Library
    from studio.training.batch import train_batch

    library = Library(tmp_path / "lib.db")
    seen: dict[str, list[tuple[float, dict]]] = {}
    jobs = train_batch(concepts(tmp_path / "concepts"), tmp_path / "out", executor="ray", cpus_per_job=0.5,
                       library=library, log=lambda line: None,
                       on_event=lambda job, event: seen.setdefault(job.name, []).append((time.monotonic(), event)),
                       **OPTIONS)
    assert [(j["name"], j["status"], j["attempts"]) for j in jobs] == [
        ("heart", "done", 1), ("moon", "done", 1), ("star", "done", 1)]
    assert {a["name"] for a in library.adapters()} == {"star", "heart", "moon"}
    for job in jobs:  # progress and log lines came back from the workers into the library
        assert job["step"] == 4 and "wrote" in job["log"] and "pid" in job["worker"]
        assert load_file(job["result"])  # the adapter landed where the batch said
    pids = {events[0][1]["pid"] for events in seen.values()}
    assert len(pids) == 3 and os.getpid() not in pids
    spans = sorted((events[0][0], events[-1][0]) for events in seen.values())
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))  # ran at the same time


def test_ray_job_killed_mid_way_is_retried_from_its_checkpoint(ray_local, tmp_path):
    from studio.library import Library
    from studio.training.batch import train_batch

    library = Library(tmp_path / "lib.db")
    steps: list[tuple[int, int]] = []  # (attempt, step)
    pids: list[int] = []
    killed = []

    def kill_once(job, event):
        if event["event"] == "started":
            pids.append(event["pid"])
        if event["event"] == "step":
            steps.append((job.attempts, event["step"]))
            if event["step"] >= 6 and not killed:  # the checkpoint of step 4 is on disk
                killed.append(pids[-1])
                os.kill(pids[-1], signal.SIGKILL)

    lines = []
    (job,) = train_batch(concepts(tmp_path / "concepts", ("star",)), tmp_path / "out", executor="ray", backoff=0.1,
                         library=library, log=lines.append, on_event=kill_once,
                         **{**OPTIONS, "steps": 12, "checkpoint_every": 4})
    assert killed and job["status"] == "done" and job["attempts"] == 2
    assert "resumed at step 4 of 12" in job["log"]
    assert any("retrying in 0.1 s" in line for line in job["log"].splitlines())
    assert [s for a, s in steps if a == 2] == list(range(5, 13))  # the second attempt went on from step 4
    assert any("WorkerCrashedError" in line for line in lines)


def test_ray_batch_resumes_after_its_driver_died(ray_local, tmp_path):
    """A driver killed mid-batch leaves a job `running` with a checkpoint: the next start resumes it."""
    from studio.library import Library
    from studio.training.batch import batch_jobs, train_batch
    from studio.training.trainer import TrainConfig, TrainingCancelled, train

    library = Library(tmp_path / "lib.db")
    parent = concepts(tmp_path / "concepts", ("star", "moon"))
    options = {**OPTIONS, "steps": 6, "checkpoint_every": 2}
    first = batch_jobs(parent, tmp_path / "out", library, **options)[0]
    library.update_job(first.id, status="running", attempts=1)
    done: list[int] = []  # what the dead driver's job left: a checkpoint at step 2
    with pytest.raises(TrainingCancelled):
        train(TrainConfig(**first.config), log=lambda line: None, progress=lambda step, total, loss: done.append(step),
              should_stop=lambda: done[-1] >= 2)
    jobs = {j["name"]: j for j in train_batch(parent, tmp_path / "out", executor="ray", library=library,
                                              log=lambda line: None, **options)}
    assert jobs["moon"]["status"] == jobs["star"]["status"] == "done"
    assert "resumed at step 2 of 6" in jobs[first.name]["log"] and jobs[first.name]["attempts"] == 2


def test_ray_missing_names_the_extra(tmp_path, monkeypatch):
    from studio.errors import MissingExtraError
    from studio.library import Library
    from studio.training.batch import train_batch

    monkeypatch.setitem(sys.modules, "ray", None)
    library = Library(tmp_path / "lib.db")
    with pytest.raises(MissingExtraError, match=r"pip install 'studio\[ray\]'"):
        train_batch(concepts(tmp_path / "concepts", ("star",)), tmp_path / "out", executor="ray", library=library)
    assert library.jobs() == []  # refused before anything was queued


def test_two_processes_train_the_same_adapter_as_one(tmp_path):
    """torchrun (what `accelerate launch --multi_gpu` runs) with gloo: each process trains on half of every
    batch and the averaged gradients give the one-process adapter."""
    refs = tmp_path / "refs"
    write_reference_folder(refs, n=4, seed=31, shape="star", trigger="sks")  # not the images other tests cache
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = ["-m", "studio.cli", "train", str(refs), "--steps", "6", "--batch", "4", "--rank", "2", "--lr", "1e-3",
             "--flip"]
    one = subprocess.run([sys.executable, *train, "--out", str(tmp_path / "one.safetensors")], env=env,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29517", *train, "--out", str(tmp_path / "two.safetensors")], env=env, capture_output=True,
                         text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.split() == [str(tmp_path / "two.safetensors")]  # one process answers for the run
    a, b = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert a.keys() == b.keys()
    moved = max(float(a[k].abs().max()) for k in a if "lora_B" in k)
    assert moved > 1e-3  # training moved the adapter, so equality says something
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    logs = [(tmp_path / f"{n}.log.jsonl").read_text().splitlines() for n in ("one", "two")]
    assert len(logs[0]) == len(logs[1]) == 6


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tmp_path, monkeypatch):
    from studio.errors import InvalidArgumentError
    from studio.training.trainer import Run, TrainConfig

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InvalidArgumentError, match="batch=3 does not split over 2 processes"):
        Run(TrainConfig(folder=str(tmp_path), out=str(tmp_path / "a.safetensors"), batch=3))
