"""LoRA files in the layouts of the field, read into per-module deltas and written back out.

Read: diffusers/PEFT (`unet.<module>.lora_A.weight`), kohya sd-scripts for A1111/ComfyUI
(`lora_unet_*` / `lora_te[12]_*` with `.lora_down/.lora_up/.alpha`, LoCon convs; SD1 files use
diffusers module names, SDXL files the original LDM names), LyCORIS LoHa (`hada_w1_a`...) and LoKr
(`lokr_w1`...) as dense deltas, and for Flux/SD3 whatever diffusers' own converters read (BFL/kohya
fused-qkv files). Write: kohya and diffusers.

Names are matched against a table built from the backbone's own modules, so any size of a known
architecture works and every key that fits nothing is reported.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from studio import concept_tokens
from studio.adapters.base import AdapterFileError, UnknownKeysError, module_table
from studio.deltas import Delta, Dense, LowRank
from studio.home import atomic_path

if TYPE_CHECKING:
    import torch

    from studio.adapters.lora import LoraAdapter
    from studio.backbones import Backbone

LYCORIS_KEYS = ("hada_", "lokr_")
UNSUPPORTED = ("dora_scale", "hada_t1", "hada_t2", "lokr_t2", ".diff", "on_input")


def kohya_names(backbone: Backbone) -> dict[str, list[str]]:
    """studio module name -> its kohya names (without suffix), the one kohya writes first: SDXL's
    UNet under the original LDM names, SD1/SD2's under diffusers names; text encoders as `lora_te`
    (one encoder) or `lora_te1` / `lora_te2`; DiTs as `lora_transformer_` (OneTrainer, SimpleTuner)."""
    from studio.formats import unet_to_ldm

    modules = module_table(backbone)
    unet_paths = [n.split(".", 1)[1] for n in modules if n.startswith("unet.")]
    ldm: dict[str, str] = {}
    if unet_paths and backbone.family.name in ("sd1", "sd2", "sdxl"):
        order = {f"{p}.weight": i for i, p in enumerate(unet_paths)}
        mapped = unet_to_ldm(order, backbone.pipe.unet.config)  # {"model.diffusion_model.<ldm>.weight": i}
        ldm = {unet_paths[i]: key.split(".", 2)[2].removesuffix(".weight") for key, i in mapped.items()}
    two_encoders = "text_encoder_2" in backbone.pipe.components and backbone.pipe.text_encoder_2 is not None
    names: dict[str, list[str]] = {}
    for name in modules:
        component, path = name.split(".", 1)
        flat = path.replace(".", "_")
        if component == "unet":
            candidates = ["lora_unet_" + flat]
            if path in ldm:
                ldm_name = "lora_unet_" + ldm[path].replace(".", "_")
                candidates = [ldm_name, *candidates] if backbone.family.name == "sdxl" else [*candidates, ldm_name]
        elif component == "transformer":
            candidates = ["lora_transformer_" + flat, "lora_unet_" + flat]
        else:
            classic = path if path.startswith("text_model.") or path == "text_projection" else f"text_model.{path}"
            prefixes = {"text_encoder": ["lora_te1", "lora_te"] if two_encoders else ["lora_te", "lora_te1"],
                        "text_encoder_2": ["lora_te2"]}.get(component, [])
            candidates = [f"{prefix}_{classic.replace('.', '_')}" for prefix in prefixes]
        names[name] = candidates
    return names


def _alpha(tensors: dict[str, torch.Tensor], base: str, rank: int) -> float:
    value = tensors.get(f"{base}.alpha")
    return float(value) if value is not None else float(rank)


def _lycoris_delta(t: dict[str, torch.Tensor], base: str, shape: tuple[int, ...]) -> Dense:
    """LoHa: ΔW = (w1a w1b) ⊙ (w2a w2b) · alpha/r (Hyeon-Woo et al. 2022, FedPara); LoKr: ΔW =
    w1 ⊗ w2 · alpha/r, either factor possibly itself low-rank (LyCORIS, arXiv:2309.14859)."""
    import torch

    if f"{base}.hada_w1_a" in t:
        w1 = t[f"{base}.hada_w1_a"].float() @ t[f"{base}.hada_w1_b"].float()
        w2 = t[f"{base}.hada_w2_a"].float() @ t[f"{base}.hada_w2_b"].float()
        rank = t[f"{base}.hada_w1_b"].shape[0]
        return Dense((w1 * w2 * _alpha(t, base, rank) / rank).view(shape))
    factors, rank = [], None
    for side in ("w1", "w2"):
        if f"{base}.lokr_{side}" in t:
            factors.append(t[f"{base}.lokr_{side}"].float())
        else:
            a, b = t[f"{base}.lokr_{side}_a"].float(), t[f"{base}.lokr_{side}_b"].float()
            rank = a.shape[1]
            factors.append((a @ b.flatten(1)).view(a.shape[0], *b.shape[1:]))
    w1, w2 = factors
    scale = _alpha(t, base, rank) / rank if rank else 1.0
    if w2.dim() == 4 and w1.dim() == 2:
        w1 = w1[:, :, None, None]
    return Dense((torch.kron(w1, w2) * scale).reshape(shape))


def read_foreign(tensors: dict[str, torch.Tensor], metadata: dict[str, str], backbone: Backbone, *,
                 allow_partial: bool = False, source: str = "") -> tuple[dict[str, Delta], dict[str, torch.Tensor], str]:
    """(deltas, DoRA magnitudes, layout name) of a file another tool wrote; keys that fit no module
    of the backbone raise `UnknownKeysError` listing them, unless `allow_partial`."""
    if any(k.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for k in tensors):
        deltas, used, layout = _read_kohya(tensors, backbone)
        magnitudes: dict[str, torch.Tensor] = {}
    else:
        if backbone.family.name in ("flux", "sd3") and not any(".lora_A." in k for k in tensors):
            tensors = _diffusers_conversion(tensors, backbone, source)
        deltas, magnitudes, used = _read_peft(tensors, metadata, backbone)
        layout = "diffusers"
    unknown = sorted(set(tensors) - used)
    if not deltas:
        raise AdapterFileError(f"{source or 'the file'} holds no LoRA tensors studio can place on {backbone.source!r} "
                               f"({len(tensors)} keys, e.g. {sorted(tensors)[:2]}); is it a LoRA for "
                               f"{backbone.family.name}?")
    if unknown and not allow_partial:
        raise UnknownKeysError(
            f"{source or 'the file'}: {len(unknown)} of {len(tensors)} keys match no module of {backbone.source!r} "
            f"({backbone.family.name}), e.g. {unknown[:4]}. It may be for another model; pass allow_partial=True "
            f"(--allow-partial) to load the {len(deltas)} modules that do match."
        )
    return deltas, magnitudes, layout


def _read_kohya(tensors: dict[str, torch.Tensor], backbone: Backbone) -> tuple[dict[str, Delta], set[str], str]:
    table = {kohya: name for name, candidates in kohya_names(backbone).items() for kohya in candidates}
    modules = module_table(backbone)
    deltas: dict[str, Delta] = {}
    used: set[str] = set()
    layout = "kohya"
    bases = sorted({k.split(".", 1)[0] for k in tensors})
    for base in bases:
        name = table.get(base)
        keys = [k for k in tensors if k.split(".", 1)[0] == base]
        if name is None or any(u in k for k in keys for u in UNSUPPORTED):
            continue
        shape = tuple(modules[name].weight.shape)
        if f"{base}.lora_down.weight" in tensors:
            down, up = tensors[f"{base}.lora_down.weight"], tensors[f"{base}.lora_up.weight"]
            deltas[name] = LowRank(up=up.float(), down=down.float(), alpha=_alpha(tensors, base, down.shape[0]))
        elif any(f"{base}.{p}" in " ".join(keys) for p in LYCORIS_KEYS):
            deltas[name] = _lycoris_delta(tensors, base, shape)
            layout = "lycoris"
        else:
            continue
        if tuple(deltas[name].shape) != shape:
            del deltas[name]
            continue
        used.update(keys)
    return deltas, used, layout


def _read_peft(tensors: dict[str, torch.Tensor], metadata: dict[str, str],
               backbone: Backbone) -> tuple[dict[str, Delta], dict[str, torch.Tensor], set[str]]:
    modules = module_table(backbone)
    alphas = _peft_alphas(metadata)
    deltas: dict[str, Delta] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key in tensors:
        m = re.fullmatch(r"(.+)\.lora_A(?:\.default)?\.weight", key)
        if not m:
            continue
        name = m[1]
        up_key = next((k for k in (f"{name}.lora_B.weight", f"{name}.lora_B.default.weight") if k in tensors), None)
        if name not in modules or up_key is None:
            continue
        down, up = tensors[key].float(), tensors[up_key].float()
        alpha = alphas(name, down.shape[0], tensors.get(f"{name}.alpha"))
        delta = LowRank(up=up, down=down, alpha=alpha)
        if tuple(delta.shape) != tuple(modules[name].weight.shape):
            continue
        deltas[name] = delta
        used.update({key, up_key, f"{name}.alpha"} & set(tensors))
        for magnitude_key in (f"{name}.lora_magnitude_vector", f"{name}.lora_magnitude_vector.weight"):
            if magnitude_key in tensors:
                magnitudes[name] = tensors[magnitude_key].float()
                used.add(magnitude_key)
    if magnitudes:  # studio keeps DoRA's scale folded only when alpha = rank
        deltas = {n: d.folded() for n, d in deltas.items()}
    return deltas, magnitudes, used


def _peft_alphas(metadata: dict[str, str]):
    """alpha(module name, rank, alpha tensor or None) from diffusers' `lora_adapter_metadata` (a
    PEFT LoraConfig per component) or a per-module `.alpha` tensor; else alpha = rank."""
    configs = {}
    if "lora_adapter_metadata" in metadata:
        raw = json.loads(metadata["lora_adapter_metadata"])
        configs = {k.split(".")[0]: v for k, v in raw.items()} if all(isinstance(v, dict) for v in raw.values()) \
            else {"": raw}

    def alpha(name: str, rank: int, tensor) -> float:
        if tensor is not None:
            return float(tensor)
        component, path = name.split(".", 1)
        config = configs.get(component) or configs.get("")
        if not config:
            return float(rank)
        for pattern, value in (config.get("alpha_pattern") or {}).items():
            if re.fullmatch(rf"(.*\.)?{pattern}", path):
                return float(value)
        return float(config.get("lora_alpha") or rank)

    return alpha


def _diffusers_conversion(tensors: dict[str, torch.Tensor], backbone: Backbone, source: str) -> dict[str, torch.Tensor]:
    """Flux/SD3 files in BFL, kohya or XLabs layouts through diffusers' own converters (they split
    fused qkv projections, which a name table cannot)."""
    try:
        converted = type(backbone.pipe).lora_state_dict(dict(tensors))
    except Exception as error:  # diffusers raises ValueError/KeyError/... on layouts it does not know
        raise AdapterFileError(f"{source or 'the file'} is in no LoRA layout studio or diffusers reads for "
                               f"{backbone.family.name} ({error}).") from error
    return converted[0] if isinstance(converted, tuple) else converted


# ------------------------------------------------------------------------------------ writing


def to_kohya(adapter: LoraAdapter, backbone: Backbone) -> dict[str, torch.Tensor]:
    """kohya sd-scripts keys (`lora_unet_*`, `lora_te*_*`, `.lora_down/.lora_up/.alpha`), as A1111,
    Forge and ComfyUI read them: the LDM names for SDXL, diffusers names for SD1/SD2."""
    import torch

    if adapter.config.dora:
        raise AdapterFileError("a DoRA has no kohya LoRA layout; export it with --to diffusers.")
    if backbone.family.arch != "unet":
        raise AdapterFileError(f"kohya's {backbone.family.name} layout fuses q/k/v; export DiT adapters with --to "
                               f"diffusers (ComfyUI and diffusers read that layout for DiTs).")
    preferred = {name: candidates[0] for name, candidates in kohya_names(backbone).items()}
    out: dict[str, torch.Tensor] = {}
    for name, delta in adapter.deltas().items():
        base = preferred[name]
        out[f"{base}.lora_down.weight"] = delta.down.contiguous()
        out[f"{base}.lora_up.weight"] = delta.up.contiguous()
        out[f"{base}.alpha"] = torch.tensor(float(delta.alpha))
    return out


FORMATS = ("kohya", "diffusers")


def convert_file(path: str | Path, to: str, out: str | Path, *, backbone: Backbone | str | None = None,
                 overwrite: bool = False) -> Path:
    """Rewrite an adapter file in another tool's layout: `kohya` (A1111, Forge, ComfyUI; with kohya's
    `ss_*` metadata) or `diffusers` (PEFT keys `pipe.load_lora_weights` reads). The export carries
    modelspec keys but no studio manifest: it is that tool's file. Concept tokens go into the kohya file
    as A1111 bundled embeddings, and beside a diffusers file as one embedding file per trigger,
    `OUT.<trigger>.safetensors`, which `pipe.load_textual_inversion(file, token=trigger)` reads (SDXL:
    its `clip_l` / `clip_g` tensors, as diffusers' advanced DreamBooth script writes them)."""
    import json as json_

    from studio.adapters.base import load_adapter, modelspec, read_manifest, read_safetensors
    from studio.backbones import load_backbone
    from studio.errors import InvalidArgumentError

    if to not in FORMATS:
        raise InvalidArgumentError(f"--to {to!r}; choose one of {', '.join(FORMATS)}.")
    out = Path(out)
    if out.exists() and not overwrite:
        raise InvalidArgumentError(f"{str(out)!r} exists; choose another --out or pass --overwrite.")
    if backbone is not None and not isinstance(backbone, str):
        bb = backbone
    else:
        source = backbone
        if source is None:
            manifest = read_manifest(read_safetensors(path)[1], path)
            if manifest is None:
                raise InvalidArgumentError(f"{str(path)!r} was written by another tool: say which backbone it is for "
                                           f"with --backbone.")
            source = manifest.get("base") or None
        bb = load_backbone(source)
    adapter = load_adapter(path, bb)
    if not hasattr(adapter, "factors"):
        raise InvalidArgumentError(f"{str(path)!r} is a {adapter.kind} adapter; only LoRA-like adapters have "
                                   f"kohya/diffusers layouts.")
    manifest = adapter.manifest()
    metadata = modelspec(manifest)
    if to == "kohya":  # concept tokens ride along as A1111 bundled embeddings
        tensors = to_kohya(adapter, bb) | concept_tokens.to_a1111(adapter.tokens, bb.family.name)
        metadata |= {"ss_network_module": "networks.lora", "ss_network_dim": str(adapter.config.rank),
                     "ss_network_alpha": str(adapter.config.rank), "ss_base_model_version": bb.family.name,
                     "ss_tag_frequency": json_.dumps({w: 1 for w in adapter.config.trigger_words})}
    else:  # diffusers' LoRA loader takes no embeddings: each concept token goes to an embedding file beside it
        tensors = dict(adapter.tensors)
        for trigger, embedding in concept_tokens.to_embedding_files(adapter.tokens, bb.family.name).items():
            _write_plain(out.with_name(f"{out.stem}.{trigger}.safetensors"), embedding, {})
    return _write_plain(out, tensors, metadata)


def _write_plain(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return path
