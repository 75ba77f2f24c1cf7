"""Training recipes: one YAML file describes a whole run (model, data, optimiser, ...).

A recipe is validated completely when it is loaded, so a typo or a wrong type fails
with a message naming the dotted key (``train.steps``) before any data is read or
any weight is built. The schema and every default are documented in
``docs/recipes.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import yaml

from bmojo_neuron.config_fields import BMojoFields, saved_defaults

DEFAULT_RECIPE = "cpu-tiny"
RECIPE_DIR = "recipes"
DEVICES = ("auto", "cpu", "cuda", "neuron")  # neuron: Trainium through torch-xla + NxD (the neuron training backend)
PRECISIONS = ("fp32", "bf16")
DATA_KINDS = ("mqar", "text")
BYTE_VOCAB_SIZE = 256


# ----------------------------------------------------------------------------- YAML
class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``3e-4`` as a float (PyYAML's YAML 1.1 needs ``3.0e-4``)."""


class _LibyamlLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """`_Loader` on libyaml's parser, where PyYAML was built with it: a recipe in 0.3 ms instead of 3 ms."""


for _loader in (_Loader, _LibyamlLoader):
    _loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
            |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
            re.X,
        ),
        list("-+0123456789."),
    )
del _loader


def parse_yaml(text: str) -> Any:
    """The YAML document `text`, parsed by libyaml when PyYAML has it; text it refuses is parsed again by PyYAML's
    own parser, whose error names the token it found and the column where a value ends (libyaml's says
    "did not find expected ',' or ']'" a line further on), so a refusal reads the same either way."""
    try:
        return yaml.load(text, Loader=_LibyamlLoader)
    except yaml.YAMLError:
        return yaml.load(text, Loader=_Loader)


def parse_yaml_value(text: str) -> Any:
    """Parse one override value as a YAML scalar or flow list (``10``, ``BMBM``, ``[0.9,0.99]``)."""
    return parse_yaml(text)


def _yaml_problem(err: yaml.YAMLError, in_file: bool = False) -> str:
    """PyYAML's error on one line: what it was parsing, what it found, and where in the value (an override)
    or the file (its own message spans several lines, with the text quoted and a caret under the column)."""
    problem = getattr(err, "problem", None)
    if problem is None:
        return " ".join(str(err).split())
    context = getattr(err, "context", None)
    mark = getattr(err, "problem_mark", None)
    if mark is None:
        where = ""
    elif in_file:
        where = f" (line {mark.line + 1}, column {mark.column + 1})"
    else:
        where = f" (at character {mark.column + 1} of the value)" if mark.line == 0 else ""
    return f"{context + ', ' if context else ''}{problem}{where}"


# ----------------------------------------------------------------------------- sections
@dataclass
class RunSection:
    name: str = "run"
    output_dir: str | None = None  # default: runs/<name>
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # CPU intra-op threads; 0: every usable core but one (device.set_cpu_threads)
    jobs: int = 1  # runs of a suite / compare trained at once, one process each (training/run_pool.py)

    def check(self) -> None:
        _choice("run.device", self.device, DEVICES)
        _require(bool(self.name), "run.name", "must not be empty")
        _require(self.output_dir is None or bool(self.output_dir), "run.output_dir",
                 "must not be empty (null: runs/<run.name>)")
        _require(self.threads >= 0, "run.threads", f"is {self.threads}; must be >= 0 (0: every usable core but one)")
        _positive("run.jobs", self.jobs)
        _require(self.jobs == 1 or self.device != "neuron", "run.jobs",
                 f"is {self.jobs}; a neuron run owns every NeuronCore of its instance: use 1")


@dataclass
class MqarDataSection:
    kind: str = "mqar"
    vocab_size: int = 128
    seq_len: int = 64
    num_kv_pairs: int = 8
    power_a: float = 0.01
    random_non_queries: bool = True
    # Training examples are drawn at each of these spacings in turn (`mqar_arrays`'s `spacing`: the
    # layout of a seq_len / s example stretched s-fold, filler between the pairs); eval at 1x uses
    # spacing 1. [1]: every pair contiguous at the start, as in Zoology.
    train_spacings: list[int] = field(default_factory=lambda: [1])
    # Whether a spacing > 1 (train_spacings, the length eval) spreads the kv pairs too (true) or keeps
    # them contiguous at the start and stretches only the query region (false).
    stretch_pairs: bool = True
    train_examples: int = 20000
    eval_examples: int = 1000
    seed: int = 0

    @property
    def sequence_length(self) -> int:
        """Tokens per training sequence (a text section calls it ``block_size``)."""
        return self.seq_len

    def check(self) -> None:
        for key in ("vocab_size", "seq_len", "num_kv_pairs", "train_examples", "eval_examples"):
            _positive(f"data.{key}", getattr(self, key))
        _require(self.power_a > 0, "data.power_a", f"is {self.power_a}; must be > 0")
        from bmojo_neuron.data.mqar import check_mqar_args

        try:
            check_mqar_args(self.vocab_size, self.seq_len, self.num_kv_pairs)
        except ValueError as err:
            raise ValueError(f"recipe key data: {err}") from None
        _require(bool(self.train_spacings), "data.train_spacings", "must not be empty")
        for spacing in self.train_spacings:
            _require(isinstance(spacing, int) and spacing >= 1 and self.seq_len % spacing == 0,
                     "data.train_spacings", f"holds {spacing!r}; each must be an integer >= 1 dividing "
                     f"data.seq_len {self.seq_len}")
            try:
                check_mqar_args(self.vocab_size, self.seq_len // spacing, self.num_kv_pairs)
            except ValueError as err:
                raise ValueError(f"recipe key data.train_spacings: spacing {spacing} stretches a "
                                 f"{self.seq_len // spacing}-token layout, and {err}") from None


@dataclass
class TextDataSection:
    kind: str = "text"
    path: str | None = None  # None: the corpus shipped in bmojo_neuron/data/corpus
    tokenizer: str = "byte"
    block_size: int = 256
    cache_dir: str | None = None  # default: <output_dir>/../data-cache
    eval_fraction: float = 0.05
    text_column: str = "text"

    @property
    def sequence_length(self) -> int:
        """Tokens per training sequence (an MQAR section calls it ``seq_len``)."""
        return self.block_size

    def check(self) -> None:
        _positive("data.block_size", self.block_size)
        _require(0 < self.eval_fraction < 1, "data.eval_fraction", f"is {self.eval_fraction}; must be in (0, 1)")
        _require(bool(self.tokenizer), "data.tokenizer", "must not be empty")


@dataclass
class OptimSection:
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    # regular expression searched in a parameter's name -> factor of `lr` for the parameters it
    # matches (e.g. {"mixer\\.[qkvo]_proj": 0.33}); see training/optim.py `parameter_groups`
    lr_multipliers: dict[str, float] = field(default_factory=dict)

    def check(self) -> None:
        _require(self.lr > 0, "optim.lr", f"is {self.lr}; must be > 0")
        for pattern, factor in self.lr_multipliers.items():
            key = f"optim.lr_multipliers[{pattern!r}]"
            _require(isinstance(pattern, str) and pattern != "", key, "the pattern must be a non-empty string")
            try:
                re.compile(pattern)
            except re.error as err:
                _fail(key, f"is not a regular expression ({err})")
            _require(isinstance(factor, (int, float)) and not isinstance(factor, bool)
                     and math.isfinite(factor) and factor > 0, key, f"is {factor!r}; must be a number > 0")
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optim.betas",
            f"is {self.betas}; must be [beta1, beta2] with each in [0, 1)",
        )
        _require(self.eps > 0, "optim.eps", "must be > 0")
        _require(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")


@dataclass
class TrainSection:
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    precision: str = "fp32"
    activation_checkpointing: bool = False
    log_every: int = 10
    compile: bool = False  # torch.compile the decoder layers (`layers.compiled_layers`; cpu/cuda, one process)

    def check(self) -> None:
        for key in ("steps", "batch_size", "grad_accum", "log_every"):
            _positive(f"train.{key}", getattr(self, key))
        _choice("train.precision", self.precision, PRECISIONS)
        _require(not (self.compile and self.activation_checkpointing), "train.compile",
                 "cannot be combined with train.activation_checkpointing (compiled layers inside checkpointing "
                 "are not supported yet); set one of them to false")


@dataclass
class EvalSection:
    every: int = 200
    batches: int = 10
    length_multipliers: list[int] = field(default_factory=lambda: [1, 2, 4, 8])

    def check(self) -> None:
        _positive("eval.every", self.every)
        _positive("eval.batches", self.batches)
        _require(bool(self.length_multipliers), "eval.length_multipliers", "must not be empty")
        for value in self.length_multipliers:
            _positive("eval.length_multipliers", value)
        repeated = sorted({m for m in self.length_multipliers if self.length_multipliers.count(m) > 1})
        _require(not repeated, "eval.length_multipliers",
                 f"is {self.length_multipliers}; each length must appear once (repeated: "
                 f"{', '.join(map(str, repeated))})")


@dataclass
class CheckpointSection:
    every: int = 500
    keep_last: int = 2

    def check(self) -> None:
        _positive("checkpoint.every", self.every)
        _positive("checkpoint.keep_last", self.keep_last)


@dataclass
class ParallelSection:
    tp: int = 1
    pp: int = 1
    sp: bool = False
    zero1: bool = False
    microbatches: int = 1

    def check(self) -> None:
        for key in ("tp", "pp", "microbatches"):
            _positive(f"parallel.{key}", getattr(self, key))
        # sequence parallelism splits the sequence over the tensor-parallel ranks: over one it does nothing (NxD
        # only warns), so the run would not be the one the recipe describes
        _require(not self.sp or self.tp > 1, "parallel.sp",
                 "is true with parallel.tp 1: sequence parallelism splits the sequence over the tensor-parallel "
                 "ranks, so with one it does nothing; set parallel.sp=false, or parallel.tp above 1")


@dataclass
class InitSection:
    """Where a new run's weights come from. ``weights: null`` initialises at random (``run.seed``)."""

    weights: str | None = None  # a primed folder (`bmojo-neuron prime`), an export, a checkpoint or a run directory

    def check(self) -> None:
        _require(self.weights is None or bool(self.weights), "init.weights", "must not be empty (null: random init)")


@dataclass
class DistillSection:
    """Present: the run distils (docs/priming.md): only the new paths train, against the model's own attention."""

    hidden_weight: float = 1.0  # layer-by-layer hidden-state MSE
    kl_weight: float = 0.0  # KL of the next-token distributions to the teacher's
    kl_temperature: float = 1.0

    def check(self) -> None:
        _require(self.hidden_weight >= 0 and self.kl_weight >= 0 and self.hidden_weight + self.kl_weight > 0,
                 "distill.hidden_weight", "and distill.kl_weight must be >= 0, not both 0")
        _require(self.kl_temperature > 0, "distill.kl_temperature", f"is {self.kl_temperature}; must be > 0")


@dataclass
class Variant:
    """A named set of dotted overrides: the `compare:` baseline or one `suite:` entry."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


SECTIONS: dict[str, type] = {
    "run": RunSection,
    "model": dict,
    "data": MqarDataSection,  # replaced by the kind's class when parsing
    "optim": OptimSection,
    "train": TrainSection,
    "eval": EvalSection,
    "checkpoint": CheckpointSection,
    "compare": Variant,
    "suite": list,
    "parallel": ParallelSection,
    "init": InitSection,
    "distill": DistillSection,
}
DATA_SECTIONS: dict[str, type] = {"mqar": MqarDataSection, "text": TextDataSection}
OVERRIDABLE = ("run", "model", "data", "optim", "train", "eval", "checkpoint", "parallel", "init", "distill",
               "compare")
# ``compare=none`` / ``suite=none`` / ``model=none`` (also null, ~, false, off) drops the section: the model's,
# so that ``init.weights``' config is taken whole where a shipped recipe's model section restates other sizes
SWITCHABLE = ("compare", "suite", "model")


# ----------------------------------------------------------------------------- recipe
@dataclass
class Recipe:
    """A validated run description; sections are attributes (``recipe.train.steps``)."""

    run: RunSection
    model: dict[str, Any]
    data: MqarDataSection | TextDataSection
    optim: OptimSection
    train: TrainSection
    eval: EvalSection
    checkpoint: CheckpointSection
    parallel: ParallelSection
    init: InitSection = field(default_factory=InitSection)
    distill: DistillSection | None = None  # None: the causal-LM objective
    compare: Variant | None = None
    suite: list[Variant] = field(default_factory=list)
    source: str | None = field(default=None, compare=False)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> Recipe:
        """Validate a nested mapping (the YAML document) and fill the defaults."""
        return _build_recipe(copy.deepcopy(dict(data or {})), source)

    def to_dict(self) -> dict[str, Any]:
        """All keys with defaults resolved; `Recipe.from_dict(r.to_dict())` gives the same recipe."""
        out: dict[str, Any] = {}
        for name in ("run", "model", "data", "optim", "train", "eval", "checkpoint", "parallel", "init"):
            value = getattr(self, name)
            out[name] = dict(value) if isinstance(value, dict) else dataclasses.asdict(value)
        if self.distill is not None:
            out["distill"] = dataclasses.asdict(self.distill)
        if self.compare is not None:
            out["compare"] = dataclasses.asdict(self.compare)
        if self.suite:
            out["suite"] = [dataclasses.asdict(v) for v in self.suite]
        return copy.deepcopy(out)

    def with_overrides(self, overrides: Mapping[str, Any] | Sequence[str]) -> Recipe:
        """A new recipe with dotted overrides applied: ``{"model.layer_pattern": "MM"}`` or ``["train.steps=10"]``."""
        return _build_recipe(_apply_overrides(self.raw, overrides), self.source)

    def model_config(self) -> Any:
        """The `BMojoConfig` of this recipe (vocab_size filled from the data when the model omits it)."""
        return _model_config(self.model, self.data, self.init)

    def model_fields(self) -> BMojoFields:
        """The same fields and derived sizes as `model_config`, without the transformers import: for checks
        that read the model's shape (`plan`'s Trainium rules, the distill checks) and build nothing."""
        return _model_fields(self.model, self.data, self.init)

    def variants(self) -> list[Variant]:
        """The suite entries, or (name, no overrides) for this recipe alone."""
        return list(self.suite) or [Variant(self.run.name, {})]

    def check(self) -> None:
        """Validate every section again, types included: a recipe may have been edited since it was loaded.

        The one set of rules: loading runs the same checks, so the trainer calls this
        only to catch later edits, before any data or weights are built.
        """
        _choice("data.kind", self.data.kind, DATA_KINDS)
        for name in ("run", "data", "optim", "train", "eval", "checkpoint", "parallel", "init", "distill"):
            section = getattr(self, name)
            if isinstance(section, dict) or section is None:
                continue
            hints = typing.get_type_hints(type(section))
            for f in dataclasses.fields(section):
                _check_type(f"{name}.{f.name}", getattr(section, f.name), hints[f.name])
            section.check()

    def record(self) -> dict[str, Any]:
        """The recipe as a run stores it (``recipe.json``): `to_dict` through JSON, so tuples become lists and
        a stored recipe compares equal to a freshly built one."""
        return json.loads(json.dumps(self.to_dict(), default=str))


# Recipe keys that may differ between a checkpoint and the run resuming it (dotted prefixes).
RESUMABLE_CHANGES = ("run.name", "run.output_dir", "run.device", "run.jobs", "train.steps", "train.log_every",
                     "train.precision", "train.activation_checkpointing", "train.compile", "eval.", "checkpoint.",
                     "data.cache_dir", "compare", "suite", "parallel.",  # parallel: checked on load
                     "init.")  # a resumed run continues from its checkpoint, not from init.weights


# Recipe keys added after runs had been stored without them, with the value such a run was trained at.
ADDED_KEYS = {"data.train_spacings": [1], "data.stretch_pairs": True}


def resume_conflicts(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between a stored recipe and `current` and that `RESUMABLE_CHANGES`
    does not allow to change (both as `Recipe.record` gives them), in order, each with its (stored, current)
    value so a refusal can say what to pass; a stored recipe without a key of `ADDED_KEYS` that `current` has
    was trained at that key's value there."""
    a, b = _flatten(saved), _flatten(current)
    for key, value in ADDED_KEYS.items():
        if key in b and key not in a:
            a[key] = value
    keys = sorted(set(a) | set(b))
    return {k: (a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_CHANGES)}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def load_recipe(path_or_name: str | None = None, overrides: Sequence[str] = ()) -> Recipe:
    """Load and validate a recipe file (a path, or a name under ``recipes/``) and apply ``key=value`` overrides."""
    path = resolve_recipe_path(path_or_name or DEFAULT_RECIPE)
    parsed = _normalise_overrides(overrides)  # fail on a bad override before reading anything
    recipe = _build_recipe(_read_document(path), str(path))
    return recipe.with_overrides(dict(parsed)) if parsed else recipe


def shadowed_overrides(recipe: Recipe, overrides: Sequence[str]) -> list[str]:
    """One note per command-line override that a compare/suite entry of `recipe` sets to another value.

    An entry's keys are applied after the whole recipe's, so they win (a suite's arms differ on
    purpose, e.g. in matched widths or step counts); the note keeps that from going unnoticed
    when a user shortens or changes every run from the command line."""
    given = dict(_normalise_overrides(overrides))
    variants = list(recipe.suite) + ([recipe.compare] if recipe.compare is not None else [])
    return [f"{variant.name} keeps its suite entry's {key}={variant.overrides[key]!r}, not the command line's "
            f"{given[key]!r} (an entry's keys win; suite=none trains the recipe alone)"
            for variant in variants for key in given
            if key in variant.overrides and variant.overrides[key] != given[key]]


def recipe_device(path_or_name: str | None = None, overrides: Sequence[str] = ()) -> str:
    """``run.device`` of a recipe with its overrides applied, read from the YAML alone.

    Cheap (no model config, so no torch or transformers import): `bmojo-neuron train`
    uses it to refuse a ``neuron`` recipe on a machine without the Neuron SDK at once.
    """
    raw = _apply_overrides(_read_document(resolve_recipe_path(path_or_name or DEFAULT_RECIPE)), overrides)
    run = raw.get("run")
    device = run.get("device", RunSection.device) if isinstance(run, dict) else RunSection.device
    _choice("run.device", device, DEVICES)
    return device


def _read_document(path: Path) -> dict[str, Any]:
    try:
        document = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"recipe {path}: not valid YAML: {_yaml_problem(err, in_file=True)}") from None
    if document is None:  # an empty file, or comments only: most likely not the file meant (cut short, unsaved)
        raise ValueError(f"recipe {path}: is empty; write the sections it changes (e.g. train: {{steps: 100}}), "
                         "or `{}` for every default")
    if not isinstance(document, dict):
        raise ValueError(f"recipe {path}: must be a mapping of sections, got {type(document).__name__}")
    document.setdefault("run", {})
    if isinstance(document["run"], dict):
        document["run"].setdefault("name", path.stem)
    return document


def resolve_recipe_path(path_or_name: str) -> Path:
    """An existing file is used as is; otherwise ``recipes/<name>.yaml`` under the CWD, then the repository root.

    A shipped recipe's path as the docs write it (``recipes/priming/cpu-mqar-source.yaml``)
    names the same recipe from any folder: a leading ``recipes/`` is the recipe folder.
    """
    candidate = Path(path_or_name).expanduser()
    if candidate.is_file():
        return candidate
    name = path_or_name if path_or_name.endswith((".yaml", ".yml")) else f"{path_or_name}.yaml"
    name = name.removeprefix(f"{RECIPE_DIR}/")
    # one folder when the current directory is the checkout, so the message names it once
    roots = list(dict.fromkeys([Path.cwd() / RECIPE_DIR, repository_root() / RECIPE_DIR]))
    for root in roots:
        if (root / name).is_file():
            return root / name
    known = sorted({str(p.relative_to(r))[: -len(".yaml")] for r in roots if r.is_dir() for p in r.rglob("*.yaml")})
    # an absolute path is looked up nowhere else, so "no /abs/x.yaml under recipes/" would mislead
    where = "no such file" if candidate.is_absolute() else (
        f"not a file, and no {name} under {', '.join(map(str, roots))}")
    if not known:  # the shipped recipes sit beside the package in a checkout, not inside it
        raise FileNotFoundError(f"recipe {path_or_name!r} not found: {where}, and no recipes/ folder there: the "
                                "shipped recipes live in the repository's recipes/ folder, which an install from a "
                                "wheel or `pip install .` leaves behind; install the checkout with `pip install -e .`, "
                                "run from the checkout, or give a recipe's YAML path")
    raise FileNotFoundError(f"recipe {path_or_name!r} not found: {where}; known recipes: {', '.join(known)}")


def repository_root() -> Path:
    """The checkout that holds ``bmojo_neuron/`` (and ``recipes/`` in a source install)."""
    import bmojo_neuron

    return Path(bmojo_neuron.__file__).resolve().parents[1]


def list_recipes() -> list[str]:
    """Names of the recipes shipped under the repository's ``recipes/`` folder."""
    root = repository_root() / RECIPE_DIR
    return sorted(str(p.relative_to(root))[: -len(".yaml")] for p in root.rglob("*.yaml"))


def count_parameters(recipe: Recipe) -> int:
    """Parameter count of the recipe's model, built on the meta device (no memory, instant even for 1.4B)."""
    import torch

    from bmojo_neuron import BMojoForCausalLM

    with torch.device("meta"):
        model = BMojoForCausalLM(recipe.model_config())
    return int(model.num_parameters())


# ----------------------------------------------------------------------------- building
def _apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any] | Sequence[str]) -> dict[str, Any]:
    """A copy of the raw document with dotted overrides set.

    Section drops (``model=none``) apply before every dotted key, wherever they stand on the command line, so
    ``model.window_size=64 model=none`` and ``model=none model.window_size=64`` both keep that window: applied in
    order, the first would drop the key it was just given, silently.
    """
    raw = copy.deepcopy(raw)
    pairs = _normalise_overrides(overrides)
    for key, _ in pairs:
        if key in SWITCHABLE:
            raw[key] = None
    for key, value in pairs:
        if key in SWITCHABLE:
            continue
        section, sub = key.split(".", 1)
        target = raw.setdefault(section, {})
        if target is None:
            target = raw[section] = {}
        if not isinstance(target, dict):
            raise ValueError(f"recipe key {section}: is not a mapping, cannot set {key}")
        target[sub] = value
    return raw


def _build_recipe(raw: dict[str, Any], source: str | None, check_variants: bool = True) -> Recipe:
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ValueError(f"recipe key {unknown[0]}: unknown section; valid sections: {', '.join(SECTIONS)}")
    for name, value in raw.items():
        expected = list if name == "suite" else dict
        if value is not None and not isinstance(value, expected):
            raise ValueError(f"recipe key {name}: must be a {'list' if expected is list else 'mapping'}, got {value!r}")
    run = _section(RunSection, "run", raw.get("run"))
    if run.output_dir is None:
        run.output_dir = str(Path("runs") / run.name)
    else:  # ``~/x`` from YAML or an override (no shell expands ``run.output_dir=~/x``) is the home folder's, here
        run.output_dir = str(Path(run.output_dir).expanduser())  # where it enters, so the data cache follows it
    data = _data_section(raw.get("data"), run)
    init = _section(InitSection, "init", raw.get("init"))
    model = _model_section(raw.get("model"), data, init)
    recipe = Recipe(
        run=run,
        model=model,
        data=data,
        optim=_section(OptimSection, "optim", raw.get("optim")),
        train=_section(TrainSection, "train", raw.get("train")),
        eval=_section(EvalSection, "eval", raw.get("eval")),
        checkpoint=_section(CheckpointSection, "checkpoint", raw.get("checkpoint")),
        parallel=_section(ParallelSection, "parallel", raw.get("parallel")),
        init=init,
        distill=_section(DistillSection, "distill", raw["distill"]) if raw.get("distill") is not None else None,
        compare=_variant("compare", raw["compare"]) if raw.get("compare") is not None else None,
        suite=[_variant(f"suite[{i}]", item) for i, item in enumerate(raw.get("suite") or [])],
        source=source,
        raw=raw,
    )
    if recipe.distill is not None:
        _check_distill(recipe)
    if check_variants:
        _check_variants(recipe)
    return recipe


def _section(cls: type, name: str, values: Mapping[str, Any] | None) -> Any:
    """Instantiate a section dataclass from user values, checking keys and types."""
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"recipe key {name}.{key}: unknown key; valid keys of {name}: {', '.join(fields)}")
        values[key] = _check_type(f"{name}.{key}", value, hints[key])
    section = cls(**values)
    if hasattr(section, "check"):
        section.check()
    return section


def _data_section(values: Mapping[str, Any] | None, run: RunSection) -> MqarDataSection | TextDataSection:
    values = dict(values or {})
    kind = values.get("kind", "mqar")
    _choice("data.kind", kind, DATA_KINDS)
    keys = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in DATA_SECTIONS.items()}
    for key in (key for key in values if key not in keys[kind]):
        other = next((name for name, names in keys.items() if key in names), None)
        if other is not None:  # e.g. data.kind=text given to an MQAR recipe: its MQAR keys are left over
            _fail(f"data.{key}", f"is a key of {other} data, but data.kind is {kind}: data.kind alone does not "
                                 f"switch the section; give a whole {kind} data section without the {other} keys "
                                 "(in a recipe file; eval: --data RECIPE)")
    section = _section(DATA_SECTIONS[kind], "data", values)
    if isinstance(section, TextDataSection) and section.cache_dir is None:
        section.cache_dir = str(Path(run.output_dir).parent / "data-cache")
    return section


def _model_section(values: Mapping[str, Any] | None, data: Any, init: InitSection | None = None) -> dict[str, Any]:
    model = dict(values or {})
    hints = _config_fields()
    for key, value in model.items():
        if key not in hints:
            raise ValueError(f"recipe key model.{key}: unknown BMojoConfig field; valid fields: {', '.join(hints)}")
        _check_type(f"model.{key}", value, hints[key])  # checked, kept as written (an int stays an int)
    fields = _model_fields(model, data, init)
    if isinstance(data, MqarDataSection) and fields.vocab_size < data.vocab_size:
        _fail("model.vocab_size", f"is {fields.vocab_size}, smaller than data.vocab_size ({data.vocab_size})")
    byte_text = isinstance(data, TextDataSection) and (data.tokenizer or "byte") == "byte"
    if byte_text and fields.vocab_size < BYTE_VOCAB_SIZE:
        _fail("model.vocab_size", f"is {fields.vocab_size}, smaller than the byte tokenizer's {BYTE_VOCAB_SIZE} ids "
                                  "(data.tokenizer: byte); the embedding needs a row for every id")
    return model


def _model_config(model: Mapping[str, Any], data: Any, init: InitSection | None = None) -> Any:
    from bmojo_neuron import BMojoConfig  # transformers (and torch, with the model classes it registers)

    return _build_fields(BMojoConfig, _config_arguments(model, data, init))


def _model_fields(model: Mapping[str, Any], data: Any, init: InitSection | None = None) -> BMojoFields:
    """The model's fields, checked by `BMojoConfig`'s own validation without importing transformers."""
    return _build_fields(BMojoFields, _config_arguments(model, data, init))


def _config_arguments(model: Mapping[str, Any], data: Any, init: InitSection | None) -> dict[str, Any]:
    """The keyword arguments of the model's config: ``init.weights``' config, the model section over it, and
    vocab_size from the data when neither gives it."""
    fields = {**_init_config_fields(init), **model}
    if "vocab_size" not in fields:
        if isinstance(data, MqarDataSection):
            fields["vocab_size"] = data.vocab_size
        elif isinstance(data, TextDataSection) and data.tokenizer == "byte":
            fields["vocab_size"] = BYTE_VOCAB_SIZE
    return fields


def _build_fields(cls: type, fields: dict[str, Any]) -> Any:
    """`cls(**fields)`, its validation error turned into the recipe key it names."""
    try:
        return cls(**fields)
    except ValueError as err:
        match = re.match(r"BMojoConfig\.(\w+) (.*)", str(err), re.S)
        if match:
            raise ValueError(f"recipe key model.{match.group(1)}: {match.group(2)}") from None
        raise ValueError(f"recipe key model: {err}") from None
    except TypeError as err:
        raise ValueError(f"recipe key model: {err}") from None


def _init_config_fields(init: InitSection | None) -> dict[str, Any]:
    """The model fields of ``init.weights``' config, which the model section then overrides.

    A folder that does not exist (yet) contributes nothing: the model section must then
    describe the model, and training checks the folder when it loads the weights.
    """
    if init is None or not init.weights:
        return {}
    folder = _model_folder(Path(init.weights).expanduser())
    if folder is None:
        return {}
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "bmojo":
        _fail("init.weights", f"{folder} holds a {config.get('model_type')!r} model, not a B'MOJO one; "
                              "start from it with `bmojo-neuron prime` first")
    valid = set(_config_fields())
    # a field the folder's config predates is the value its weights were trained with, not today's default
    return {key: value for key, value in saved_defaults(config).items() if key in valid}


def _model_folder(path: Path) -> Path | None:
    """The folder holding the model config behind `path`: itself (an export, a primed folder, a checkpoint), a
    run directory's ``final/``, or the checkpoint its ``latest`` file names (docs/training.md's run layout)."""
    candidates = [path, path / "final"]
    if (path / "latest").is_file():
        candidates.append(path / (path / "latest").read_text().strip())
    return next((c for c in candidates if (c / "config.json").is_file()), None)


def keys_named(name: str) -> list[str]:
    """The recipe keys (``section.field``) whose field is called `name` (``steps`` -> ``train.steps``), sorted:
    what an unknown ``--steps`` option may have meant."""
    classes = [(section, cls) for section, cls in SECTIONS.items() if dataclasses.is_dataclass(cls)]
    classes += [("data", cls) for cls in DATA_SECTIONS.values()]
    keys = {f"{section}.{f.name}" for section, cls in classes for f in dataclasses.fields(cls) if f.name == name}
    if name in _config_fields():
        keys.add(f"model.{name}")
    return sorted(keys)


def _config_fields() -> dict[str, Any]:
    """Every `BMojoConfig` argument with its type hint, in signature order.

    Read from `BMojoFields`, whose `__init__` `BMojoConfig` is (tests/test_recipes.py checks it stays so), so
    the recipe schema needs no transformers import."""
    hints = typing.get_type_hints(BMojoFields.__init__)
    params = inspect.signature(BMojoFields.__init__).parameters.values()
    return {p.name: hints.get(p.name, Any) for p in params
            if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}


def _variant(name: str, values: Any) -> Variant:
    if not isinstance(values, dict):
        raise ValueError(f"recipe key {name}: must be a mapping with name and overrides, got {values!r}")
    if "name" not in values:
        raise ValueError(f"recipe key {name}.name: missing; every compare/suite entry needs a name")
    return _section(Variant, name, values)


def _check_distill(recipe: Recipe) -> None:
    """A distillation (`bmojo_neuron.priming.distill`) needs a primed model to start from, a B or F layer with
    an SSM to distil, no M layer (it keeps no attention to act as its teacher), and no pipeline or sequence split."""
    _require(bool(recipe.init.weights), "init.weights",
             "must name the primed model a distill run starts from (bmojo-neuron prime writes it)")
    _require(recipe.parallel.pp == 1, "parallel.pp", "must be 1 with distill: the teacher pass runs every layer")
    _require(not recipe.parallel.sp, "parallel.sp", "must be false with distill (the layer losses need whole sequences)")
    config = recipe.model_fields()
    pattern = config.layer_pattern
    _require("M" not in pattern, "model.layer_pattern",
             f"is {pattern!r}; an M layer keeps no attention weights, so the model holds no teacher for it "
             "(distil B or F layers)")
    _require(bool(config.ssm_layers()), "model.layer_pattern",
             f"is {pattern!r} (fading_window {config.fading_window}, memory_size {config.memory_size}): "
             "no B or F layer with an SSM to distil")


def _check_variants(recipe: Recipe) -> None:
    """Apply each compare/suite override set once so a bad key fails at load time."""
    variants = ([("compare", recipe.compare)] if recipe.compare else []) + [
        (f"suite[{i}]", v) for i, v in enumerate(recipe.suite)
    ]
    for label, variant in variants:
        for key in variant.overrides:
            if key.split(".", 1)[0] in ("compare", "suite"):
                raise ValueError(f"recipe key {label}.overrides: cannot override {key}")
        try:
            _build_recipe(_apply_overrides(recipe.raw, variant.overrides), recipe.source, check_variants=False)
        except ValueError as err:
            raise ValueError(f"recipe key {label}.overrides ({variant.name}): {err}") from None


def _normalise_overrides(overrides: Mapping[str, Any] | Sequence[str]) -> list[tuple[str, Any]]:
    """Turn ``{"a.b": v}`` or ``["a.b=v"]`` into checked (dotted key, value) pairs."""
    if isinstance(overrides, str):
        overrides = [overrides]
    if isinstance(overrides, Mapping):
        pairs = list(overrides.items())
    else:
        pairs = []
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r}: expected key.sub=value, e.g. train.steps=10")
            key, text = item.split("=", 1)
            try:
                value = parse_yaml_value(text)
            except yaml.YAMLError as err:
                raise ValueError(f"override {item!r}: not valid YAML: {_yaml_problem(err)}") from None
            pairs.append((key.strip(), value))
    for key, value in pairs:
        if key in SWITCHABLE:
            if not (value is None or value is False or value == "none"):
                # compare and model are sections with keys; a suite is a list, whose entries only the recipe file sets
                how = {"compare": "change one of its keys with compare.name=... or compare.overrides=...",
                       "model": "set one of its keys with model.KEY=VALUE, e.g. model.window_size=64"}.get(
                           key, "its entries are set in the recipe file")
                raise ValueError(f"override {key!r}: {key}=none is the only value accepted (it drops the recipe's "
                                 f"{key}); {how}")
            continue
        section, _, sub = key.partition(".")
        if not sub or "." in sub:
            raise ValueError(f"override {key!r}: expected section.key, e.g. train.steps")
        if section not in OVERRIDABLE:
            raise ValueError(f"override {key!r}: unknown section {section!r}; valid sections: {', '.join(OVERRIDABLE)}")
    return pairs


# ----------------------------------------------------------------------------- checks
def _check_type(key: str, value: Any, hint: Any) -> Any:
    """Return `value` if it matches `hint` (ints are accepted as floats); raise naming `key` otherwise."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _check_type(key, value, option)
            except ValueError as err:
                errors.append(err)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            _fail(key, f"must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_check_type(key, v, item) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            _fail(key, f"must be a mapping, got {value!r}")
        return dict(value)
    if origin is tuple:
        items = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            _fail(key, f"must be a list of {len(items)} values, got {value!r}")
        return [_check_type(key, v, item) for v, item in zip(value, items)]
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if value is None:  # `key:` with nothing after it in a file, `key=` on the command line
        _fail(key, f"must be {_type_name(hint)}, got no value (null)")
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        _fail(key, f"must be {_type_name(hint)}, got {type(value).__name__} {value!r}")
    if hint is float and not math.isfinite(value):
        _fail(key, f"must be a finite number, got {value!r}")
    return value


def _type_name(hint: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, hint.__name__)


def _fail(key: str, message: str) -> typing.NoReturn:
    raise ValueError(f"recipe key {key}: {message}")


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        _fail(key, message)


def _positive(key: str, value: int) -> None:
    _require(value >= 1, key, f"is {value}; must be a positive integer")


def _choice(key: str, value: Any, choices: Sequence[str]) -> None:
    _require(value in choices, key, f"is {value!r}; choose one of {', '.join(choices)}")
