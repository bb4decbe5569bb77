"""File formats: the original single-file layouts A1111/ComfyUI read, from diffusers modules.

diffusers reads these layouts (`from_single_file`) but cannot write them; its conversion scripts
live outside the package and assume full-size SD shapes. Here the diffusers -> original key map is
derived from each model's config, so it serves any size of SD1.x/SDXL UNet and VAE, tiny ones
included, and reuses diffusers' own fixed-name tables. Adapter formats join this module later.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.errors import InvalidArgumentError
from studio.home import atomic_write_bytes

if TYPE_CHECKING:
    import torch

    from studio.backbones import Backbone

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# where each family's text encoders sit in the original layout, and whether they are OpenCLIP
TEXT_ENCODERS = {
    "sd1": {"text_encoder": ("cond_stage_model.transformer.", "clip")},
    "sd2": {"text_encoder": ("cond_stage_model.model.", "openclip")},
    "sdxl": {"text_encoder": ("conditioner.embedders.0.transformer.", "clip"),
             "text_encoder_2": ("conditioner.embedders.1.model.", "openclip")},
}
_RESNET_TO_LDM = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                  ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))


def _ldm_tables() -> dict[str, Any]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    return DIFFUSERS_TO_LDM_MAPPING


def _rename_resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return dict(_RESNET_TO_LDM).get(head, head) + "." + tail


def unet_to_ldm(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel weights in the original `model.diffusion_model.*` layout."""
    per_block = config.layers_per_block
    if not isinstance(per_block, int):
        raise InvalidArgumentError("layers_per_block differs per block; the original layout has one number.")
    stride = per_block + 1  # input/output blocks per diffusers block
    fixed = dict(_ldm_tables()["unet"]["layers"])
    if config.addition_embed_type == "text_time":
        fixed |= _ldm_tables()["unet"]["addition_embed_type"]
    up_has_attention = ["CrossAttn" in kind for kind in config.up_block_types]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key in fixed:
            new = fixed[key]
        elif m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            side, i, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            part = f"0.{_rename_resnet(rest)}" if kind == "resnets" else f"1.{rest}"
            # input block 0 is conv_in; output blocks start at 0
            new = f"input_blocks.{1 + i * stride + j}.{part}" if side == "down" else \
                f"output_blocks.{i * stride + j}.{part}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{1 + int(m[1]) * stride + per_block}.0.op.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_rename_resnet(m[2])}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            i = int(m[1])
            new = f"output_blocks.{i * stride + per_block}.{2 if up_has_attention[i] else 1}.conv.{m[2]}"
        else:
            raise InvalidArgumentError(f"UNet weight {key!r} has no place in the original SD layout.")
        out[UNET_PREFIX + new] = tensor
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """AutoencoderKL weights in the original `first_stage_model.*` layout (1x1-conv attention)."""
    fixed = _ldm_tables()["vae"]  # diffusers name -> original name
    n_up = len(config.up_block_types)
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key in fixed:
            new = fixed[key]
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            # the original decoder numbers its levels from the bottom
            new = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{attention[m[2]]}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm":
                tensor = tensor[:, :, None, None]  # (out, in) linear -> (out, in, 1, 1) conv
        else:
            raise InvalidArgumentError(f"VAE weight {key!r} has no place in the original SD layout.")
        out[VAE_PREFIX + new] = tensor
    return out


def clip_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP text model's weights under transformers' classic `text_model.*` names.

    transformers >= 5.6 dropped the `text_model.` level from CLIPTextModel; every file format in the
    field (and CLIPTextModelWithProjection) still has it.
    """
    return {k if k.startswith("text_model.") or k == "text_projection.weight" else f"text_model.{k}": v
            for k, v in state.items() if not k.endswith("position_ids")}


def clip_to_openclip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model in OpenCLIP's layout (fused q/k/v, `resblocks`), under `prefix`."""
    import torch

    out: dict[str, torch.Tensor] = {}
    fixed = _ldm_tables()["openclip"]["layers"]
    renames = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
               ("self_attn.out_proj", "attn.out_proj"))
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in clip_keys(state).items():
        if key in fixed:
            out[prefix + fixed[key]] = tensor.T.contiguous() if key == "text_projection.weight" else tensor
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            fused.setdefault(f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", {})[m[2]] = tensor
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key):
            rest = m[2]
            for old, new in renames:
                rest = rest.replace(old, new)
            out[f"{prefix}transformer.resblocks.{m[1]}.{rest}"] = tensor
        else:
            raise InvalidArgumentError(f"text encoder weight {key!r} has no place in OpenCLIP's layout.")
    for name, parts in fused.items():
        out[prefix + name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def backbone_to_single_file(backbone: Backbone) -> dict[str, torch.Tensor]:
    """A UNet-family backbone's weights as one original-layout state dict (A1111/ComfyUI checkpoint)."""
    family = backbone.family.name
    if family not in TEXT_ENCODERS:
        raise InvalidArgumentError(
            f"single-file export is available for {', '.join(TEXT_ENCODERS)}; {family} saves as a diffusers folder."
        )
    pipe = backbone.pipe
    state = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config)
    state |= vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config)
    for attr, (prefix, layout) in TEXT_ENCODERS[family].items():
        encoder_state = getattr(pipe, attr).state_dict()
        if layout == "clip":
            state |= {prefix + k: v for k, v in clip_keys(encoder_state).items()}
        else:
            state |= clip_to_openclip(encoder_state, prefix)
    return state


def save_single_file(backbone: Backbone, path: str | Path, *, metadata: dict[str, str] | None = None) -> Path:
    """Write the backbone as one original-layout .safetensors file (atomically)."""
    from safetensors.torch import save

    state = {k: v.detach().to("cpu").contiguous() for k, v in backbone_to_single_file(backbone).items()}
    meta = {"modelspec.architecture": f"studio/{backbone.family.name}", "studio.family": backbone.family.name,
            "studio.source": json.dumps(backbone.source)} | (metadata or {})
    path = Path(path)
    atomic_write_bytes(path, save(state, metadata=meta))
    return path
