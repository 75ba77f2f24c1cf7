"""Per-NeuronCore HBM estimate of a training recipe (weights, gradients, optimizer, activations).

A NeuronCore-v2 has 16 GiB: a Trn1 chip holds 32 GiB of HBM shared by its two cores.
Parameter counts come from the model built on the meta device with the tensor-parallel
shape factory (`bmojo_neuron.parallel.sharding.shard_shapes`), so they are
exact; the activation part is a formula (documented in ``docs/trn1.md``) and an
estimate. Everything here is arithmetic: nothing is allocated or compiled.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

if TYPE_CHECKING:  # torch is imported where the shapes are built: validating a recipe needs none of it
    import torch

GIB = 1024**3
NEURONCORE_HBM_BYTES = 16 * GIB  # NeuronCore-v2: 32 GiB HBM per Trn1 chip, two cores share it
FP32 = 4


@dataclass
class StageParams:
    """Parameters one tensor-parallel rank of pipeline stage `stage` holds."""

    stage: int
    layers: list[int]
    sharded: int  # tensors split over tp (this rank's part)
    replicated: int  # tensors every tp rank holds whole (norms; everything when tp = 1)
    trainable: int = -1  # of which get gradients and optimizer states (-1: all; a distillation trains fewer)

    @property
    def total(self) -> int:
        return self.sharded + self.replicated

    @property
    def trained(self) -> int:
        return self.total if self.trainable < 0 else self.trainable


@dataclass
class StageMemory:
    """Bytes on one NeuronCore of pipeline stage `stage`."""

    stage: int
    layers: list[int]
    parameters: int
    trainable: int  # parameters with gradients and optimizer states (fewer than `parameters` when distilling)
    weights: int
    gradients: int
    optimizer: int
    activations_per_microbatch: int  # with the recipe's activation_checkpointing setting
    activations_full: int  # per micro-batch, every layer's tensors kept
    activations_checkpointed: int  # per micro-batch, layer inputs kept + one layer recomputed on its kept input
    layer_inputs: int  # per micro-batch, the decoder layers' inputs (what checkpointing keeps of them)
    microbatches_in_flight: int
    activations: int  # per_microbatch × in flight

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


@dataclass
class MemoryEstimate:
    tp: int
    pp: int
    dp: int
    precision: str
    zero1: bool
    activation_checkpointing: bool
    sequence_parallel: bool
    seq_len: int
    microbatch_size: int  # sequences per micro-batch on one data rank
    stages: list[StageMemory] = field(default_factory=list)
    budget: int = NEURONCORE_HBM_BYTES

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    @property
    def total(self) -> int:
        """The largest per-NeuronCore total over the pipeline stages."""
        return self.peak.total

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def check(self) -> None:
        """ValueError when the busiest NeuronCore needs more than the 16 GiB of a NeuronCore-v2."""
        if not self.fits:
            s = self.peak
            raise ValueError(
                f"the plan needs {gib(s.total)} GiB of HBM per NeuronCore (pipeline stage {s.stage}: weights "
                f"{gib(s.weights)}, gradients {gib(s.gradients)}, optimizer {gib(s.optimizer)}, activations "
                f"{gib(s.activations)} GiB), more than the 16 GiB of a NeuronCore-v2 (32 GiB HBM per Trn1 chip, "
                "two cores share it); raise parallel.tp / parallel.pp, enable parallel.zero1, "
                "train.activation_checkpointing or parallel.sp, or lower train.batch_size")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for stage, s in zip(out["stages"], self.stages):
            stage["total"] = s.total
        out["total"] = self.total
        out["fits"] = self.fits
        return out


def gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def seq_len_of(recipe: Any) -> int:
    return recipe.data.seq_len if recipe.data.kind == "mqar" else recipe.data.block_size


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers":
        return int(parts[2])
    return None


class ModelShapes(NamedTuple):
    """State-dict shapes of a model: the one-device model's (`full`) and tensor-parallel rank 0's shard
    (`local`, the same dict at tp 1). Each is a build of the model on the meta device (about 0.15 s of CPU for the
    1.4B recipe), so a plan builds them once (`model_shapes`) and hands them to each estimate that counts them."""

    tp: int
    full: dict[str, torch.Size]
    local: dict[str, torch.Size]


def model_shapes(config: Any, tp: int) -> ModelShapes:
    """The shapes of `config`'s model at tensor-parallel degree `tp` (one meta build at tp 1, two above)."""
    from bmojo_neuron.parallel.sharding import shard_shapes

    full = shard_shapes(config, 1)
    return ModelShapes(tp, full, full if tp == 1 else shard_shapes(config, tp))


def stage_parameters(config: Any, tp: int, pp: int, trains: Callable[[str], bool] | None = None,
                     shapes: ModelShapes | None = None) -> list[StageParams]:
    """Exact parameter counts per pipeline stage for one tensor rank, from `shapes` (`model_shapes` of
    `config` at `tp`; built here when not given).

    Stage 0 holds the embedding, the last stage the final norm and ``lm_head``. A tied
    ``lm_head`` is the embedding itself with one stage; with several, the last stage
    holds its own copy (kept equal by summing the two gradients), counted there too.
    `trains` (a parameter name -> bool) counts the trainable ones, when not all are.
    """
    from bmojo_neuron.parallel.sharding import tied_names
    from bmojo_neuron.parallel.pipeline import split_layers

    if shapes is None:
        shapes = model_shapes(config, tp)
    elif shapes.tp != tp:
        raise ValueError(f"shapes of tensor-parallel degree {shapes.tp} given for tp {tp}")
    blocks = split_layers(config.num_hidden_layers, pp)
    stage_of_layer = {i: s for s, block in enumerate(blocks) for i in block}
    full, local = shapes.full, shapes.local
    out = [StageParams(s, list(block), 0, 0, trainable=-1 if trains is None else 0) for s, block in enumerate(blocks)]
    skip = tied_names(config) if pp == 1 else set()
    for name, shape in local.items():
        if name in skip:
            continue
        layer = _layer_index(name)
        if layer is not None:
            stage = stage_of_layer[layer]
        elif name.startswith("model.embed_tokens"):
            stage = 0
        else:  # final norm, untied lm_head
            stage = pp - 1
        numel = shape.numel()
        if trains is not None and trains(name):
            out[stage].trainable += numel
        if tuple(shape) == tuple(full[name]):
            out[stage].replicated += numel
        else:
            out[stage].sharded += numel
    return out


def layer_activation_bytes(config: Any, kind: str, tp: int, sp: bool, act: int) -> int:
    """Bytes one token of one decoder layer keeps for backward (one tensor-parallel rank).

    ``act`` is the activation element size (2 for bf16, 4 for fp32); softmax statistics,
    innovations, dt and SSM chunk states are fp32. Head-, channel- and group-sized
    tensors are split over tp; the d-sized residual-stream tensors only under SP.
    """
    d = config.hidden_size
    res = d / tp if sp else d  # residual-stream sized tensors
    elems = 4 * res  # residual stream: mixer_norm input + output, mlp_norm input + output
    fp32 = 0.0
    attention = kind in "BFSA"
    fading = kind in "BF" and config.fading_window > 0
    memory = kind == "B" and config.memory_size > 0
    ssm = kind == "M" or fading
    if attention:
        hq = config.num_attention_heads // tp
        hkv = config.num_key_value_heads // tp
        hd = config.head_dim
        # q, rotated q, k, rotated k, v, attention output (before o_proj); softmax log-sum-exp per head
        elems += 3 * hq * hd + 3 * hkv * hd
        fp32 += hq
        if fading:
            elems += 2 * hkv * hd + res  # fading keys + values from the SSM output s (d-sized)
        if memory:
            # eidetic memory: predicted keys K_hat, the innovation e_t (fp32), and the memory
            # snapshot each chunk reads (M slots of key + value): 2·M·kv·D per c tokens
            elems += hkv * hd + 2 * hkv * hd * config.memory_size / config.memory_chunk
            fp32 += 1
    if ssm:
        di = config.ssm_inner_size // tp
        n = config.ssm_state_size
        q = config.ssm_chunk_size
        if config.ssm_mixer == "mamba2":
            hs = config.ssm_num_heads // tp
            g = config.ssm_n_groups // tp
            # z, x, conv(x), silu(conv x), y, y·silu(z), gated-norm output; B and C before/after conv and silu
            elems += 7 * di + 3 * 2 * g * n
            # dt (raw, softplus), chunk states (H·P·N per chunk of q tokens), intra-chunk decay and C·Bᵀ (q per token)
            fp32 += 2 * hs + di * n / q + q * (hs + g)
        else:
            r = config.ssm_dt_rank
            # z, x, conv(x), silu(conv x), y, y·silu(z); x_proj output (dt rank + B + C, whole sequence)
            elems += 6 * di + (r + 2 * n)
            fp32 += 2 * di + di * n / q  # dt (raw, softplus) and scan states per chunk
    if config.intermediate_size > 0:
        i = config.intermediate_size // tp
        elems += 4 * i  # SwiGLU: gate, up, silu(gate), silu(gate)·up
    return int(round(elems * act + fp32 * FP32))


def microbatches_in_flight(stage: int, pp: int, microbatches: int) -> int:
    """Micro-batches whose activations stage `stage` holds at once under NxD's 1F1B pipeline schedule.

    NxD v2.28.0's ``Train1F1BSchedule`` (``pipeline/scheduler.py`` lines 179-184) runs
    ``min(pp - stage - 1, microbatches)`` warm-up forwards, then one forward before each
    backward, so ``pp - stage`` micro-batches are held before the first backward frees one:
    stage 0 holds the most, and a step of fewer micro-batches holds them all. One stage: 1.
    (The Neuron loop gives NxD ``parallel.microbatches × train.grad_accum`` per step.)
    """
    return min(microbatches, pp - stage) if pp > 1 else 1


def activation_element_bytes(precision: str) -> int:
    """Bytes of one residual-stream element: the model's dtype, end to end (NxD's layers are built for it)."""
    return 2 if precision == "bf16" else FP32


def parameter_bytes(precision: str, zero1: bool) -> tuple[int, int, int]:
    """(weight, gradient, optimizer) bytes per parameter as NxD 0.17 holds them on a NeuronCore.

    - fp32: fp32 weights and gradients, AdamW's two fp32 states;
    - bf16 without ZeRO-1: everything in bf16, AdamW's states included (they take the
      parameter's dtype; stochastic rounding keeps the updates unbiased);
    - bf16 with ZeRO-1: bf16 weights; NxD's fp32 gradient accumulation keeps an fp32
      ``main_grad`` of every parameter's full shape; the optimizer holds an fp32 master
      copy and two fp32 states (the optimizer part is divided by dp).
    """
    if precision != "bf16":
        return FP32, FP32, 2 * FP32
    if zero1:
        return 2, FP32, 3 * FP32
    return 2, 2, 2 * 2


def estimate_memory(recipe: Any, world: int, shapes: ModelShapes | None = None) -> MemoryEstimate:
    """Per-NeuronCore bytes of `recipe` on `world` ranks (degrees from ``recipe.parallel``); `shapes`: its
    model's `model_shapes` at ``parallel.tp``, when the caller has them already."""
    config = recipe.model_config()
    p, t = recipe.parallel, recipe.train
    tp, pp = p.tp, p.pp
    dp = world // (tp * pp)
    act = activation_element_bytes(t.precision)
    weight_bytes, grad_bytes, optim_bytes = parameter_bytes(t.precision, p.zero1)
    seq = seq_len_of(recipe)
    micro = max(t.batch_size // dp // p.microbatches, 1)
    d = config.hidden_size
    res = d / tp if p.sp else d
    pattern = config.layer_pattern
    estimate = MemoryEstimate(tp, pp, dp, t.precision, p.zero1, t.activation_checkpointing, p.sp, seq, micro,
                              budget=NEURONCORE_HBM_BYTES)
    trains = None
    if recipe.distill is not None:  # only the new paths get gradients and optimizer states
        from bmojo_neuron.priming.distill import is_new_parameter

        trains = lambda name: is_new_parameter(name, pattern)  # noqa: E731
    for sp_ in stage_parameters(config, tp, pp, trains, shapes):
        params, trained = sp_.total, sp_.trained
        optim_params = -(-trained // dp) if p.zero1 else trained
        per_layer = [layer_activation_bytes(config, pattern[i], tp, p.sp, act) for i in sp_.layers]
        # Stage 0's embedding output is layer 0's input, counted with the layer (its norm keeps it); the
        # embedding's backward needs only the token ids.
        extra = 0.0
        if sp_.stage == pp - 1:
            # final norm input + output, logits (vocab shard) and their fp32 copy for the cross-entropy
            extra += 2 * res * act + config.vocab_size / tp * (act + FP32)
        else:
            # The stage's output (the last layer's, sent on): no op here saves it for the backward, the norm that
            # reads it being on the next stage, but NxD v2.28.0 keeps each sent tensor that needs a gradient until
            # that micro-batch's backward (pipeline/model.py lines 1325 and 1366); `deallocate_pipeline_outputs`,
            # which would shrink it after the send, is off by default (line 97) and `nxd_training.pipeline_config`
            # leaves it so. The (1,) float32 innovation sum sent beside it is left out.
            extra += res * act
        tokens = micro * seq
        if recipe.distill is not None:
            per_layer, extra = _distill_activations(recipe, config, sp_.layers, per_layer, extra, res, act, tp)
        full = tokens * (sum(per_layer) + extra)
        layer_inputs = tokens * len(per_layer) * res * act
        # One layer is recomputed at a time, on the input checkpointing kept, not a copy of it: NxD v2.28.0 wraps
        # each decoder layer in torch-xla's reentrant checkpoint (utils/activation_checkpoint.py lines 37-46),
        # which keeps the layer's tensor inputs (torch-xla v2.9.0 torch_xla/utils/checkpoint.py line 136) and
        # reruns the layer on `detach_variable` of them (lines 155 and 190-195): views of the same storage. So
        # the recomputed layer's residual-stream input, in its count, is already among `layer_inputs`.
        recomputed = max(per_layer) - res * act if per_layer else 0
        ckpt = layer_inputs + tokens * (recomputed + extra)
        per_micro = ckpt if t.activation_checkpointing else full
        in_flight = microbatches_in_flight(sp_.stage, pp, p.microbatches * t.grad_accum)
        estimate.stages.append(StageMemory(
            stage=sp_.stage, layers=sp_.layers, parameters=params, trainable=trained,
            weights=params * weight_bytes, gradients=trained * grad_bytes, optimizer=optim_params * optim_bytes,
            activations_per_microbatch=int(per_micro), activations_full=int(full),
            activations_checkpointed=int(ckpt), layer_inputs=int(layer_inputs), microbatches_in_flight=in_flight,
            activations=int(per_micro) * in_flight,
        ))
    return estimate


def _distill_activations(recipe: Any, config: Any, layers: list[int], per_layer: list[int], extra: float,
                         res: float, act: int, tp: int) -> tuple[list[int], float]:
    """Per-token activation bytes of a distillation step (`bmojo_neuron.priming.distill`): the teacher pass keeps
    only its layers' outputs (no gradients), each distilled layer runs once as the student on them, and with
    ``kl_weight > 0`` the student also runs end to end, with a second copy of the logits (the teacher's)."""
    from bmojo_neuron.priming.distill import distilled_layers

    distilled = set(distilled_layers(config))
    teacher_states = (len(layers) + 1) * res * act
    students = [cost for i, cost in zip(layers, per_layer) if i in distilled]
    if recipe.distill.kl_weight > 0:
        logits = config.vocab_size / tp * (act + FP32)
        return per_layer + students, extra + teacher_states + logits
    return students, teacher_states
