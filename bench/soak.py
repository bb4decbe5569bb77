"""Soak: kill `studio train`, `studio train-batch` and `studio erase` at random moments, run the same command
again, and check that every run finished, every output (both of the batch's adapters) is bit-identical to an
uninterrupted run's (tensors and metadata, the creation dates aside), and nothing was left stuck (no
checkpoint, trash, temporary file or lock beside the outputs).

    python bench/soak.py [--kills 20] [--seed 0]

Each command runs in its own process (SIGKILL to its process group, as a crash or an OOM kill does) on
world-sd with short runs, in a scratch folder with its own STUDIO_HOME; the uncut runs go first and time the
window the kills are drawn from. Prints one line per kill and a table per command.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from studio.world.folder import write_reference_folder

STUDIO = [sys.executable, "-m", "studio.cli"]
COMMANDS = {
    "train": (["train", "refs", "--recipe", "any/lora", "--steps", "40", "--rank", "2", "--batch", "2",
               "--config", "every5.yaml", "--out", "soak-train.safetensors"], ["--resume"], ["soak-train.safetensors"]),
    "train-batch": (["train-batch", "concepts", "--out", "batch", "--recipe", "any/lora", "--steps", "20",
                     "--rank", "2"], [], ["batch/star.safetensors", "batch/heart.safetensors"]),
    "erase": (["erase", "circle", "--method", "esd", "--steps", "30", "--out", "soak-erase.safetensors"], [],
              ["soak-erase.safetensors"]),
}


def setup(folder: Path) -> None:
    write_reference_folder(folder / "refs", n=3, seed=1, shape="star", trigger="sks")
    write_reference_folder(folder / "concepts" / "star", n=2, seed=2, shape="star", trigger="star")
    write_reference_folder(folder / "concepts" / "heart", n=2, seed=3, shape="heart", trigger="heart")
    (folder / "every5.yaml").write_text("checkpoint_every: 5\n")


def clean(folder: Path, outputs: list[str]) -> None:
    import shutil

    for name in outputs:
        for path in (folder / name).parent.glob(f"{Path(name).stem}*"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(folder / "home", ignore_errors=True)  # the batch's job list


def run(folder: Path, args: list[str], *, kill_after: float | None = None) -> tuple[int, str, float]:
    env = dict(os.environ, STUDIO_HOME=str(folder / "home"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    started = time.monotonic()
    process = subprocess.Popen([*STUDIO, *args], cwd=folder, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return -9, output, time.monotonic() - started
    return process.returncode, output, time.monotonic() - started


def digests(folder: Path, outputs: list[str]) -> dict[str, str | None]:
    """Per output: a hash of its tensors' bytes and its metadata, less the two creation dates (the manifest's
    `created` and modelspec's `date`, which differ between any two runs)."""
    import json

    from safetensors import safe_open

    def digest(path: Path) -> str:
        hasher = hashlib.sha256()
        with safe_open(str(path), framework="pt") as handle:
            for key in sorted(handle.keys()):
                hasher.update(key.encode() + handle.get_tensor(key).numpy().tobytes())
            metadata = dict(handle.metadata() or {})
        metadata.pop("modelspec.date", None)
        for key, value in sorted(metadata.items()):  # a HashMap on the Rust side: any order
            if value.startswith("{"):
                value = json.dumps({k: v for k, v in json.loads(value).items() if k != "created"}, sort_keys=True)
            hasher.update(f"{key}={value}".encode())
        return hasher.hexdigest()

    return {name: digest(folder / name) if (folder / name).is_file() else None for name in outputs}


def stuck(folder: Path) -> list[str]:
    """Files a finished command must not leave: checkpoints, trash, temporary files, locks."""
    marks = (".checkpoint", ".trash-", ".tmp", ".lock", ".studio-probe-")
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if any(m in p.name for m in marks) and "home" not in p.parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    folder = Path(tempfile.mkdtemp(prefix="studio-soak-"))
    setup(folder)
    reference, window = {}, {}
    for name, (command, _, outputs) in COMMANDS.items():
        clean(folder, outputs)
        code, output, seconds = run(folder, command)
        assert code == 0, output[-2000:]
        reference[name], window[name] = digests(folder, outputs), seconds
        print(f"uncut {name}: {seconds:.1f} s", flush=True)
    results = {name: [] for name in COMMANDS}
    for i in range(args.kills):
        name = list(COMMANDS)[i % len(COMMANDS)]
        command, again, outputs = COMMANDS[name]
        clean(folder, outputs)
        at = rng.uniform(0.5, window[name])
        code, _, _ = run(folder, command, kill_after=at)
        tries, finished = 0, code == 0
        while not finished and tries < 3:  # the same command (train: with --resume) until it ends
            tries += 1
            code, output, _ = run(folder, [*command, *again])
            finished = code == 0 or (code == 2 and "exists" in output and all(digests(folder, outputs).values()))
            if not finished:
                print(f"  rerun {tries} of {name} exited {code}: {output.strip().splitlines()[-1:]}", flush=True)
        same = digests(folder, outputs) == reference[name]
        left = stuck(folder)
        results[name].append((finished, same, not left))
        print(f"kill {i + 1:>2}: {name:<11} at {at:5.1f} s of {window[name]:.1f}: "
              f"{'killed' if code != 0 or tries else 'ended first'}, reruns {tries}, finished {finished}, "
              f"bit-identical {same}, left {left or 'nothing'}", flush=True)
    print(f"\n{'command':<12} {'kills':>5} {'finished':>9} {'identical':>10} {'nothing left':>13}")
    for name, rows in results.items():
        print(f"{name:<12} {len(rows):>5} {sum(r[0] for r in rows):>9} {sum(r[1] for r in rows):>10} "
              f"{sum(r[2] for r in rows):>13}")


if __name__ == "__main__":
    main()
