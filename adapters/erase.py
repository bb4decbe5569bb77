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

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from studio.adapters.base import components, register
from studio.adapters.lora import LoraAdapter, LoraConfig, target_modules

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
    from_folder = False  # made from concept words by studio.training.erasing (`studio erase`)
    sample_options = {"method": "spm", "concepts": ["cat"], "rank": 1, "transport": True}

    def __init__(self, config: EraseConfig, tensors: dict[str, torch.Tensor]):
        super().__init__(config, tensors)
        self._scales: torch.Tensor | None = None  # transport: one factor per prompt of the coming call
        self._concept_vectors: torch.Tensor | None = None
        self._handles: list[Any] = []

    # ------------------------------------------------------------------- facilitated transport

    def _apply(self, backbone: Backbone, entry: dict[str, Any]) -> None:
        super()._apply(backbone, entry)
        if self.config.transport:
            self._handles = self._hooks(backbone)

    def _remove(self, backbone: Backbone, entry: dict[str, Any]) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._scales = [], None
        self._concept_vectors = None  # encoded by the backbone it was attached to
        super()._remove(backbone, entry)

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
