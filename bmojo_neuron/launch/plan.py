"""The launch plan of a recipe on Trn1: validation, rank layout, memory, environment, commands.

`build_plan(recipe, nodes, instance)` checks everything before it builds anything:
the Trainium tiling rules and parallel degrees (`validate_for_trainium`), then the
per-NeuronCore memory estimate (a ValueError above 16 GiB); only then the torchrun
and srun lines. Nothing here imports Neuron or runs a process.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from bmojo_neuron.launch.memory import MemoryEstimate, estimate_memory, gib, model_shapes, seq_len_of

if TYPE_CHECKING:  # imported where used: `python -m bmojo_neuron.launch.host_memory` runs that module
    from bmojo_neuron.launch.host_memory import HostMemoryEstimate

# NeuronCores (torchrun processes) per instance: 16 Trainium chips × 2 cores, or 1 chip × 2 cores.
INSTANCES = {"trn1.32xlarge": 32, "trn1.2xlarge": 2}
# Instances with EFA, which multi-node runs need: "EFA is currently not available on the smaller instances
# sizes and they cannot be used for running multi-node jobs" (aws-neuron-sdk 3c46990d,
# frameworks/torch/torch-neuronx/setup-trn1-multi-node-execution.rst, line 6).
MULTI_NODE_INSTANCES = ("trn1.32xlarge",)
DEFAULT_INSTANCE = "trn1.32xlarge"
DEFAULT_CACHE_DIR = "/var/tmp/neuron-compile-cache"  # the Neuron compiler's default cache
DEFAULT_MASTER_PORT = 29500
MAX_PORT = 65535
PARTITION = 128  # SBUF / PSUM partitions: the tile size the kernels work in


@dataclass
class LaunchPlan:
    recipe: str
    overrides: list[str]
    instance: str
    nodes: int
    cores_per_node: int
    world: int
    tp: int
    pp: int
    dp: int
    rank_layout: dict[str, Any]
    memory: MemoryEstimate
    host: HostMemoryEstimate
    env: dict[str, str]
    torchrun: str
    srun: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe, "overrides": self.overrides, "instance": self.instance, "nodes": self.nodes,
            "cores_per_node": self.cores_per_node, "world": self.world, "tp": self.tp, "pp": self.pp,
            "dp": self.dp, "rank_layout": self.rank_layout, "memory": self.memory.to_dict(),
            "host_memory": self.host.to_dict(), "env": self.env,
            "torchrun": self.torchrun, "srun": self.srun, "notes": self.notes,
        }

    def env_lines(self) -> list[str]:
        return [f"export {k}={shlex.quote(v)}" for k, v in self.env.items()]

    def format(self) -> str:
        m = self.memory
        lines = [
            f"recipe      {self.recipe}" + (f" {' '.join(self.overrides)}" if self.overrides else ""),
            f"cluster     {self.nodes} × {self.instance} = {self.world} NeuronCores",
            f"layout      tp {self.tp} × pp {self.pp} × dp {self.dp} ({self.rank_layout['order']})",
        ]
        for stage in self.rank_layout["stages"]:
            first, last = stage["layers"][0], stage["layers"][-1]
            lines.append(f"  stage {stage['stage']}: decoder layers {first}-{last}, ranks {_ranges(stage['ranks'])}")
        lines.append(f"  tensor groups (first): {self.rank_layout['tp_groups'][0]}; "
                     f"data groups (first): {self.rank_layout['dp_groups'][0]}")
        lines += ["", f"HBM per NeuronCore (GiB; budget 16 per NeuronCore-v2), micro-batch {m.microbatch_size} × "
                      f"{m.seq_len} tokens, {m.precision}, zero1 {m.zero1}, checkpointing "
                      f"{m.activation_checkpointing}, sp {m.sequence_parallel}:"]
        lines.append(f"  {'stage':<6}{'params':>14}{'weights':>9}{'grads':>9}{'optim':>9}{'act':>9}"
                     f"{'(full)':>9}{'(ckpt)':>9}{'total':>9}")
        for s in m.stages:
            lines.append(f"  {s.stage:<6}{s.parameters:>14,}{gib(s.weights):>9}{gib(s.gradients):>9}"
                         f"{gib(s.optimizer):>9}{gib(s.activations):>9}{gib(s.activations_full):>9}"
                         f"{gib(s.activations_checkpointed):>9}{gib(s.total):>9}")
        lines += ["", *self._host_lines()]
        lines += ["", "environment:"] + [f"  {line}" for line in self.env_lines()]
        lines += ["", "per node (NODE_RANK = 0 .. nodes-1):", f"  {self.torchrun}", "", "Slurm:", f"  {self.srun}"]
        if self.notes:
            lines += ["", "notes:"] + [f"  - {n}" for n in self.notes]
        return "\n".join(lines)


    def _host_lines(self) -> list[str]:
        h = self.host
        of = f" of {gib(h.host_memory)}" if h.host_memory else ""
        return [f"host memory at start-up (GiB, per node of {h.local_world} ranks; docs/trn1.md): each rank builds "
                f"the one-device model in fp32 ({gib(h.full_model)}) once, {h.ranks_per_wave} at a time "
                f"({h.waves} wave{'s' if h.waves > 1 else ''})",
                f"  per rank {gib(h.per_rank_building)} while building, {gib(h.per_rank_after)} after "
                f"(shard {gib(h.shard)}); node peak {gib(h.node_peak)}{of}"]


def _ranges(ranks: list[int]) -> str:
    if ranks == list(range(ranks[0], ranks[0] + len(ranks))):
        return f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else str(ranks[0])
    return ",".join(map(str, ranks))


def _fail(key: str, message: str) -> None:
    raise ValueError(f"recipe key {key}: {message}")


def validate_for_trainium(recipe: Any, world: int) -> None:
    """ValueError naming the key for any shape that breaks Trainium tiling or the parallel degrees."""
    config = recipe.model_fields()  # no transformers import: a shape the rules refuse answers at once
    p = recipe.parallel
    tp, pp = p.tp, p.pp
    seq_key = "data.seq_len" if recipe.data.kind == "mqar" else "data.block_size"
    seq = seq_len_of(recipe)
    if seq % PARTITION:
        _fail(seq_key, f"is {seq}; on Trainium the sequence length must be a multiple of {PARTITION} "
                       "(the partition tile of the attention and scan kernels)")
    if "B" in config.layer_pattern and config.memory_size > 0 and seq % config.memory_chunk:
        _fail(seq_key, f"is {seq}; on Trainium it must be a multiple of model.memory_chunk "
                       f"({config.memory_chunk}): only whole memory chunks are compiled")
    if config.head_dim > PARTITION:
        _fail("model.head_dim", f"is {config.head_dim}; at most {PARTITION} (one partition tile)")
    ssm = _uses_ssm_scan(config)
    if ssm:
        _check_ssm_tiles(config, tp)
    if world % (tp * pp):
        raise ValueError(f"the world size {world} (cores per node × nodes) is not divisible by "
                         f"parallel.tp × parallel.pp = {tp} × {pp}")
    dp = world // (tp * pp)
    attention = any(k in "BFSA" for k in config.layer_pattern)
    checks = [("model.vocab_size", config.vocab_size)]
    if attention:
        checks += [("model.num_attention_heads", config.num_attention_heads),
                   ("model.num_key_value_heads", config.num_key_value_heads)]
    if ssm and config.ssm_mixer == "mamba2":
        checks += [("model.ssm_num_heads (ssm_expand·hidden_size / ssm_head_dim)", config.ssm_num_heads),
                   ("model.ssm_n_groups", config.ssm_n_groups)]
    elif ssm:
        checks += [("model.ssm_inner_size (ssm_expand·hidden_size)", config.ssm_inner_size)]
    for key, value in checks:
        if value % tp:
            _fail(key, f"is {value}; must be divisible by parallel.tp ({tp})")
    if p.sp and seq % tp:
        _fail(seq_key, f"is {seq}; parallel.sp needs it divisible by parallel.tp ({tp})")
    if pp > config.num_hidden_layers:
        _fail("parallel.pp", f"is {pp}; at most model.num_hidden_layers ({config.num_hidden_layers})")
    if pp == 1 and p.microbatches != 1:
        _fail("parallel.microbatches", "only applies to pipeline parallelism (parallel.pp > 1); "
                                       "use train.grad_accum")
    if recipe.train.batch_size % (dp * p.microbatches):
        _fail("train.batch_size", f"is {recipe.train.batch_size}, the global micro-batch; it must be divisible "
                                  f"by the data-parallel degree {dp} (world {world} / (tp {tp} × pp {pp}))"
              + (f" × parallel.microbatches ({p.microbatches})" if p.microbatches > 1 else ""))


def _uses_ssm_scan(config: Any) -> bool:
    """Whether some layer runs an SSM scan: M layers, F with a fading window, B with fading or memory."""
    kinds = set(config.layer_pattern)
    return "M" in kinds or (config.fading_window > 0 and bool(kinds & set("BF"))) or (
        "B" in kinds and config.memory_size > 0)


def _check_ssm_tiles(config: Any, tp: int) -> None:
    """The scan kernels put the state (both mixers) and, for Mamba-2, the head dim and this rank's
    heads on the 128 partitions: larger sizes do not tile."""
    if config.ssm_state_size > PARTITION:
        _fail("model.ssm_state_size", f"is {config.ssm_state_size}; at most {PARTITION} on Trainium "
                                      "(the scan kernels keep the state on the partitions)")
    if config.ssm_mixer != "mamba2":
        return
    if config.ssm_head_dim > PARTITION:
        _fail("model.ssm_head_dim", f"is {config.ssm_head_dim}; at most {PARTITION} on Trainium "
                                    "(one partition tile per SSD head)")
    if config.ssm_num_heads > PARTITION * tp:
        _fail("model.ssm_num_heads (ssm_expand·hidden_size / ssm_head_dim)",
              f"is {config.ssm_num_heads}, {-(-config.ssm_num_heads // tp)} per tensor-parallel rank; at most "
              f"{PARTITION} per rank on Trainium (the SSD kernels hold a rank's heads on the partitions): "
              "raise model.ssm_head_dim or parallel.tp")


def rank_layout(world: int, tp: int, pp: int, num_layers: int, local_world: int) -> dict[str, Any]:
    """Each pipeline stage's layers and ranks, and the groups, as NxD builds them on trn1 (`trainium_groups`)."""
    from bmojo_neuron.parallel.layout import TRN1_STRIDED_TP, trainium_groups
    from bmojo_neuron.parallel.pipeline import split_layers

    groups = trainium_groups(world, tp, pp, local_world)
    blocks = split_layers(num_layers, pp)
    stages = [{"stage": s, "layers": list(block), "ranks": sorted(group[s] for group in groups["pp"])}
              for s, block in enumerate(blocks)]
    order = ("tensor fastest: rank = (pp_rank·dp + dp_rank)·tp + tp_rank" if tp != TRN1_STRIDED_TP else
             f"tp 4 on trn1: each tensor group every {local_world // tp}th core of one node (NxD)")
    return {"order": order, "stages": stages,
            "tp_groups": groups["tp"], "pp_groups": groups["pp"], "dp_groups": groups["dp"]}


STOCHASTIC_ROUNDING = "NEURON_RT_STOCHASTIC_ROUNDING_EN"
# NEURON_RT_NUM_CORES is what one process reserves (neuron-runtime/nrt-configurable-parameters.rst line 31), and
# torchrun starts one process per NeuronCore, so 1. Under torchrun torch-xla 2.9 also sets NEURON_RT_VISIBLE_CORES
# to the LOCAL_RANK (torch_xla/_internal/neuron.py lines 76-77), which takes precedence (the runtime page, line
# 152); 1 keeps any launch without it from reserving every core. NxD's scripts' 32 is their processes per node.
CORES_PER_PROCESS = "1"
# Variables that make torch-xla / NxD recast the model or change ZeRO-1 (NxD's optimizer becomes float64 with
# XLA_DOWNCAST_BF16=1 and master weights): the trainer casts the model itself (model.to(bfloat16), SDK 2.28).
CONFLICTING_ENV = ("XLA_USE_BF16", "XLA_DOWNCAST_BF16")


def stochastic_rounding(recipe: Any) -> str:
    """``NEURON_RT_STOCHASTIC_ROUNDING_EN`` for `recipe`: "1" when bf16 weights are updated in place (no
    ZeRO-1, so no fp32 master copy: round-to-nearest would drop small updates), "0" when the optimizer keeps
    fp32 master weights (bf16 + ZeRO-1, as NxD's examples set it) or the model is fp32."""
    return "1" if recipe.train.precision == "bf16" and not recipe.parallel.zero1 else "0"


def runtime_env(recipe: Any) -> dict[str, str]:
    """What the trainer sets itself (unless already set) before the Neuron runtime starts."""
    return {STOCHASTIC_ROUNDING: stochastic_rounding(recipe)}


def conflicting_env(environ: Any) -> list[str]:
    """The variables of `CONFLICTING_ENV` set to anything but "0" in `environ`."""
    return [k for k in CONFLICTING_ENV if environ.get(k, "0") not in ("", "0")]


def compiler_flags(cache_dir: str) -> list[str]:
    """``NEURON_CC_FLAGS`` as a word list; tests/test_plan.py pins each flag to the documentation.

    No ``--distribution-strategy llm-training``: NxD Training's SDK 2.22 release notes say that flag "should
    not be enabled when using the Neuron Kernel Interface", and the hot ops run on NKI by default
    (aws-neuron-sdk 3c46990d, release-notes/components/nxd-training.rst line 82).
    ``--enable-saturate-infinity``: the compiler's own matrix-multiply transposes turn an infinity into NaN on
    trn1 (0 * inf, as NxD v2.28.0's test/integration/modules/moe/test_moe_spmd.py line 172 puts it); the flag
    clamps +/-inf to the largest finite values first (compiler/neuronx-cc/api-reference-guide/index.rst line
    153: "Only needed on trn1", with "a potential performance impact"). Our step graphs carry -inf on purpose
    (the eidetic memory's retention scores of empty slots, layers/eidetic_memory.py `retention_scores`), so
    every plan, all for trn1, sets it, as NxD v2.28.0's GPT-NeoX, Mixtral and DBRX training scripts do
    (docs/trn1.md, "What the plan contains").
    A cache folder with white space in its name is refused: the flags are one space-separated string, so the
    folder would reach the compiler as several words.
    """
    if any(c.isspace() for c in cache_dir):
        raise ValueError(f"the compile cache {cache_dir!r} contains white space, which NEURON_CC_FLAGS "
                         "(one space-separated string) cannot carry in --cache_dir; choose a folder without it")
    return ["--model-type", "transformer",  # transformer-specific optimisations (neuronx-cc reference)
            f"--cache_dir={cache_dir}",  # torch-neuronx's persistent cache; wins over NEURON_COMPILE_CACHE_URL
            "-O1",  # optlevel 1: shortest compiles; the default is 2
            "--retry_failed_compilation",  # recompile an entry the cache holds as failed instead of failing
            "--enable-saturate-infinity"]  # no NaN from -inf in compiler-made transposes on trn1 (above)


def neuron_env(recipe: Any, nodes: int, cache_dir: str) -> dict[str, str]:
    env = {"NEURON_CC_FLAGS": " ".join(compiler_flags(cache_dir)), **runtime_env(recipe)}
    env["NEURON_RT_NUM_CORES"] = CORES_PER_PROCESS
    env["MALLOC_ARENA_MAX"] = "64"  # glibc: bounded malloc arenas per process (host memory; NxD's scripts)
    if nodes > 1:
        env.update({"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1", "FI_EFA_FORK_SAFE": "1"})
    return env


def build_plan(recipe: Any, recipe_arg: str, overrides: Sequence[str] = (), nodes: int = 1,
               instance: str = DEFAULT_INSTANCE, cache_dir: str = DEFAULT_CACHE_DIR,
               master_port: int = DEFAULT_MASTER_PORT) -> LaunchPlan:
    """Validate, estimate (ValueError above 16 GiB per NeuronCore), then build the launch plan."""
    if instance not in INSTANCES:
        raise ValueError(f"--instance {instance!r}: choose one of {', '.join(INSTANCES)}")
    if nodes < 1:
        raise ValueError(f"--nodes is {nodes}; must be >= 1")
    if nodes > 1 and instance not in MULTI_NODE_INSTANCES:
        raise ValueError(f"--nodes {nodes} with --instance {instance}: multi-node runs need EFA between the nodes, "
                         f"which {instance} lacks (Neuron's Trn1 multi-node setup guide); use "
                         f"{' or '.join(MULTI_NODE_INSTANCES)}")
    if not 1 <= master_port <= MAX_PORT:  # torchrun would only fail at rendezvous, on every node
        raise ValueError(f"--master-port is {master_port}; must be a TCP port, 1..{MAX_PORT}")
    cores = INSTANCES[instance]
    world = nodes * cores
    validate_for_trainium(recipe, world)
    from bmojo_neuron.parallel.layout import check_trainium_layout

    check_trainium_layout(world, recipe.parallel.tp, recipe.parallel.pp, cores)
    p = recipe.parallel
    shapes = model_shapes(recipe.model_config(), p.tp)  # the model's meta builds, once for both estimates
    memory = estimate_memory(recipe, world, shapes)
    memory.check()
    from bmojo_neuron.launch.host_memory import estimate_host_memory

    host = estimate_host_memory(recipe, cores, instance, shapes=shapes)
    dp = world // (p.tp * p.pp)
    config = recipe.model_fields()
    master = "localhost" if nodes == 1 else "$MASTER_ADDR"
    node_rank = "0" if nodes == 1 else "$NODE_RANK"
    train_args = " ".join(shlex.quote(a) for a in [recipe_arg, *overrides])
    torchrun = (f"torchrun --nproc-per-node {cores} --nnodes {nodes} --node-rank {node_rank} "
                f"--master-addr {master} --master-port {master_port} -m bmojo_neuron.cli train {train_args}")
    inner = torchrun.replace("$MASTER_ADDR", '"$MASTER_ADDR"').replace("$NODE_RANK", "$SLURM_NODEID")
    srun = (f"srun --nodes {nodes} --ntasks-per-node 1 --export ALL bash -c "
            + shlex.quote('MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1) '
                          + inner.replace("--master-addr localhost", '--master-addr "$MASTER_ADDR"')))
    notes = ["these lines train on Trainium when run.device is neuron (as in recipes/trn1/; docs/training.md); "
             "build a text recipe's data cache once first with `bmojo-neuron data prepare`"]
    if recipe.distill is not None:
        s = memory.peak
        notes.append(f"distill: {s.trainable:,} of {s.parameters:,} parameters per NeuronCore train (the new paths "
                     "of the primed model), so only they have gradients and optimizer states; init.weights names "
                     "the primed folder (`bmojo-neuron prime`, docs/priming.md)")
    if p.pp > 1:
        notes.append("parallel.pp > 1 trains through NxD's pipeline (NxDPPModel); eval keeps the training shape, "
                     "so length generalisation beyond x1 is left to `bmojo-neuron eval` (docs/training.md)")
    if host.host_memory and host.node_peak > host.host_memory:
        notes.append(f"start-up needs about {gib(host.node_peak)} GiB of host memory per node, more than the "
                     f"{gib(host.host_memory)} GiB of a {instance}: expect the build to swap or fail")
    if nodes > 1:
        notes.append("multi-node: the run directory must be on a shared filesystem, the compile cache not: one "
                     "cache folder per node, as Neuron's training troubleshooting guide asks (share compiled graphs "
                     "with `bmojo-neuron cache push/pull`, docs/compile-cache.md); EFA needs the instances in one "
                     "placement group with EFA interfaces")
    return LaunchPlan(
        recipe=recipe_arg, overrides=list(overrides), instance=instance, nodes=nodes, cores_per_node=cores,
        world=world, tp=p.tp, pp=p.pp, dp=dp, rank_layout=rank_layout(world, p.tp, p.pp, config.num_hidden_layers, cores),
        memory=memory, host=host, env=neuron_env(recipe, nodes, cache_dir), torchrun=torchrun, srun=srun,
        notes=notes,
    )
