"""YAML recipes: one file says what to train, on what, how sparse, and what to export.

``load_recipe(path, overrides)`` reads the YAML safely (no object construction), applies
``--set dotted.key=value`` overrides, and validates the whole thing before any work is done.
Every problem is reported as one :class:`RecipeError` naming the file, the line and column, the
key path, and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from ..methods.targets import LAYER_TYPES

Loc = tuple[str | int, ...]


class RecipeError(ValueError):
    """A recipe problem, located in its file. ``str()`` is the one-line message the CLI prints."""

    def __init__(self, message: str, source: str = "<recipe>", key: Loc = (), line: int | None = None,
                 col: int | None = None):
        self.message, self.source, self.key, self.line, self.col = message, source, key, line, col
        where = source if line is None else f"{source}:{line}:{col}"
        key_path = ".".join(str(k) for k in key)
        super().__init__(f"{where}: {key_path + ': ' if key_path else ''}{message}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    """Where the model comes from. ``num_labels``/``num_classes`` and input channels come from the data."""

    source: Literal["hf_sparse", "timm", "transformers"] = Field(
        "hf_sparse", description="hf_sparse's registry, timm.create_model, or a transformers Auto class")
    name: str | None = Field(None, description="registry name (hf_sparse) or timm model name")
    path: str | None = Field(None, description="transformers: a checkpoint folder or Hub id to load")
    auto_class: str | None = Field(
        None, description="transformers: Auto class to use (default from the task, e.g. AutoModelForImageClassification)")
    config: dict[str, Any] = Field(default_factory=dict,
                                   description="config values: hf_sparse model config, or a transformers config incl. model_type")
    pretrained: bool = Field(False, description="timm: load pretrained weights (needs the Hub)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="timm: extra create_model keyword arguments")

    @model_validator(mode="after")
    def _needs_a_name(self):
        if self.source in ("hf_sparse", "timm") and not self.name:
            raise ValueError(f"model.name is required when model.source is {self.source!r}")
        if self.source == "transformers" and not (self.path or self.config.get("model_type")):
            raise ValueError("model.source 'transformers' needs model.path or model.config.model_type")
        return self


class DataConfig(_Section):
    name: str = Field("fashion_mnist", description="built-in data source (see hf_sparse.data.DATA_SOURCES)")
    path: str | None = Field(None, description="local folder overriding the source's bundled copy")
    hub_id: str | None = Field(None, description="a Hub dataset id, loaded with datasets.load_dataset")
    split: str = Field("official", description="which split scheme the source offers (e.g. official, speaker)")
    options: dict[str, Any] = Field(default_factory=dict, description="source-specific options")
    max_train_samples: PositiveInt | None = Field(None, description="use only this many training examples")
    max_eval_samples: PositiveInt | None = Field(None, description="use only this many evaluation examples")
    seed: int = Field(0, description="seed for subsampling and generated data")


class TargetsConfig(_Section):
    include: list[str] = Field(default_factory=lambda: ["*"],
                               description="parameter-name patterns to sparsify: glob, or 're:<regex>'")
    exclude: list[str] = Field(default_factory=list, description="patterns to leave dense (e.g. the classifier head)")
    layer_types: list[Literal[tuple(LAYER_TYPES)]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(LAYER_TYPES), description="module types whose weights qualify")


class SparsityConfig(_Section):
    method: str = Field("none", description="a registered method name, or 'none' for dense training")
    target_density: float | None = Field(None, gt=0, le=1, description="kept fraction of the targeted weights")
    targets: TargetsConfig = Field(default_factory=TargetsConfig)
    params: dict[str, Any] = Field(default_factory=dict, description="the method's own parameters")

    @model_validator(mode="after")
    def _known_method(self):
        from ..methods import METHODS

        if self.method == "none":
            return self
        if self.method not in METHODS:
            raise _KeyedError(("method",), f"unknown method {self.method!r}; allowed: none, {', '.join(sorted(METHODS))}")
        cls = METHODS[self.method]
        if cls.target_density_mode == "required" and self.target_density is None:
            raise _KeyedError(("target_density",), f"method {self.method!r} needs a target_density in (0, 1]")
        try:
            config = cls.Config(**self.params)
        except ValidationError as e:
            err = e.errors()[0]
            raise _KeyedError(("params", *err["loc"]), _describe(err, cls.Config)) from None
        problem = cls.config_error(config, self.target_density)
        if problem:
            raise _KeyedError(*problem)
        return self

    def method_config(self):
        from ..methods import METHODS

        return METHODS[self.method].Config(**self.params)


class ExportConfig(_Section):
    format: Literal["dense", "bitmask", "purged"] = Field("dense", description="storage format of run_dir/model")
    push_to_hub: bool = Field(False, description="push the sparse checkpoint to the Hub at the end of the run")
    hub_model_id: str | None = Field(None, description="repo id to push to")
    private: bool = False
    revision: str | None = None

    @model_validator(mode="after")
    def _repo_when_pushing(self):
        if self.push_to_hub and not self.hub_model_id:
            raise _KeyedError(("hub_model_id",), "required when push_to_hub is true")
        return self


class Recipe(_Section):
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    training: dict[str, Any] = Field(default_factory=dict, description="any transformers.TrainingArguments field")
    sparsity: SparsityConfig = Field(default_factory=SparsityConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    # Where the recipe came from, for error messages and for the copy saved with the model.
    _source: str = "<recipe>"
    _positions: dict = {}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def error(self, key: Loc, message: str) -> RecipeError:
        """A RecipeError located at ``key`` of this recipe (e.g. for checks that need the model)."""
        return _located(message, self._source, key, self._positions)


class _KeyedError(ValueError):
    """Raised inside validators to point at a key below the validated section."""

    def __init__(self, key: Loc, message: str):
        self.key, self.message = key, message
        super().__init__(message)


# -- reading YAML with positions --------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false are booleans.

    YAML 1.1 also reads yes/no/on/off as booleans, which turns transformers' own option values
    (``save_strategy: no``, ``--set training.eval_strategy=no``) into ``False``.
    """


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _positions(node: yaml.Node, source: str, prefix: Loc = ()) -> dict[Loc, tuple[int, int]]:
    """Map each key path to the 1-based (line, column) where it is written; reject duplicate keys."""
    pos: dict[Loc, tuple[int, int]] = {prefix: (node.start_mark.line + 1, node.start_mark.column + 1)}
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                raise RecipeError(f"duplicate key {key!r}", source, prefix + (key,),
                                  line=key_node.start_mark.line + 1, col=key_node.start_mark.column + 1)
            seen.add(key)
            pos.update(_positions(value_node, source, prefix + (key,)))
            pos[prefix + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            pos.update(_positions(item, source, prefix + (i,)))
    return pos


def _located(message: str, source: str, key: Loc, positions: dict) -> RecipeError:
    """Attach the closest written position: the key itself, else its nearest written parent."""
    for n in range(len(key), -1, -1):
        where = positions.get(key[:n])
        if where == "--set":
            return RecipeError(message, f"{source} (--set)", key)
        if where:
            return RecipeError(message, source, key, *where)
    return RecipeError(message, source, key)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as a YAML scalar/list)."""
    if "=" not in text:
        raise RecipeError(f"--set expects dotted.key=value, got {text!r}", "<command line>")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set expects dotted.key=value, got {text!r}", "<command line>")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw != "" else ""
    except yaml.YAMLError as e:
        raise RecipeError(f"cannot parse value {raw!r}: {e.problem}", "<command line>", tuple(key.split("."))) from None
    return key.split("."), value


def _apply_override(data: dict, keys: list[str], value: Any, positions: dict, source: str) -> None:
    node = data
    for i, k in enumerate(keys[:-1]):
        if not isinstance(node.get(k, {}), dict):
            raise RecipeError(f"cannot set below {k!r}: it is not a mapping", f"{source} (--set)", tuple(keys[: i + 1]))
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    positions[tuple(keys)] = "--set"


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file. Raises :class:`RecipeError`."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise RecipeError(f"cannot read recipe: {e.strerror}", source) from None
    return recipe_from_text(text, source, overrides)


def recipe_from_text(text: str, source: str = "<recipe>", overrides: list[str] | None = None) -> Recipe:
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise RecipeError(f"invalid YAML: {e.problem}", source, (), mark.line + 1, mark.column + 1) from None
    except yaml.YAMLError as e:
        raise RecipeError(f"invalid YAML: {e}", source) from None
    if data is None:
        data, node_positions = {}, {}
    else:
        node_positions = _positions(node, source)
    if not isinstance(data, dict):
        raise RecipeError("a recipe is a mapping with keys model, data, training, sparsity, export", source, (), 1, 1)
    for item in overrides or []:
        keys, value = parse_override(item)
        _apply_override(data, keys, value, node_positions, source)
    recipe = validate_dict(data, source, node_positions)
    return recipe


def validate_dict(data: dict, source: str = "<recipe>", positions: dict | None = None) -> Recipe:
    """Validate an already-parsed recipe mapping."""
    positions = positions or {}
    try:
        recipe = Recipe(**data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err["loc"])
        ctx_err = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_err, _KeyedError):
            raise _located(ctx_err.message, source, loc + ctx_err.key, positions) from None
        raise _located(_describe(err, Recipe, loc), source, loc, positions) from None
    except TypeError as e:  # e.g. a top-level key that is not a string
        raise RecipeError(str(e), source) from None
    _check_training_args(recipe.training, source, positions)
    recipe._source, recipe._positions = source, positions
    return recipe


def _describe(err: dict, root: type[BaseModel], loc: Loc | None = None) -> str:
    """Pydantic's message, plus the allowed keys when a key is unknown."""
    if err["type"] == "extra_forbidden":
        model = _model_at(root, tuple(loc if loc is not None else err["loc"])[:-1])
        allowed = ", ".join(model.model_fields) if model else "see the recipe reference"
        return f"unknown key; allowed: {allowed}"
    if err["type"] == "missing":
        return "required key is missing"
    msg = err["msg"]
    if err["type"] not in ("value_error",) and "input" in err and not isinstance(err["input"], dict):
        msg += f", got {err['input']!r}"
    return msg.removeprefix("Value error, ")


def _model_at(model: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    for key in loc:
        field = model.model_fields.get(key) if isinstance(key, str) else None
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


# -- training: any TrainingArguments field ----------------------------------------------------
def _training_fields() -> dict[str, dataclasses.Field]:
    from transformers import TrainingArguments

    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}


_SIMPLE = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}


def _allowed_types(annotation) -> tuple[type, ...] | None:
    """Plain Python types a field accepts, or None when it is too rich to check here."""
    if isinstance(annotation, str):
        annotation = {"int": int, "float": float, "bool": bool, "str": str}.get(annotation.split(" |")[0].strip())
    if annotation in _SIMPLE:
        return _SIMPLE[annotation]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        allowed: tuple[type, ...] = ()
        for arg in typing.get_args(annotation):
            if arg is type(None):
                allowed += (type(None),)
            elif arg in _SIMPLE:
                allowed += _SIMPLE[arg]
            else:
                return None
        return allowed
    return None


def _check_training_args(training: dict, source: str, positions: dict) -> None:
    fields = _training_fields()
    for key, value in training.items():
        if key not in fields:
            close = [f for f in fields if key.lower() in f or f in key.lower()][:5]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise _located(f"not a transformers.TrainingArguments field{hint}", source, ("training", key), positions)
        allowed = _allowed_types(fields[key].type)
        if allowed and (not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)):
            names = "/".join(sorted({t.__name__ for t in allowed}))
            raise _located(f"expected {names}, got {value!r}", source, ("training", key), positions)
