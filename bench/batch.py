"""Batch training throughput: adapters per hour for 6 reference folders on world-sd, the local executor against
Ray on this machine in one run, then the scaling planned on paper for N GPUs from the measured phases.

Each job: a LoRA (rank 8) from 8 renders of one shape, `--steps` steps of batch 4. The local executor trains
one job after another with every core; Ray runs one task per `--cpus-per-job` cores, each with that many torch
threads. From the Ray run's events: a job's fixed cost (worker start, backbone load, latents) and its cost per
step, which the plan scales.

    .venv/bin/python bench/batch.py                 # ~8 min on 2 cores
    .venv/bin/python bench/batch.py --steps 50 --jobs 4
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

SHAPES = ("star", "heart", "moon", "triangle", "square", "circle", "cross", "hexagon")


DRIVER: list[float] = []  # seconds the driver spent on each finished Ray job


def timed_driver() -> None:
    """Time the driver's serial work per finished job (landing the files, then the library)."""
    from studio.training import ray_batch

    land, done = ray_batch._land, ray_batch.Recorder.done

    def timed_land(output, out):
        start = time.monotonic()
        path = land(output, out)
        DRIVER.append(time.monotonic() - start)
        return path

    def timed_done(self, job, path):
        start = time.monotonic()
        done(self, job, path)
        DRIVER[-1] += time.monotonic() - start

    ray_batch._land, ray_batch.Recorder.done = timed_land, timed_done


def folders(parent: Path, jobs: int) -> Path:
    from studio.world.folder import write_reference_folder
    from studio.world.vocab import SHAPES as KNOWN

    names = [s for s in SHAPES if s in KNOWN][:jobs]
    for i, name in enumerate(names):
        write_reference_folder(parent / name, n=8, seed=100 + i, shape=name, trigger=name)
    return parent


def run(executor: str, parent: Path, out: Path, options: dict, **extra) -> tuple[float, dict[str, list]]:
    """Wall seconds for the whole batch and each job's (time, event) list."""
    from studio.library import Library
    from studio.training.batch import train_batch

    events: dict[str, list] = {}
    start = time.monotonic()
    jobs = train_batch(parent, out, executor=executor, library=Library(out / "lib.db"), log=lambda line: None,
                       on_event=lambda job, event: events.setdefault(job.name, []).append((time.monotonic(), event)),
                       **options, **extra)
    wall = time.monotonic() - start
    failed = [j["name"] for j in jobs if j["status"] != "done"]
    if failed:
        raise SystemExit(f"{executor}: jobs {failed} did not finish")
    return wall, events


def phases(events: dict[str, list], steps: int) -> tuple[float, float]:
    """Median fixed cost before a job's first step and median seconds per step (from its first to last step)."""
    fixed, per_step = [], []
    for timeline in events.values():
        started = timeline[0][0]
        marks = [(t, e["step"]) for t, e in timeline if e["event"] == "step"]
        (t0, s0), (t1, s1) = marks[0], marks[-1]
        per_step.append((t1 - t0) / max(1, s1 - s0))
        fixed.append(t0 - started - s0 * per_step[-1])
    return statistics.median(fixed), statistics.median(per_step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--cpus-per-job", type=float, default=1)
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray instance")
    parser.add_argument("--gpu-job", type=float, default=600.0, help="seconds of one job on a GPU, for the plan")
    args = parser.parse_args()
    import ray
    import torch

    torch.set_num_threads(args.cpus)
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    os.environ.setdefault("STUDIO_HOME", str(work / "home"))
    parent = folders(work / "concepts", args.jobs)
    options = dict(steps=args.steps, batch=4, rank=8, lr=1e-3, checkpoint_every=max(1, args.steps // 2))
    local_wall, _ = run("local", parent, work / "local", options)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    timed_driver()
    ray_wall, events = run("ray", parent, work / "ray", options, cpus_per_job=args.cpus_per_job)
    ray.shutdown()
    fixed, per_step = phases(events, args.steps)
    job_seconds = fixed + args.steps * per_step
    print(f"\n{args.jobs} LoRAs (rank 8, {args.steps} steps of batch 4, 8 renders each) on world-sd, "
          f"{args.cpus} CPUs, one run\n")
    print("| executor | wall s | adapters per hour |")
    print("| --- | --- | --- |")
    print(f"| local (one job at a time, {args.cpus} threads) | {local_wall:.0f} | {3600 * args.jobs / local_wall:.0f} |")
    parallel = int(args.cpus // args.cpus_per_job)
    print(f"| ray ({parallel} tasks at a time, {args.cpus_per_job:g} CPU each) | {ray_wall:.0f} | "
          f"{3600 * args.jobs / ray_wall:.0f} |")
    print(f"\nA Ray job: {fixed:.1f} s fixed (backbone load, latents; after its worker started) + {per_step:.3f} s per step = "
          f"{job_seconds:.0f} s per adapter\n")
    serial = statistics.median(DRIVER) if DRIVER else 0.0
    print(f"The driver's own work per finished adapter (landing its file, library rows, hashing): {serial:.3f} s "
          f"(median of {len(DRIVER)})\n")
    print(f"Planned for N GPUs, one job per GPU (Ray), jobs independent: adapters per hour = "
          f"min(N / job time, 1 / driver time). Job time: this machine's Ray job ({job_seconds:.0f} s), and an "
          f"assumed GPU job of {args.gpu_job:.0f} s (--gpu-job: e.g. an SDXL LoRA of 1,000 steps):\n")
    print(f"| workers or GPUs | adapters per hour ({job_seconds:.0f} s jobs) | adapters per hour "
          f"({args.gpu_job:.0f} s jobs) | speed-up |")
    print("| --- | --- | --- | --- |")
    for n in (1, 2, 4, 8, 16, 64, 256):
        here = 3600 * min(n / job_seconds, 1 / max(serial, 1e-9))
        gpu = 3600 * min(n / args.gpu_job, 1 / max(serial, 1e-9))
        print(f"| {n} | {here:.0f} | {gpu:.0f} | {gpu / (3600 / args.gpu_job):.1f}x |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
