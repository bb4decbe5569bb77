"""The recipe of an image: everything that made it, written into the PNG it is saved as.

Each PNG carries two text chunks: `parameters`, in the A1111 format that A1111, ComfyUI, Civitai and
image browsers already read, and `studio.recipe`, the full recipe as JSON, from which
`studio generate --from image.png` makes the same pixels again.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.errors import RecipeError
from studio.home import atomic_write_bytes

if TYPE_CHECKING:
    from PIL import Image

RECIPE_CHUNK = "studio.recipe"
PARAMETERS_CHUNK = "parameters"
RECIPE_VERSION = 1


@dataclass
class AdapterUse:
    """One adapter of a generation request: what to attach (a file, a control model's folder or hub id, or an
    `Adapter` object), at which weight (a number or block weights, "1,up_blocks.1=0"), with which run-time
    inputs (reference or control images, routing...). The CLI and the UI build these and hand them to
    `StudioPipeline.use` / `generate(adapters=...)`; a recipe's adapter records are read the same way."""

    source: Any
    weight: float | str = 1.0
    inputs: dict[str, Any] = field(default_factory=dict)
    allow_partial: bool = False  # a foreign LoRA file with keys this backbone lacks: attach the rest


@dataclass(kw_only=True)
class Recipe:
    """One image's recipe; `n` and `index` place it in the batch that made it (its seed is seed + index)."""

    prompt: str
    negative_prompt: str = ""
    seed: int
    n: int = 1
    index: int = 0
    steps: int
    guidance: float
    width: int
    height: int
    scheduler: str
    backbone: str
    backbone_hash: str
    backbone_config: str | None = None  # the diffusers configs a single-file backbone was built with
    family: str
    dtype: str
    device: str
    adapters: list[dict[str, Any]] = field(default_factory=list)
    studio_version: str = ""
    recipe_version: int = RECIPE_VERSION

    @property
    def image_seed(self) -> int:
        """The seed of this image alone (A1111 numbers a batch's images seed, seed+1, ...)."""
        return self.seed + self.index

    def for_image(self, index: int) -> Recipe:
        return dataclasses.replace(self, index=index)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(
                f"recipe has fields this studio does not know ({', '.join(unknown)}); it was written by a "
                f"newer studio ({data.get('studio_version', '?')}): upgrade studio to replay it."
            )
        try:
            return cls(**data)
        except TypeError as error:
            raise RecipeError(f"recipe is incomplete: {error}") from None

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        try:
            data = json.loads(text)
        except ValueError as error:
            raise RecipeError(f"recipe JSON is malformed: {error}") from None
        if not isinstance(data, dict):
            raise RecipeError("recipe JSON is not an object.")
        return cls.from_dict(data)

    def parameters(self) -> str:
        """The A1111 `parameters` text of this image."""
        from studio.schedulers import SCHEDULERS

        spec = SCHEDULERS.get(self.scheduler)
        fields = {
            "Steps": self.steps,
            "Sampler": spec.a1111 if spec else self.scheduler,
            "CFG scale": f"{self.guidance:g}",
            "Seed": self.image_seed,
            "Size": f"{self.width}x{self.height}",
            "Model hash": self.backbone_hash[:10],
            "Model": Path(self.backbone).stem if Path(self.backbone).suffix else Path(self.backbone).name,
        }
        if self.n > 1:
            fields |= {"Batch size": self.n, "Batch pos": self.index}
        loras = [a for a in self.adapters if a.get("kind") not in CONTROLNET_UNIT_KINDS]
        if loras:  # A1111's LoRA fields: `<lora:name:weight>` in the prompt, short file hashes
            fields["Lora hashes"] = '"' + ", ".join(f"{a['name']}: {(a.get('sha256') or '')[:12]}" for a in loras) + '"'
        # image prompts and controls as A1111's ControlNet extension writes its units
        for i, a in enumerate(a for a in self.adapters if a.get("kind") in CONTROLNET_UNIT_KINDS):
            inputs = a.get("inputs") or {}
            model = f'Model: {a["name"]} [{(a.get("sha256") or "")[:8]}], Weight: {_a1111_weight(a["weight"])}'
            if a["kind"] == "ip_adapter":
                fields[f"ControlNet {i}"] = f'"Module: ip-adapter, {model}, Routing: {inputs.get("routing", "all")}"'
            else:
                fields[f"ControlNet {i}"] = (f'"Module: {inputs.get("preprocess", "none")}, {model}, Guidance Start: '
                                             f'{inputs.get("start", 0):g}, Guidance End: {inputs.get("end", 1):g}"')
        fields["Version"] = f"studio {self.studio_version}".strip()
        lines = [" ".join([self.prompt, *(f"<lora:{a['name']}:{_a1111_weight(a['weight'])}>" for a in loras)])]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(", ".join(f"{key}: {value}" for key, value in fields.items()))
        return "\n".join(lines)


CONTROLNET_UNIT_KINDS = ("ip_adapter", "controlnet", "t2i_adapter")  # not LoRAs: A1111 lists them as units


def _a1111_weight(weight: float | str) -> str:
    """A number as A1111 writes it; per-block weights as the default plus the block-weight extension's
    `lbw=` field holding studio's spec."""
    if isinstance(weight, (int, float)):
        return f"{weight:g}"
    default, _, rules = str(weight).partition(",")  # BlockWeights write their default first
    return f"{default}:lbw={rules}"


def png_bytes(image: Image.Image, recipe: Recipe) -> bytes:
    """The image encoded as PNG with both recipe chunks."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt(PARAMETERS_CHUNK, recipe.parameters())
    info.add_itxt(RECIPE_CHUNK, recipe.to_json())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(image: Image.Image, recipe: Recipe, path: str | Path) -> Path:
    """Write the image with its recipe to `path` atomically."""
    path = Path(path)
    atomic_write_bytes(path, png_bytes(image, recipe))
    return path


def read_png_text(path: str | Path) -> dict[str, str]:
    """The text chunks of a PNG file."""
    from PIL import UnidentifiedImageError

    from studio.limits import ImageTooLargeError, open_image

    try:
        with open_image(path) as image:
            image.load()
            return {k: v for k, v in image.info.items() if isinstance(v, str)}
    except FileNotFoundError:
        raise RecipeError(f"image {str(path)!r} does not exist.") from None
    except (UnidentifiedImageError, OSError) as error:
        raise RecipeError(f"{str(path)!r} is not a readable image ({error}).") from None
    except ImageTooLargeError as error:
        raise RecipeError(str(error)) from None


def read_recipe(path: str | Path) -> Recipe:
    """The studio recipe stored in a PNG."""
    text = read_png_text(path)
    if RECIPE_CHUNK not in text:
        found = "it has A1111 parameters but no studio recipe" if PARAMETERS_CHUNK in text else "it has no recipe"
        raise RecipeError(f"{str(path)!r} was not written by studio ({found}); pass an image studio saved.")
    return Recipe.from_json(text[RECIPE_CHUNK])
