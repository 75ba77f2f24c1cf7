"""The benchmark suites: ``train-step``, ``scaling``, ``decode`` and ``kernels``.

Each suite returns one JSON-serialisable report (schema in ``docs/benchmarks.md``):
machine, settings, candidates (with parameter counts), one result row per
(candidate, size), speed-ups against the Hugging Face baselines, fitted exponents
where relevant, and the speed targets with whether they were met.
"""

from __future__ import annotations

import importlib
import inspect
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import torch

from bmojo_neuron.cache_bmojo import BMojoCache
from bmojo_neuron.ops import auto, dispatch

from . import harness
from .candidates import (ALL, COMPILED, HF, OURS, TOY_SHAPE, CandidateFactory, Shape, build_candidate,
                         check_buildable, check_names, first_layer, is_baseline)
from .harness import CAPPED, ERROR, OK, SKIPPED
from .library_notes import keeping_library_warnings, merge_notes

Log = Callable[[str], None]


@dataclass
class Settings:
    """Options of one suite run (CLI flags; None = the suite's default)."""

    suite: str
    lengths: list[int] | None = None
    repeats: int | None = None
    warmup: int | None = None
    cap_seconds: float | None = None
    batch: int | None = None
    candidates: list[str] | None = None
    toy: bool = False
    d_model: int | None = None
    layers: int | None = None
    window: int | None = None
    vocab_size: int | None = None
    device: str = "cpu"
    seed: int = 0
    budget_seconds: float | None = None  # whole-suite budget; cells past it are skipped
    probe: bool = True  # probe each candidate in a separate process (cap + memory); False: in-process
    busy: bool = False  # run a fixed background load on one core while timing (harness.BusyLoad)
    clock: str = "wall"  # harness.CLOCKS: wall, or this process's CPU time (one thread)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Defaults:
    lengths: tuple[int, ...]
    toy_lengths: tuple[int, ...]
    candidates: tuple[str, ...]
    repeats: int
    warmup: int
    cap_seconds: float
    batch: int
    toy_batch: int
    toy_cap_seconds: float = 20.0
    budget_seconds: float = 540.0  # a whole suite within 10 minutes on 2 cores, with a margin


DEFAULTS = {
    "train-step": Defaults(lengths=(1024, 4096), toy_lengths=(64, 128),
                           candidates=("bmojo", "bmojo-f", "mamba-only", "swa-only", "hf-mamba", "hf-mamba2",
                                       "hf-mistral-swa", "hf-mistral"),
                           repeats=3, warmup=1, cap_seconds=30.0, batch=4, toy_batch=2),
    "scaling": Defaults(lengths=(1024, 2048, 4096, 8192, 16384), toy_lengths=(64, 128, 256),
                        candidates=("bmojo", "bmojo-f", "hf-mamba", "hf-mamba2", "hf-mistral-swa", "hf-mistral"),
                        repeats=3, warmup=1, cap_seconds=20.0, batch=1, toy_batch=1),
    "decode": Defaults(lengths=(1024, 4096, 16384), toy_lengths=(64, 256),
                       candidates=("bmojo", "hf-mistral", "hf-mistral-swa", "hf-mamba2"),
                       repeats=16, warmup=3, cap_seconds=60.0, batch=1, toy_batch=1),
    "kernels": Defaults(lengths=(0,), toy_lengths=(0,), candidates=(), repeats=1, warmup=0,
                        cap_seconds=120.0, batch=1, toy_batch=1),
}
SUITES = tuple(DEFAULTS)
TOY_REPEATS = 2  # timed rounds of a --toy suite, no warm-up (`resolve`)
SETUP_SECONDS = 120.0  # building a candidate's unit in a probe process (`harness.probe`'s build_seconds)
COMPILE_SECONDS = 600.0  # the same for a compiled candidate, whose set-up compiles (minutes on a small CPU)
SEED_RANGE = (-2**63, 2**64 - 1)  # what `torch.manual_seed` accepts (a 64-bit seed, signed or not)


def resolve(settings: Settings) -> Settings:
    """Fill every None with the suite's default (toy defaults with ``toy``) and check the values."""
    if settings.suite not in DEFAULTS:
        raise ValueError(f"unknown suite {settings.suite!r}; choose from {list(SUITES)}")
    d = DEFAULTS[settings.suite]
    s = replace(settings, extra=dict(settings.extra))
    if s.lengths is None:
        s.lengths = list(d.toy_lengths if s.toy else d.lengths)
    # The toy checks the plumbing (probe, alternating rounds, median, report, plot, targets): two timed rounds
    # take a median of more than one, and a warm-up round would only time first-call costs nobody reads.
    if s.repeats is None:
        s.repeats = min(d.repeats, TOY_REPEATS) if s.toy else d.repeats
    if s.warmup is None:
        s.warmup = 0 if s.toy else d.warmup
    if s.cap_seconds is None:
        s.cap_seconds = d.toy_cap_seconds if s.toy else d.cap_seconds
    if s.batch is None:
        s.batch = d.toy_batch if s.toy else d.batch
    if s.candidates is None:
        s.candidates = list(d.candidates)
    if s.budget_seconds is None:
        s.budget_seconds = d.budget_seconds
    _check_seconds("--budget-seconds", s.budget_seconds)
    if d.candidates:
        check_names(s.candidates, ALL if s.suite == "train-step" else tuple(n for n in ALL if n not in COMPILED))
    if s.suite != "kernels" and (any(not isinstance(n, int) or n < 1 for n in s.lengths) or not s.lengths):
        raise ValueError(f"--lengths must be positive integers, got {s.lengths}")
    repeated = sorted({n for n in s.lengths if s.lengths.count(n) > 1})
    if repeated:  # 1K and 1024 are one length: a report would hold fewer rows than the lengths asked for
        hint = " (1K = 1024)" if any(n % 1024 == 0 for n in repeated) else ""
        raise ValueError(f"--lengths: {', '.join(map(str, repeated))} given more than once{hint}; name each length "
                         "once")
    s.lengths = sorted(s.lengths)
    if s.suite == "scaling" and len(s.lengths) < 2:
        raise ValueError(f"scaling fits an exponent across lengths: --lengths needs at least two, got {s.lengths}")
    if s.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {s.repeats}")
    if s.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {s.warmup}")
    _check_seconds("--cap-seconds", s.cap_seconds)
    if s.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {s.batch}")
    if not SEED_RANGE[0] <= s.seed <= SEED_RANGE[1]:
        raise ValueError(f"--seed must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}, got {s.seed}")
    if s.suite != "kernels":
        _check_shape(s)
    return s


def _check_shape(s: Settings) -> None:
    """The sizes given must be >= 1 and every candidate buildable at them (as the suite builds it: scaling
    builds one layer, without the LM head), so a bad size is refused before the suite prints anything."""
    for option, value in (("--d-model", s.d_model), ("--layers", s.layers), ("--window", s.window),
                          ("--vocab-size", s.vocab_size)):
        if value is not None and value < 1:
            raise ValueError(f"{option} must be >= 1, got {value}")
    scaling = s.suite == "scaling"
    check_buildable(s.candidates, shape_for(s), num_layers=1 if scaling else None, causal_lm=not scaling)


def _check_seconds(option: str, value: float) -> None:
    """A time limit must be a finite number > 0 (``float`` parses ``nan`` and ``inf`` too)."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{option} must be a finite number of seconds > 0, got {value}")


def shape_for(s: Settings) -> Shape:
    base = TOY_SHAPE if s.toy else Shape()
    changes: dict[str, Any] = {"max_length": max(max(s.lengths) + 64, base.max_length)}
    if s.d_model is not None:
        changes["hidden_size"] = s.d_model
    if s.layers is not None:
        changes["num_layers"] = s.layers
    if s.window is not None:
        changes["window"] = s.window
    if s.vocab_size is not None:
        changes["vocab_size"] = s.vocab_size
    return replace(base, **changes)


def run_suite(settings: Settings, log: Log = print) -> dict[str, Any]:
    s = resolve(settings)
    torch.manual_seed(s.seed)
    started = time.perf_counter()
    s.extra["deadline"] = time.monotonic() + s.budget_seconds
    report: dict[str, Any] = {
        "schema": harness.SCHEMA,
        "suite": s.suite,
        "created": harness.now_iso(),
        "toy": s.toy,
        "machine": harness.machine_info(s.device),
        "settings": {k: v for k, v in asdict(s).items() if k != "extra"},
        "memory_method": _memory_method(s),
        "status": OK,
        "message": None,
        "candidates": [],
        "results": [],
        "speedups": [],
        "fits": [],
        "targets": [],
        "ratios": [],  # reported ratios that are not targets (train-step: the compiled candidates)
        "library_notes": [],  # the libraries' warnings, each once, here and in the probes (`library_notes`)
    }
    body = {"train-step": _train_step, "scaling": _scaling, "decode": _decode, "kernels": _kernels}[s.suite]
    if s.suite != "kernels":  # builds the C kernels now if the default runs them, not inside a timed unit
        report["machine"]["ops"] = auto.describe(torch.device(s.device).type)
        log(f"ops: {report['machine']['ops']}")
    with keeping_library_warnings() as notes:
        if s.busy and s.suite != "kernels":
            with harness.BusyLoad() as load:
                s.extra["busy"] = load
                report["machine"]["busy_load"] = load.describe()
                log(f"busy: a single-threaded busy loop on core {load.core} for the whole suite; "
                    f"{QUIET_TOO} is also timed with it paused")
                body(s, report, log)
        else:
            body(s, report, log)
    merge_notes(report["library_notes"], notes)
    report["machine"]["load_average_end"] = harness.load_average()
    report["elapsed_s"] = round(time.perf_counter() - started, 2)
    return report


def _memory_method(s: Settings) -> str:
    if s.suite == "kernels":
        return "not measured"
    if not s.probe or harness.probe_context() is None:
        return "not measured (no probe process)" if not s.device.startswith("cuda") else harness.MEMORY_METHOD_CUDA
    if s.device.startswith("cuda"):
        return harness.MEMORY_METHOD_CUDA
    return harness.MEMORY_METHOD_CPU if harness.cpu_memory_supported() else "not measured (no /proc)"


# Under --busy this candidate is also timed with the load paused, alternating with its busy runs.
QUIET_TOO = "bmojo"
QUIET = "@quiet"

# ----------------------------------------------------------------------------- units
# A unit builder takes a spec (plain dict: picklable, so a probe process can rebuild
# the same unit) and an optional cache of built models (the main process keeps one
# per suite run, so models and optimizer state persist across sizes). It returns an
# object with run() (one unit of work) and info() (extra JSON numbers).
BUILDERS = {
    "train-step": "bmojo_neuron.bench.suites:train_step_unit",
    "scaling": "bmojo_neuron.bench.suites:scaling_unit",
    "decode": "bmojo_neuron.bench.suites:decode_unit",
}


def _built(spec: dict[str, Any], cache: dict[str, Any] | None, causal_lm: bool, num_layers: int | None):
    cache = {} if cache is None else cache
    name = spec["name"]
    if name not in cache:
        cache[name] = build_candidate(name, Shape(**spec["shape"]), spec["width"], num_layers, causal_lm,
                                      spec["seed"], spec["device"])
    return cache, cache[name]


def _generator(spec: dict[str, Any]) -> torch.Generator:
    return torch.Generator().manual_seed(spec["seed"] * 1_000_003 + spec["length"])


class _Unit:
    def __init__(self, run: Callable[[], Any], info: Callable[[], dict] | None = None) -> None:
        self.run = run
        self._info = info

    def info(self) -> dict[str, Any]:
        return self._info() if self._info else {}


def train_step_unit(spec: dict[str, Any], cache: dict[str, Any] | None = None) -> _Unit:
    """One AdamW training step (forward with labels, backward, optimizer step) on (batch, length) tokens."""
    cache, built = _built(spec, cache, causal_lm=True, num_layers=None)
    key = ("optimizer", spec["name"])
    if key not in cache:
        cache[key] = torch.optim.AdamW(built.model.parameters(), lr=1e-4)
    model, opt = built.model, cache[key]
    model.train()
    shape = Shape(**spec["shape"])
    ids = torch.randint(0, shape.vocab_size, (spec["batch"], spec["length"]), generator=_generator(spec))
    ids = ids.to(spec["device"])

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    if spec["name"] not in COMPILED:
        return _Unit(step)
    # A compiled candidate compiles (forward and backward) on its first step at a new shape: that step
    # is set-up, not the unit, so it runs here and its time is reported apart, as compile_s.
    harness.sync(spec["device"])
    t0 = time.perf_counter()
    step()
    harness.sync(spec["device"])
    compile_s = time.perf_counter() - t0
    return _Unit(step, lambda: {"compile_s": round(compile_s, 3)})


def scaling_unit(spec: dict[str, Any], cache: dict[str, Any] | None = None) -> _Unit:
    """Forward + backward of one layer on a (batch, length, d_model) float32 input."""
    cache, built = _built(spec, cache, causal_lm=False, num_layers=1)
    shape = Shape(**spec["shape"])
    x = torch.randn(spec["batch"], spec["length"], shape.hidden_size, generator=_generator(spec))
    x = x.to(spec["device"])
    if spec["name"] in OURS:
        module = first_layer(built)

        def loss(inp: torch.Tensor) -> torch.Tensor:
            out, innovation = module(inp)
            value = out.square().mean()
            return value if innovation is None else value + innovation
    else:
        module = built.model

        def loss(inp: torch.Tensor) -> torch.Tensor:
            return module(inputs_embeds=inp).last_hidden_state.square().mean()

    module.train()

    def unit() -> None:
        module.zero_grad(set_to_none=True)
        loss(x.detach().requires_grad_(True)).backward()

    return _Unit(unit)


def _forward_kwarg(model) -> str:
    """`cache` on transformers 5.x and our models, `past_key_values` on older HF releases."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _out_cache(out):
    for key in ("cache", "past_key_values", "cache_params"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    raise ValueError("the model returned no cache")


class Decoder:
    """Prefill a context, then decode one token per `step()` (no grad), for our models and HF's alike."""

    def __init__(self, name: str, model, context: torch.Tensor) -> None:
        self.name, self.model, self.context = name, model, context
        self.kwarg = _forward_kwarg(model)
        self.cache = None
        self.token = context[:, -1:]

    def prefill(self) -> None:
        with torch.no_grad():
            cache = BMojoCache(self.model.config.num_hidden_layers) if self.name in OURS else None
            kwargs = {self.kwarg: cache} if cache is not None else {}
            out = self.model(input_ids=self.context, use_cache=True, logits_to_keep=1, **kwargs)
            self.cache = _out_cache(out)
            self.token = out.logits[:, -1:].argmax(-1)

    def step(self) -> None:
        with torch.no_grad():
            # the same token every step: the work per token does not depend on its value
            out = self.model(input_ids=self.token, use_cache=True, **{self.kwarg: self.cache})
            self.cache = _out_cache(out)

    def cache_bytes(self) -> int:
        return harness.tensor_bytes(self.cache)


def decode_unit(spec: dict[str, Any], cache: dict[str, Any] | None = None) -> _Unit:
    """Probe phase: prefill `length` tokens and decode one. Time phase: prefill now, then run() = one token."""
    cache, built = _built(spec, cache, causal_lm=True, num_layers=None)
    model = built.model
    model.eval()
    shape = Shape(**spec["shape"])
    context = torch.randint(0, shape.vocab_size, (spec["batch"], spec["length"]), generator=_generator(spec))
    context = context.to(spec["device"])
    decoder = Decoder(spec["name"], model, context)
    if spec.get("phase") == "time":
        t0 = time.perf_counter()
        decoder.prefill()
        harness.sync(spec["device"])
        prefill_s = time.perf_counter() - t0
        return _Unit(decoder.step, lambda: {"prefill_s": round(prefill_s, 4), "cache_bytes": decoder.cache_bytes()})
    # Probe: the prefill is set-up (bounded by `_setup_seconds`), the cap applies to the decoded token;
    # the prefill's own peak memory is measured here, where the probe process pins the allocator.
    prefill_s, prefill_peak = harness.measure_call(decoder.prefill, spec["device"])
    info = {"prefill_s": round(prefill_s, 4)}
    if spec.get("isolated"):
        info["prefill_peak_memory_bytes"] = prefill_peak
    return _Unit(decoder.step, lambda: dict(info, cache_bytes=decoder.cache_bytes()))


# ----------------------------------------------------------------------------- helpers
def _setup_seconds(s: Settings, name: str) -> float:
    """How long a probe may take to build its unit before the cap starts.

    A compiled candidate compiles while it builds (`COMPILE_SECONDS`).

    Decode prefills the context while it builds: at 16K on a loaded machine that alone can
    take minutes, and it is not the unit being timed, so it is bounded by what is left of the
    suite's budget (at least the usual 120 s), not by the per-token cap.
    """
    if name in COMPILED:
        return COMPILE_SECONDS
    if s.suite != "decode":
        return SETUP_SECONDS
    return max(SETUP_SECONDS, s.extra["deadline"] - time.monotonic())


def _describe(report: dict[str, Any], factory: CandidateFactory, built: dict, log: Log) -> None:
    target = factory.target
    for name, b in built.items():
        info = b.describe(target)
        report["candidates"].append(info)
        log(f"  {name:<15} {info['class']:<22} params {b.params:>11,}  non-embedding {b.non_embedding_params:>11,}"
            f"  ({info['params_vs_bmojo']:.3f}x B'MOJO)")


def _recording_ops(run: Callable[[], Any], into: dict[str, set[str]]) -> Callable[[], Any]:
    """`run`, noting into `into` which backend ran each hot op it called (B'MOJO's; the HF models call none)."""

    def recorded() -> Any:
        with dispatch.recording() as ran:
            result = run()
        for op, names in ran.items():
            into.setdefault(op, set()).update(names)
        return result

    return recorded


def _row(name: str, length: int, status: str, **values: Any) -> dict[str, Any]:
    row = {"candidate": name, "role": "baseline" if is_baseline(name) else "ours", "length": length,
           "status": status, "median_s": None, "times_s": [], "peak_memory_bytes": None, "memory_warm": None,
           "probe_s": None, "note": None}
    row.update(values)
    return row


def _prepare(s: Settings, report: dict[str, Any], log: Log, num_layers: int | None, causal_lm: bool
             ) -> tuple[Shape, dict[str, Any], dict[str, Any]]:
    """Build every candidate once (matched widths), describe them; returns shape, model cache, base spec."""
    shape = shape_for(s)
    report["settings"]["shape"] = shape.to_dict()
    factory = CandidateFactory(shape, num_layers=num_layers, causal_lm=causal_lm)
    cache: dict[str, Any] = {}
    for name in s.candidates:
        cache[name] = factory.build(name, seed=s.seed, device=s.device)
    _describe(report, factory, cache, log)
    base = {"suite": s.suite, "shape": shape.to_dict(), "batch": s.batch, "seed": s.seed, "device": s.device}
    return shape, cache, base


def _cells(s: Settings, report: dict[str, Any], log: Log, cache: dict[str, Any], base: dict[str, Any],
           describe_row: Callable[[dict[str, Any]], str]) -> dict[str, int]:
    """For every length: probe each candidate (cap, memory), then time the survivors alternating."""
    builder = BUILDERS[s.suite]
    capped_at: dict[str, int] = {}
    for length in s.lengths:
        rows: dict[str, dict[str, Any]] = {}
        probes: dict[str, harness.Probe] = {}
        units: dict[str, Any] = {}
        for name in s.candidates:
            if name in capped_at:
                rows[name] = _row(name, length, CAPPED, note=f"capped at the shorter length {capped_at[name]}")
                continue
            if time.monotonic() > s.extra["deadline"]:
                rows[name] = _row(name, length, SKIPPED,
                                  note=f"the suite's time budget ({s.budget_seconds:g} s) was spent")
                log(f"  L={length:<6} {name:<15} skipped: time budget spent")
                continue
            spec = dict(base, name=name, length=length, width=cache[name].width, phase="probe", isolated=s.probe)
            p = harness.probe(builder, spec, s.cap_seconds, build_seconds=_setup_seconds(s, name), isolate=s.probe)
            probes[name] = p
            merge_notes(report["library_notes"], p.notes)
            if p.status != OK:
                rows[name] = _row(name, length, p.status, probe_s=harness.rounded(p.seconds, 4), note=p.error)
                if p.status == CAPPED:
                    capped_at[name] = length
                log(f"  L={length:<6} {name:<15} {p.status}: {p.error or ''}")
                continue
            try:
                units[name] = harness._load(builder)(dict(spec, phase="time"), cache)
            except Exception as exc:
                rows[name] = _row(name, length, ERROR, note=f"{type(exc).__name__}: {exc}")
        ran: dict[str, dict[str, set[str]]] = {n: {} for n in units}
        runs = {n: _recording_ops(u.run, ran[n]) for n, u in units.items()}
        load = s.extra.get("busy")
        if load is not None and QUIET_TOO in units:
            runs[QUIET_TOO + QUIET] = load.paused(units[QUIET_TOO].run)
        timings = harness.round_robin(runs, s.warmup, s.repeats, s.device,
                                      cap_seconds=s.cap_seconds, budget_seconds=s.cap_seconds,
                                      deadline=s.extra["deadline"], clock=harness.CLOCKS[s.clock])
        quiet = timings.pop(QUIET_TOO + QUIET, None)
        for name, t in timings.items():
            p = probes[name]
            rows[name] = _row(name, length, t.status, median_s=harness.rounded(t.median),
                              times_s=[harness.rounded(x) for x in t.times], peak_memory_bytes=p.peak_memory_bytes,
                              memory_warm=p.memory_warm, probe_s=harness.rounded(p.seconds, 4), note=t.error)
            rows[name].update({f"probe_{k}": v for k, v in p.info.items()})
            rows[name].update(units[name].info())
            rows[name]["ops"] = {op: "+".join(sorted(names)) for op, names in ran[name].items()}
            if name == QUIET_TOO and quiet is not None:
                rows[name].update(quiet_median_s=harness.rounded(quiet.median),
                                  quiet_times_s=[harness.rounded(x) for x in quiet.times],
                                  busy_over_quiet=harness.rounded(t.median / quiet.median, 4)
                                  if t.median and quiet.median else None)
            if t.status == CAPPED:
                capped_at[name] = length
        for name in s.candidates:
            row = rows[name]
            row["tokens_per_s"] = round(s.batch * length / row["median_s"], 2) if row["median_s"] else None
            if row["median_s"]:
                log(f"  L={length:<6} {name:<15} {describe_row(row)}")
            report["results"].append(row)
    return capped_at


def _speedups(report: dict[str, Any], key: str, higher_is_better: bool) -> None:
    """speedup = how many times faster `candidate` is than `baseline` (>1: faster), per length."""
    by_length: dict[int, dict[str, dict]] = {}
    for row in report["results"]:
        if row["status"] == OK and row.get(key):
            by_length.setdefault(row["length"], {})[row["candidate"]] = row
    for length, rows in sorted(by_length.items()):
        for cand, crow in rows.items():
            if is_baseline(cand):
                continue
            for base, brow in rows.items():
                if not is_baseline(base):
                    continue
                ratio = crow[key] / brow[key] if higher_is_better else brow[key] / crow[key]
                report["speedups"].append({"length": length, "candidate": cand, "baseline": base,
                                           "metric": key, "speedup": round(ratio, 4)})


def _target(report: dict[str, Any], name: str, value: float | None, threshold: float, comparison: str,
            note: str = "", met: bool | None = None) -> None:
    """Record a target. Never undecided: without a value it is missed unless `met` says otherwise."""
    if met is None:
        met = value is not None and (value >= threshold if comparison == ">=" else value <= threshold)
    if value is None and not note:
        note = "missed: not measured"
    report["targets"].append({"name": name, "value": None if value is None else round(value, 4),
                              "threshold": threshold, "comparison": comparison, "met": bool(met), "note": note})


def _why_not(row: dict[str, Any] | None, name: str, length: int) -> str:
    """Why candidate `name` has no number at `length` (for a missed target's note)."""
    if row is None:
        return f"{name} was not run at {length}"
    detail = f": {row['note']}" if row.get("note") else ""
    return f"{name} {row['status']} at {length}{detail}"


def _ratio_target(report: dict[str, Any], s: Settings, name: str, length: int, key: str, ours: str, other: str,
                  threshold: float, comparison: str) -> None:
    """Target on ``ours[key] / other[key]`` at one length; skipped unless both were requested.

    Ours capped, failed or skipped: missed. The baseline capped while ours ran: met
    (ours finished within the cap, it did not), with no value.
    """
    if ours not in s.candidates or other not in s.candidates:
        return
    a, b = _result(report, ours, length), _result(report, other, length)
    if not (a and a["status"] == OK and a.get(key)):
        _target(report, name, None, threshold, comparison, note="missed: " + _why_not(a, ours, length))
    elif b and b["status"] == CAPPED:
        _target(report, name, None, threshold, comparison, met=True,
                note=f"{other} capped at {length} (over {s.cap_seconds:g} s) while {ours} ran")
    elif not (b and b["status"] == OK and b.get(key)):
        _target(report, name, None, threshold, comparison, note="missed: " + _why_not(b, other, length))
    else:
        _target(report, name, a[key] / b[key], threshold, comparison)


def _busy_targets(report: dict[str, Any], s: Settings, label: str) -> None:
    """Under --busy: B'MOJO's time with the load running over its time with it paused."""
    if not s.busy or QUIET_TOO not in s.candidates:
        return
    for length in s.lengths:
        row = _result(report, QUIET_TOO, length)
        value = row.get("busy_over_quiet") if row else None
        note = "" if value is not None else "missed: " + _why_not(row, QUIET_TOO, length)
        _target(report, f"{label} L={length}: B'MOJO time with one core busy / quiet", value, 1.5, "<=", note=note)


def _result(report: dict[str, Any], candidate: str, length: int) -> dict[str, Any] | None:
    for row in report["results"]:
        if row["candidate"] == candidate and row["length"] == length:
            return row
    return None


# ----------------------------------------------------------------------------- train-step
TRAIN_STEP_TARGETS = (("hf-mistral-swa", 1.0), ("hf-mamba2", 1.5))  # B'MOJO tokens/s over theirs, at least
# Reported, not targets (the targets stay on the eager `bmojo`): compiled B'MOJO over eager and compiled Mistral-SWA.
TRAIN_STEP_RATIOS = (("bmojo-compiled", "hf-mistral-swa"), ("bmojo-compiled", "hf-mistral-swa-compiled"),
                     ("bmojo-compiled", "bmojo"))
SCALING_EXPONENT = 1.05  # B'MOJO one-layer time exponent, at most
DECODE_VS_MISTRAL_SWA = 1.2  # B'MOJO per-token latency over HF Mistral-SWA's, at most, at every context
DECODE_GROWTH = 1.2  # B'MOJO latency at the longest context over the shortest, at most


def _train_step(s: Settings, report: dict[str, Any], log: Log) -> None:
    shape = shape_for(s)
    log(f"train-step: d_model {shape.hidden_size}, {shape.num_layers} layers, batch {s.batch}, "
        f"lengths {s.lengths}, {s.warmup} warm-up + {s.repeats} timed rounds, cap {s.cap_seconds:g} s")
    _, cache, base = _prepare(s, report, log, num_layers=None, causal_lm=True)
    report["unit"] = "one training step: forward with labels, backward, AdamW step, on (batch, L) tokens"
    _cells(s, report, log, cache, base, lambda r: f"{r['median_s'] * 1e3:10.1f} ms/step  {r['tokens_per_s']:10.1f} "
                                                  f"tok/s  peak +{_mib(r['peak_memory_bytes'])}")
    _speedups(report, "tokens_per_s", higher_is_better=True)
    for length in s.lengths:
        for other, threshold in TRAIN_STEP_TARGETS:
            _ratio_target(report, s, f"train-step L={length}: B'MOJO tokens/s / {other} tokens/s", length,
                          "tokens_per_s", "bmojo", other, threshold, ">=")
    report["ratios"] = [_ratio(report, length, "tokens_per_s", ours, other)
                        for length in s.lengths for ours, other in TRAIN_STEP_RATIOS
                        if ours in s.candidates and other in s.candidates]
    _busy_targets(report, s, "train-step")


def _ratio(report: dict[str, Any], length: int, key: str, ours: str, other: str) -> dict[str, Any]:
    """``ours[key] / other[key]`` at one length, or None with why not."""
    a, b = _result(report, ours, length), _result(report, other, length)
    value, note = None, None
    if not (a and a["status"] == OK and a.get(key)):
        note = _why_not(a, ours, length)
    elif not (b and b["status"] == OK and b.get(key)):
        note = _why_not(b, other, length)
    else:
        value = round(a[key] / b[key], 4)
    return {"name": f"train-step L={length}: {ours} {key} / {other} {key}", "length": length, "candidate": ours,
            "other": other, "metric": key, "value": value, "note": note}


# ----------------------------------------------------------------------------- scaling
def _scaling(s: Settings, report: dict[str, Any], log: Log) -> None:
    shape = shape_for(s)
    log(f"scaling: one layer, d_model {shape.hidden_size}, batch {s.batch}, lengths {s.lengths}, "
        f"{s.warmup} warm-up + {s.repeats} timed rounds, cap {s.cap_seconds:g} s")
    _, cache, base = _prepare(s, report, log, num_layers=1, causal_lm=False)
    report["unit"] = ("forward + backward of one layer (ours: BMojoDecoderLayer; HF: its *Model with one layer, "
                      "fed inputs_embeds) on a (batch, L, d_model) float32 input")
    capped_at = _cells(s, report, log, cache, base,
                       lambda r: f"{r['median_s'] * 1e3:10.1f} ms  peak +{_mib(r['peak_memory_bytes'])}")
    for name in s.candidates:
        ok = [r for r in report["results"] if r["candidate"] == name and r["status"] == OK and r["median_s"]]
        mem = [r for r in ok if r["peak_memory_bytes"]]
        fit = {"candidate": name, "lengths": [r["length"] for r in ok],
               "time_exponent": harness.fit_exponent([r["length"] for r in ok], [r["median_s"] for r in ok]),
               "memory_exponent": harness.fit_exponent([r["length"] for r in mem],
                                                       [r["peak_memory_bytes"] for r in mem]),
               "capped_from": capped_at.get(name)}
        report["fits"].append(fit)
        log(f"  fit {name:<15} time exponent {_or_na(fit['time_exponent'])}  "
            f"memory exponent {_or_na(fit['memory_exponent'])}"
            + (f"  (capped from L={capped_at[name]})" if name in capped_at else ""))
    _speedups(report, "median_s", higher_is_better=False)
    fit = next((f for f in report["fits"] if f["candidate"] == "bmojo"), None)
    if fit is not None:
        note = "1.0 is linear; full attention is the quadratic reference"
        met = None
        if fit["capped_from"] is not None or len(fit["lengths"]) < len(s.lengths):
            met = False
            note = f"missed: B'MOJO has times for {fit['lengths']} only, not every length of {s.lengths}"
        elif fit["time_exponent"] is None:  # e.g. times too short for the clock to tell apart from zero
            note = f"missed: B'MOJO's times at {fit['lengths']} give no exponent"
        _target(report, "scaling: B'MOJO layer time exponent", fit["time_exponent"], SCALING_EXPONENT, "<=",
                note=note, met=met)
    _busy_targets(report, s, "scaling")


# ----------------------------------------------------------------------------- decode
def _decode(s: Settings, report: dict[str, Any], log: Log) -> None:
    shape = shape_for(s)
    log(f"decode: d_model {shape.hidden_size}, {shape.num_layers} layers, batch {s.batch}, contexts {s.lengths}, "
        f"{s.warmup} warm-up + {s.repeats} timed tokens, cap {s.cap_seconds:g} s")
    _, cache, base = _prepare(s, report, log, num_layers=None, causal_lm=True)
    report["unit"] = ("one decoded token after prefilling the context (the cap and peak_memory_bytes: that token; "
                      "the prefill is set-up: probe_prefill_s, probe_prefill_peak_memory_bytes); "
                      "cache_bytes = all tensors held by the cache after prefill and the timed tokens")
    _cells(s, report, log, cache, base,
           lambda r: f"{r['median_s'] * 1e3:8.2f} ms/token  cache {_mib(r.get('cache_bytes'))}  "
                     f"prefill {r.get('prefill_s')} s, peak +{_mib(r.get('probe_prefill_peak_memory_bytes'))}  "
                     f"token peak +{_mib(r['peak_memory_bytes'])}")
    for row in report["results"]:
        row["latency_ms"] = round(row["median_s"] * 1e3, 4) if row["median_s"] else None
        row.pop("tokens_per_s", None)
        row.setdefault("cache_bytes", None)
        row.setdefault("prefill_s", None)
    _speedups(report, "median_s", higher_is_better=False)
    lo, hi = min(s.lengths), max(s.lengths)
    for name in s.candidates:
        a, b = _result(report, name, lo), _result(report, name, hi)
        growth = (b["median_s"] / a["median_s"]) if a and b and a["median_s"] and b["median_s"] else None
        cache_growth = (b["cache_bytes"] / a["cache_bytes"]) if a and b and a.get("cache_bytes") and b.get(
            "cache_bytes") else None
        report["fits"].append({"candidate": name, "lengths": [lo, hi],
                               "latency_ratio_longest_to_shortest": growth and round(growth, 4),
                               "cache_ratio_longest_to_shortest": cache_growth and round(cache_growth, 4)})
    fit = next((f for f in report["fits"] if f["candidate"] == "bmojo"), None)
    if fit is not None:
        value = fit["latency_ratio_longest_to_shortest"]
        note = "" if value is not None else "missed: " + "; ".join(
            _why_not(_result(report, "bmojo", n), "bmojo", n) for n in (lo, hi))
        _target(report, f"decode: B'MOJO latency at context {hi} / at {lo}", value, DECODE_GROWTH, "<=", note=note)
    for length in s.lengths:
        _ratio_target(report, s, f"decode context={length}: B'MOJO latency / hf-mistral-swa latency", length,
                      "median_s", "bmojo", "hf-mistral-swa", DECODE_VS_MISTRAL_SWA, "<=")
    _busy_targets(report, s, "decode")


# ----------------------------------------------------------------------------- kernels
KERNELS_MODULE = "bmojo_neuron.bench.kernel_profile"  # also behind `bmojo-neuron kernels profile`
SCAN_KERNELS = ("mamba1_fwd", "mamba1_bwd", "ssd_fwd", "ssd_bwd")
TOY_KERNEL_SHAPE = {"name": "toy", "d_inner": 128, "length": 256, "n1": 16, "n2": 16, "head_dim": 64, "groups": 1}


def _kernels(s: Settings, report: dict[str, Any], log: Log) -> None:
    """Modelled Trn1 kernel times from the NKI emulator's cost model (``kernels profile``).

    Uses `bmojo_neuron.bench.kernel_profile`: ``profile_kernel(kernel, shape)`` for the scan
    kernels at the calibration shape and the Trn1 recipes' shapes (``ladder_shapes()``),
    and ``attention_profiles(names)`` for the eidetic-attention kernels. Skipped with a
    message where that module or the emulator is not there. ``--lengths`` does not
    apply: the shapes come from ``recipes/trn1``. ``--toy``: one tiny shape, two kernels.
    """
    report["unit"] = "modelled Trn1 seconds per kernel call (one NeuronCore, batch 1), NKI emulator cost model"
    report["settings"]["lengths"] = []
    try:
        module = importlib.import_module(KERNELS_MODULE)
        profile_kernel = module.profile_kernel
        importlib.import_module("nki_kernels.emulator")
    except (ImportError, AttributeError) as exc:
        report["status"] = SKIPPED
        report["message"] = (f"skipped: the NKI emulator's `kernels profile` is not available here "
                             f"({KERNELS_MODULE}: {type(exc).__name__}: {exc})")
        log(report["message"])
        return
    if s.toy:
        jobs = [(k, TOY_KERNEL_SHAPE) for k in ("ssd_fwd", "mamba1_fwd")]
        attention = None
    else:
        shapes = [module.CALIBRATION] + list(module.ladder_shapes())
        jobs = [(k, shape) for shape in shapes for k in SCAN_KERNELS]
        attention = module.attention_profiles
    rows: list[dict[str, Any]] = []
    for kernel, shape in jobs:
        if time.monotonic() > s.extra["deadline"]:
            rows.append({"kernel": kernel, "shape": shape["name"], "length": shape["length"], "status": SKIPPED,
                         "note": f"the suite's time budget ({s.budget_seconds:g} s) was spent"})
            continue
        try:
            rows.append(dict(profile_kernel(kernel, shape), length=shape["length"]))
        except Exception as exc:  # one kernel failing must not hide the others
            rows.append({"kernel": kernel, "shape": shape["name"], "length": shape["length"], "status": ERROR,
                         "note": f"{type(exc).__name__}: {exc}"})
    if attention is not None:
        if time.monotonic() > s.extra["deadline"]:
            log("  attention kernels skipped: time budget spent")
        else:
            try:
                for row in attention(list(module.ATTENTION_KERNELS)):
                    length = int(str(row.get("dims", "L=0")).split()[0].split("=")[1])
                    rows.append(dict(row, length=length))
            except Exception as exc:
                log(f"  attention kernels: {type(exc).__name__}: {exc}")
                report["message"] = f"attention kernels failed: {type(exc).__name__}: {exc}"
    for row in rows:
        ok = "time_ms" in row
        entry = _row(f"{row['kernel']}", row["length"], row.get("status", OK) if not ok else OK,
                     median_s=harness.rounded(row["time_ms"] / 1e3, 9) if ok else None, note=row.get("note"))
        entry["times_s"] = [entry["median_s"]] if ok else []  # one modelled value, no repeats
        entry["role"] = "kernel"
        entry.update({k: v for k, v in row.items() if k not in entry and k not in ("profile", "time_ms")})
        entry["modelled_ms"] = harness.rounded(row.get("time_ms"), 6)
        report["results"].append(entry)
        if ok:
            log(f"  {entry['shape']:<24} {entry['candidate']:<16} {entry.get('dims', ''):<44} "
                f"modelled {entry['modelled_ms']:.3f} ms")


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def _or_na(value: float | None) -> str:
    """A printed number that may not have been measured (no CPU memory with --no-probe): "n/a", not "None"."""
    return "n/a" if value is None else str(value)


__all__ = ["ALL", "DEFAULTS", "HF", "SUITES", "Settings", "resolve", "run_suite"]
