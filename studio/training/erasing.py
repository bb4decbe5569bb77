"""Making erasers (the kind is `studio.adapters.erase`): UCE in closed form, ESD and SPM trained on a
trajectory bank sampled from the backbone itself, with anchoring to the base model.

    studio.erase("circle", method="uce", preserve=["square", "ring"], out="no-circle.safetensors")

The papers and what each method changes are in the kind's module docstring.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.adapters.base import load_adapter, module_table
from studio.adapters.erase import (
    CLOSED_FORM,
    METHOD_DEFAULTS,
    METHODS,
    TRAINABLE,
    EraseAdapter,
    EraseConfig,
    EraseError,
    check_concept_words,
    method_pattern,
    method_targets,
    pooled_text,
    word_tokens,
)
from studio.adapters.lora import attached_adapters, without
from studio.errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch

    from studio.backbones import Backbone


def erase(concepts: str | list[str], *, method: str = "esd", backbone: Backbone | str | None = None,
          preserve: list[str] | str = (), templates: list[str] | None = None, steps: int | None = None,
          lr: float | None = None, rank: int | None = None, out: str | None = None, overwrite: bool = False,
          seed: int = 0, name: str = "", progress: Callable[[int, int, float], None] | None = None,
          bank_progress: Callable[[int, int], None] | None = None, warn: Callable[[str], None] | None = None,
          should_stop: Callable[[], bool] | None = None, log: Callable[[str], None] = lambda line: None,
          **options: Any) -> EraseAdapter:
    """Make an eraser for `concepts` (one for ESD/SPM, several for UCE) and save it to `out` when given.

        studio.erase("circle", method="uce", preserve=["square", "ring"], out="no-circle.safetensors")

    `options` are other EraseConfig fields (eta, variant, anchor_weight, transport, destination, lam,
    preserve_scale, push). ESD and SPM train through the one run loop (`studio.training.trainer.run_loop`):
    `progress(step, steps, loss)` follows it, `bank_progress(step, steps)` the sampling of their trajectory bank
    before it; with `out`, checkpoints go beside it, a run a kill stopped goes on from its last one when called
    again, and `should_stop` stops it with a checkpoint (`TrainingCancelled`)."""
    from studio.backbones import Backbone as BackboneClass
    from studio.backbones import load_backbone
    from studio.limits import check_count
    from studio.outputs import claim
    from studio.training.trainer import latest_checkpoint, run_paths, supervise

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
    # what this eraser is made of: a checkpoint of another request is refused, a finished output of this one kept
    request = {"concepts": concepts, "method": method, "preserve": preserve, "templates": templates, "steps": steps,
               "lr": lr, "rank": rank, "seed": seed, "name": name, "options": options,
               "backbone": backbone.source if isinstance(backbone, BackboneClass) else backbone}
    request = json.loads(json.dumps(request, default=str))

    def make(paths: dict[str, Path] | None, resume: bool) -> EraseAdapter:
        loaded = backbone if isinstance(backbone, BackboneClass) else load_backbone(backbone)
        config = EraseConfig(family=loaded.family.name, method=method, name=name, concepts=concepts,
                             preserve=list(preserve) if not isinstance(preserve, str) else preserve,
                             rank=rank or 1, **({"templates": list(templates)} if templates else {}),
                             **{**defaults, **options})
        return make_eraser(loaded, config, steps=steps, lr=lr, rank=rank, seed=seed, progress=progress,
                           bank_progress=bank_progress, warn=warn, paths=paths, request=request, resume=resume,
                           should_stop=should_stop, log=log)

    if out is None:
        return make(None, False)
    paths = run_paths(out)
    if method in CLOSED_FORM_ONLY:  # nothing to checkpoint: made whole, then written
        with claim(out, overwrite=overwrite):
            adapter = make(None, False)
            adapter.save(out, overwrite=True)  # claimed above: new, or overwrite asked for
            return adapter
    # the output is checked and held before the backbone loads; a run a kill stopped goes on from its checkpoint
    result = supervise(paths, lambda resume: make(paths, resume), resume=latest_checkpoint(paths["checkpoint"]) is not None,
                       overwrite=overwrite, finished=lambda: _finished(out, request), log=log)
    return result if isinstance(result, EraseAdapter) else load_adapter(result)


CLOSED_FORM_ONLY = ("uce",)  # methods made in closed form, without a run


def _finished(out: str | Path, request: dict[str, Any]) -> bool:
    """`out` is the finished eraser of this very request (its manifest's training record keeps it)."""
    from studio.training.trainer import finished_record

    return finished_record(Path(out), request, normalise=lambda training: training.get("request") or {})


def make_eraser(backbone: Backbone, config: EraseConfig, *, steps: int | None = None, lr: float | None = None,
                rank: int | None = None, batch: int = 2, bank_images: int = 8, bank_steps: int = 20, seed: int = 0,
                progress: Callable[[int, int, float], None] | None = None,
                bank_progress: Callable[[int, int], None] | None = None,
                warn: Callable[[str], None] | None = None, paths: dict[str, Path] | None = None,
                request: dict[str, Any] | None = None, resume: bool = False,
                should_stop: Callable[[], bool] | None = None,
                log: Callable[[str], None] = lambda line: None) -> EraseAdapter:
    """An eraser for `config.concepts` on `backbone`: UCE in closed form (exact, or SVD-truncated to
    `rank`), ESD/SPM trained for `steps` at `config.rank`."""
    import warnings

    families = CLOSED_FORM if config.method == "uce" else TRAINABLE
    if backbone.family.name not in families:
        raise EraseError(f"{config.method} erasing on {backbone.family.title} ({backbone.family.name}) is not supported "
                         f"yet; families: {', '.join(families)}{' (uce also flux)' if config.method != 'uce' else ''}.")
    if attached_adapters(backbone):
        raise EraseError(f"detach the adapters {sorted(attached_adapters(backbone))} first: an eraser is made "
                         f"against the plain backbone.")
    check_concept_words(backbone, config.concepts + config.preserve,
                        warn or (lambda message: warnings.warn(message, stacklevel=3)))
    config.family, config.base = backbone.family.name, config.base or backbone.source
    config.target = method_pattern(backbone, config)
    config.trigger_words = []
    if config.transport and config.preserve:
        kept = pooled_text(backbone, config.prompts(config.preserve)) @ pooled_text(backbone, config.concepts).T
        config.transport_floor = min(float(kept.max()), 0.99)  # kept prompts get γ 0 (shared tokens aside)
    if config.method in CLOSED_FORM_ONLY:
        return uce(backbone, config, rank=rank)
    from studio.training.trainer import run_loop

    defaults = METHOD_DEFAULTS[config.method]  # one place for them: `erase` reads the same table
    steps = defaults["steps"] if steps is None else steps
    run = EraseRun(backbone, config, steps=steps, lr=defaults["lr"] if lr is None else lr, batch=batch,
                   bank_images=bank_images, bank_steps=bank_steps, seed=seed, paths=paths, request=request or {},
                   bank_progress=bank_progress, log=log)
    try:
        return run_loop(run, paths, steps=steps, checkpoint_every=CHECKPOINT_EVERY, resume=resume, progress=progress,
                        log=log, should_stop=should_stop)
    finally:
        run.close()


CHECKPOINT_EVERY = 100  # an eraser's checkpoints, in steps (a few seconds of CPU each)


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


class EraseRun:
    """ESD / SPM as a run of the one run loop: the erase target on bank states, plus anchoring to the base model on
    the anchors. Its checkpoint holds the adapter, the optimizer, the step and the sampler's random state, so a
    resumed run ends bit for bit where an uninterrupted one does."""

    rank = 0  # one process

    def __init__(self, backbone: Backbone, config: EraseConfig, *, steps: int, lr: float, batch: int, bank_images: int,
                 bank_steps: int, seed: int, paths: dict[str, Path] | None, request: dict[str, Any],
                 bank_progress: Callable[[int, int], None] | None = None, log: Callable[[str], None] = print):
        import torch

        from studio.training.objectives import objective_for

        torch.manual_seed(seed)
        self.backbone, self.config, self.paths, self.request, self.log = backbone, config, paths, request, log
        self.steps, self.lr, self.batch, self.seed = steps, lr, batch, seed
        self.bank_images, self.bank_steps = bank_images, bank_steps
        self.rng = random.Random(seed)
        self.objective = objective = objective_for(backbone)
        prompts = config.prompts(config.concepts)
        self.bank = trajectory_bank(backbone, prompts, images=bank_images, steps=bank_steps, seed=seed,
                                    progress=bank_progress)
        self.cond = encode(objective, prompts)
        self.null = encode(objective, [""])
        self.anchor_prompts = config.prompts(config.preserve) if config.preserve else []
        if config.anchor_weight > 0:
            self.anchor_prompts += random_anchors(backbone, config, 64, self.rng)
        self.anchors = encode(objective, self.anchor_prompts) if self.anchor_prompts else None
        config.targets = []
        self.adapter = EraseAdapter.create(backbone, config, seed=seed)
        self.adapter.attach(backbone)
        self.base_model = without(backbone, self.adapter)
        self.params = [p for group in self.adapter.trainable_parameters(backbone).values() for p in group]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        self.step_done, self.losses = 0, []

    def step(self) -> float:
        import torch

        config, rng, batch, objective = self.config, self.rng, self.batch, self.objective
        denoiser = self.backbone.denoiser

        def pick(table: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
            return {k: v[rows] for k, v in table.items()}

        chosen = [self.bank[rng.randrange(len(self.bank))] for _ in range(batch)]
        xt = torch.stack([c[0] for c in chosen]).to(denoiser.device, denoiser.dtype)
        t = torch.stack([torch.as_tensor(c[1]) for c in chosen]).to(denoiser.device)
        concept = pick(self.cond, [c[2] for c in chosen])
        with torch.no_grad(), self.base_model:
            e_c = objective.predict(denoiser, xt, t, **concept)
            e_u = objective.predict(denoiser, xt, t, **pick(self.null, [0] * batch))
            target = e_u - config.eta * (e_c - e_u)
            if self.anchors is not None:
                a_rows = [rng.randrange(len(self.anchor_prompts)) for _ in range(batch)]
                a_target = objective.predict(denoiser, xt, t, **pick(self.anchors, a_rows))
        loss = torch.nn.functional.mse_loss(objective.predict(denoiser, xt, t, **concept).float(), target.float())
        if self.anchors is not None:
            weight = config.anchor_weight if config.anchor_weight > 0 else 1.0
            anchored = objective.predict(denoiser, xt, t, **pick(self.anchors, a_rows)).float()
            loss = loss + weight * torch.nn.functional.mse_loss(anchored, a_target.float())
        if not torch.isfinite(loss):
            raise EraseError(f"the erase loss became {loss.item()} at step {self.step_done}; lower the learning rate "
                             f"(--lr).")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step_done += 1
        self.losses.append(float(loss.detach()))
        return self.losses[-1]

    def save_checkpoint(self) -> None:
        from studio.training.trainer import write_checkpoint

        self.adapter.sync_from(self.backbone)
        write_checkpoint(self.paths["checkpoint"], self.adapter.tensors, self.optimizer.state_dict(),
                         {"step": self.step_done, "losses": self.losses, "rng": self.rng.getstate(),
                          "config": self.request})

    def load_checkpoint(self) -> bool:
        from studio.training.trainer import read_checkpoint

        found = read_checkpoint(self.paths["checkpoint"], self.request)
        if found is None:
            return False
        tensors, optimizer, state = found
        self.adapter.load_values(self.backbone, tensors)
        self.optimizer.load_state_dict(optimizer)
        self.step_done, self.losses = state["step"], state["losses"]
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        for _ in range(self.step_done):
            self.scheduler.step()
        return True

    def samples(self) -> None:
        """Erasers draw no sample images while they train."""

    def finish(self) -> EraseAdapter:
        """The trained eraser (written to the run's output when it has one), detached from the backbone."""
        self.adapter.sync_from(self.backbone)
        self.close()
        config = self.config
        config.training = {**config.training, "method": config.method, "steps": self.steps, "lr": self.lr,
                           "batch": self.batch, "bank_images": self.bank_images, "bank_steps": self.bank_steps,
                           "anchors": len(self.anchor_prompts), "seed": self.seed,
                           **({"request": self.request} if self.paths is not None else {})}
        if self.paths is not None:
            self.adapter.save(self.paths["out"], overwrite=True)  # claimed by the run: new, or overwrite asked for
        return self.adapter

    def close(self) -> None:
        """Detach the eraser in training (after `finish`, or when the run stops on an error or a cancel)."""
        if self.adapter.name in attached_adapters(self.backbone):
            self.adapter.detach(self.backbone)
