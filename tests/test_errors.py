"""Bad input: each a StudioError subclass whose message names the input and the fix."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from studio.pipelines import StudioPipeline

from studio.backbones import load_backbone, resolve_dtype
from studio.errors import (
    BackboneNotFoundError,
    InvalidArgumentError,
    InvalidSizeError,
    NotACheckpointError,
    StudioError,
    UnknownFamilyError,
    UnknownSchedulerError,
    UnsafeFileError,
)


def test_unreachable_hub_id_offline_fails_fast_naming_the_id():
    code = ("from studio.backbones import load_backbone\n"
            "from studio.errors import BackboneNotFoundError\n"
            "try:\n    load_backbone('nobody-here/no-such-model')\n"
            "except BackboneNotFoundError as e:\n    print('ERR', e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    start = time.monotonic()
    # the timeout catches a hang (the failure this guards against), it is not a speed target
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert "ERR hub id 'nobody-here/no-such-model'" in done.stdout, done.stderr
    assert "HF_HUB_OFFLINE=1" in done.stdout and "hf download nobody-here/no-such-model" in done.stdout
    assert elapsed < 120


def test_missing_source_lists_the_embedded_names(tmp_path):
    with pytest.raises(BackboneNotFoundError, match=r"tiny-sd1"):
        load_backbone(str(tmp_path / "nothing-here"))


def test_files_that_are_no_checkpoint(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, not tensors")
    with pytest.raises(NotACheckpointError, match="notes.safetensors"):
        load_backbone(str(text))
    empty_dir = tmp_path / "folder"
    empty_dir.mkdir()
    with pytest.raises(NotACheckpointError, match="model_index.json"):
        load_backbone(str(empty_dir))
    other = tmp_path / "other.txt"
    other.write_text("x")
    with pytest.raises(NotACheckpointError):
        load_backbone(str(other))


def test_a_lora_file_is_not_taken_for_a_backbone(tmp_path):
    import torch
    from safetensors.torch import save_file

    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, lora)
    with pytest.raises(NotACheckpointError, match="LoRA"):
        load_backbone(str(lora))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_files_are_refused_with_how_to_convert(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsafeFileError, match="safetensors") as info:
        load_backbone(str(path))
    assert f"model{suffix}" in str(info.value)


def test_unknown_family_and_dtype():
    with pytest.raises(UnknownFamilyError, match="sd1, sd2, sdxl, sd3, flux, pixart"):
        load_backbone("tiny-sd1", family="sd4")
    with pytest.raises(InvalidArgumentError, match="fp16"):
        resolve_dtype("int8", "cpu", None)


@pytest.fixture(scope="module")
def sd1(backbones):
    return StudioPipeline(backbones("sd1"))


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"width": 60}, InvalidSizeError, r"width=60 must be a positive multiple of 8 .* \(e\.g\. 56 or 64\)"),
    ({"height": 0}, InvalidSizeError, r"height=0"),
    ({"n": 0}, InvalidArgumentError, r"n=0 must be a whole number >= 1"),
    ({"steps": 0}, InvalidArgumentError, r"steps=0"),
    ({"seed": -1}, InvalidArgumentError, r"seed=-1"),
    ({"guidance": float("nan")}, InvalidArgumentError, r"guidance=nan"),
    ({"scheduler": "dpm_fast"}, UnknownSchedulerError, r"scheduler='dpm_fast' is not known; choose one of ddim"),
    ({"scheduler": "flow_euler"}, UnknownSchedulerError, r"flow sampler but this backbone is trained for discrete"),
])
def test_bad_generation_arguments(sd1, kwargs, error, message):
    with pytest.raises(error, match=message):
        sd1.generate("a star", **({"steps": 1} | kwargs))


def test_dit_size_factor_is_its_own(backbones):
    with pytest.raises(InvalidSizeError, match=r"multiple of 16"):
        StudioPipeline(backbones("sd3")).generate("x", width=72, height=64, steps=1)
    with pytest.raises(UnknownSchedulerError, match="discrete sampler"):
        StudioPipeline(backbones("sd3")).generate("x", scheduler="ddim", steps=1)


def test_flux_refuses_a_negative_prompt(backbones):
    with pytest.raises(InvalidArgumentError, match="guidance-distilled"):
        StudioPipeline(backbones("flux")).generate("x", negative_prompt="blurry", steps=1)


def test_errors_are_also_builtin_errors():
    assert issubclass(InvalidSizeError, ValueError) and issubclass(InvalidSizeError, StudioError)
    assert issubclass(BackboneNotFoundError, FileNotFoundError)
