"""Concept tokens: a trigger word learned as its own text-encoder embedding, carried inside the adapter.

Pivotal tuning (diffusers' advanced DreamBooth script, Mix-of-Show's ED-LoRA, and the token that
Orthogonal Adaptation trains beside its weights) moves part of a concept out of the weights into new
token embeddings. A sum of adapters does not touch tokens, so that part survives a merge intact.

An adapter's tokens are `{trigger: {text encoder component: (n, dim) vectors}}`. On attach the trigger
becomes an added token of each tokenizer (matched as a whole word in any case, so it overrides the
word's BPE pieces and leaves words that contain it, "asks" for `sks`, alone) with its vectors as new rows of the embedding table; a trigger of n > 1 vectors is written
out as n tokens in prompts (`expand`). In a file they are `bundle_emb.<trigger>.<component>` tensors,
after A1111's bundled embeddings (`bundle_emb.<name>.*` in a LoRA file); `to_a1111` gives its names.

diffusers' `load_textual_inversion` is the mixin method of SD1/SDXL/Flux pipelines only (not SD3 or
PixArt) and expands multi-vector tokens in its own prompt hook, which other families lack; adding
tokens is three lines, so it is written here, and removing them reuses diffusers' unload function,
which works on any tokenizer / text encoder pair.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from typing import TYPE_CHECKING, Any

from studio.errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch

    from studio.backbones import Backbone

PREFIX = "bundle_emb."
Tokens = dict[str, dict[str, "torch.Tensor"]]  # trigger -> component -> (n, dim)


# A1111's names of the text encoders in bundled embeddings
A1111 = {"string_to_param.*": "text_encoder", "clip_l": "text_encoder", "clip_g": "text_encoder_2"}


def split(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Tokens]:
    """A file's tensors -> (the weights, the concept tokens), from studio's names or A1111's."""
    weights, tokens = {}, {}
    for key, value in tensors.items():
        if key.startswith(PREFIX):
            rest = key[len(PREFIX):]
            suffix = next((s for s in A1111 if rest.endswith("." + s)), None)
            trigger, _, component = (rest[: -len(suffix) - 1], "", A1111[suffix]) if suffix else rest.rpartition(".")
            tokens.setdefault(trigger, {})[component] = value
        else:
            weights[key] = value
    return weights, tokens


def join(tensors: dict[str, torch.Tensor], tokens: Tokens) -> dict[str, torch.Tensor]:
    return {**tensors, **{f"{PREFIX}{trigger}.{component}": value
                          for trigger, parts in tokens.items() for component, value in parts.items()}}


def _names(family: str, single: str) -> dict[str, str]:
    """component -> its name in other tools' embedding files: SDXL's `clip_l` / `clip_g`, else `single`."""
    return {"text_encoder": "clip_l", "text_encoder_2": "clip_g"} if family == "sdxl" else {"text_encoder": single}


def to_a1111(tokens: Tokens, family: str) -> dict[str, torch.Tensor]:
    """The tokens under A1111's bundled-embedding names: `string_to_param.*` for one text encoder,
    `clip_l` / `clip_g` for SDXL's two."""
    names = _names(family, "string_to_param.*")
    return {f"{PREFIX}{trigger}.{names[c]}": v for trigger, parts in tokens.items()
            for c, v in parts.items() if c in names}


def to_embedding_files(tokens: Tokens, family: str) -> dict[str, dict[str, torch.Tensor]]:
    """trigger -> the tensors of its embedding file: `emb_params` (A1111's and diffusers' single-encoder
    embedding) or SDXL's `clip_l` / `clip_g` pair."""
    names = _names(family, "emb_params")
    return {trigger: {names[c]: v for c, v in parts.items() if c in names} for trigger, parts in tokens.items()}


def encoders(backbone: Backbone) -> dict[str, tuple[Any, Any]]:
    """component -> (tokenizer, text encoder) for each text encoder the backbone has."""
    pipe = backbone.pipe.components
    return {name: (pipe.get(name.replace("text_encoder", "tokenizer")), module) for name, module in pipe.items()
            if name.startswith("text_encoder") and module is not None
            and pipe.get(name.replace("text_encoder", "tokenizer")) is not None}


def names(trigger: str, n: int) -> list[str]:
    """The added tokens of a trigger of n vectors: the trigger itself, then `trigger+1`... (not diffusers'
    `trigger_1`, which its SD1/SDXL prompt hook would expand a second time)."""
    return [trigger] + [f"{trigger}+{i}" for i in range(1, n)]


def attached(backbone: Backbone | Any) -> dict[str, dict[str, Any]]:
    """trigger -> {"owner": adapter name, "n": vectors} of the tokens on this backbone (kept on its diffusers
    pipeline, so code that holds only the pipeline can `expand` prompts too)."""
    pipe = getattr(backbone, "pipe", backbone)
    if not hasattr(pipe, "concept_tokens"):
        pipe.concept_tokens = {}
    return pipe.concept_tokens


def check(backbone: Backbone, owner: str, tokens: Tokens) -> None:
    """Refuse, before anything changes, tokens for text encoders the backbone lacks or of another width,
    and a trigger that another attached adapter already brought."""
    parts = encoders(backbone)
    for trigger, per_component in tokens.items():
        if not re.fullmatch(r"[\w-]+", trigger):
            raise InvalidArgumentError(f"adapter {owner!r}: concept token {trigger!r} must be one word (letters, "
                                       f"digits, _ or -).")
        other = attached(backbone).get(trigger)
        if other is not None:
            raise InvalidArgumentError(f"adapter {owner!r} brings the token {trigger!r}, which adapter "
                                       f"{other['owner']!r} already brought; detach one, or retrain one with "
                                       f"another trigger.")
        shapes = sorted(tuple(v.shape) for v in per_component.values())
        if any(len(s) != 2 for s in shapes) or len({s[0] for s in shapes}) != 1:
            raise InvalidArgumentError(f"adapter {owner!r}: token {trigger!r} needs one (n, dim) tensor per text "
                                       f"encoder, the same n for each; got {shapes}.")
        for component, vectors in per_component.items():
            if component not in parts:
                raise InvalidArgumentError(f"adapter {owner!r}: token {trigger!r} is for {component}, which "
                                           f"{backbone.source!r} does not have.")
            width = parts[component][1].get_input_embeddings().embedding_dim
            if vectors.shape[1] != width:
                raise InvalidArgumentError(f"adapter {owner!r}: token {trigger!r} is {vectors.shape[1]} wide for "
                                           f"{component}, whose embeddings are {width} wide in {backbone.source!r}.")


def add(backbone: Backbone, owner: str, tokens: Tokens) -> None:
    """Add the tokens to the tokenizers and their vectors to the embedding tables."""
    import torch
    from transformers import AddedToken

    check(backbone, owner, tokens)
    parts = encoders(backbone)
    for trigger, per_component in tokens.items():
        n = next(iter(per_component.values())).shape[0]
        for component, vectors in per_component.items():
            tokenizer, encoder = parts[component]
            tokenizer.add_tokens([AddedToken(t, single_word=True, normalized=True) for t in names(trigger, n)])
            ids = tokenizer.convert_tokens_to_ids(names(trigger, n))
            if encoder.get_input_embeddings().num_embeddings < len(tokenizer):
                encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            table = encoder.get_input_embeddings().weight
            with torch.no_grad():
                table[ids] = vectors.to(table.device, table.dtype)
        attached(backbone)[trigger] = {"owner": owner, "n": n}


def remove(backbone: Backbone, owner: str) -> None:
    """Take `owner`'s tokens out of the tokenizers and embedding tables (diffusers' unload)."""
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin

    mine = {t: e for t, e in attached(backbone).items() if e["owner"] == owner}
    parts = list(encoders(backbone).values())
    for trigger, entry in mine.items():
        left = Counter(id(tokenizer) for tokenizer, _ in parts)  # encoders still to unload, per tokenizer
        for tokenizer, encoder in parts:
            left[id(tokenizer)] -= 1
            if left[id(tokenizer)]:  # shared with an encoder still to come (tiny configs): unload from a copy
                tokenizer = copy.deepcopy(tokenizer)
            present = [t for t in names(trigger, entry["n"]) if t in tokenizer.get_added_vocab()]
            if present:
                TextualInversionLoaderMixin.unload_textual_inversion(None, tokens=present, tokenizer=tokenizer,
                                                                     text_encoder=encoder)
                # resizing set the config's vocabulary size; the unload leaves it, and a saved model would not load
                encoder.config.get_text_config().vocab_size = encoder.get_input_embeddings().num_embeddings
        del attached(backbone)[trigger]


def word(trigger: str) -> re.Pattern:
    """The trigger as a whole word of a prompt, in any case (as the tokenizer matches it)."""
    return re.compile(rf"(?<![\w+-]){re.escape(trigger)}(?![\w+-])", re.IGNORECASE)


def expand(backbone: Backbone | Any, text: str) -> str:
    """`text` (for a backbone or its diffusers pipeline) with each multi-vector trigger written out as its tokens ("sks" -> "sks sks+1")."""
    for trigger, entry in attached(backbone).items():
        if entry["n"] > 1:
            text = word(trigger).sub(" ".join(names(trigger, entry["n"])), text)
    return text


class TrainableTokens:
    """A trigger's vectors as parameters while training: added as tokens (starting from the embedding of
    the word's own pieces), and put into the text encoders' output by a hook on the embedding table, so
    only these vectors get gradients, not the whole table."""

    def __init__(self, backbone: Backbone, owner: str, trigger: str, n: int):
        import torch

        self.backbone, self.trigger = backbone, trigger
        start: Tokens = {trigger: {}}
        for component, (tokenizer, encoder) in encoders(backbone).items():
            pieces = tokenizer(trigger, add_special_tokens=False).input_ids
            table = encoder.get_input_embeddings().weight.detach()
            start[trigger][component] = table[pieces].float().mean(0, keepdim=True).repeat(n, 1).cpu()
        add(backbone, owner, start)
        self.vectors: dict[str, torch.nn.Parameter] = {}
        self.hooks = []
        for component, (tokenizer, encoder) in encoders(backbone).items():
            table = encoder.get_input_embeddings()
            param = torch.nn.Parameter(start[trigger][component].to(table.weight.device))
            self.vectors[component] = param
            first = tokenizer.convert_tokens_to_ids(trigger)
            self.hooks.append(table.register_forward_hook(self._hook(param, first, n)))

    @staticmethod
    def _hook(param: torch.nn.Parameter, first: int, n: int):
        import torch

        def put(module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
            ids = args[0]
            mine = (ids >= first) & (ids < first + n)
            if not mine.any():
                return output
            return torch.where(mine[..., None], param[(ids - first).clamp(0, n - 1)].to(output.dtype), output)

        return put

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.vectors.values())

    def values(self) -> Tokens:
        return {self.trigger: {c: p.detach().float().cpu().clone() for c, p in self.vectors.items()}}

    def load(self, tokens: Tokens) -> None:
        import torch

        with torch.no_grad():
            for component, value in tokens[self.trigger].items():
                self.vectors[component].copy_(value)

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
