"""Batch training on Ray: each job one Ray task with its resources; the driver keeps the books.

Ray places the tasks on the cluster's CPUs and GPUs. It retries nothing by itself here (max_retries=0, since
its retries have no backoff): a lost task (its worker or node died, it ran out of memory) comes back to the
driver, which starts it again after a delay that doubles each time, and the new attempt resumes from the
job's last checkpoint. Data errors (a folder without usable images) fail the job at once. Tasks send their
events through a Ray queue that the driver drains into the library, and return the adapter's files, so the
adapter lands in the driver's out folder even where the workers' disks are not shared (the reference folders
and checkpoints must be: README, "Batch training on a Ray cluster").
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from studio.errors import InvalidArgumentError, MissingExtraError, StudioError
from studio.home import atomic_write_bytes
from studio.jobs import EXECUTORS, Executor, Job, Recorder, Work, run_job


def require_ray() -> Any:
    try:
        import ray
    except ImportError as error:
        raise MissingExtraError("executor='ray' (--executor ray) needs Ray, an optional extra: "
                                "pip install 'studio[ray]' (or use the local executor).") from error
    return ray


def _task(work: Work, config: dict[str, Any], queue: Any, job_id: int, threads: int) -> tuple[bool, dict[str, bytes]]:
    """A job on a Ray worker, run with `threads` CPU threads; returns whether its output is a folder (a control
    model) and its files by path relative to it."""
    import torch

    torch.set_num_threads(threads)
    path = work(config, lambda event: queue.put((job_id, event)))
    if path.is_dir():
        return True, {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    return False, {path.name: path.read_bytes()}


def _land(output: tuple[bool, dict[str, bytes]], out: Path) -> Path:
    """The task's files at `out` on the driver (the same bytes already there, from a shared disk, are kept)."""
    folder, files = output
    for name, data in files.items():
        target = out / name if folder else out
        if not (target.is_file() and target.read_bytes() == data):
            atomic_write_bytes(target, data)
    return out


class RayExecutor(Executor):
    """Each job a Ray task with its resources; the driver keeps the books."""

    def check(self) -> None:
        require_ray()

    def run(self, jobs: list[Job], recorder: Recorder, *, work: Work = run_job, address: str | None = None,
            gpus_per_job: float = 0, cpus_per_job: float = 1, retries: int = 3, backoff: float = 5.0,
            runtime_env: dict[str, Any] | None = None, **options: Any) -> None:
        """Run the jobs as Ray tasks on the cluster at `address` (the running Ray, else a local instance)."""
        ray = require_ray()
        from ray.util.queue import Queue

        if cpus_per_job <= 0 or gpus_per_job < 0 or retries < 0 or backoff < 0:
            raise InvalidArgumentError(f"cpus_per_job={cpus_per_job} must be > 0, gpus_per_job={gpus_per_job} >= 0, "
                                       f"retries={retries} >= 0 and backoff={backoff} >= 0.")
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        elif address or runtime_env:
            recorder.log("Ray is already initialised in this process: --address and the runtime env are not applied")
        remote = ray.remote(_task)
        queue = Queue(actor_options={"num_cpus": 0})
        by_id = {job.id: job for job in jobs}
        pending: dict[Any, Job] = {}
        waiting: list[tuple[float, Job]] = []  # (when to start again, job)
        tries = {job.id: 0 for job in jobs}  # in this run (job.attempts counts every run's)

        def submit(job: Job) -> None:
            job.attempts += 1
            tries[job.id] += 1
            resources = dict(num_cpus=cpus_per_job, num_gpus=gpus_per_job, max_retries=0,
                             name=f"studio-train:{job.name}")
            pending[remote.options(**resources).remote(work, job.config, queue, job.id, max(1, int(cpus_per_job)))] = job

        def drain() -> None:
            while not queue.empty():
                for job_id, event in queue.get_nowait_batch(queue.qsize()):
                    recorder(by_id[job_id], event)

        try:
            for job in jobs:
                submit(job)
            while pending or waiting:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.2) if pending else ([], [])
                drain()
                for ref in ready:
                    job = pending.pop(ref)
                    try:
                        files = ray.get(ref)
                    except ray.exceptions.RayTaskError as error:
                        cause = getattr(error, "cause", None)
                        if isinstance(cause, StudioError):  # the data or the options: another try gives the same
                            recorder.failed(job, str(cause))
                        else:
                            _lost(job, tries[job.id], f"{type(cause or error).__name__}: {cause or error}", recorder,
                                  waiting, retries, backoff)
                        continue
                    except ray.exceptions.RayError as error:  # the worker or its node died, the task was lost
                        _lost(job, tries[job.id], type(error).__name__, recorder, waiting, retries, backoff)
                        continue
                    recorder.done(job, _land(files, Path(job.config["out"])))
                now = time.monotonic()
                for due, job in [w for w in waiting if w[0] <= now]:
                    waiting.remove((due, job))
                    submit(job)
                if waiting and not pending:
                    time.sleep(max(0.0, min(due for due, _ in waiting) - now))
            drain()
        finally:
            ray.kill(queue.actor)
            if started_here:
                ray.shutdown()


EXECUTORS.add("ray", RayExecutor())


def _lost(job: Job, tries: int, error: str, recorder: Recorder, waiting: list[tuple[float, Job]],
          retries: int, backoff: float) -> None:
    """A lost attempt: tried again after backoff x 2^(tries - 1) seconds, or failed after `retries` retries."""
    if tries > retries:
        recorder.failed(job, f"{error} (lost {tries} times)")
        return
    delay = backoff * 2 ** (tries - 1)
    recorder.retrying(job, error, delay)
    waiting.append((time.monotonic() + delay, job))
