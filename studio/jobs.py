"""The one job system: a job record, the recorder that keeps the library's jobs table, and the executors.

A job is a row of the library's jobs table (batch, name, config, status, step, result, log) and a `Job`
record of it here. Its work is a function `work(config, emit, should_stop=None) -> Path` (training one
adapter: `run_job`; the web UI's eraser) that tells what happens through `emit(event)`:

    {"event": "started", "doing", "resume", "from_step", "worker", "pid"}  what, where, from which step
    {"event": "log", "line"}  /  {"event": "warning", "line"}              a line of its log
    {"event": "step", "step", "total", "loss"?, "stage"?}                  how far it is
    any other event (the eraser's "made": what it made)                    kept in the job's `events` only

The `Recorder` turns the events and the outcome (done, failed, cancelled...) into the table, so every
reader (the CLI's table, a reloaded page, a second driver of the same batch) sees the same state. An
executor runs the work; they are registered by name in `EXECUTORS`:

    local   one job after another in this process (`studio train-batch`, the default)
    thread  each job in a background thread of this process, stopped by an event (the web UI's Train and
            Erase tabs: a job goes on when the browser closes)
    ray     each job a Ray task with its own CPUs and GPUs (studio.training.ray_batch registers it, and
            studio.training.batch imports that module: this one imports neither)
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from studio.errors import InvalidArgumentError, StudioError
from studio.library import Library
from studio.progress import clock
from studio.registry import Registry

if TYPE_CHECKING:
    from studio.training.trainer import TrainConfig

log = logging.getLogger("studio.jobs")

Event = dict[str, Any]  # {"event": "started" | "log" | "warning" | "step" | ..., ...} from a job's work
Emit = Callable[[Event], None]
Work = Callable[..., Path]  # work(config, emit, should_stop=None) -> the adapter it wrote


@dataclass
class Job:
    """One job of the library's jobs table: its row id, name, config and batch; `attempts` counts its starts,
    `status` and `events` are what its recorder saw, `error` what stopped it (the exception, for a caller that
    waits)."""

    id: int
    name: str
    config: dict[str, Any]
    attempts: int = 0
    status: str = "queued"
    batch: str = ""
    events: list[Event] = field(default_factory=list)
    error: BaseException | None = field(default=None, repr=False)

    def lines(self, event: str) -> list[str]:
        """The lines of its events of one kind (its warnings, its log)."""
        return [e["line"] for e in self.events if e["event"] == event]


def started(doing: str = "training", *, resume: bool = False, from_step: int = 0) -> Event:
    """The event a job's work sends first: what it does, where it runs (host and pid) and from which step."""
    return {"event": "started", "doing": doing, "resume": resume, "from_step": from_step,
            "worker": f"{socket.gethostname()} pid {os.getpid()}", "pid": os.getpid()}


# -------------------------------------------------------------------------------------- training


def run_job(config: dict[str, Any], emit: Emit, should_stop: Callable[[], bool] | None = None, *,
            resume: bool = True, every: int = 0) -> Path:
    """Train one job's adapter, from its checkpoint when a run of it was cut short (unless `resume` is off),
    telling `emit` what happens: started (where), its log lines, and its step every `every` steps (0: at every
    tenth of the run). `should_stop` is asked after each step (studio.training.trainer.train)."""
    from studio.outputs import lock
    from studio.training.trainer import TrainConfig

    config = TrainConfig(**config)
    with lock(config.out):  # another driver of the same batch training this job: OutputBusyError, before "started"
        return _run_job(config, emit, should_stop, resume=resume, every=every)


def _run_job(config: TrainConfig, emit: Emit, should_stop: Callable[[], bool] | None, *, resume: bool,
             every: int) -> Path:
    from studio.training.trainer import latest_checkpoint, train

    checkpoint = latest_checkpoint(config.paths()["checkpoint"]) if resume else None
    emit(started(resume=checkpoint is not None,
                 from_step=json.loads((checkpoint / "state.json").read_text())["step"] if checkpoint else 0))
    every = every or max(1, config.steps // 10)

    def progress(step: int, total: int, loss: float) -> None:
        if step % every == 0 or step == total:
            emit({"event": "step", "step": step, "total": total, "loss": loss})

    # resume: a job cut short continues from its checkpoint, and one whose adapter was written just before the
    # kill (the job list not told yet) is taken as finished rather than refused as existing
    return train(config, resume=resume, progress=progress, log=lambda line: emit({"event": "log", "line": line}),
                 should_stop=should_stop)


# -------------------------------------------------------------------------------------- recording


class Recorder:
    """The driver's side: each job's events into the library, a line per event into `log` (per job: a line
    per step event with its ETA), and the whole batch's steps into `progress(done, total)`. A finished job's
    adapter joins the library's adapters with `tags` and, when `thumbnail(path)` is given, its preview."""

    def __init__(self, library: Library, jobs: Sequence[Job], *, log: Callable[[str], None] = print,
                 progress: Callable[[int, int], None] | None = None,
                 on_event: Callable[[Job, Event], None] | None = None, tags: Sequence[str] = (),
                 thumbnail: Callable[[Path], str | None] | None = None):
        self.library, self.log, self.progress, self.on_event = library, log, progress, on_event
        self.tags, self.thumbnail = list(tags), thumbnail
        self.total = sum(_steps(job) for job in jobs)
        self.steps = {job.id: 0 for job in jobs}
        self.started: dict[int, tuple[float, int]] = {}  # job -> (when its attempt started, from which step)

    def __call__(self, job: Job, event: Event) -> None:
        job.events.append(event)
        kind = event["event"]
        if kind == "started":
            self.started[job.id] = (time.monotonic(), event["from_step"])
            self._status(job, "running", attempts=job.attempts, worker=event["worker"], error=None)
            self._say(job, f"{'resuming' if event['resume'] else event['doing']} on {event['worker']} "
                           f"(attempt {job.attempts}) -> {job.config['out']}")
        elif kind in ("log", "warning"):
            line = event["line"] if kind == "log" else f"warning: {event['line']}"
            self.library.add_job_log(job.id, line)
            self._say(job, line)
        elif kind == "step":
            step, total = event["step"], event["total"]
            self.library.update_job(job.id, step=step, **self.step_values(event))
            since, first = self.started.get(job.id, (time.monotonic(), step))
            eta = (time.monotonic() - since) / max(1, step - first) * (total - step)
            loss = f", loss {event['loss']:.4f}" if "loss" in event else ""
            stage = f"{event['stage']}: " if "stage" in event else ""
            self._say(job, f"{stage}step {step}/{total} ({100 * step // max(1, total)}%){loss}, ETA {clock(eta)}")
            if "stage" not in event:  # a stage before the job's own steps is not the batch's progress
                self._advance(job, step)
        if self.on_event is not None:
            self.on_event(job, event)

    def step_values(self, event: Event) -> dict[str, Any]:
        """What a step event writes in the job's row besides its step."""
        return {}

    def result(self, path: Path) -> str:
        """A finished job's `result` column: the path of what it wrote."""
        return str(path)

    def done(self, job: Job, path: Path) -> None:
        thumbnail = None
        if self.thumbnail is not None:
            try:
                thumbnail = self.thumbnail(path)
            except Exception:  # noqa: BLE001 - a missing thumbnail must not fail a finished job
                log.exception("thumbnail of %s", path)
        self.library.add_adapter(path, tags=self.tags, thumbnail=thumbnail)
        self._status(job, "done", result=self.result(path), step=job.config.get("steps"))
        self._advance(job, _steps(job))
        self._say(job, f"done: {path}")

    def failed(self, job: Job, error: str) -> None:
        self._status(job, "failed", error=error)
        self.library.add_job_log(job.id, f"failed: {error}")
        self._advance(job, _steps(job))  # the batch's progress counts it as over
        self._say(job, f"failed: {error}")

    def cancelled(self, job: Job, error: str) -> None:
        """Stopped on request; its checkpoint is there to resume from."""
        self._status(job, "cancelled", error=error)
        self.library.add_job_log(job.id, f"cancelled: {error}")
        self._say(job, f"cancelled: {error}")

    def taken(self, job: Job, error: str) -> None:
        """Another driver holds the job (its status is that driver's to tell)."""
        self._advance(job, _steps(job))
        self._say(job, f"skipped: {error}")

    def finished_elsewhere(self, job: Job) -> bool:
        """Done by another driver since this one listed the batch."""
        record = self.library.job(job.id)
        if record and record["status"] == "done":
            job.status = "done"
            self._advance(job, _steps(job))
            self._say(job, f"done by another run: {record['result']}")
            return True
        return False

    def retrying(self, job: Job, error: str, delay: float) -> None:
        self._status(job, "retrying", error=error)
        self.library.add_job_log(job.id, f"lost ({error}); retrying in {delay:g} s")
        self._say(job, f"lost ({error}); attempt {job.attempts + 1} in {delay:g} s, from its last checkpoint")

    def _status(self, job: Job, status: str, **values: Any) -> None:
        job.status = status
        self.library.update_job(job.id, status=status, **values)

    def _advance(self, job: Job, step: int) -> None:
        self.steps[job.id] = step
        if self.progress is not None:
            self.progress(sum(self.steps.values()), self.total)

    def _say(self, job: Job, line: str) -> None:
        self.log(f"[{job.name}] {line}")


class LiveRecorder(Recorder):
    """The recorder of jobs that a page draws while they run (the web UI's): each step's loss (and the stage and
    total of a job whose steps its config does not say) in the row's result, the finished job's path as
    {"path": ...} there."""

    def step_values(self, event: Event) -> dict[str, Any]:
        return {"result": json.dumps({k: event[k] for k in ("loss", "total", "stage") if k in event})}

    def result(self, path: Path) -> str:
        return json.dumps({"path": str(path)})


def _steps(job: Job) -> int:
    return job.config.get("steps") or 0


# -------------------------------------------------------------------------------------- executors


class Executor:
    """Runs jobs: `run(jobs, recorder, work=...)`. `waits`: whether `run` returns only once every job is over
    (`local`, `ray`), or starts them and returns (`thread`)."""

    waits: ClassVar[bool] = True

    def check(self) -> None:
        """Refuse, before any job is queued, an executor that cannot run here (a missing extra)."""

    def run(self, jobs: Sequence[Job], recorder: Recorder, *, work: Work = run_job, **options: Any) -> None:
        """Run `work` for each job, telling `recorder`; `options` are the executor's own (ray: address, resources,
        retries); an executor has no use for another's."""
        raise NotImplementedError


EXECUTORS: Registry[Executor] = Registry("executor", InvalidArgumentError)


class LocalExecutor(Executor):
    def run(self, jobs: Sequence[Job], recorder: Recorder, *, work: Work = run_job, **options: Any) -> None:
        """One job after another in this process; a job whose data is wrong fails alone, and one that another
        driver of the same batch holds or has finished is left to it."""
        from studio.outputs import OutputBusyError

        for job in jobs:
            if recorder.finished_elsewhere(job):
                continue
            job.attempts += 1
            try:
                path = work(job.config, lambda event, job=job: recorder(job, event))
            except OutputBusyError as error:
                recorder.taken(job, str(error))
                continue
            except StudioError as error:  # one bad folder does not stop the batch
                job.error = error
                recorder.failed(job, str(error))
                continue
            except Exception as error:  # noqa: BLE001 - nor does a fault of studio's own: it is recorded with its type
                job.error = error
                recorder.failed(job, f"{type(error).__name__}: {error}")
                continue
            recorder.done(job, path)


class ThreadExecutor(Executor):
    """Jobs of this process, one background thread each, stopped by their own event (the work's `should_stop`).
    Their state lives in the library's jobs table, so a reloaded page, or a second browser, sees them."""

    waits = False

    def __init__(self) -> None:
        self.threads: dict[int, threading.Thread] = {}
        self.stops: dict[int, threading.Event] = {}
        self.jobs: dict[int, Job] = {}

    def running(self, job_id: int) -> bool:
        thread = self.threads.get(job_id)
        return thread is not None and thread.is_alive()

    def running_named(self, name: str) -> Job | None:
        """The running job of that name (its output's), if any."""
        return next((job for job in self.jobs.values() if job.name == name and self.running(job.id)), None)

    def start(self, batch: str, name: str, config: dict[str, Any], work: Work, *, library: Library | None = None,
              **recording: Any) -> int:
        """Queue a job afresh in the library (one of the same batch and name, finished, failed or cancelled, is
        started over: give a work that resumes it to resume it) and run it in a thread; returns its id.
        `recording`: the `LiveRecorder`'s options (tags, thumbnail, log)."""
        if self.running_named(name):
            raise InvalidArgumentError(f"job {name!r} is already running; wait for it, or cancel it first.")
        library = library or Library()
        job = Job(library.start_job(batch, name, config), name, config, batch=batch)
        self.run([job], LiveRecorder(library, [job], **{"log": log.info, **recording}), work=work)
        return job.id

    def run(self, jobs: Sequence[Job], recorder: Recorder, *, work: Work = run_job, **options: Any) -> None:
        for job in jobs:
            stop = self.stops[job.id] = threading.Event()
            self.jobs[job.id] = job
            thread = threading.Thread(target=self._run, args=(job, recorder, work, stop), daemon=True,
                                      name=f"job-{job.name}")
            self.threads[job.id] = thread
            thread.start()

    def _run(self, job: Job, recorder: Recorder, work: Work, stop: threading.Event) -> None:
        from studio.training.trainer import TrainingCancelled

        job.attempts += 1
        try:
            path = work(job.config, lambda event: recorder(job, event), stop.is_set)
        except TrainingCancelled as error:
            recorder.cancelled(job, str(error))
            return
        except Exception as error:  # noqa: BLE001 - the job's row carries the message to the page
            if isinstance(error, StudioError):
                log.warning("job %s (%s) failed: %s", job.id, job.name, error)
            else:
                log.exception("job %s (%s) failed", job.id, job.name)
            job.error = error
            recorder.failed(job, f"{type(error).__name__}: {error}")
            return
        recorder.done(job, path)

    def cancel(self, job_id: int) -> None:
        """Ask the job to stop after its current step (unknown ids are ignored)."""
        if job_id in self.stops:
            self.stops[job_id].set()

    def wait(self, job_id: int, timeout: float | None = None) -> Job:
        """The job's record once its thread has ended (or `timeout` seconds passed)."""
        if job_id not in self.threads:
            raise InvalidArgumentError(f"job {job_id!r} was not started by this process; nothing to wait for.")
        self.threads[job_id].join(timeout)
        return self.jobs[job_id]


EXECUTORS.add("local", LocalExecutor())
EXECUTORS.add("thread", ThreadExecutor())
