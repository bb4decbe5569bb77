"""Nothing lost, nothing stuck: kills at the worst moments of the checkpoint cycle, one writer per output, images
over the pixel limit, a batch that loses one job.

Kills are simulated in-process at named points (studio.faults): the files are left exactly as a kill there
leaves them (no studio file code tidies up in a `finally`), and the same command run again must finish with the
same adapter as a run never cut, and leave no checkpoint, trash or lock behind.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from conftest import bomb
from safetensors.torch import load_file

from studio import faults
from studio.errors import InvalidArgumentError
from studio.outputs import OutputBusyError, claim
from studio.training.trainer import train
from studio.world.folder import write_reference_folder

GENERIC = "any/lora"
RUN = dict(recipe=GENERIC, steps=4, batch=2, rank=2, lr=1e-3, checkpoint_every=1)


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reliability") / "refs"
    write_reference_folder(folder / "3_sks", n=3, seed=5, shape="star", trigger="sks")
    return folder


@pytest.fixture(scope="module")
def uncut(refs, tmp_path_factory):
    out = tmp_path_factory.mktemp("uncut") / "a.safetensors"
    train(folder=str(refs), out=str(out), log=lambda line: None, **RUN)
    return load_file(str(out))


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.suffix not in (".safetensors", ".jsonl", ".png"))


# (point, which pass through it): after the new checkpoint is written, after the old one is moved aside, after
# the swap, inside the deletion of the old one, after the adapter is written, inside the deletion of the last
KILLS = [("checkpoint:written", 2), ("checkpoint:moved-old", 2), ("checkpoint:swapped", 2),
         ("checkpoint:deleting", 1), ("finish:written", 1), ("checkpoint:deleting", 9)]


@pytest.mark.parametrize("point,hit", KILLS, ids=[f"{p}#{h}" for p, h in KILLS])
def test_a_kill_anywhere_in_the_checkpoint_cycle_resumes_to_the_same_adapter(refs, uncut, tmp_path, point, hit):
    out = tmp_path / "a.safetensors"
    faults.arm(point, hit)
    try:
        with pytest.raises(faults.Killed):
            train(folder=str(refs), out=str(out), log=lambda line: None, **RUN)
    finally:
        faults.disarm()
    lines = []
    train(folder=str(refs), out=str(out), resume=True, log=lines.append, **RUN)
    got = load_file(str(out))
    assert got.keys() == uncut.keys() and all((got[k] == uncut[k]).all() for k in got)
    assert leftovers(tmp_path) == []  # no checkpoint, .old, .tmp, trash or lock left
    steps = [json.loads(line)["step"] for line in out.with_suffix(".log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_kill_after_the_adapter_is_written_leaves_a_finished_run(refs, uncut, tmp_path):
    out = tmp_path / "a.safetensors"
    faults.arm("finish:written")
    try:
        with pytest.raises(faults.Killed):
            train(folder=str(refs), out=str(out), log=lambda line: None, **RUN)
    finally:
        faults.disarm()
    assert out.is_file() and (tmp_path / "a.checkpoint").is_dir()
    lines = []
    train(folder=str(refs), out=str(out), resume=True, log=lines.append, **RUN)  # nothing trained again
    assert any("was finished" in line for line in lines) and not any(line.startswith("resumed") for line in lines)
    assert leftovers(tmp_path) == []


def test_an_existing_output_is_refused_unless_overwrite(refs, tmp_path):
    out = tmp_path / "a.safetensors"
    out.write_bytes(b"mine")
    with pytest.raises(InvalidArgumentError, match="exists.*--overwrite"):
        train(folder=str(refs), out=str(out), log=lambda line: None, **RUN)
    assert out.read_bytes() == b"mine"
    train(folder=str(refs), out=str(out), overwrite=True, log=lambda line: None, **{**RUN, "steps": 1})
    assert out.read_bytes() != b"mine"


HOLDER = """
import sys, time
from studio.outputs import lock
with lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def hold(path):
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_one_writer_per_output_and_a_dead_writers_lock_is_taken_over(refs, tmp_path):
    out = tmp_path / "a.safetensors"
    holder = hold(out)
    try:
        with pytest.raises(OutputBusyError, match=rf"pid {holder.pid}.*wait for it"):
            train(folder=str(refs), out=str(out), log=lambda line: None, **RUN)
        assert not out.exists() and not (tmp_path / "a.log.jsonl").exists()  # refused before any work
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".a.safetensors.lock").exists()  # a killed writer leaves its lock file...
    train(folder=str(refs), out=str(out), log=lambda line: None, **{**RUN, "steps": 1})  # ...which is taken over
    assert out.is_file() and leftovers(tmp_path) == []


def test_locks_are_reentrant_within_a_process(tmp_path):
    with claim(tmp_path / "x.png"), claim(tmp_path / "x.png"):
        pass
    assert not (tmp_path / ".x.png.lock").exists()


def test_an_image_over_the_pixel_limit_is_skipped_and_listed(tmp_path):
    from studio.limits import ImageTooLargeError, open_image
    from studio.training.data import scan_folder

    folder = tmp_path / "refs"
    write_reference_folder(folder, n=2, seed=1, shape="star", trigger="sks")
    bomb(folder / "huge.png")
    assert (folder / "huge.png").stat().st_size < 400
    scan = scan_folder(folder)
    assert len(scan.items) == 2
    assert [(p.name, "limit" in why) for p, why in scan.skipped] == [("huge.png", True)]
    with pytest.raises(ImageTooLargeError, match="9000x9000"):
        open_image(bomb(tmp_path / "smaller.png", 9000))  # over studio's limit, under PIL's own


def test_a_batch_with_a_bad_job_finishes_the_others_and_its_progress(tmp_path):
    from studio.library import Library
    from studio.training.batch import train_batch

    parent = tmp_path / "concepts"
    write_reference_folder(parent / "star", n=2, seed=3, shape="star", trigger="star")
    (parent / "bomb").mkdir()
    bomb(parent / "bomb" / "huge.png")
    seen = []
    jobs = {j["name"]: j for j in train_batch(parent, tmp_path / "out", library=Library(tmp_path / "lib.db"),
                                               recipe=GENERIC, steps=2, batch=2, rank=2, log=lambda line: None,
                                               progress=lambda done, total: seen.append((done, total)))}
    assert jobs["star"]["status"] == "done" and jobs["bomb"]["status"] == "failed"
    assert "huge.png" in jobs["bomb"]["error"] and "limit" in jobs["bomb"]["error"]
    assert seen[-1][0] == seen[-1][1]  # the bar reaches its end


def test_a_second_batch_driver_leaves_held_jobs_to_the_first(tmp_path):
    from studio.library import Library
    from studio.training.batch import train_batch

    parent = tmp_path / "concepts"
    write_reference_folder(parent / "star", n=2, seed=3, shape="star", trigger="star")
    write_reference_folder(parent / "heart", n=2, seed=4, shape="heart", trigger="heart")
    holder = hold(tmp_path / "out" / "star.safetensors")  # the first driver, training star
    try:
        lines = []
        jobs = {j["name"]: j for j in train_batch(parent, tmp_path / "out", library=Library(tmp_path / "lib.db"),
                                                   recipe=GENERIC, steps=1, batch=2, rank=2, log=lines.append)}
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert jobs["heart"]["status"] == "done" and jobs["star"]["status"] != "failed"
    assert not (tmp_path / "out" / "star.safetensors").exists()
    assert any("[star] skipped" in line and f"pid {holder.pid}" in line for line in lines)


def test_a_pickle_under_a_safetensors_name_is_called_a_pickle(tmp_path):
    import torch
    from studio.adapters.base import load_adapter

    from studio.errors import UnsafeFileError

    path = tmp_path / "x.safetensors"
    torch.save({"a": torch.zeros(2)}, path)
    with pytest.raises(UnsafeFileError, match="pickle file.*torch.save file under a .safetensors name"):
        load_adapter(path)
