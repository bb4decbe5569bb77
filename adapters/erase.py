"""Concept erasers as stackable weight adapters: ESD, SPM and UCE.

Every eraser is a LoRA in the PEFT layout (so it attaches, weights, stacks, fuses, merges and exports
to kohya like any LoRA) whose manifest says what it erases and how:

- **ESD** (Gandikota et al. 2023, arXiv:2303.07345): fine-tune so that the prompt of the concept
  predicts what negative guidance away from it would, ε'(x_t, c) -> ε(x_t) - η (ε(x_t, c) - ε(x_t)).
  Variant "x" trains the cross-attention (the paper's choice for styles), "u" everything else (objects).
  Trained as a LoRA (rank 4) rather than the paper's full fine-tune, so it stays an adapter.
- **SPM** (Lyu et al. 2024, arXiv:2312.16145): the same erase target on a rank-1 LoRA over every layer of
  the transformer blocks, plus latent anchoring: random prompts far from the concept must keep the base
  model's prediction (weight λ). At inference, facilitated transport scales each eraser per prompt by
  γ = max(cos(E_prompt, E_concept), |tokens shared| / |concept tokens|), so prompts that do not mention
  the concept are left nearly alone.
- **UCE** (Gandikota et al. 2024, arXiv:2308.14761): closed form, no training. For each projection W
  that reads text embeddings, W' = (λW + Σ_e v*ᵢcᵢᵀ + s Σ_p W cⱼcⱼᵀ)(λI + Σ_e cᵢcᵢᵀ + s Σ_p cⱼcⱼᵀ)⁻¹, with c
  the concept prompts' token embeddings, v* = W c_dest those of the destination prompt, and a preserve
  list held in place. Several concepts at once. The change W' - W has rank <= the number of erased
  token embeddings; it is stored exactly (SVD, singular values above 1e-6 of the largest) or truncated
  to `rank`.

Where the text enters: a UNet's cross-attention key/value projections (attn2.to_k/to_v) read the text
encoder's states directly. An MMDiT (SD3) has no cross-attention: its joint attention sees the text
after `context_embedder` and per-block, timestep-modulated norms, so UCE edits `context_embedder`,
the one linear map every block's text stream passes through; ESD-x trains the joint attention there.

Written here rather than taken from the papers' code: their repositories are per-backbone scripts that
rewrite a full checkpoint; none yields an adapter, and none covers both UNets and DiTs.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from studio.adapters.base import components, module_table, register
from studio.adapters.lora import LoraAdapter, LoraConfig, target_modules, without

from studio.errors import InvalidArgumentError, StudioError

if TYPE_CHECKING:
    import torch

    from studio.backbones import Backbone

METHODS = ("esd", "spm", "uce")
# Prompts that name the concept: `{}` is the concept. Bank images, UCE's embeddings and SPM's
# similarity all use them; pass the captions your users write for sharper erasing.
DEFAULT_TEMPLATES = ("{}", "a {}", "a photo of a {}", "an image of a {}", "a picture of a {}", "a {} in the centre")
ANCHOR_WEIGHT = 1.0  # SPM's λ here (see bench/erase.py; the paper's 1000 is for its own loss scale)
TRAINABLE = ("sd1", "sd2", "sdxl", "sd3")  # ESD/SPM: the families with a training objective (studio/training/objectives.py)
CLOSED_FORM = (*TRAINABLE, "flux")  # UCE needs only the text states
# Which modules each method changes, per architecture (regular expressions over module paths)
TARGETS = {
    ("unet", "esd-x"): r"attn2\.(to_q|to_k|to_v|to_out\.0)$",
    ("unet", "esd-u"): r"^(?!.*attn2\.)(down_blocks|mid_block|up_blocks)\.",
    ("unet", "esd-kv"): r"attn2\.(to_k|to_v)$",
    ("unet", "spm"): r"attentions\.\d+\.",
    ("unet", "uce"): r"attn2\.(to_k|to_v)$",
    ("dit", "esd-x"): r"^transformer_blocks\.\d+\.attn\.",
    ("dit", "esd-u"): r"^transformer_blocks\.\d+\.(?!attn\.)",
    ("dit", "esd-kv"): r"^transformer_blocks\.\d+\.attn\.add_(k|v)_proj$",
    ("dit", "spm"): r"^transformer_blocks\.\d+\.",
    ("dit", "uce"): r"^context_embedder$",
}


class EraseError(StudioError, ValueError):
    """A concept or preserve list that erasing cannot use."""


@dataclass(kw_only=True)
class EraseConfig(LoraConfig):
    method: str = "esd"
    concepts: list[str] = field(default_factory=list)
    preserve: list[str] = field(default_factory=list)  # concepts that must stay (UCE: held exactly; ESD/SPM: anchors)
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    # esd: x = cross-attention (the paper's ESD-x), u = the other layers (ESD-u), kv = only the projections
    # that read the text (keys and values), so the change acts through the prompt's words alone
    variant: str = "x"
    eta: float = 1.0  # negative guidance strength of the erase target (ESD, SPM)
    anchor_weight: float = 0.0  # SPM's latent anchoring λ (weight of the random-prompt preservation loss)
    transport: bool = False  # SPM's facilitated transport: scale per prompt by its closeness to the concepts
    # transport's cosine floor, set at creation from the preserve list: the highest cosine of a prompt
    # naming a kept concept to the erased one. Cosines at or below it give 0 and the rest scale to
    # [0, 1], so a prompt of a kept concept gets no eraser while a paraphrase of the erased one, closer
    # than anything kept, still does (the paper's transport has no floor: on world-sd prompts naming
    # neighbouring shapes reached γ 0.43 and lost up to 21 points)
    transport_floor: float = 0.0
    destination: str = ""  # UCE: the concepts' keys and values become this text's ("" = the null text)
    lam: float = 0.1  # UCE's ridge term λ (TIME's 0.1): how strongly everything not listed keeps its mapping
    preserve_scale: float = 1.0  # UCE: weight of the preserve list's rows against the erased ones
    # UCE: negative guidance in closed form. The concept's text states map past the destination, away from
    # the concept: d + push·(d - c). With push 0 (the paper) a prompt whose concept reads as the null text
    # still draws the concept at the model's chance rate; push > 0 drives it below that, as ESD's η does
    push: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.method not in METHODS:
            raise InvalidArgumentError(f"method={self.method!r}; choose one of {', '.join(METHODS)}.")
        if isinstance(self.concepts, str):
            self.concepts = [self.concepts]
        if isinstance(self.preserve, str):
            self.preserve = [p.strip() for p in self.preserve.split(",") if p.strip()]
        self.concepts = [" ".join(str(c).split()) for c in self.concepts]
        self.preserve = [" ".join(str(p).split()) for p in self.preserve]
        if not self.concepts or any(not c for c in self.concepts):
            raise EraseError("the concept to erase is empty; name it, e.g. `studio erase \"circle\"`.")
        if self.method != "uce" and len(self.concepts) > 1:
            raise EraseError(f"{self.method} erases one concept per adapter (got {self.concepts}); stack several "
                             f"adapters, or use --method uce to erase them in one.")
        clash = sorted({p for p in self.preserve if p.lower() in {c.lower() for c in self.concepts}})
        if clash:
            raise EraseError(f"the preserve list names {clash}, which is also to be erased; remove it from --preserve.")
        if self.variant not in ("x", "u", "kv"):
            raise InvalidArgumentError(f"variant={self.variant!r}; choose x (cross-attention), u (the other layers) "
                                       f"or kv (the text's keys and values).")
        if not 0 <= self.transport_floor < 1:
            raise InvalidArgumentError(f"transport_floor={self.transport_floor!r} must be in [0, 1).")
        if not self.eta > 0 or not self.lam > 0 or min(self.anchor_weight, self.preserve_scale, self.push) < 0:
            raise InvalidArgumentError(f"eta ({self.eta}) and lam ({self.lam}) must be > 0, anchor_weight "
                                       f"({self.anchor_weight}), preserve_scale ({self.preserve_scale}) and push "
                                       f"({self.push}) >= 0.")
        bad = [t for t in self.templates if t.count("{}") != 1]
        if not self.templates or bad:
            raise InvalidArgumentError(f"templates {bad or self.templates} must each hold exactly one '{{}}' where "
                                       f"the concept goes, e.g. 'a photo of a {{}}'.")

    def prompts(self, words: list[str] | str) -> list[str]:
        words = [words] if isinstance(words, str) else words
        return [" ".join(t.format(w).split()) for w in words for t in self.templates]


@register("erase")
class EraseAdapter(LoraAdapter):
    """An eraser: a LoRA that removes `config.concepts`; SPM ones scale themselves per prompt."""

    config_class = EraseConfig

    def __init__(self, config: EraseConfig, tensors: dict[str, torch.Tensor]):
        super().__init__(config, tensors)
        self._scales: torch.Tensor | None = None  # transport: one factor per prompt of the coming call
        self._concept_vectors: torch.Tensor | None = None
        self._handles: list[Any] = []

    # ------------------------------------------------------------------- facilitated transport

    def attach(self, backbone: Backbone, weight: float = 1.0, **inputs: Any) -> None:
        super().attach(backbone, weight, **inputs)
        if self.config.transport:
            self._handles = self._hooks(backbone)

    def detach(self, backbone: Backbone) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._scales = [], None
        self._concept_vectors = None  # encoded by the backbone it was attached to
        super().detach(backbone)

    def _hooks(self, backbone: Backbone) -> list[Any]:
        """A forward hook on each of the adapter's lora_B layers that scales its output row by row."""
        from peft.tuners.lora import LoraLayer

        handles = []
        for model in components(backbone).values():
            for module in model.modules():
                if isinstance(module, LoraLayer) and self.name in module.lora_B:
                    handles.append(module.lora_B[self.name].register_forward_hook(self._scale_rows))
        return handles

    def _scale_rows(self, module, args, output):
        scales = self._scales
        if scales is None:
            return output
        rows = output.shape[0]
        if rows % len(scales):  # a batch that does not come from the prepared prompts: the strongest factor
            factor = scales.max()
            return output * factor
        # diffusers batches are [negative prompts; prompts] (each prompt's images together): a prompt's
        # factor applies to its unconditional row too, as SPM's sampler does
        per_row = scales.to(output).repeat(rows // len(scales))
        return output * per_row.view(-1, *([1] * (output.dim() - 1)))

    def prepare(self, backbone: Backbone, prompts: list[str], images_per_prompt: int = 1) -> list[float]:
        """Set the transport factors for the next pipeline call of `prompts`; returns them per prompt."""
        import torch

        if not self.config.transport:
            return [1.0] * len(prompts)
        factors = transport_factors(backbone, prompts, self.config.concepts, self._concept_cache(backbone),
                                    floor=self.config.transport_floor)
        self._scales = torch.tensor(factors).repeat_interleave(images_per_prompt)
        return factors

    def release(self) -> None:
        """Back to full strength after the call `prepare` was for."""
        self._scales = None

    def _concept_cache(self, backbone: Backbone) -> torch.Tensor:
        if self._concept_vectors is None:
            self._concept_vectors = pooled_text(backbone, self.config.concepts)
        return self._concept_vectors


# ------------------------------------------------------------------------------ text utilities


def pooled_text(backbone: Backbone, prompts: list[str]) -> torch.Tensor:
    """One unit vector per prompt from the first text encoder: CLIP's pooled (end-of-text) state, or the
    mean state for encoders without one."""
    import torch

    pipe = backbone.pipe
    tokens = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = pipe.text_encoder(tokens.input_ids.to(pipe.text_encoder.device))
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        pooled = getattr(out, "text_embeds", None)
    if pooled is None:
        pooled = out.last_hidden_state.mean(dim=1)
    return torch.nn.functional.normalize(pooled.float().cpu(), dim=-1)


def word_tokens(backbone: Backbone, text: str, tokenizer: Any = None) -> list[int]:
    """The tokenizer's ids for `text` without the start/end tokens."""
    tokenizer = tokenizer or backbone.pipe.tokenizer
    special = set(tokenizer.all_special_ids)
    return [t for t in tokenizer(text).input_ids if t not in special]


def transport_factors(backbone: Backbone, prompts: list[str], concepts: list[str],
                      concept_vectors: torch.Tensor | None = None, *, floor: float = 0.0) -> list[float]:
    """SPM's facilitated transport: per prompt, max over concepts of max(cos(E_prompt, E_concept),
    |prompt tokens ∩ concept tokens| / |concept tokens|), clipped to [0, 1]; cosines are first mapped
    from [floor, 1] to [0, 1] (see EraseConfig.transport_floor)."""
    vectors = pooled_text(backbone, prompts)
    concept_vectors = pooled_text(backbone, concepts) if concept_vectors is None else concept_vectors
    cosine = ((vectors @ concept_vectors.T - floor) / (1 - floor)).clamp(0, 1)  # (prompts, concepts)
    wanted = [set(word_tokens(backbone, concept)) for concept in concepts]
    factors = []
    for i, prompt in enumerate(prompts):
        have = set(word_tokens(backbone, prompt))
        best = 0.0
        for j, tokens in enumerate(wanted):
            shared = len(have & tokens) / len(tokens) if tokens else 0.0
            best = max(best, float(cosine[i, j]), shared)
        factors.append(min(best, 1.0))
    return factors


def check_concept_words(backbone: Backbone, concepts: list[str], warn: Callable[[str], None]) -> None:
    """Warn when the tokenizer knows a concept's words only as pieces (or not at all): the text encoder
    never saw the word, so prompts naming it may not mean what the user thinks."""
    tokenizer = backbone.pipe.tokenizer
    unknown = getattr(tokenizer, "unk_token_id", None)
    for concept in concepts:
        for word in re.findall(r"\w+", concept):
            ids = word_tokens(backbone, word)
            if not ids or (unknown is not None and unknown in ids) or len(ids) > 1:
                pieces = tokenizer.convert_ids_to_tokens(ids)
                warn(f"the tokenizer splits {word!r} into {pieces}: it does not know the word as one token, so the "
                     f"eraser may not touch what you mean; check that prompts with it make the concept.")


# ------------------------------------------------------------------------------------ creating


def method_pattern(backbone: Backbone, config: EraseConfig) -> str:
    return TARGETS[(backbone.family.arch, config.method if config.method != "esd" else f"esd-{config.variant}")]


def method_targets(backbone: Backbone, config: EraseConfig) -> list[str]:
    return target_modules(backbone, method_pattern(backbone, config))


# per method: what `erase` uses unless told otherwise
# (η = 3 rather than the papers' 1: a LoRA trained for a few hundred steps gets part of the way to its
# target; on world-sd, 200-step runs with η = 1 left the triangle in 0.75 (ESD) and 0.88 (SPM) of its
# prompts, with η = 3 in 0.38 (ESD) and 0.13 (SPM at lr 3e-2); README, Erasing benchmark)
METHOD_DEFAULTS = {
    "esd": dict(rank=4, variant="x", eta=3.0, steps=400, lr=1e-2),
    # lr 2.5e-2 for 500 steps, with transport's floor: the triangle falls to 0.08 and the dots to 0.04 with
    # no other value moving; 300 steps at 3e-2 left the dots at 0.33, at 2.5e-2 the triangle at 0.21
    # (README, Erasing benchmark)
    "spm": dict(rank=1, alpha=1.0, transport=True, anchor_weight=ANCHOR_WEIGHT, eta=3.0, steps=500, lr=2.5e-2),
    # push 1: triangle 1.00 -> 0.00 with every other shape within 5 points; push 0 left 0.21 (the null text
    # alone draws triangles at 0.12 on world-sd). README, Erasing benchmark
    "uce": dict(rank=None, push=1.0),
}


def erase(concepts: str | list[str], *, method: str = "esd", backbone: Backbone | str | None = None,
          preserve: list[str] | str = (), templates: list[str] | None = None, steps: int | None = None,
          lr: float | None = None, rank: int | None = None, out: str | None = None, overwrite: bool = False,
          seed: int = 0, name: str = "", progress: Callable[[int, int, float], None] | None = None,
          bank_progress: Callable[[int, int], None] | None = None, warn: Callable[[str], None] | None = None,
          **options: Any) -> EraseAdapter:
    """Make an eraser for `concepts` (one for ESD/SPM, several for UCE) and save it to `out` when given.

        studio.erase("circle", method="uce", preserve=["square", "ring"], out="no-circle.safetensors")

    `options` are other EraseConfig fields (eta, variant, anchor_weight, transport, destination, lam,
    preserve_scale, push). `progress(step, steps, loss)` follows ESD/SPM training, `bank_progress(step, steps)`
    the sampling of their trajectory bank before it."""
    from studio.backbones import Backbone as BackboneClass
    from studio.backbones import load_backbone
    from studio.limits import check_count
    from studio.outputs import claim

    if method not in METHODS:
        raise InvalidArgumentError(f"method={method!r}; choose one of {', '.join(METHODS)}.")
    for what, value in (("steps", steps), ("rank", rank)):
        if value is not None:
            check_count(what, value)
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        raise InvalidArgumentError(f"lr={lr!r} must be a number > 0 (e.g. 1e-2).")
    defaults = dict(METHOD_DEFAULTS[method])
    given = {k: defaults.pop(k, None) for k in ("steps", "lr", "rank")}
    steps, lr, rank = (given[k] if v is None else v for k, v in (("steps", steps), ("lr", lr), ("rank", rank)))
    # the output is checked and held before the backbone loads
    with claim(out, overwrite=overwrite) if out is not None else contextlib.nullcontext():
        backbone = backbone if isinstance(backbone, BackboneClass) else load_backbone(backbone)
        config = EraseConfig(family=backbone.family.name, method=method, name=name, concepts=concepts,
                             preserve=list(preserve) if not isinstance(preserve, str) else preserve,
                             rank=rank or 1, **({"templates": list(templates)} if templates else {}),
                             **{**defaults, **options})
        adapter = make_eraser(backbone, config, steps=steps, lr=lr, rank=rank, seed=seed, progress=progress,
                              bank_progress=bank_progress, warn=warn)
        if out is not None:
            adapter.save(out, overwrite=True)  # claimed above: new, or overwrite asked for
    return adapter


def make_eraser(backbone: Backbone, config: EraseConfig, *, steps: int | None = None, lr: float | None = None,
                rank: int | None = None, batch: int = 2, bank_images: int = 8, bank_steps: int = 20, seed: int = 0,
                progress: Callable[[int, int, float], None] | None = None,
                bank_progress: Callable[[int, int], None] | None = None,
                warn: Callable[[str], None] | None = None) -> EraseAdapter:
    """An eraser for `config.concepts` on `backbone`: UCE in closed form (exact, or SVD-truncated to
    `rank`), ESD/SPM trained for `steps` at `config.rank`."""
    import warnings

    families = CLOSED_FORM if config.method == "uce" else TRAINABLE
    if backbone.family.name not in families:
        raise EraseError(f"{config.method} erasing on {backbone.family.title} ({backbone.family.name}) is not supported "
                         f"yet; families: {', '.join(families)}{' (uce also flux)' if config.method != 'uce' else ''}.")
    if getattr(backbone, "attached_adapters", None):
        raise EraseError(f"detach the adapters {sorted(backbone.attached_adapters)} first: an eraser is made "
                         f"against the plain backbone.")
    check_concept_words(backbone, config.concepts + config.preserve,
                        warn or (lambda message: warnings.warn(message, stacklevel=3)))
    config.family, config.base = backbone.family.name, config.base or backbone.source
    config.target = method_pattern(backbone, config)
    config.trigger_words = []
    if config.transport and config.preserve:
        kept = pooled_text(backbone, config.prompts(config.preserve)) @ pooled_text(backbone, config.concepts).T
        config.transport_floor = min(float(kept.max()), 0.99)  # kept prompts get γ 0 (shared tokens aside)
    if config.method == "uce":
        return uce(backbone, config, rank=rank)
    defaults = METHOD_DEFAULTS[config.method]  # one place for them: `erase` reads the same table
    return train_eraser(backbone, config, steps=defaults["steps"] if steps is None else steps,
                        lr=defaults["lr"] if lr is None else lr, batch=batch,
                        bank_images=bank_images, bank_steps=bank_steps, seed=seed, progress=progress,
                        bank_progress=bank_progress)


def encode(objective, prompts: list[str]) -> dict[str, torch.Tensor]:
    import torch

    with torch.no_grad():
        return {k: v.detach() for k, v in objective.encode(prompts).items()}


# ----------------------------------------------------------------------------------------- UCE


def text_states(backbone: Backbone, prompt: str) -> torch.Tensor:
    """The text states (tokens, width) that the UCE targets read: the text encoders' output as the
    family's pipeline conditions on it (Flux: T5's, which its context_embedder reads)."""
    import torch

    prompt = " ".join(prompt.split())
    with torch.no_grad():
        if backbone.family.name == "flux":
            return backbone.pipe.encode_prompt(prompt=[prompt], prompt_2=None)[0][0].detach()
        from studio.training.objectives import objective_for

        return objective_for(backbone).encode([prompt])["context"][0].detach()


def states_tokenizer(backbone: Backbone):
    """The tokenizer whose positions `text_states` follows."""
    return backbone.pipe.tokenizer_2 if backbone.family.name == "flux" else backbone.pipe.tokenizer


def concept_rows(backbone: Backbone, template: str, word: str) -> tuple[int, int]:
    """Where `word` sits in `template`'s text states: (first position, token count)."""
    tokenizer = states_tokenizer(backbone)
    prefix = " ".join(template.split("{}")[0].split())
    start = len(tokenizer(prefix).input_ids) - 1  # [start token +] prefix, without the end token
    return start, len(word_tokens(backbone, word, tokenizer))


def uce(backbone: Backbone, config: EraseConfig, *, rank: int | None = None) -> EraseAdapter:
    """UCE's closed form per target projection (see the module's docstring), stored as a LoRA."""
    import torch

    from studio.deltas import Dense

    erase_rows, value_rows, keep_rows = [], [], []
    for template in config.templates:
        dest = text_states(backbone, template.format(config.destination))
        d_start, d_count = concept_rows(backbone, template, config.destination)
        for concept in config.concepts:
            old = text_states(backbone, template.format(concept))
            start, count = concept_rows(backbone, template, concept)
            # the concept's tokens take the destination's last token (the start token's state, a null,
            # when the destination is empty); the tokens after it, which carry the concept too through
            # the causal text encoder, take the destination's tokens at the same offsets
            null = dest[d_start + d_count - 1] if d_count else dest[0]
            tail = min(len(old) - start - count, len(dest) - d_start - d_count)
            erase_rows += [old[start : start + count], old[start + count : start + count + tail]]
            value_rows += [null.expand(count, -1), dest[d_start + d_count : d_start + d_count + tail]]
        for kept in config.preserve:
            states = text_states(backbone, template.format(kept))
            keep_rows.append(states[concept_rows(backbone, template, kept)[0] :])
    c_erase = torch.cat(erase_rows).double()
    c_dest = torch.cat(value_rows).double()
    c_keep = torch.cat(keep_rows).double() if keep_rows else c_erase[:0]
    c_erase, c_dest = c_erase[c_erase.norm(dim=1) > 0], c_dest[c_erase.norm(dim=1) > 0]  # T5-free SD3: zero rows
    c_dest = c_dest + config.push * (c_dest - c_erase)  # the tokens after the concept too: they carry most of it
    modules = module_table(backbone)
    # the same inputs for every target: λI + Σ c cᵀ (erased and kept rows) is shared
    gram = (config.lam * torch.eye(c_erase.shape[1], dtype=torch.float64) + c_erase.T @ c_erase
            + config.preserve_scale * c_keep.T @ c_keep)
    lowered = {}
    for name in method_targets(backbone, config):
        weight = modules[name].weight.detach().double().cpu()
        # W' - W = Σ_e (v* - W c) cᵀ (λI + Σ c cᵀ)⁻¹ (the preserve terms W c cᵀ cancel): solve, never invert
        residual = ((c_dest - c_erase) @ weight.T).T @ c_erase  # (out, in)
        low = Dense(torch.linalg.solve(gram, residual.T).T.float()).low_rank()
        if rank is not None and rank < low.rank:  # the largest singular directions (SVD order)
            low = type(low)(up=low.up[:, :rank], down=low.down[:rank], alpha=float(rank))
        lowered[name] = low
    config.rank = max(d.rank for d in lowered.values())
    config.training = {**config.training, "method": "uce", "erased_rows": int(len(c_erase)),
                       "preserved_rows": int(len(c_keep))}
    return EraseAdapter.from_deltas(lowered, config)


# ------------------------------------------------------------------------------------ ESD / SPM


def trajectory_bank(backbone: Backbone, prompts: list[str], *, images: int, steps: int, seed: int,
                    progress: Callable[[int, int], None] | None = None) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """(x_t, timestep, prompt index) along the base model's own sampling of the concept prompts with
    classifier-free guidance: the states an eraser must change. ESD and SPM sample them with the model
    being trained at every step; a bank sampled once from the base model costs one generation instead
    of one per step, which is what makes CPU runs practical."""
    import torch
    from studio.backbones import t5_free_options

    pipe = backbone.pipe
    pipe.scheduler = backbone.scheduler("ddim" if backbone.family.arch == "unet" else backbone.family.scheduler)
    picks = [i % len(prompts) for i in range(images)]
    states: list[torch.Tensor] = []

    def keep(pipeline, step, timestep, tensors):
        states.append(tensors["latents"].detach().clone())
        if progress is not None:
            progress(step + 1, steps)
        return tensors

    generators = [torch.Generator().manual_seed(seed + i) for i in range(images)]
    with torch.no_grad():
        pipe([prompts[i] for i in picks], num_inference_steps=steps, guidance_scale=backbone.family.guidance,
             generator=generators, output_type="latent", callback_on_step_end=keep, **t5_free_options(pipe))
    timesteps = pipe.scheduler.timesteps
    bank = []
    for step in range(len(states) - 1):  # the latents after step i are the input of step i + 1
        for row, prompt_index in enumerate(picks):
            bank.append((states[step][row], timesteps[step + 1], prompt_index))
    return bank


def random_anchors(backbone: Backbone, config: EraseConfig, count: int, rng: random.Random) -> list[str]:
    """SPM's anchors: random prompts from the tokenizer's words, kept with probability 1 - cos(anchor,
    concept) so the far ones dominate, and never containing a concept token."""
    tokenizer = backbone.pipe.tokenizer
    vocab = [w.replace("</w>", "") for w, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
             if w.endswith("</w>") and re.fullmatch(r"[a-z]+</w>", w)]
    banned = {t for c in config.concepts for t in word_tokens(backbone, c)}
    concepts = pooled_text(backbone, config.concepts)
    anchors: list[str] = []
    while len(anchors) < count:
        candidates = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 6))) for _ in range(4 * count)]
        candidates = [c for c in candidates if not set(word_tokens(backbone, c)) & banned]
        if not candidates:
            break
        cosine = (pooled_text(backbone, candidates) @ concepts.T).max(dim=1).values.clamp(0, 1)
        anchors += [c for c, cos in zip(candidates, cosine.tolist(), strict=True) if rng.random() < 1 - cos]
    return anchors[:count]


def train_eraser(backbone: Backbone, config: EraseConfig, *, steps: int, lr: float, batch: int, bank_images: int,
                 bank_steps: int, seed: int, progress: Callable[[int, int, float], None] | None,
                 bank_progress: Callable[[int, int], None] | None = None) -> EraseAdapter:
    """ESD / SPM: the erase target on bank states, plus anchoring to the base model on the anchors."""
    import torch

    from studio.training.objectives import objective_for

    torch.manual_seed(seed)
    rng = random.Random(seed)
    objective = objective_for(backbone)
    prompts = config.prompts(config.concepts)
    bank = trajectory_bank(backbone, prompts, images=bank_images, steps=bank_steps, seed=seed, progress=bank_progress)
    cond = encode(objective, prompts)
    null = encode(objective, [""])
    anchor_prompts = config.prompts(config.preserve) if config.preserve else []
    if config.anchor_weight > 0:
        anchor_prompts += random_anchors(backbone, config, 64, rng)
    anchors = encode(objective, anchor_prompts) if anchor_prompts else None
    config.targets = []
    adapter = EraseAdapter.create(backbone, config, seed=seed)
    adapter.attach(backbone)
    denoiser = backbone.denoiser
    base_model = without(backbone, adapter)
    try:
        params = [p for group in adapter.trainable_parameters(backbone).values() for p in group]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))

        def pick(table: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
            return {k: v[rows] for k, v in table.items()}

        for step in range(steps):
            chosen = [bank[rng.randrange(len(bank))] for _ in range(batch)]
            xt = torch.stack([c[0] for c in chosen]).to(denoiser.device, denoiser.dtype)
            t = torch.stack([torch.as_tensor(c[1]) for c in chosen]).to(denoiser.device)
            rows = [c[2] for c in chosen]
            concept = pick(cond, rows)
            with torch.no_grad(), base_model:
                e_c = objective.predict(denoiser, xt, t, **concept)
                e_u = objective.predict(denoiser, xt, t, **pick(null, [0] * batch))
                target = e_u - config.eta * (e_c - e_u)
                if anchors is not None:
                    a_rows = [rng.randrange(len(anchor_prompts)) for _ in range(batch)]
                    a_target = objective.predict(denoiser, xt, t, **pick(anchors, a_rows))
            loss = torch.nn.functional.mse_loss(objective.predict(denoiser, xt, t, **concept).float(), target.float())
            if anchors is not None:
                weight = config.anchor_weight if config.anchor_weight > 0 else 1.0
                anchored = objective.predict(denoiser, xt, t, **pick(anchors, a_rows)).float()
                loss = loss + weight * torch.nn.functional.mse_loss(anchored, a_target.float())
            if not torch.isfinite(loss):
                raise EraseError(f"the erase loss became {loss.item()} at step {step}; lower the learning rate (--lr).")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            if progress is not None:
                progress(step + 1, steps, float(loss.detach()))
        adapter.sync_from(backbone)
    finally:
        adapter.detach(backbone)
    config.training = {**config.training, "method": config.method, "steps": steps, "lr": lr, "batch": batch,
                       "bank_images": bank_images, "bank_steps": bank_steps, "anchors": len(anchor_prompts),
                       "seed": seed}
    return adapter
