"""YAML recipes: one file says what to train, on what, how sparse, and what to export.

``load_recipe(path, overrides)`` reads the YAML safely (no object construction), applies
``--set dotted.key=value`` overrides, and validates the whole thing before any work is done.
Every problem is reported as one :class:`RecipeError` naming the file, the line and column, the
key path, and what is allowed.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import math
import os
import re
import stat
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from ..grids.targets import LAYER_TYPES

Loc = tuple[str | int, ...]


class RecipeError(ValueError):
    """A recipe problem, located in its file. ``str()`` is the one-line message the CLI prints."""

    def __init__(self, message: str, source: str = "<recipe>", key: Loc = (), line: int | None = None,
                 col: int | None = None):
        self.message, self.source, self.key, self.line, self.col = message, source, key, line, col
        #: further problems found in the same validation pass (``hf-sparse validate`` prints them all)
        self.others: list[RecipeError] = []
        where = source if line is None else f"{source}:{line}:{col}"
        key_path = ".".join(str(k) for k in key)
        super().__init__(one_line(f"{where}: {key_path + ': ' if key_path else ''}{message}"))


def one_line(text: str) -> str:
    """Escape line breaks and other control characters (from a --set argument, a key...): one line out."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode() for c in text)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _numbers_are_numbers(cls, data: Any) -> Any:
        """``true`` is not 1.0 and ``'10'`` is not 10: a number field takes a YAML number only
        (pydantic's lax mode would convert both silently)."""
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key) if isinstance(key, str) else None
                if field is not None and isinstance(value, (bool, str)) and _is_number_field(field.annotation):
                    raise _KeyedError((key,), f"Input should be a valid number, got {value!r}")
        return data


def _is_number_field(annotation: Any) -> bool:
    """int/float (possibly constrained, or Optional) and no other type."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _is_number_field(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return bool(args) and all(_is_number_field(a) for a in args)
    return annotation in (int, float)


class ModelConfig(_Section):
    """Where the model comes from. ``num_labels``/``num_classes`` and input channels come from the data."""

    source: Literal["hf_sparse", "timm", "transformers"] = Field(
        "hf_sparse", description="hf_sparse's registry, timm.create_model, or a transformers Auto class")
    name: str | None = Field(None, description="registry name (hf_sparse), or timm model name (also "
                                               "'local-dir:PATH' and 'hf-hub:ID')")
    path: str | None = Field(None, description="pretrained weights to start from: a checkpoint folder or Hub id "
                                               "(transformers, hf_sparse), or a folder written by timm's "
                                               "save_for_hf / a .safetensors, .bin or .pth file (timm)")
    revision: str | None = Field(None, description="branch, tag or commit of a Hub model.path")
    ignore_mismatched_sizes: bool = Field(
        False, description="transformers/hf_sparse: replace weights whose shapes differ from the model's (a "
                           "head with another number of labels) by freshly initialised ones")
    auto_class: str | None = Field(
        None, description="transformers: Auto class to use (default from the task, e.g. AutoModelForImageClassification)")
    config: dict[str, Any] = Field(default_factory=dict,
                                   description="config values: hf_sparse model config, or a transformers config incl. model_type")
    pretrained: bool = Field(False, description="timm: load the model's pretrained weights from the Hub (or from "
                                                "model.path, which needs no connection)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="timm: extra create_model keyword arguments")

    @model_validator(mode="after")
    def _needs_a_name(self):
        if self.source == "timm" and not (self.name or self.path):
            raise ValueError("model.source 'timm' needs model.name (a timm model name, 'local-dir:PATH' or "
                             "'hf-hub:ID') or model.path (a timm folder)")
        if self.source == "hf_sparse" and not (self.name or self.path):
            raise ValueError("model.source 'hf_sparse' needs model.name (a registered model) or model.path "
                             "(a saved hf_sparse checkpoint)")
        if self.source == "transformers" and not (self.path or self.config.get("model_type")):
            raise ValueError("model.source 'transformers' needs model.path or model.config.model_type")
        return self


class AugmentConfig(_Section):
    """Training-only speech augmentation: SpecAugment masks on the features, optional waveform perturbation."""

    time_masks: int = Field(0, ge=0, description="SpecAugment: time masks per utterance")
    time_mask_width: int = Field(0, ge=0, description="SpecAugment: largest time mask, in frames")
    freq_masks: int = Field(0, ge=0, description="SpecAugment: frequency masks per utterance")
    freq_mask_width: int = Field(0, ge=0, description="SpecAugment: largest frequency mask, in mel bins")
    speed: list[float] | None = Field(None, description="speed perturbation: factors drawn per utterance, e.g. "
                                                        "[0.9, 1.0, 1.1]")
    noise_snr_db: list[float] | None = Field(None, description="white noise at an SNR drawn from [low, high] dB")

    @model_validator(mode="after")
    def _ranges(self):
        if self.speed is not None and not (self.speed and all(0.5 <= f <= 2.0 for f in self.speed)):
            raise _KeyedError(("speed",), f"speed factors must be a non-empty list of numbers in [0.5, 2], got {self.speed}")
        snr = self.noise_snr_db
        if snr is not None and not (len(snr) == 2 and all(math.isfinite(x) for x in snr) and snr[0] <= snr[1]):
            raise _KeyedError(("noise_snr_db",), f"noise_snr_db must be [low, high] in dB with low <= high, got {snr}")
        return self


class DataConfig(_Section):
    name: str = Field("fashion_mnist", description="built-in data source (see hf_sparse.data.DATA_SOURCES)")
    path: str | None = Field(None, description="local folder overriding the source's bundled copy")
    hub_id: str | None = Field(None, description="a Hub dataset id, loaded with datasets.load_dataset")
    config_name: str | None = Field(None, description="Hub dataset: configuration name (e.g. v0.02, clean)")
    train_split: str | None = Field(None, description="Hub dataset: split to train on (default: train)")
    eval_split: str | None = Field(None, description="Hub dataset: split to evaluate on (default: validation, "
                                                     "else test)")
    task: Literal["audio-classification", "ctc"] | None = Field(
        None, description="speech data: classification or CTC, when the columns leave it open")
    audio_column: str = Field("audio", description="speech data: the column holding the audio")
    label_column: str | None = Field(None, description="speech data: the class column (found when unambiguous)")
    text_column: str | None = Field(None, description="speech data: the transcript column for CTC (found when "
                                                      "unambiguous: transcription, text, sentence)")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="audio_folder with only a train split: fraction "
                                                              "held out (seeded, stratified) for evaluation")
    max_duration_s: float | None = Field(None, gt=0, description="speech data: clips longer than this are skipped "
                                                                 "(counted in the log)")
    augment: AugmentConfig | None = Field(None, description="speech data: training-only augmentation")
    split: str = Field("official", description="which split scheme the source offers (e.g. official, speaker)")
    options: dict[str, Any] = Field(default_factory=dict, description="source-specific options")
    max_train_samples: PositiveInt | None = Field(None, description="use only this many training examples")
    max_eval_samples: PositiveInt | None = Field(None, description="use only this many evaluation examples")
    seed: int = Field(0, description="seed for subsampling and generated data")
    image_size: PositiveInt | None = Field(None, description="resize images to this many pixels a side (default: as stored)")
    channels: PositiveInt | None = Field(None, description="image channels the model reads: 3 replicates grey images to RGB")
    transforms: Literal["stored", "timm"] | None = Field(
        None, description="stored: images decoded once into memory, used as stored; timm: kept encoded and "
                          "decoded per example with timm's train/eval transforms (for ImageNet-size data). "
                          "Default: timm for image_folder, stored otherwise")


class TargetsConfig(_Section):
    include: list[str] = Field(default_factory=lambda: ["*"],
                               description="parameter-name patterns to sparsify: glob, or 're:<regex>'")
    exclude: list[str] = Field(default_factory=list, description="patterns to leave dense (e.g. the classifier head)")
    layer_types: list[Literal[tuple(LAYER_TYPES)]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(LAYER_TYPES), description="module types whose weights qualify")
    include_head: bool = Field(False, description="also sparsify the output head (classifier/lm_head), dense by default")
    density: dict[str, float] = Field(
        default_factory=dict, description="per-layer target densities {pattern: density} (first match wins; other "
                                          "layers get target_density), e.g. from hf-sparse sensitivity; methods "
                                          "with per-layer targets: gmp, and gradual/dns with a target_density")

    def model_dump(self, **kwargs) -> dict[str, Any]:
        """The selection rules (a ``TargetSpec``'s fields): per-layer densities are the method's business.

        Dumping the whole recipe (``Recipe.model_dump``/``to_yaml``) still writes ``density``.
        """
        kwargs.setdefault("exclude", {"density"})
        return super().model_dump(**kwargs)

    @model_validator(mode="after")
    def _densities_in_range(self):
        for pattern, value in self.density.items():
            if not (isinstance(value, (int, float)) and 0 < value <= 1):
                raise _KeyedError(("density", pattern), f"a density must lie in (0, 1], got {value!r}")
        return self

    @model_validator(mode="after")
    def _regexes_compile(self):
        for kind in ("include", "exclude"):
            for index, pattern in enumerate(getattr(self, kind)):
                if pattern.startswith("re:"):
                    try:
                        re.compile(pattern[3:])
                    except re.error as e:
                        raise _KeyedError((kind, index), f"{pattern!r} is not a valid regular expression: {e}") from None
        return self


class BudgetConfig(_Section):
    """A cost budget for the purged model: exactly one of ``params`` / ``macs``, a fraction of dense."""

    params: float | None = Field(None, gt=0, le=1, description="expected parameters of the purged model / dense")
    macs: float | None = Field(None, gt=0, le=1, description="expected MACs per sample of the purged model / dense")

    @model_validator(mode="after")
    def _exactly_one(self):
        if (self.params is None) == (self.macs is None):
            raise ValueError("give exactly one of params or macs, e.g. {macs: 0.25}")
        return self

    @property
    def kind(self) -> str:
        return "params" if self.params is not None else "macs"

    @property
    def fraction(self) -> float:
        return float(self.params if self.params is not None else self.macs)


class SparsityConfig(_Section):
    method: str = Field("none", description="a registered method name, or 'none' for dense training")
    target_density: float | None = Field(None, gt=0, le=1, description="kept fraction of the targeted weights")
    targets: TargetsConfig = Field(default_factory=TargetsConfig)
    params: dict[str, Any] = Field(default_factory=dict, description="the method's own parameters")
    granularity: str = Field("unstructured", description="what is kept or removed together: unstructured, block "
                                                         "(with block_shape), 'N:M' such as '2:4', channel")
    block_shape: list[int] | None = Field(None, description="granularity block: [rows, cols] of each block")
    budget: BudgetConfig | None = Field(None, description="l0 constrained/augmented at group granularity: a "
                                                          "params or macs budget of the purged model instead of "
                                                          "target_density, e.g. {macs: 0.25}")

    def granularity_spec(self):
        """The parsed :class:`~hf_sparse.grids.Granularity` (its registered kind's class)."""
        from ..grids import Granularity

        return Granularity.parse(self.granularity, self.block_shape)

    @model_validator(mode="after")
    def _known_method(self):
        from ..methods import METHODS

        if self.method == "none":
            # set to something other than the default (a saved recipe.yaml spells out the defaults)
            ignored = [k for k in ("target_density", "targets", "params", "granularity", "block_shape", "budget")
                       if k in self.model_fields_set
                       and getattr(self, k) != type(self).model_fields[k].get_default(call_default_factory=True)]
            if ignored:
                raise _KeyedError((ignored[0],), "method 'none' trains dense, so this would be ignored; "
                                                 "remove it or choose a sparsity method")
            return self
        if self.method not in METHODS:
            raise _KeyedError(("method",), f"unknown method {self.method!r}; allowed: none, {', '.join(sorted(METHODS))}")
        cls = METHODS[self.method]
        self._check_granularity(cls)
        if self.budget is not None:
            self._check_budget(cls)
        if cls.target_density_mode == "required" and self.target_density is None:
            raise _KeyedError(("target_density",), f"method {self.method!r} needs a target_density in (0, 1]")
        try:
            config = cls.Config(**self.params)
        except ValidationError as e:
            err = e.errors()[0]
            raise _KeyedError(("params", *err["loc"]), _describe(err, cls.Config)) from None
        if self.targets.density:
            self._check_layer_density(cls, config)
        density = self.target_density if self.budget is None else self.budget.fraction  # a budget stands in for it
        problem = cls.config_error(config, density) or _schedule_order_error(config, self.params)
        if problem:
            raise _KeyedError(*problem)
        return self

    def method_config(self):
        from ..methods import METHODS

        config = METHODS[self.method].Config(**self.params)
        if self.targets.density:  # per-layer targets reach the method through its config
            config = config.model_copy(update={"layer_density": dict(self.targets.density)})
        return config

    def _check_layer_density(self, cls, config) -> None:
        """Per-layer densities need a method that targets each layer, and a target_density for the rest."""
        if "layer_density" not in cls.Config.model_fields:
            raise _KeyedError(("targets", "density"), f"method {self.method!r} has no per-layer target; use gmp, "
                                                      "gradual or dns")
        if getattr(config, "scope", "layer") != "layer":
            raise _KeyedError(("params", "scope"), "per-layer densities (targets.density) need scope: layer")
        if self.target_density is None:
            raise _KeyedError(("target_density",), "per-layer densities (targets.density) need a target_density "
                                                   "for the layers they do not name")

    def _check_budget(self, cls) -> None:
        """A budget needs a method that trains against one, a structured granularity and no target_density."""
        if not getattr(cls, "budgets", False):
            raise _KeyedError(("budget",), f"method {self.method!r} has no cost budget; use l0 with control "
                                           "constrained or augmented")
        control = self.params.get("control", "constrained")
        if control not in ("constrained", "augmented"):
            raise _KeyedError(("params", "control"), f"a budget needs control constrained or augmented, not {control!r}")
        if self.params.get("constraint", "model") != "model":
            raise _KeyedError(("params", "constraint"), "a budget is one constraint on the whole model; "
                                                        "use constraint: model")
        if not self.granularity_spec().structured:  # whole output units: channel or group
            raise _KeyedError(("granularity",), f"a budget counts the purged model, so it needs granularity "
                                                f"group (coupled channel groups), not {self.granularity!r}")
        if self.target_density is not None:
            raise _KeyedError(("target_density",), "give either target_density or budget, not both")

    def _check_granularity(self, cls) -> None:
        """Granularity errors, located; N:M sets the target density to N/M."""
        try:
            spec = self.granularity_spec()
        except ValueError as e:
            key = "block_shape" if "block_shape" in str(e) and self.block_shape is not None else "granularity"
            raise _KeyedError((key,), str(e)) from None
        if spec.kind not in cls.granularities:
            raise _KeyedError(("granularity",), f"method {self.method!r} has no {spec.kind!r} granularity; "
                                                f"allowed: {', '.join(cls.granularities)}")
        if spec.gates_every_output and self.targets.include_head:  # (coupled groups never hold the head's)
            raise _KeyedError(("targets", "include_head"), f"{spec.kind} granularity would remove whole output units "
                                                           "of the head (classes); keep the head dense")
        if spec.fixed_density is not None:
            if self.target_density is not None and abs(self.target_density - spec.fixed_density) > 1e-9:
                raise _KeyedError(("target_density",), f"granularity {self.granularity!r} fixes the density at "
                                                       f"{spec.fixed_density:g}; remove target_density or set it so")
            self.target_density = spec.fixed_density
            if self.params.get("scope") == "global":
                raise _KeyedError(("params", "scope"), "N:M selects within each run of M weights; scope 'global' "
                                                       "has no meaning with it")


def _schedule_order_error(config: BaseModel, written: dict[str, Any]) -> tuple[Loc, str] | None:
    """A schedule that ends before it starts (``start_X`` after ``end_X``/``stop_X``/``X_stop``)."""
    values = config.model_dump()
    for start, first in values.items():
        if not start.startswith("start_") or not isinstance(first, (int, float)):
            continue
        stem = start.removeprefix("start_")
        for end in (f"end_{stem}", f"stop_{stem}", f"{stem}_stop", f"{stem}_end"):
            last = values.get(end)
            if isinstance(last, (int, float)) and not isinstance(last, bool) and first > last:
                key = end if end in written and start not in written else start
                return ("params", key), f"the schedule is reversed: {start}={first} comes after {end}={last}"
    return None


class ExportConfig(_Section):
    format: str = Field(
        "dense", description="storage format of run_dir/model, a name in hf_sparse.checkpoint.formats (dense, "
                             "bitmask, purged, onnx: purged or dense weights plus model.onnx); checked when the run "
                             "is prepared, where the formats are known")
    push_to_hub: bool = Field(False, description="push the sparse checkpoint to the Hub at the end of the run")
    hub_model_id: str | None = Field(None, description="repo id to push to")
    private: bool = False
    revision: str | None = None
    license: str | None = Field(None, description="the card's license (default: the base model's, else unset)")

    @model_validator(mode="after")
    def _repo_when_pushing(self):
        if self.push_to_hub and not self.hub_model_id:
            raise _KeyedError(("hub_model_id",), "required when push_to_hub is true")
        return self


class DistillationConfig(_Section):
    """Distil from a frozen teacher: ``(1-alpha)*task + alpha*T^2*KL(teacher || student)`` (Hinton et al.)."""

    teacher: str = Field("self", description="'self' (a frozen copy of the weights the run starts from), a "
                                             "checkpoint folder, a finished run directory or a Hub id "
                                             "(loaded with load_sparse)")
    revision: str | None = Field(None, description="branch, tag or commit of a Hub teacher")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation term; the task loss gets 1-alpha")
    temperature: float = Field(2.0, gt=0, description="softmax temperature T of both models' logits (the term "
                                                      "is scaled by T^2)")
    loss: Literal["kl", "mse"] = Field("kl", description="kl: KL divergence of the softened distributions (per "
                                                         "valid frame for CTC logits); mse: squared logit difference")
    hidden: dict[str, str] = Field(default_factory=dict, description="{student_module: teacher_module}: MSE "
                                                                     "between their outputs (same shapes)")
    hidden_weight: float = Field(1.0, ge=0, description="weight of the summed hidden MSE terms")


class Recipe(_Section):
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    training: dict[str, Any] = Field(default_factory=dict, description="any transformers.TrainingArguments field")
    sparsity: SparsityConfig = Field(default_factory=SparsityConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    distillation: DistillationConfig | None = Field(None, description="distil from a teacher (see "
                                                                      "hf_sparse.training.distill)")

    # Where the recipe came from, for error messages and for the copy saved with the model.
    _source: str = "<recipe>"
    _positions: dict = {}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def error(self, key: Loc, message: str) -> RecipeError:
        """A RecipeError located at ``key`` of this recipe (e.g. for checks that need the model)."""
        return _located(message, self._source, key, self._positions)

    def notices(self) -> list[str]:
        """Located one-line warnings: settings that run but do not do what they promise."""
        found = []
        try:
            granularity = self.sparsity.granularity_spec()
        except ValueError:  # a bad granularity is an error of its own, raised where it is checked
            return found
        if self.export.format == "purged" and self.sparsity.method != "none" and not granularity.structured:
            found.append(str(self.error(("export", "format"), (
                f"purged removes whole channels only; with granularity {granularity} the zeros stay inside "
                "channels that are kept, so the file is as large as a dense one: use format bitmask, or "
                "granularity channel/group"))))
        return found


class RecipeWarning(UserWarning):
    """A recipe setting that runs but does not do what it promises (located like a RecipeError)."""


class _KeyedError(ValueError):
    """Raised inside validators to point at a key below the validated section."""

    def __init__(self, key: Loc, message: str):
        self.key, self.message = key, message
        super().__init__(message)


# -- reading YAML with positions --------------------------------------------------------------
#: Bounds on what one recipe may expand to: nesting depth and the number of nodes after aliases.
#: A real recipe has a few dozen nodes; the bounds stop "billion laughs" files and self-references.
MAX_DEPTH = 50
MAX_NODES = 10_000

_YAML = "tag:yaml.org,2002:"
_ALLOWED_TAGS = {_YAML + t for t in ("str", "int", "float", "bool", "null", "seq", "map", "merge")}


class _Loader(yaml.SafeLoader):
    """SafeLoader with the YAML 1.2 core schema for scalars.

    Booleans: only true/false (YAML 1.1 also reads yes/no/on/off, which turns transformers' own
    option values such as ``save_strategy: no`` into ``False``). Numbers: ``1e-4`` is a float (1.1
    wants a dot), ``0o17``/``0x1f`` are ints, ``010`` is ten; no sexagesimal, no timestamps. The same
    rules apply to recipe files and to ``--set`` values.
    """


_REPLACED = {_YAML + t for t in ("bool", "int", "float", "timestamp")}
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _REPLACED]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_YAML + "bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(_YAML + "int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                              list("-+0123456789"))
_Loader.add_implicit_resolver(
    _YAML + "float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    sign = -1 if text.startswith("-") else 1
    digits = text.lstrip("+-")
    if digits[:2] in ("0o", "0x"):
        return sign * int(digits[2:], 8 if digits[1] == "o" else 16)
    return sign * int(digits, 10)


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node)
    special = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}
    return special[text.lower()] if text.lower() in special else float(text)


_Loader.add_constructor(_YAML + "int", _construct_int)
_Loader.add_constructor(_YAML + "float", _construct_float)


def decode_recipe(raw: bytes, source: str) -> str:
    """UTF-8 text (UTF-16/32 when the file starts with their byte-order mark, as YAML allows)."""
    boms = [(codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
            (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")]
    encoding = next((enc for bom, enc in boms if raw.startswith(bom)), None)
    if encoding is None and b"\0" in raw:
        at = raw.index(b"\0")
        raise RecipeError("the file holds NUL bytes (UTF-16 without a byte-order mark?); save the recipe as UTF-8",
                          source, (), raw.count(b"\n", 0, at) + 1, at - (raw.rfind(b"\n", 0, at) + 1) + 1)
    encoding = encoding or "utf-8"
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise RecipeError(f"not {encoding.upper().removesuffix('-SIG')} text (byte 0x{raw[e.start]:02x} cannot be "
                          "decoded); save the recipe as UTF-8", source, (), line, col) from None


def _mark(node_or_mark) -> tuple[int, int]:
    mark = getattr(node_or_mark, "start_mark", node_or_mark)
    return mark.line + 1, mark.column + 1


def _check_depth(text: str, source: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH before PyYAML's recursive composer sees it."""
    opening = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken, yaml.FlowMappingStartToken,
               yaml.FlowSequenceStartToken)
    closing = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)
    depth = 0
    for token in yaml.scan(text, Loader=_Loader):
        if isinstance(token, opening):
            depth += 1
            if depth > MAX_DEPTH:
                raise RecipeError(f"nested more than {MAX_DEPTH} levels deep", source, (), *_mark(token))
        elif isinstance(token, closing):
            depth -= 1


class _Walk:
    """One pass over the composed node graph: positions of every key path, and the safety checks.

    Aliases are followed (the constructed data holds their expansion), so the walk counts every
    node it expands and stops at MAX_NODES; a node met again inside itself is a self-reference.
    """

    def __init__(self, source: str):
        self.source, self.count, self.pos = source, 0, {}
        self.active: set[int] = set()
        self.scalars = _Loader("")

    def error(self, message: str, key: Loc, node) -> RecipeError:
        return RecipeError(message, self.source, key, *_mark(node))

    def visit(self, node: yaml.Node, key: Loc) -> None:
        self.count += 1
        if self.count > MAX_NODES:
            raise self.error(f"the recipe expands to more than {MAX_NODES} values (YAML aliases?)", key, node)
        if id(node) in self.active:
            raise self.error("a YAML alias refers to a node that contains it", key, node)
        if node.tag not in _ALLOWED_TAGS:
            raise self.error(f"YAML tag {node.tag!r} is not allowed in a recipe", key, node)
        self.pos.setdefault(key, _mark(node))
        if isinstance(node, yaml.ScalarNode):
            self._check_scalar(node, key)
            return
        self.active.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, value_node in node.value:
                if key_node.tag == _YAML + "merge":
                    self.visit(value_node, key)
                    continue
                if not (isinstance(key_node, yaml.ScalarNode) and key_node.tag == _YAML + "str"):
                    shown = key_node.value if isinstance(key_node, yaml.ScalarNode) else "a collection"
                    raise self.error(f"keys must be strings, got {shown!r}; quote it", key, key_node)
                if key_node.value in seen:
                    raise self.error(f"duplicate key {key_node.value!r}", key + (key_node.value,), key_node)
                seen.add(key_node.value)
                self.visit(value_node, key + (key_node.value,))
                self.pos[key + (key_node.value,)] = _mark(key_node)
        else:
            for i, item in enumerate(node.value):
                self.visit(item, key + (i,))
        self.active.discard(id(node))

    def _check_scalar(self, node: yaml.ScalarNode, key: Loc) -> None:
        try:
            self.scalars.yaml_constructors[node.tag](self.scalars, node)
        except (ValueError, TypeError, OverflowError, yaml.YAMLError) as e:
            raise self.error(f"invalid {node.tag.removeprefix(_YAML)} {_short(node.value)}: {_short(str(e))}", key,
                             node) from None


def _short(value: Any, limit: int = 60) -> str:
    """``repr`` cut to one readable line."""
    text = value if isinstance(value, str) and not value.startswith("'") else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def compose_recipe(text: str, source: str) -> tuple[Any, dict[Loc, tuple[int, int]]]:
    """Parse recipe text safely: (data, position of every key path). Raises RecipeError."""
    try:
        _check_depth(text, source)
        node = yaml.compose(text, Loader=_Loader)
        if node is None:
            raise RecipeError("the recipe is empty; it needs at least a model section", source, (), 1, 1)
        walk = _Walk(source)
        walk.visit(node, ())
        loader = _Loader("")
        try:
            data = loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise RecipeError(f"invalid YAML: {e.problem or e.context}", source, (), *_mark(mark)) from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow (NUL, other control codes)
        line = text.count("\n", 0, e.position) + 1
        col = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        code = e.character if isinstance(e.character, int) else ord(e.character)
        raise RecipeError(f"invalid YAML: character #x{code:04x} is not allowed in a recipe", source, (),
                          line, col) from None
    except yaml.YAMLError as e:
        raise RecipeError(f"invalid YAML: {e}", source, (), 1, 1) from None
    except RecursionError:
        raise RecipeError(f"nested more than {MAX_DEPTH} levels deep", source, (), 1, 1) from None
    return data, walk.pos


def _check_finite(data: Any, key: Loc, source: str, positions: dict) -> None:
    """Refuse NaN and infinities anywhere: no recipe value means anything as one."""
    if isinstance(data, float) and not math.isfinite(data):
        raise _located(f"must be a finite number, got {data!r}", source, key, positions)
    if isinstance(data, dict):
        for k, v in data.items():
            _check_finite(v, key + (k,), source, positions)
    elif isinstance(data, list):
        for i, v in enumerate(data):
            _check_finite(v, key + (i,), source, positions)


def _located(message: str, source: str, key: Loc, positions: dict) -> RecipeError:
    """Attach the closest written position: the key itself, else its nearest written parent."""
    for n in range(len(key), -1, -1):
        where = positions.get(key[:n])
        if isinstance(where, str):  # written by a --set argument
            return RecipeError(message, f"{source} (--set {where})", key)
        if where:
            return RecipeError(message, source, key, *where)
    return RecipeError(message, source, key, 1, 1)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML, with the recipe's scalar rules)."""
    source = f"<command line> (--set {text})"
    if "=" not in text:
        raise RecipeError(f"--set expects dotted.key=value, got {text!r}", source)
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set expects dotted.key=value, got {text!r}", source)
    if raw == "":
        return key.split("."), ""
    try:
        value, _ = compose_recipe(raw, source)
    except RecipeError as e:
        if e.message.startswith("the recipe is empty"):  # a comment or blank: YAML's null
            return key.split("."), None
        raise RecipeError(e.message.replace("a recipe", "a --set value"), source, tuple(key.split("."))) from None
    return key.split("."), value


def _apply_override(data: dict, keys: list[str], value: Any, positions: dict, source: str, text: str) -> None:
    node = data
    for i, k in enumerate(keys[:-1]):
        if not isinstance(node.get(k, {}), dict):
            raise RecipeError(f"cannot set below {k!r}: it is not a mapping", f"{source} (--set {text})",
                              tuple(keys[: i + 1]))
        node = node.setdefault(k, {})
        positions.setdefault(tuple(keys[: i + 1]), text)  # a section the override creates is the override's
    node[keys[-1]] = value
    for key in [k for k in positions if k[: len(keys)] == tuple(keys)]:
        del positions[key]  # what the file wrote below this key is gone
    positions[tuple(keys)] = text


#: A recipe is a few kilobytes; past this size a file is not one (and parsing it would take minutes).
MAX_RECIPE_BYTES = 1 << 20


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file. Raises :class:`RecipeError`.

    Only a regular file up to :data:`MAX_RECIPE_BYTES` is read: a FIFO would block forever and
    ``/dev/zero`` never ends.
    """
    source = str(path)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise RecipeError("not a regular file (a recipe is a YAML file)", source)
        if info.st_size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{info.st_size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,}", source)
        with open(path, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise RecipeError(f"cannot read recipe: {e.strerror}", source) from None
    if len(raw) > MAX_RECIPE_BYTES:  # it grew while being read
        raise RecipeError(f"more than {MAX_RECIPE_BYTES:,} bytes; a recipe is at most that", source)
    return recipe_from_text(decode_recipe(raw, source), source, overrides)


def recipe_from_text(text: str, source: str = "<recipe>", overrides: list[str] | None = None) -> Recipe:
    data, node_positions = compose_recipe(text, source)
    if not isinstance(data, dict):
        raise RecipeError("a recipe is a mapping with keys model, data, training, sparsity, export", source, (), 1, 1)
    for item in overrides or []:
        keys, value = parse_override(item)
        _apply_override(data, keys, value, node_positions, source, item)
    _check_finite(data, (), source, node_positions)
    return validate_dict(data, source, node_positions)


def validate_dict(data: dict, source: str = "<recipe>", positions: dict | None = None) -> Recipe:
    """Validate an already-parsed recipe mapping.

    Every schema problem found in the one pass is reported: the RecipeError raised is the first (by
    position in the file), and its ``others`` hold the rest, each located, so a recipe with three
    typos needs one run to find all three.
    """
    positions = positions or {}
    problems: list[RecipeError] = []
    recipe = None
    try:
        recipe = Recipe(**data)
    except ValidationError as e:
        problems = [_schema_problem(err, source, positions) for err in e.errors()]
    except TypeError as e:  # e.g. a top-level key that is not a string
        raise _located(str(e), source, (), positions) from None
    training = recipe.training if recipe is not None else data.get("training")
    if isinstance(training, dict):
        problems += _training_problems(training, source, positions)
    if problems:
        raise _first_of(problems)
    recipe._source, recipe._positions = source, positions
    return recipe


def _schema_problem(err: dict, source: str, positions: dict) -> RecipeError:
    loc = tuple(err["loc"])
    ctx_err = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_err, _KeyedError):
        return _located(ctx_err.message, source, loc + ctx_err.key, positions)
    return _located(_describe(err, Recipe, loc), source, loc, positions)


def _first_of(problems: list[RecipeError]) -> RecipeError:
    """The first problem by position, carrying the others (each reported once)."""
    unique = list({str(p): p for p in problems}.values())
    unique.sort(key=lambda p: (p.line or 0, p.col or 0))
    first = unique[0]
    first.others = unique[1:]
    return first


def _describe(err: dict, root: type[BaseModel], loc: Loc | None = None) -> str:
    """Pydantic's message, plus the allowed keys when a key is unknown."""
    if err["type"] == "extra_forbidden":
        path = tuple(loc if loc is not None else err["loc"])
        model = _model_at(root, path[:-1])
        allowed = ", ".join(model.model_fields) if model else "see the recipe reference"
        close = difflib.get_close_matches(str(path[-1]), list(model.model_fields), n=1, cutoff=0.75) if model else []
        return f"unknown key; allowed: {allowed}{f'; did you mean {close[0]}?' if close else ''}"
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


#: Types TrainingArguments takes beyond its annotation: ``fsdp: true`` is the documented form now,
#: while the field is still annotated ``str | None``.
_ALSO_ACCEPTED = {"fsdp": (bool,)}


def _training_problems(training: dict, source: str, positions: dict) -> list[RecipeError]:
    """Every ``training`` key that is not a TrainingArguments field, or has a value of the wrong type."""
    fields = _training_fields()
    problems = []
    for key, value in training.items():
        if key not in fields:
            close = [f for f in fields if str(key).lower() in f or f in str(key).lower()][:5] or \
                difflib.get_close_matches(str(key).lower(), list(fields), n=3, cutoff=0.8)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            problems.append(_located(f"not a transformers.TrainingArguments field{hint}", source, ("training", key),
                                     positions))
            continue
        allowed = _allowed_types(fields[key].type)
        if allowed:
            allowed += _ALSO_ACCEPTED.get(key, ())
        if allowed and (not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)):
            names = "/".join(sorted({t.__name__ for t in allowed}))
            problems.append(_located(f"expected {names}, got {value!r}", source, ("training", key), positions))
    return problems
