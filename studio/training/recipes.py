"""Training recipes as data: the options a run takes, per backbone family (or embedded backbone) and kind.

The files live in `studio/recipes/`: `defaults.yaml` (every run option a recipe controls), `any/<kind>.yaml` (a
kind on any backbone) and `<target>/<kind>.yaml` (a kind on one family: sd1, sd2, sdxl, sd3, flux, pixart; or an
embedded backbone: world-sd, world-dit), each naming its source. A file holds `about`, `source`, `train:`
(run options), `adapter:` (the kind's own options, named as its config names them: the fields it declares with
`studio.adapters.base.option`) and `variants:` (`fast`, `quality`, `style`, ...: the same sections on top).
Layers, each on the one before: defaults <- any/<kind> <- (an alias kind's options: dora) <- any/<alias> <-
<target>/<kind> <- <target>/<alias> <- the variant <- the run's own options (--config, then the command line).

kohya, ai-toolkit and OneTrainer ship presets per model family; these are the same idea, resolved by one
function (`resolve`) that the CLI, the API (`TrainConfig`) and the UI's Train tab all call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.errors import InvalidArgumentError

if TYPE_CHECKING:
    from dataclasses import Field

    from studio.adapters.base import AdapterConfig, KindAlias

ROOT = Path(__file__).resolve().parent.parent / "recipes"
SECTIONS = ("about", "source", "extends", "train", "adapter", "variants")


@dataclass
class Recipe:
    """A resolved recipe: its name ("world-sd/lora", "sdxl/lora@quality"), what it is for, where its values
    come from, the kind it trains (an alias's kind: dora trains a lora), the run options it sets (`train`) and
    the kind's own (`adapter`, by its config's names)."""

    name: str
    about: str
    sources: list[str]
    kind: str
    train: dict[str, Any]
    adapter: dict[str, Any]
    variants: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # options (by keyword) its layers set above defaults.yaml

    @property
    def options(self) -> dict[str, Any]:
        """Every option it sets, flat, by the names TrainConfig's keywords and `studio train`'s flags give them
        (rank, concept_slots)."""
        return {"kind": self.kind, **self.train, **keyword_view(self.kind, self.adapter)}

    def line(self, options: dict[str, Any] | None = None) -> str:
        """The recipe in one line, as `studio train` prints it: steps, batch, lr and what it sets beyond the
        defaults, at the values of `options` (the run's, overrides included) when given."""
        values = {**self.options, **(options or {})}
        keys = ["steps", "batch", "lr", *(k for k in self.changed if k not in ("steps", "batch", "lr", "kind",
                                                                            "checkpoint_every"))]
        return f"recipe {self.name}: " + ", ".join(f"{k}={_short(values[k])}" for k in keys)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + "; ".join(map(str, value[:2])) + ("; ..." if len(value) > 2 else "") + "]"
    return str(value)


def kind_alias(kind: str) -> KindAlias | None:
    """What `kind` is an alias of (a kind module declares it: `register_alias`), or None."""
    from studio.adapters.base import KIND_ALIASES, adapter_kinds

    adapter_kinds()  # every kind module has registered its kinds and aliases
    return KIND_ALIASES.get(kind)


def base_kind(kind: str) -> str:
    """The kind `kind` trains as: itself, or the kind it is an alias of."""
    alias = kind_alias(kind)
    return alias.kind if alias else kind


def config_class(kind: str) -> type[AdapterConfig]:
    """The config class of `kind` (of an alias: its kind's); an unknown kind raises, naming the registered ones."""
    from studio.adapters.base import adapter_kinds

    return adapter_kinds().get_or_raise(base_kind(kind)).config_class


def kind_options(kind: str) -> dict[str, Field]:
    """The kind's own training options (its config's fields declared with `option`), by keyword."""
    return config_class(kind).training_options()


def adapter_options(kind: str) -> set[str]:
    """The kind's own options a recipe (or the trainer) can set, by its config's names."""
    return {f.name for f in kind_options(kind).values()}


def option_keywords() -> set[str]:
    """The keywords of every registered kind's options (TrainConfig's flat names: rank, concept_slots...)."""
    from studio.adapters.base import adapter_kinds

    return {keyword for cls in adapter_kinds().values() for keyword in cls.config_class.training_options()}


def kind_section(kind: str, section: dict[str, Any] | None,
                 flat: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The kind's own options from `section` (by its config's names: a recipe's `adapter:`, TrainConfig's
    `adapter`) and `flat` (by keyword: TrainConfig's flat keywords and the flags, rank=8, concept_slots=4; None is
    not given; they win) -> (the options by config name, what the kind does not have as it was named)."""
    if not isinstance(section, dict | None):
        raise InvalidArgumentError(f"adapter={section!r} must map the kind's options to values (e.g. {{'rank': 8}}).")
    own = kind_options(kind)
    names = {f.name for f in own.values()}
    options: dict[str, Any] = {}
    unknown: dict[str, Any] = {}
    for name, value in (section or {}).items():
        (options if name in names else unknown)[name] = value
    for keyword, value in (flat or {}).items():
        if value is None:
            continue
        if keyword in own:
            options[own[keyword].name] = value
        else:
            unknown[keyword] = value
    return options, unknown


def keyword_view(kind: str, adapter: dict[str, Any]) -> dict[str, Any]:
    """The kind's options `adapter` (by config name) by their keywords, in their order."""
    keywords = {f.name: keyword for keyword, f in kind_options(kind).items()}
    return {keywords[name]: value for name, value in adapter.items()}


def trainable_kinds() -> list[str]:
    """The registered kinds that train (`Trainable`), each followed by its aliases: what `studio train` takes, in
    the registry's order. A kind's recipe files (any/<kind>.yaml...) are optional: defaults.yaml and its config's
    defaults make one."""
    from studio.adapters.base import KIND_ALIASES, Trainable, adapter_kinds

    return [name for kind, cls in adapter_kinds().items() if issubclass(cls, Trainable) and cls.from_folder
            for name in (kind, *(a for a, alias in KIND_ALIASES.items() if alias.kind == kind))]


def recipe_kinds() -> list[str]:
    """Every kind with a recipe (the trainable kinds, plus aliases such as dora)."""
    return sorted(p.stem for p in (ROOT / "any").glob("*.yaml"))


def targets() -> list[str]:
    return sorted(p.name for p in ROOT.iterdir() if p.is_dir() and p.name != "any")


@functools.cache
def _read(path: Path) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise InvalidArgumentError(f"recipe file {path} has unknown sections {unknown}; sections: {', '.join(SECTIONS)}.")
    return data


def _layers(target: str, kind: str) -> list[tuple[str, dict[str, Any]]]:
    """(file name, contents) of each layer that exists, from the bottom; a file that `extends` another
    ("world-sd/lora") has that one's layer just below its own."""
    names = ["defaults", f"any/{base_kind(kind)}", f"any/{kind}", f"{target}/{base_kind(kind)}", f"{target}/{kind}"]
    alias = kind_alias(kind)
    layers: list[tuple[str, dict[str, Any]]] = []

    def add(name: str, chain: tuple[str, ...] = ()) -> None:
        if name in chain:
            raise InvalidArgumentError(f"recipe {name} extends itself through {' -> '.join(chain)}.")
        data = _read(ROOT / f"{name}.yaml")
        if data.get("extends"):
            if not (ROOT / f"{data['extends']}.yaml").is_file():
                raise InvalidArgumentError(f"recipe {name} extends {data['extends']!r}, which is not a recipe; "
                                           f"recipes: {', '.join(names_of_files())}.")
            add(data["extends"], (*chain, name))
        if all(name != seen for seen, _ in layers):
            layers.append((name, data))

    for name in names:
        if alias and name == f"any/{kind}":  # what the alias declares, under its recipe files
            layers.append((f"kind {kind}", {"adapter": alias.options}))
        if (ROOT / f"{name}.yaml").is_file():
            add(name)
    return layers


def run_options() -> set[str]:
    """The run options a recipe's `train:` sets: those defaults.yaml holds."""
    return set(_read(ROOT / "defaults.yaml").get("train") or {})


def section_options(section: dict[str, Any], kind: str, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A layer's `train:` (run options) and `adapter:` (the kind's own, by its config's names); a key the trainer
    or the kind does not have is refused, naming the key and the kind."""
    train_keys = run_options()
    train: dict[str, Any] = {}
    for key, value in (section.get("train") or {}).items():
        if key not in train_keys:
            hint = " (it is the kind's own option: put it under adapter:)" if key in option_keywords() else ""
            raise InvalidArgumentError(f"{where}: train key {key!r} is not a training option{hint}; training options: "
                                       f"{', '.join(sorted(train_keys))}.")
        train[key] = value
    adapter, unknown = kind_section(kind, section.get("adapter"))
    if unknown:
        raise InvalidArgumentError(f"{where}: adapter key {next(iter(unknown))!r} is not an option of kind {kind!r}; "
                                   f"its options: {', '.join(sorted(adapter_options(kind))) or 'none'}.")
    return train, adapter


def parse_name(name: str) -> tuple[str | None, str | None, str | None]:
    """"target/kind@variant", "target/kind", "kind@variant" or "variant" -> (target, kind, variant)."""
    head, _, variant = name.partition("@")
    if "/" in head:
        target, _, kind = head.partition("/")
        return target, kind, variant or None
    if variant:
        return None, head, variant
    return None, None, head or None


def resolve(backbone: str | None, kind: str, recipe: str | None = None) -> Recipe:
    """The recipe for training `kind` on `backbone` (a name, folder, file or hub id; None = the embedded
    default); `recipe`: a variant ("quality") or a full name ("sdxl/lora@quality") chosen instead."""
    target = recipe_target(backbone)
    variant = None
    if recipe:
        named_target, named_kind, variant = parse_name(recipe)
        if named_kind and base_kind(named_kind) != base_kind(kind):
            raise InvalidArgumentError(f"recipe {recipe!r} is for kind {named_kind!r}, not {kind!r}; pick one of "
                                       f"{', '.join(names(kind))} or set kind={named_kind!r}.")
        if named_kind:
            kind = named_kind
        if named_target:
            if named_target not in targets() and named_target != "any":
                raise InvalidArgumentError(f"recipe {recipe!r}: no recipes for {named_target!r}; recipes: "
                                           f"{', '.join(names())}.")
            target = named_target
    if kind not in trainable_kinds():
        raise InvalidArgumentError(f"kind {kind!r} does not train from a folder; kinds that do: "
                                   f"{', '.join(trainable_kinds())}.")
    layers = _layers(target, kind)
    train: dict[str, Any] = {}
    adapter: dict[str, Any] = {}
    sources, about, variants = [], "", {}
    changed: list[str] = []

    def apply(data: dict[str, Any], where: str) -> list[str]:
        """The layer's options on those below; returns their keywords."""
        layer_train, layer_adapter = section_options(data, kind, where)
        train.update(layer_train)
        adapter.update(layer_adapter)
        return [*layer_train, *keyword_view(kind, layer_adapter)]

    for where, data in layers:
        layer = apply(data, f"recipe {where}")
        if where != "defaults":
            changed += [k for k in layer if k not in changed]
        about = data.get("about", about)
        if data.get("source"):
            sources.append(f"{where}: {data['source']}")
        for name, body in (data.get("variants") or {}).items():
            variants.setdefault(name, []).append((where, body))
    name = f"{target}/{kind}"
    if variant:
        if variant not in variants:
            raise InvalidArgumentError(f"recipe {recipe!r}: {name} has no variant {variant!r}; recipes for it: "
                                       f"{', '.join([name, *(f'{name}@{v}' for v in sorted(variants))])}.")
        for where, body in variants[variant]:
            layer = apply(body, f"recipe {where}@{variant}")
            changed += [k for k in layer if k not in changed]
            about = body.get("about", about)
        name = f"{name}@{variant}"
    return Recipe(name=name, about=about, sources=sources, kind=base_kind(kind), train=train,
                  adapter={k: v for k, v in adapter.items() if v is not None},  # None: the config's default
                  variants=sorted(variants), changed=changed)


def names_of_files() -> list[str]:
    return [f"{p.parent.name}/{p.stem}" for p in sorted(ROOT.glob("*/*.yaml"))]


def _abouts(target: str, kind: str) -> dict[str | None, str]:
    """What the recipe target/kind is for (key None) and each of its variants, the layers' included."""
    abouts: dict[str | None, str] = {}
    for _, data in _layers(target, kind):
        abouts[None] = data.get("about", abouts.get(None, ""))
        for variant, body in (data.get("variants") or {}).items():
            abouts[variant] = body.get("about", abouts.get(variant, ""))
    return abouts


def listing(kind: str | None = None) -> list[tuple[str, str]]:
    """(name, what it is for) of every recipe file (of one kind) and each variant it has, its layers' included;
    for `studio recipes`."""
    rows = []
    for target in ["any", *targets()]:
        for path in sorted((ROOT / target).glob("*.yaml")):
            if kind and base_kind(path.stem) != base_kind(kind):
                continue
            abouts = _abouts(target, path.stem)
            rows += [(f"{target}/{path.stem}" + (f"@{v}" if v else ""), about)
                     for v, about in sorted(abouts.items(), key=lambda item: item[0] or "")]
    return rows


def names(kind: str | None = None) -> list[str]:
    """Every recipe's name (of one kind), variants included."""
    return [name for name, _ in listing(kind)]


def recipe_target(backbone: str | None) -> str:
    """Which recipes a backbone takes: an embedded world backbone's own, else its family's (read from its
    config or its file's header, without loading weights)."""
    from studio.backbones import DEFAULT_BACKBONE, family_of_source
    from studio.embedded import EMBEDDED

    source = str(backbone or DEFAULT_BACKBONE)
    if source in EMBEDDED and not Path(source).expanduser().exists():
        return source.removeprefix("tiny-") if source.startswith("tiny-") else source
    return family_of_source(source).name


def recipe_line(config: Any) -> str:
    """A resolved TrainConfig's recipe in one line, at the run's values (its overrides included)."""
    values = {f.name: getattr(config, f.name) for f in fields(config) if f.name != "adapter"}
    return resolve(config.backbone, config.kind, config.recipe).line(
        {**values, **keyword_view(config.kind, config.adapter)})
