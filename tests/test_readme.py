"""Every code block of the README runs verbatim: a promise in the README is a test.

Blocks run in README order in one scratch folder (so a block may use the files an earlier one made), with
`assets/` linked there so the README's `assets/world/...` paths resolve, `studio` on PATH and an isolated
STUDIO_HOME. A block that cannot run here says why in its fence (```bash no-run: needs a download```):
set-up commands, hub downloads, a user's own checkpoints, servers. The adapters the Merging and API
examples use are the ones the CLI block trains (short runs on world-sd).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```$", re.S | re.M)


def blocks(text: str) -> list[tuple[int, str, str, str]]:
    """(line, language, info after the language, code) of every fenced block."""
    return [(text[: m.start()].count("\n") + 1, m.group(1), m.group(2).strip(), m.group(3))
            for m in FENCE.finditer(text)]


README = blocks((ROOT / "README.md").read_text())
RUNNABLE = [b for b in README if b[1] in ("bash", "python") and not b[2].startswith("no-run")]


def test_every_block_runs_or_says_why_not():
    for line, language, info, _ in README:
        assert language in ("bash", "python", "text"), f"README line {line}: fence language {language!r}"
        if info:
            assert re.fullmatch(r"no-run: \S.{8,}", info), f"README line {line}: {info!r} (no-run: <why>)"
    # the blocks that must never stop running: plain diffusers on the world folders, the API, the CLI
    runnable = "\n".join(code for *_, code in RUNNABLE)
    for promise in ("StableDiffusionPipeline.from_pretrained(\"assets/world/world-sd\"",
                    "StableDiffusion3Pipeline.from_pretrained(\"assets/world/world-dit\"",
                    "studio.StudioPipeline(", "studio generate ", "studio train "):
        assert promise in runnable, promise


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    (folder / "assets").symlink_to(ROOT / "assets")
    return folder


def _env(folder: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", HF_HUB_OFFLINE="1",
                STUDIO_HOME=str(folder / "home"), PYTHONUNBUFFERED="1")


@pytest.mark.parametrize("line,language,code", [(b[0], b[1], b[3]) for b in RUNNABLE],
                         ids=[f"line{b[0]}-{b[1]}" for b in RUNNABLE])
def test_readme_block_runs_verbatim(scratch, line, language, code):
    command = [sys.executable, "-c", code] if language == "python" else ["bash", "-euo", "pipefail", "-c", code]
    done = subprocess.run(command, cwd=scratch, env=_env(scratch), capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"README block at line {line} failed:\n{code}\n---\n{done.stdout[-3000:]}\n" \
                                 f"{done.stderr[-3000:]}"


def test_the_teach_a_shape_flow_draws_the_held_out_shape(scratch):
    """The README's flow (render 12 stars, `studio train refs/ --kind lora` with the shipped recipe) raises how
    often "a ... sks star" prompts draw a star, read by the evaluator on bench/customize.py's 64 samples (its seed)
    before and after: the base model draws about 1 in 30; the README's 12 renders give about 2 in 10 at this
    sampling (bench/customize.py's renders about 4 in 10: README Benchmarks, where the recipe's miss is told)."""
    from studio.pipelines import StudioPipeline

    from studio.backbones import load_backbone
    from studio.world.fidelity import fidelity

    adapter = scratch / "sks.safetensors"
    assert adapter.is_file(), "the README's CLI block trains sks.safetensors; run this file whole"
    backbone = load_backbone("world-sd")
    settings = dict(n=64, seed=4321, steps=25, guidance=backbone.family.guidance, trigger="sks", shape="star")
    before = fidelity(backbone.pipe, **settings)["accuracy"]["shape"]
    pipeline = StudioPipeline(backbone)
    pipeline.attach(str(adapter))
    after = fidelity(backbone.pipe, **settings)["accuracy"]["shape"]
    pipeline.detach()
    assert after >= before + 0.15, (before, after)
