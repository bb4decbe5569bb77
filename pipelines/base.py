"""StudioPipeline: a backbone, its run-time options, and the diffusers call of its family."""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio import concept_tokens
from studio.backbones import Backbone, load_backbone
from studio.blocks import parse_weight
from studio.errors import InvalidArgumentError, InvalidSizeError, RecipeError, UnknownFamilyError
from studio.limits import check_count, check_generation_size
from studio.recipe import AdapterUse, Recipe, save_png
from studio.registry import Registry
from studio.schedulers import get_scheduler_spec, scheduler_kind

if TYPE_CHECKING:
    from PIL import Image

Progress = Callable[[int, int], None]  # (steps done, total steps)
CallBuilder = Callable[[Any, Recipe, "Progress | None"], dict[str, Any]]  # (diffusers pipe, recipe, progress)

# family name -> the family-specific part of its diffusers call
CALLS: Registry[CallBuilder] = Registry("family", UnknownFamilyError)
MAX_SEED = 2**63 - 1


def step_end_callback(progress: Progress | None, total: int) -> dict[str, Any]:
    """The `callback_on_step_end` argument reporting progress, for pipelines that take it."""
    if progress is None:
        return {}

    def on_step_end(pipe, step, timestep, tensors):
        progress(step + 1, total)
        return tensors

    return {"callback_on_step_end": on_step_end}


def standard_call(pipe: Any, recipe: Recipe, progress: Progress | None) -> dict[str, Any]:
    """The call of pipelines with negative prompts and `callback_on_step_end` (SD1/2, SDXL, SD3)."""
    return {"negative_prompt": recipe.negative_prompt, **step_end_callback(progress, recipe.steps)}


@dataclass
class Generation:
    """Images of one batch and the recipe that made them (image i's own recipe: `recipes[i]`)."""

    images: list[Image.Image]
    recipe: Recipe

    @property
    def recipes(self) -> list[Recipe]:
        return [self.recipe.for_image(i) for i in range(len(self.images))]

    def save(self, out: str | Path) -> list[Path]:
        """Save as PNGs with their recipes: `out` is a file (`x.png`, `x-1.png`...) or a folder."""
        paths = output_paths(out, self.recipe)
        return [save_png(image, recipe, path)
                for image, recipe, path in zip(self.images, self.recipes, paths, strict=True)]


def output_paths(out: str | Path, recipe: Recipe) -> list[Path]:
    """Where the images of a batch go: `x.png` -> x.png (x-0.png, x-1.png... for a batch); a folder ->
    numbered files `00012-<seed>.png` after the ones already there."""
    out = Path(out)
    if out.suffix.lower() == ".png":
        if recipe.n == 1:
            return [out]
        return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(recipe.n)]
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"out={str(out)!r} is a file but not a .png; pass a .png path or a folder.")
    start = len(list(out.glob("*.png"))) if out.is_dir() else 0
    return [out / f"{start + i:05d}-{recipe.seed + i}.png" for i in range(recipe.n)]


class StudioPipeline:
    """Generate with a backbone; every image comes back with its recipe."""

    def __init__(self, backbone: Backbone | str | None = None, **load_options: Any):
        if not isinstance(backbone, Backbone):
            backbone = load_backbone(backbone, **load_options)
        elif load_options:
            raise InvalidArgumentError(f"load options {sorted(load_options)} apply only to a backbone source.")
        self.backbone = backbone

    def __repr__(self) -> str:
        return f"StudioPipeline({self.backbone!r})"

    @property
    def pipe(self):
        return self.backbone.pipe

    @property
    def adapters(self) -> list[dict[str, Any]]:
        """What is attached to the backbone unfused, in attach order: the rows of its attachments table
        ({"adapter", "weight", "inputs", ...}; `studio.adapters.base.attachments`)."""
        from studio.adapters.base import attachments

        return [entry for entry in attachments(self.backbone).values() if entry.get("fused") is None]

    # ------------------------------------------------------------------------------------ adapters

    def attach(self, adapter: Any, weight: float | str = 1.0, *, allow_partial: bool = False, **inputs: Any) -> Any:
        """Attach an adapter (an `Adapter` or a file path) at `weight`: a number, or per-block weights
        such as "1,up_blocks.1=0,down_blocks=0.5" (see `studio.blocks`); returns the adapter."""
        from studio.adapters.base import Adapter, load_adapter

        if not isinstance(adapter, Adapter):
            adapter = load_adapter(adapter, self.backbone, allow_partial=allow_partial)
        adapter.attach(self.backbone, parse_weight(weight, what="adapter weight"), **inputs)
        return adapter

    def detach(self, adapter: Any = None) -> None:
        """Detach one adapter (the object or its name), or all of them."""
        for entry in self.adapters:
            if adapter is None or entry["adapter"] is adapter or entry["adapter"].name == adapter:
                entry["adapter"].detach(self.backbone)

    def set_weight(self, adapter: Any, weight: float | str) -> None:
        weight = parse_weight(weight, what="adapter weight")
        for entry in self.adapters:
            if entry["adapter"] is adapter or entry["adapter"].name == adapter:
                entry["adapter"].set_weight(self.backbone, weight)
                return
        raise InvalidArgumentError(f"no attached adapter {adapter!r}; attached: {[e['adapter'].name for e in self.adapters]}.")

    def _adapter_records(self) -> list[dict[str, Any]]:
        from studio.hashing import hash_files

        records = []
        for entry in self.adapters:
            adapter = entry["adapter"]
            path = adapter.path
            weight = entry["weight"]
            record = {"name": adapter.name, "kind": adapter.kind,
                      "weight": weight if isinstance(weight, float) else str(weight),
                      "path": str(path.resolve()) if path else None,
                      "sha256": hash_files(path) if path else None}  # a file, or a control model's folder
            inputs = adapter.inputs_record(self.backbone)  # run-time inputs (reference images...) that remake it
            if inputs is not None:
                record["inputs"] = inputs
            if path is None and adapter.weightless:  # nothing but its manifest: the recipe can carry it
                record["manifest"] = adapter.manifest()
            records.append(record)
        return records

    def use(self, adapters: list[AdapterUse | dict[str, Any]]) -> None:
        """Make the attached adapters exactly `adapters`, in order: `AdapterUse` requests, or a recipe's adapter
        records (their files checked by hash, so a remade image uses the very same weights). Nothing is
        detached when a record cannot be attached again; an unchanged stack is left as it is."""
        from studio.hashing import hash_files

        if self._same_stack(adapters) or (all(isinstance(item, dict) for item in adapters)
                                          and adapters == self._adapter_records()):
            return
        requests = []
        for item in adapters:
            if isinstance(item, AdapterUse):
                requests.append(item)
                continue
            if not item.get("path") and not item.get("manifest"):
                raise RecipeError(f"the recipe uses adapter {item.get('name')!r}, which was never saved to a "
                                  f"file; it cannot be attached again.")
            if item.get("path") and (not Path(item["path"]).exists()
                                     or hash_files(Path(item["path"])) != item["sha256"]):
                raise RecipeError(f"the recipe's adapter {item['path']!r} is missing or changed (sha256 "
                                  f"{item['sha256'][:10]}); put that file back to remake the image.")
            inputs = item.get("inputs") or {}
            if None in inputs.get("images", []):
                raise RecipeError(f"the recipe's adapter {item.get('name')!r} read a reference image that was never "
                                  f"a file; it cannot be attached again.")
            if item.get("path"):
                requests.append(AdapterUse(item["path"], item["weight"], inputs))
            else:
                from studio.adapters.base import adapter_kinds

                kind = adapter_kinds().get_or_raise(item["manifest"]["kind"])
                requests.append(AdapterUse(kind.from_manifest(item["manifest"], {}), item["weight"], inputs))
        self.detach()
        for request in requests:
            self.attach(request.source, request.weight, allow_partial=request.allow_partial, **request.inputs)

    def _same_stack(self, requests: list[Any]) -> bool:
        """The requests name exactly the attached files at their weights, none with run-time inputs (images are
        read again on every request: an upload path can be written over)."""
        rows = self.adapters
        if len(rows) != len(requests) or not all(isinstance(r, AdapterUse) and not r.inputs for r in requests):
            return False
        return all(not row["inputs"] and row["adapter"].path is not None and isinstance(r.source, (str, Path))
                   and Path(r.source).resolve() == row["adapter"].path.resolve()
                   and parse_weight(r.weight, what="adapter weight") == row["weight"]
                   for row, r in zip(rows, requests, strict=True))

    def recipe(self, prompt: str, *, negative_prompt: str = "", n: int = 1, seed: int | None = None,
               steps: int | None = None, guidance: float | None = None, width: int | None = None,
               height: int | None = None, scheduler: str | None = None) -> Recipe:
        """The checked, complete recipe `generate` would run, defaults filled in from the family."""
        from studio import __version__

        family = self.backbone.family
        if not isinstance(prompt, str):
            raise InvalidArgumentError(f"prompt must be text, got {type(prompt).__name__}.")
        if not isinstance(negative_prompt, str):
            raise InvalidArgumentError(f"negative_prompt must be text, got {type(negative_prompt).__name__}.")
        steps = family.steps if steps is None else steps
        guidance = family.guidance if guidance is None else guidance
        seed = secrets.randbelow(2**32) if seed is None else seed
        width = self.backbone.default_size if width is None else width
        height = self.backbone.default_size if height is None else height
        scheduler = scheduler or family.scheduler
        self._check_settings(n=n, seed=seed, steps=steps, guidance=guidance, width=width, height=height,
                             scheduler=scheduler)
        if family.name == "flux" and negative_prompt:
            raise InvalidArgumentError(
                "negative_prompt: Flux.1 is guidance-distilled and takes no negative prompt; leave it empty "
                "and steer with `guidance` (the distilled guidance scale)."
            )
        return Recipe(prompt=prompt, negative_prompt=negative_prompt, seed=seed, n=n, steps=steps,
                      guidance=float(guidance), width=width, height=height, scheduler=scheduler,
                      backbone=self.backbone.source, backbone_hash=self.backbone.fingerprint(),
                      backbone_config=self.backbone.config,
                      family=family.name, dtype=str(self.backbone.dtype).replace("torch.", ""),
                      device=str(self.backbone.device), adapters=self._adapter_records(),
                      studio_version=__version__)

    def remake(self, original: Recipe, *, adapters: list[AdapterUse | dict[str, Any]] | None = None,
               **changes: Any) -> Recipe:
        """What remaking `original` runs, its adapters attached (its own, checked by hash, or the `adapters`
        requests instead): `original` itself when nothing changes (its batch position kept, so `replay` gives its
        very pixels), else a new recipe from it with `changes` (prompt, seed, steps... as `recipe` takes them)."""
        self.use(original.adapters if adapters is None else adapters)
        if not changes and adapters is None:
            return original
        return self.recipe(**(dict(prompt=original.prompt, negative_prompt=original.negative_prompt,
                                   seed=original.image_seed, steps=original.steps, guidance=original.guidance,
                                   width=original.width, height=original.height, scheduler=original.scheduler)
                              | changes))

    def _check_settings(self, *, n: Any, seed: Any, steps: Any, guidance: Any, width: Any, height: Any,
                        scheduler: str) -> None:
        """A recipe's numbers and sampler within their limits, whether `recipe()` made it or a PNG or an edit did."""
        family = self.backbone.family
        check_count("n", n)
        check_count("steps", steps)
        if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not math.isfinite(guidance) \
                or guidance < 0:
            raise InvalidArgumentError(f"guidance={guidance!r} must be a finite number >= 0 (e.g. {family.guidance}).")
        check_count("seed", seed, minimum=0)
        if seed + n - 1 > MAX_SEED:
            raise InvalidArgumentError(f"seed={seed} with n={n} passes the largest seed {MAX_SEED}.")
        for name, value in (("width", width), ("height", height)):
            self._check_side(name, value)
        get_scheduler_spec(scheduler, kind=scheduler_kind(self.backbone.base_scheduler_config))

    def _check_side(self, name: str, value: Any) -> None:
        factor = self.backbone.size_factor
        check_generation_size(name, value, self.backbone.default_size, self.backbone.family.title)
        if isinstance(value, bool) or not isinstance(value, int) or value < factor or value % factor:
            lower = max(factor, (value // factor) * factor) if isinstance(value, int) else factor
            raise InvalidSizeError(
                f"{name}={value!r} must be a positive multiple of {factor} for this {self.backbone.family.title} "
                f"backbone (e.g. {lower} or {lower + factor})."
            )

    def generate(self, prompt: str, *, negative_prompt: str = "", n: int = 1, seed: int | None = None,
                 steps: int | None = None, guidance: float | None = None, width: int | None = None,
                 height: int | None = None, scheduler: str | None = None,
                 adapters: list[AdapterUse | dict[str, Any]] | None = None,
                 progress: Progress | None = None) -> Generation:
        """Generate `n` images of `prompt`; image i uses seed + i, as in A1111. `adapters` (requests, see
        `use`) replace the attached ones first; without it the attached adapters are used."""
        if adapters is not None:
            self.use(adapters)
        recipe = self.recipe(prompt, negative_prompt=negative_prompt, n=n, seed=seed, steps=steps,
                             guidance=guidance, width=width, height=height, scheduler=scheduler)
        return Generation(self.run(recipe, progress=progress), recipe)

    def run(self, recipe: Recipe, *, progress: Progress | None = None) -> list[Image.Image]:
        """Run a complete recipe through the family's diffusers pipeline (the whole batch)."""
        import torch

        self._check_settings(n=recipe.n, seed=recipe.seed, steps=recipe.steps, guidance=recipe.guidance,
                             width=recipe.width, height=recipe.height, scheduler=recipe.scheduler)
        self.use(recipe.adapters)
        pipe = self.backbone.pipe
        pipe.scheduler = self.backbone.scheduler(recipe.scheduler)
        # One CPU generator per image: image i is reproducible from seed + i on any device.
        generators = [torch.Generator("cpu").manual_seed(recipe.seed + i) for i in range(recipe.n)]
        # adapters that depend on the prompt (SPM's facilitated transport) set themselves for this call
        prepared = [e["adapter"] for e in self.adapters]
        for adapter in prepared:
            adapter.prepare(self.backbone, [recipe.prompt], recipe.n)
        extra: dict[str, Any] = {}  # run-time inputs of attention-space adapters (IP-Adapter's image embeddings)
        for kind in dict.fromkeys(type(adapter) for adapter in prepared):
            extra.update(kind.call_arguments(self.backbone, recipe.guidance))
        try:
            # a trigger learned as several token vectors is written out as that many tokens
            output = pipe(prompt=concept_tokens.expand(self.backbone, recipe.prompt), num_images_per_prompt=recipe.n, generator=generators,
                          num_inference_steps=recipe.steps, guidance_scale=recipe.guidance, width=recipe.width,
                          height=recipe.height, output_type="pil", **extra,
                          **CALLS.get_or_raise(self.backbone.family.name)(pipe, recipe, progress))
        finally:
            for adapter in prepared:
                adapter.release()
        return list(output.images)

    def replay(self, recipe: Recipe, *, progress: Progress | None = None) -> Image.Image:
        """The image a recipe describes, made again (its whole batch is re-run, so pixels match exactly)."""
        if recipe.family != self.backbone.family.name:
            raise RecipeError(f"recipe is for a {recipe.family} backbone, this one is {self.backbone.family.name}.")
        if recipe.backbone_hash != self.backbone.fingerprint():
            warnings.warn(
                f"backbone {self.backbone.source!r} has hash {self.backbone.short_hash}, the recipe was made with "
                f"{recipe.backbone_hash[:10]}: the image will differ.", stacklevel=2)
        return self.run(recipe, progress=progress)[recipe.index]


