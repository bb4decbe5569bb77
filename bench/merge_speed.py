"""Merge speed: 8 rank-32 LoRAs on SDXL's UNet attention projections, studio vs peft.

The modules and shapes come from SDXL-base's UNet config (built on the meta device, so no weights
are needed); the factors are random. Each method runs on the same inputs; time and peak resident
memory above the inputs are measured in one run, side by side with peft's `add_weighted_adapter`
(its `svd` and `ties` combinations; peft applies TIES to the A and B factors separately, so its
result is also compared with the TIES of the changes themselves).

    .venv/bin/python bench/merge_speed.py            # ~10 min on 2 CPU cores (peft's dense SVDs)
    .venv/bin/python bench/merge_speed.py --stride 4    # every 4th module (~4 min)
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import torch

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def sdxl_attention_shapes() -> dict[str, tuple[int, int]]:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel(**SDXL_UNET)
    return {f"unet.{name}": tuple(m.weight.shape) for name, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear) and name.endswith(TARGETS) and ".attn" in name}


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 2 ms."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()

    @staticmethod
    def _rss() -> int:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    @property
    def extra(self) -> int:
        return self.peak - self.base


def random_loras(shapes: dict[str, tuple[int, int]], n: int, rank: int):
    from studio.deltas import LowRank

    g = torch.Generator().manual_seed(0)
    return [{name: LowRank(up=torch.randn(out, rank, generator=g) * 0.01, down=torch.randn(rank, inp, generator=g) * 0.01,
                           alpha=float(rank)) for name, (out, inp) in shapes.items()} for _ in range(n)]


def studio_run(loras, weights, method: str, rank: int | None, **params):
    """studio's merge of the per-module deltas, stored at `rank` (what `studio merge --rank` writes)."""
    from studio.merge.engine import merge_deltas

    return merge_deltas(loras, weights, method, rank=rank, **params)[0]


def peft_model(shapes: dict[str, tuple[int, int]], loras, rank: int):
    """A model of Linear layers with these names and shapes (uninitialised weights: peft's merges never
    read them), with the LoRAs loaded as peft adapters through peft's public API."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    root = torch.nn.Module()
    for name, (out, inp) in shapes.items():
        parent = root
        parts = name.split(".")
        for part in parts[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(parts[-1], torch.nn.Linear(inp, out, bias=False, device="meta").to_empty(device="cpu"))
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(shapes))
    model = get_peft_model(root, config, adapter_name="a0")
    for i, lora in enumerate(loras):
        if i:
            model.add_adapter(f"a{i}", config)
        state = {}
        for name, low in lora.items():
            state[f"base_model.model.{name}.lora_A.weight"] = low.down
            state[f"base_model.model.{name}.lora_B.weight"] = low.up
        set_peft_model_state_dict(model, state, adapter_name=f"a{i}")
    return model


def peft_factors(model, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    out = {}
    for module_name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and adapter in module.lora_A:
            out[module_name] = (module.lora_B[adapter].weight.detach(), module.lora_A[adapter].weight.detach(),
                                module.scaling[adapter])
    return out


def relative_error(got: dict, want_fn) -> float:
    num = den = 0.0
    for name, dense in got.items():
        want = want_fn(name)
        num += float((dense - want).square().sum())
        den += float(want.square().sum())
    return (num / den) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--target-rank", type=int, default=64)
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--modules", type=int, default=0, help="only the first N modules (0 = all)")
    parser.add_argument("--stride", type=int, default=1, help="every k-th module (a uniform sample of the UNet)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    shapes = sdxl_attention_shapes()
    shapes = dict(list(shapes.items())[:: args.stride])
    if args.modules:
        shapes = dict(list(shapes.items())[: args.modules])
    loras = random_loras(shapes, args.adapters, args.rank)
    weights = [1.0 / args.adapters] * args.adapters
    input_bytes = sum(low.up.numel() + low.down.numel() for lora in loras for low in lora.values()) * 4
    print(f"{len(shapes)} SDXL attention modules, {args.adapters} LoRAs of rank {args.rank}: inputs "
          f"{input_bytes / 2**20:.0f} MiB", flush=True)

    def exact_sum(name):
        return sum(w * lora[name].dense() for lora, w in zip(loras, weights, strict=True))

    rows = []

    def timed(label, fn):
        with PeakRSS() as peak:
            start = time.perf_counter()
            result = fn()
            seconds = time.perf_counter() - start
        rows.append([label, seconds, peak.extra / 2**20])
        print(f"{label}: {seconds:.2f} s, +{peak.extra / 2**20:.0f} MiB", flush=True)
        return result

    linear = timed("studio linear (exact, rank-stacked)", lambda: studio_run(loras, weights, "linear", None))
    rows[-1].append(relative_error({n: d.dense() for n, d in linear.items()}, exact_sum))
    svd = timed(f"studio svd -> rank {args.target_rank}", lambda: studio_run(loras, weights, "svd", args.target_rank))
    rows[-1].append(relative_error({n: d.dense() for n, d in svd.items()}, exact_sum))
    ties = timed(f"studio ties (density {args.density}) -> rank {args.target_rank}",
                 lambda: studio_run(loras, weights, "ties", args.target_rank, density=args.density))
    from studio.merge.methods import merge_ties

    def true_ties(name):
        return merge_ties([lora[name] for lora in loras], weights, density=args.density).dense()

    rows[-1].append(relative_error({n: d.dense() for n, d in ties.items()}, true_ties))

    model = peft_model(shapes, loras, args.rank)
    weight_list = list(weights)
    names = [f"a{i}" for i in range(args.adapters)]
    timed(f"peft svd -> rank {args.target_rank}", lambda: model.add_weighted_adapter(
        names, weight_list, "peft_svd", combination_type="svd", svd_rank=args.target_rank))
    got = {n: (b @ a) * s for n, (b, a, s) in peft_factors(model, "peft_svd").items()}
    rows[-1].append(relative_error(got, exact_sum))
    timed(f"peft ties (density {args.density})", lambda: model.add_weighted_adapter(
        names, weight_list, "peft_ties", combination_type="ties", density=args.density))
    got = {n: (b @ a) * s for n, (b, a, s) in peft_factors(model, "peft_ties").items()}
    rows[-1].append(relative_error(got, true_ties))

    print(f"\n{'method':<36} {'seconds':>8} {'peak MiB':>9} {'rel. error':>11}")
    for label, seconds, mib, error in rows:
        print(f"{label:<36} {seconds:>8.2f} {mib:>9.0f} {error:>11.4f}")
    print("(error: svd/linear against the exact weighted sum; ties against TIES of the changes themselves)")
    print(f"inputs {input_bytes / 2**20:.0f} MiB; svd speed-up over peft: {rows[3][1] / rows[1][1]:.1f}x")


if __name__ == "__main__":
    main()
