"""`bmojo-neuron plan`: Trainium validation, the per-NeuronCore HBM estimate and the launch lines."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bmojo_neuron.cli import main
from bmojo_neuron.launch import build_plan, estimate_memory, validate_for_trainium
from bmojo_neuron.launch.memory import NEURONCORE_HBM_BYTES, parameter_bytes, stage_parameters
from bmojo_neuron.recipes import count_parameters, load_recipe

GIB = 1024**3
ROOT = Path(__file__).resolve().parents[1]
# The ladder at its intended degrees on one trn1.32xlarge (the recipes' comments): train.batch_size is the
# global micro-batch (the recipes' per-worker batch × dp), Mamba-2 groups must divide by tp, and the 130M
# recipe's 8 × 2048 tokens per core need activation checkpointing to fit 16 GiB (about 19 GiB without).
LADDER = {
    "trn1/bmojo-130m": ["train.batch_size=256", "train.activation_checkpointing=true"],
    "trn1/bmojo-370m": ["train.batch_size=256"],
    "trn1/bmojo-790m": ["train.batch_size=64", "model.ssm_n_groups=2"],
    "trn1/bmojo-1.4b": ["train.batch_size=16", "model.ssm_n_groups=4"],
}
# Hybrids primed from ~1B transformers (docs/priming.md), at the recipes' own degrees.
PRIMING = ["trn1/prime-llama-3.2-1b-distill", "trn1/prime-llama-3.2-1b-finetune", "trn1/prime-qwen3-0.6b-distill"]
SMALL = ["model.num_hidden_layers=2", "model.layer_pattern=BB"]


def recipe(name="trn1/bmojo-130m", *overrides):
    return load_recipe(name, [*LADDER.get(name, []), *overrides])


def test_a_refused_recipe_is_answered_before_torch_or_transformers_load():
    """`plan` and `train --dry-run` check the recipe, its model fields and the Trainium rules without importing
    transformers or torch (seconds of start-up), nor numpy (0.2-0.3 s): only a plan that passes builds the model
    to count it."""
    commands = [["plan", "mqar-suite"], ["plan", "trn1/bmojo-130m", "model.head_dim=3"],
                ["train", "--dry-run", "cpu-tiny", "model.memory_picks=999"]]
    code = ("import sys; from bmojo_neuron.cli import main; "
            f"codes = [main(args) for args in {commands!r}]; "
            "print(codes, sorted(m for m in ('numpy', 'torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[2, 2, 2] []", done.stderr
    assert done.stderr.splitlines() == [
        "error: recipe key data.seq_len: is 64; on Trainium the sequence length must be a multiple of 128 "
        "(the partition tile of the attention and scan kernels)",
        "error: recipe key model.head_dim: is 3; RoPE needs an even head_dim",
        "error: recipe key model.memory_picks: (999) cannot exceed memory_chunk (4)"]


def test_parameter_part_is_count_parameters_times_bytes():
    r = recipe("trn1/bmojo-130m")
    n = count_parameters(r)
    bf16 = estimate_memory(r, 32).stages[0]  # bf16 without ZeRO-1: AdamW's states take the bf16 dtype
    assert bf16.parameters == n
    assert bf16.weights == n * 2 and bf16.gradients == n * 2 and bf16.optimizer == n * (2 + 2)
    fp32 = estimate_memory(r.with_overrides(["train.precision=fp32"]), 32).stages[0]
    assert fp32.weights == n * 4 and fp32.gradients == n * 4 and fp32.optimizer == n * 8
    # bf16 + ZeRO-1: fp32 main_grad of every parameter (NxD's fp32 accumulation); master + 2 states over dp
    zero = estimate_memory(r.with_overrides(["parallel.zero1=true"]), 32).stages[0]
    assert zero.weights == n * 2 and zero.gradients == n * 4 and zero.optimizer == -(-n // 32) * (4 + 4 + 4)


def test_zero1_divides_optimizer_state_by_dp():
    r = recipe("trn1/bmojo-130m")
    n = count_parameters(r)
    fp32 = r.with_overrides(["train.precision=fp32"])
    plain = estimate_memory(fp32, 32).stages[0]
    zero = estimate_memory(fp32.with_overrides(["parallel.zero1=true"]), 32).stages[0]
    assert zero.optimizer == -(-n // 32) * 8
    assert zero.weights == plain.weights and zero.gradients == plain.gradients


def test_checkpointing_lowers_activations():
    r = recipe("trn1/bmojo-130m")
    on = estimate_memory(r, 32).stages[0]
    off = estimate_memory(r.with_overrides(["train.activation_checkpointing=false"]), 32).stages[0]
    assert on.activations < off.activations / 2
    assert on.activations == off.activations_checkpointed and off.activations == on.activations_full


def test_tp_halves_sharded_weights():
    r = recipe("trn1/bmojo-790m")
    n = count_parameters(r)
    (one,) = stage_parameters(r.model_config(), 1, 1)
    (two,) = stage_parameters(r.model_config(), 2, 1)
    assert one.sharded == 0 and one.replicated == n
    assert 2 * two.sharded + two.replicated == n
    assert two.replicated < n // 100  # only norms stay whole
    stage = estimate_memory(r, 32).stages[0]  # the recipe's tp=2
    assert stage.parameters == two.total and stage.weights == two.total * 2


def test_pipeline_stages_split_layers_and_sum_to_the_model():
    r = recipe("trn1/bmojo-130m", "parallel.pp=4", "model.tie_word_embeddings=false",
               "train.batch_size=32")
    stages = stage_parameters(r.model_config(), 1, 4)
    assert [s.layers for s in stages] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert sum(s.total for s in stages) == count_parameters(r)
    plan = build_plan(r, "trn1/bmojo-130m", nodes=1)
    assert plan.dp == 8 and plan.rank_layout["stages"][1]["ranks"] == list(range(8, 16))  # NxD: pipeline slowest


def test_the_plan_shows_the_groups_nxd_builds_on_trn1_and_refuses_what_it_cannot_build():
    from bmojo_neuron.parallel.layout import trainium_groups

    # The examples of NxD v2.28.0 parallel_state.py: TP=8 PP=4 on 32 cores (lines 444-472) and TP=4 PP=1 on two
    # trn1.32xlarge (lines 597-604, the strided tp=4 case).
    g = trainium_groups(32, tp=8, pp=4, local_world=32)
    assert g["pp"][:2] == [[0, 8, 16, 24], [1, 9, 17, 25]] and g["pp"][-1] == [7, 15, 23, 31]
    assert g["tp"] == [list(range(s, s + 8)) for s in (0, 8, 16, 24)] and g["dp"][:2] == [[0], [1]]
    g = trainium_groups(64, tp=4, pp=1, local_world=32)
    assert g["tp"][:2] == [[0, 8, 16, 24], [1, 9, 17, 25]] and g["tp"][8] == [32, 40, 48, 56]
    assert g["dp"] == [[*range(s, s + 8), *range(s + 32, s + 40)] for s in (0, 8, 16, 24)]
    assert all(len(group) == 1 for group in g["pp"])  # no pipeline parallelism
    for kind in ("tp", "pp", "dp"):
        assert sorted(sum(g[kind], [])) == list(range(64))  # every rank in exactly one group of each kind
    plan = build_plan(recipe("trn1/bmojo-1.4b"), "trn1/bmojo-1.4b", nodes=1)
    assert plan.tp == 4 and plan.rank_layout["tp_groups"][0] == [0, 8, 16, 24]
    assert "every 8th core of one node" in plan.format()
    # At tp 4 NxD reshapes the ranks to [pp, dp / 8, 1, 4, 8] on a 32-core node: pp 2 leaves dp 4, which fails.
    with pytest.raises(ValueError, match="multiple of 8"):
        build_plan(recipe("trn1/bmojo-1.4b", "parallel.pp=2"), "trn1/bmojo-1.4b", nodes=1)


def test_tied_embeddings_under_pp_count_the_last_stage_copy():
    r = recipe("trn1/bmojo-130m", "parallel.pp=4", "train.batch_size=32")
    config = r.model_config()
    stages = stage_parameters(config, 1, 4)
    copy = config.vocab_size * config.hidden_size  # the last stage's lm_head copy of the embedding
    assert sum(s.total for s in stages) == count_parameters(r) + copy
    untied = stage_parameters(r.with_overrides(["model.tie_word_embeddings=false"]).model_config(), 1, 4)
    assert [s.total for s in stages] == [s.total for s in untied]  # the same tensors, the copy included
    assert stage_parameters(config, 1, 1)[0].total == count_parameters(r)  # one stage: no copy


def test_over_budget_raises_before_anything_else():
    r = recipe("trn1/bmojo-1.4b", "parallel.tp=1", "parallel.sp=false", "model.ssm_n_groups=1",
               "parallel.zero1=false", "train.activation_checkpointing=false", "train.batch_size=32")
    assert estimate_memory(r, 32).total > NEURONCORE_HBM_BYTES
    with pytest.raises(ValueError, match=r"GiB of HBM per NeuronCore.*16 GiB of a NeuronCore-v2"):
        build_plan(r, "trn1/bmojo-1.4b")


def test_cli_over_budget_prints_nothing_but_the_error(capsys):
    code = main(["plan", "trn1/bmojo-1.4b", "parallel.tp=1", "parallel.sp=false", "model.ssm_n_groups=1",
                 "parallel.zero1=false", "train.activation_checkpointing=false", "train.batch_size=32"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "16 GiB" in err


def test_plan_says_on_a_terminal_what_it_loads_and_keeps_json_on_stdout(capsys, monkeypatch):
    """Building the model's shapes needs torch (seconds, more on a busy machine): on a terminal `plan` says so on
    stderr before the wait; stdout holds the plan alone, so ``--json`` parses. Off a terminal stderr stays empty."""
    argv = ["plan", "trn1/bmojo-130m", "data.path=/data/pile", "--json"]
    for terminal, said in [(True, "planning trn1/bmojo-130m: loading torch to build the model's shapes (no weights) "
                                  "for the memory estimate\n"), (False, "")]:
        monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
        assert main(argv) == 0
        out, err = capsys.readouterr()
        assert err == said and json.loads(out)["recipe"] == "trn1/bmojo-130m"


@pytest.mark.parametrize("port", ["0", "99999", "-1"])
def test_master_port_outside_the_tcp_range_is_refused(port, capsys):
    """A port torchrun cannot bind would otherwise go into every launch line and fail only at rendezvous."""
    assert main(["plan", "trn1/bmojo-130m", "--master-port", port]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"error: --master-port is {port}; must be a TCP port, 1..65535\n"
    assert main(["plan", "trn1/bmojo-130m", "--master-port", "65535"]) == 0
    assert "--master-port 65535 -m bmojo_neuron.cli train" in capsys.readouterr().out


def test_several_trn1_2xlarge_nodes_are_refused_for_lack_of_efa(capsys):
    """Neuron's Trn1 multi-node guide: EFA, which multi-node runs need, exists only on the 32xlarge size."""
    argv = ["plan", "trn1/bmojo-130m", "train.batch_size=4", "--instance", "trn1.2xlarge"]
    assert main([*argv, "--nodes", "2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == ("error: --nodes 2 with --instance trn1.2xlarge: multi-node runs need EFA between the "
                                 "nodes, which trn1.2xlarge lacks (Neuron's Trn1 multi-node setup guide); use "
                                 "trn1.32xlarge\n")
    assert main(argv) == 0  # one trn1.2xlarge plans


@pytest.mark.parametrize("overrides, world, key", [
    (["data.block_size=2000"], 32, "data.block_size"),  # not a multiple of 128
    (["data.block_size=2176"], 32, "data.block_size"),  # 17 × 128, not a multiple of memory_chunk 256
    (["parallel.tp=3"], 32, "world size 32"),
    (["parallel.tp=8", "train.batch_size=64"], 32, "model.num_attention_heads"),  # 12 heads
    (["model.num_key_value_heads=2", "parallel.tp=4", "model.ssm_n_groups=4", "train.batch_size=64"], 32,
     "model.num_key_value_heads"),
    (["model.ssm_head_dim=128", "parallel.tp=8", "model.num_attention_heads=8", "model.ssm_n_groups=4",
      "train.batch_size=32"], 32, "model.ssm_num_heads"),  # 1536 / 128 = 12 SSM heads
    (["parallel.tp=2", "train.batch_size=128"], 32, "model.ssm_n_groups"),
    (["model.vocab_size=50281", "parallel.tp=2", "model.ssm_n_groups=2", "train.batch_size=128"], 32,
     "model.vocab_size"),
    (["train.batch_size=8"], 32, "train.batch_size"),
])
def test_validation_errors_name_the_key(overrides, world, key):
    r = load_recipe("trn1/bmojo-130m", overrides)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        validate_for_trainium(r, world)


def test_head_dim_over_128_is_refused():
    with pytest.raises(ValueError, match=r"model\.head_dim.*128"):
        r = load_recipe("trn1/bmojo-130m", ["train.batch_size=256", "model.head_dim=256"])
        validate_for_trainium(r, 32)


def test_torchrun_and_env_lines():
    r = recipe("trn1/bmojo-790m")
    plan = build_plan(r, "trn1/bmojo-790m", LADDER["trn1/bmojo-790m"], nodes=4, cache_dir="s3://b/cache")
    assert plan.world == 128 and plan.dp == 64
    assert plan.torchrun.startswith("torchrun --nproc-per-node 32 --nnodes 4 --node-rank $NODE_RANK "
                                    "--master-addr $MASTER_ADDR ")
    assert "-m bmojo_neuron.cli train trn1/bmojo-790m train.batch_size=64 model.ssm_n_groups=2" in plan.torchrun
    assert plan.srun.startswith("srun --nodes 4 --ntasks-per-node 1") and "$SLURM_NODEID" in plan.srun
    flags = plan.env["NEURON_CC_FLAGS"]
    for flag in ("--model-type transformer", "--cache_dir=s3://b/cache", "-O1", "--retry_failed_compilation"):
        assert flag in flags
    assert plan.env["NEURON_RT_STOCHASTIC_ROUNDING_EN"] == "0"  # bf16 + ZeRO-1: NxD's fp32 master weights
    assert plan.env["NEURON_RT_NUM_CORES"] == "1" and plan.env["MALLOC_ARENA_MAX"] == "64"
    assert {plan.env[k] for k in ("FI_EFA_USE_DEVICE_RDMA", "FI_EFA_FORK_SAFE")} == {"1"}
    assert plan.env["FI_PROVIDER"] == "efa"
    # several nodes: one compile cache per node (Neuron's training troubleshooting guide), said where it is planned
    assert any("the compile cache not: one cache folder per node" in note for note in plan.notes)
    single = build_plan(r.with_overrides(["train.precision=fp32", "train.batch_size=1"]), "x",
                        instance="trn1.2xlarge")
    assert single.world == 2 and "--nproc-per-node 2 --nnodes 1 --node-rank 0 --master-addr localhost" in \
        single.torchrun
    assert "FI_PROVIDER" not in single.env and single.env["NEURON_RT_STOCHASTIC_ROUNDING_EN"] == "0"  # fp32
    pure_bf16 = build_plan(r.with_overrides(["parallel.zero1=false"]), "x")
    assert pure_bf16.env["NEURON_RT_STOCHASTIC_ROUNDING_EN"] == "1"  # bf16 weights updated in place: SR


# What the plan may set, each pinned to the documentation of the pinned stack (aws-neuron-sdk 3c46990d; NxD
# v2.28.0); a flag or variable missing here fails `test_plan_env_is_documented`. Values: the documented set,
# None for a switch without a value, or a predicate where the documentation gives a range.
DOCUMENTED_CC_FLAGS = {
    # compiler/neuronx-cc/api-reference-guide/index.rst:94-100: generic (default), transformer, unet-inference
    "--model-type": {"generic", "transformer", "unet-inference"},
    # index.rst:139-145: --optlevel / -O, "Possible numeric values are {1, 2, 3}" (default 2)
    "-O": {"1", "2", "3"},
    # about-neuron/arch/neuron-features/neuron-caching.rst:110,116 and torch-neuron-envvars.rst:38-43: a local
    # folder or an s3:// URL; it takes precedence over NEURON_COMPILE_CACHE_URL
    "--cache_dir": lambda v: bool(v),
    # neuron-caching.rst:130-137, pytorch-neuron-parallel-compile.rst:135-139: recompile a cached failure
    "--retry_failed_compilation": None,
    # index.rst:153: clamps +/-inf before compiler-introduced matmul transposes, "Only needed on trn1" (every
    # plan is for trn1), "a potential performance impact"; set by NxD v2.28.0's GPT-NeoX (tp_dp_gpt_neox_20b_hf_
    # pretrain.sh:6), Mixtral (run_mixtral_pretrain_ptl.sh:32-33) and DBRX training scripts, not its Llama ones;
    # kept because our step graphs carry -inf (the eidetic memory's retention scores)
    "--enable-saturate-infinity": None,
    # Left out on purpose: --distribution-strategy llm-training (index.rst:126-130) "should not be enabled when
    # using the Neuron Kernel Interface" (release-notes/components/nxd-training.rst:82), our default ops backend.
}
DOCUMENTED_ENV = {
    "NEURON_CC_FLAGS": None,  # torch-neuron-envvars.rst:13-17; its words are checked against DOCUMENTED_CC_FLAGS
    # torch-neuron-envvars.rst:140-146, about-neuron/arch/neuron-features/rounding-modes.rst:89-90: 0 = round to
    # nearest even, 1 = stochastic
    "NEURON_RT_STOCHASTIC_ROUNDING_EN": {"0", "1"},
    # neuron-runtime/nrt-configurable-parameters.rst:30-35: "Number of NeuronCores required by the process", 1 to
    # the instance's count; torchrun starts one process per NeuronCore, so exactly 1 (NxD's scripts' 32 is their
    # processes per node; torch-xla 2.9 sets NEURON_RT_VISIBLE_CORES=LOCAL_RANK under torchrun,
    # torch_xla/_internal/neuron.py:76-77, which wins over it, nrt-configurable-parameters.rst:152)
    "NEURON_RT_NUM_CORES": {"1"},
    # glibc's arena cap (a positive integer); NxD v2.28.0 examples/training/llama/tp_zero1_llama_hf_pretrain/
    # tp_zero1_llama3_8B_hf_pretrain.sh:15 sets 64; SDK release notes (_backup-rn/torch/torch-neuronx/
    # index.rst:861) name it against glibc's malloc growth
    "MALLOC_ARENA_MAX": lambda v: v.isdigit() and int(v) >= 1,
    # frameworks/torch/torch-neuronx/setup-trn1-multi-node-execution.rst:157-159
    "FI_PROVIDER": {"efa"},
    "FI_EFA_USE_DEVICE_RDMA": {"1"},
    "FI_EFA_FORK_SAFE": {"1"},
}


def parse_cc_flags(flags: str) -> list[tuple[str, str | None]]:
    """(option, value) pairs of a NEURON_CC_FLAGS string in the spellings neuronx-cc accepts: ``-O1`` or
    ``-O 1``, ``--opt=value`` or ``--opt value``; an option missing from DOCUMENTED_CC_FLAGS fails."""
    words, pairs = shlex.split(flags), []
    while words:
        word = words.pop(0)
        name, _, value = word.partition("=")
        if name.startswith("-O") and not name.startswith("--"):
            name, value = "-O", name[2:] or words.pop(0)
        assert name in DOCUMENTED_CC_FLAGS, f"{name} in NEURON_CC_FLAGS is not in the documented set"
        if DOCUMENTED_CC_FLAGS[name] is not None and not value:
            value = words.pop(0)
        pairs.append((name, value or None))
    return pairs


def allowed(spec, value) -> bool:
    return spec(value) if callable(spec) else (value in spec if spec is not None else value is None)


@pytest.mark.parametrize("name, overrides, nodes, instance", [
    ("trn1/bmojo-790m", [*LADDER["trn1/bmojo-790m"]], 4, "trn1.32xlarge"),  # EFA, bf16 + ZeRO-1
    ("trn1/bmojo-130m", [*LADDER["trn1/bmojo-130m"]], 1, "trn1.32xlarge"),  # bf16 without ZeRO-1
    ("trn1/bmojo-790m", [*LADDER["trn1/bmojo-790m"], "train.precision=fp32", "train.batch_size=1"], 1,
     "trn1.2xlarge"),
    *[(name, [], 1, "trn1.32xlarge") for name in PRIMING],
])
def test_plan_env_is_documented(name, overrides, nodes, instance):
    plan = build_plan(load_recipe(name, overrides), name, overrides, nodes=nodes,
                      instance=instance, cache_dir="/fsx/neuron-cache")
    undocumented = set(plan.env) - set(DOCUMENTED_ENV)
    assert not undocumented, f"plan sets undocumented variables {sorted(undocumented)}"
    for key, value in plan.env.items():
        if key != "NEURON_CC_FLAGS":
            assert allowed(DOCUMENTED_ENV[key], value), f"{key}={value!r} is outside its documented values"
    pairs = parse_cc_flags(plan.env["NEURON_CC_FLAGS"])
    for option, value in pairs:
        assert allowed(DOCUMENTED_CC_FLAGS[option], value), f"{option} {value!r} is outside its documented values"
    assert dict(pairs) == {"--model-type": "transformer", "--cache_dir": "/fsx/neuron-cache", "-O": "1",
                           "--retry_failed_compilation": None, "--enable-saturate-infinity": None}


@pytest.mark.parametrize("instance", ["trn1.32xlarge", "trn1.2xlarge"])
def test_each_process_reserves_the_cores_of_one_torchrun_process(instance):
    """NEURON_RT_NUM_CORES is per process: times the processes torchrun starts per node, the node's cores.
    NxD's scripts export 32 (their processes per node); per process that would reserve every core of the node
    for the first rank wherever NEURON_RT_VISIBLE_CORES is not set."""
    overrides = ["train.batch_size=64"] if instance == "trn1.32xlarge" else ["train.batch_size=2"]
    plan = build_plan(recipe("trn1/bmojo-130m", *overrides), "trn1/bmojo-130m", overrides, instance=instance)
    launch = shlex.split(plan.torchrun)
    per_node = int(launch[launch.index("--nproc-per-node") + 1])
    assert int(plan.env["NEURON_RT_NUM_CORES"]) * per_node == plan.cores_per_node == per_node


def test_saturate_infinity_is_needed_by_the_graphs_we_compile():
    """The reason the flag is set: the eidetic memory's step graph holds -inf (scores of empty slots), which a
    compiler-made transpose on trn1 would turn into NaN. If the scores ever become finite, revisit the flag."""
    import torch

    from bmojo_neuron.layers.eidetic_memory import retention_scores

    scores = retention_scores(torch.ones(4), torch.zeros(4, dtype=torch.long), 1,
                              torch.tensor([True, False, True, False]), 0.5)
    assert torch.isneginf(scores).tolist() == [False, True, False, True]
    assert "--enable-saturate-infinity" in build_plan(recipe(), "trn1/bmojo-130m",
                                                      LADDER["trn1/bmojo-130m"]).env["NEURON_CC_FLAGS"]


def test_cache_dir_with_white_space_is_refused(capsys):
    with pytest.raises(ValueError, match="white space"):
        build_plan(recipe(), "trn1/bmojo-130m", LADDER["trn1/bmojo-130m"], cache_dir="/fsx/neuron cache")
    assert main(["plan", "trn1/bmojo-130m", *LADDER["trn1/bmojo-130m"], "--cache-dir", "/fsx/a b"]) != 0
    assert "error: " in capsys.readouterr().err


@pytest.mark.parametrize("flags, problem", [
    ("--model-type transformer --distribution-strategy llm-training", "--distribution-strategy"),
    ("--model-type=llm", "--model-type"),
    ("-O4", "-O"),
    ("--optlevel 1", "--optlevel"),
    ("--retry-failed-compilation", "--retry-failed-compilation"),
])
def test_documented_flag_check_refuses(flags, problem):
    """The check itself: an option outside the set, or a value outside an option's documented values."""
    with pytest.raises(AssertionError, match=problem):
        for option, value in parse_cc_flags(flags):
            assert allowed(DOCUMENTED_CC_FLAGS[option], value), option


def test_plan_json_is_valid(capsys):
    assert main(["plan", "trn1/bmojo-370m", *LADDER["trn1/bmojo-370m"], "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["world"] == 32 and data["dp"] == 32 and data["memory"]["fits"] is True
    assert data["rank_layout"]["stages"][0]["layers"] == list(range(24))


@pytest.mark.parametrize("name", sorted(LADDER))
def test_ladder_plans_on_one_trn1_32xlarge(name):
    r = recipe(name)
    plan = build_plan(r, name, LADDER[name], nodes=1)
    assert plan.world == 32 and plan.memory.total <= 16 * GIB
    assert "decoder layers 0-" in plan.format()


def test_every_trn1_recipe_is_in_the_ladder_or_priming():
    from bmojo_neuron.recipes import repository_root

    files = {f"trn1/{p.stem}" for p in (repository_root() / "recipes" / "trn1").glob("*.yaml")}
    assert files == set(LADDER) | set(PRIMING)


@pytest.mark.parametrize("name", PRIMING)
def test_priming_plans_on_one_trn1_32xlarge(name):
    """A distillation gives gradients and optimizer states to the new paths only; a fine-tune to everything."""
    r = recipe(name)
    plan = build_plan(r, name, nodes=1)
    stage = plan.memory.peak
    assert plan.world == 32 and plan.memory.total <= 16 * GIB
    distilling = r.distill is not None
    assert (stage.trainable < stage.parameters / 4) == distilling
    grad_bytes = parameter_bytes(r.train.precision, r.parallel.zero1)[1]  # bf16, or an fp32 main_grad under ZeRO-1
    assert stage.gradients == stage.trainable * grad_bytes
    assert any(note.startswith("distill:") for note in plan.notes) == distilling


def test_a_plan_builds_the_model_shapes_once_for_both_estimates(monkeypatch):
    """At tp > 1 the HBM and host estimates both count the parameters of the one-device model and of rank 0's
    shard: `build_plan` builds each once on the meta device (one build at tp 1) and hands them to both, with the
    numbers of the estimates built alone."""
    from bmojo_neuron.launch.host_memory import estimate_host_memory
    from bmojo_neuron.parallel import one_device_init, sharding

    r = recipe("trn1/bmojo-790m", *SMALL)
    built = []

    def counted(config, tp, tp_rank=0):
        built.append(tp)
        return shard_shapes(config, tp, tp_rank)

    shard_shapes = sharding.shard_shapes
    monkeypatch.setattr(sharding, "shard_shapes", counted)
    monkeypatch.setattr(one_device_init, "shard_shapes", counted)
    plan = build_plan(r, "trn1/bmojo-790m")
    assert built == [1, 2]
    assert plan.memory == estimate_memory(r, 32) and plan.host == estimate_host_memory(r, 32, "trn1.32xlarge")
    from bmojo_neuron.launch.memory import model_shapes

    with pytest.raises(ValueError, match="shapes of tensor-parallel degree 2 given for tp 1"):
        stage_parameters(r.model_config(), 1, 1, shapes=model_shapes(r.model_config(), 2))


def test_hbm_estimate_of_a_hand_computed_case():
    """Two full-attention layers, fp32, one core: every term worked out by hand below."""
    r = load_recipe("cpu-tiny", [
        "model.layer_pattern=AA", "model.num_hidden_layers=2", "model.hidden_size=128",
        "model.num_attention_heads=2", "model.num_key_value_heads=2", "model.intermediate_size=256",
        "model.tie_word_embeddings=false", "data.vocab_size=256", "data.seq_len=128",
        "train.batch_size=2", "train.precision=fp32", "train.activation_checkpointing=false"])
    assert r.model_config().head_dim == 64 and r.model_config().vocab_size == 256
    s = estimate_memory(r, 1).stages[0]
    n = count_parameters(r)
    assert (s.weights, s.gradients, s.optimizer) == (4 * n, 4 * n, 8 * n)  # fp32 AdamW: no master copy
    # Per token, 4-byte elements: residual stream 4·128 = 512; q, rope(q), k, rope(k), v, attention
    # output 3·(2·64) + 3·(2·64) = 768; SwiGLU 4·256 = 1024; plus 2 fp32 log-sum-exps (one per head).
    layer = (512 + 768 + 1024) * 4 + 2 * 4  # 9224 bytes
    # Outside the layers: final norm in + out 2·128 and the logits 256 plus their fp32 copy. The embedding
    # output is layer 0's input, already in the layer's residual stream.
    outside = 2 * 128 * 4 + 256 * (4 + 4)  # 3072 bytes
    tokens = 2 * 128
    assert s.activations_full == tokens * (2 * layer + outside) == 5_509_120
    # Checkpointed: each layer's input (128 elements) kept, one layer recomputed at a time on that kept input, so
    # its residual stream adds three tensors, not four (`test_the_recomputed_layer_reads_the_kept_input_itself`).
    assert s.activations_checkpointed == tokens * (2 * 128 * 4 + layer - 128 * 4 + outside) == 3_278_848
    assert s.activations == s.activations_full and s.microbatches_in_flight == 1
    assert s.total == 16 * n + 5_509_120


def test_the_recomputed_layer_reads_the_kept_input_itself():
    """The checkpointed figure counts a recomputed layer's input once, as the kept one: NxD v2.28.0 checkpoints a
    decoder layer with torch-xla's reentrant checkpoint (utils/activation_checkpoint.py lines 37-46), which keeps
    the layer's inputs (torch_xla/utils/checkpoint.py v2.9.0 line 136) and recomputes on `detach_variable` of them
    (lines 190-195), as torch's reentrant checkpoint does (the test double's). Here, on the CPU: every tensor the
    recomputed layers save that holds a kept input's bytes holds that very storage, never a copy."""
    import torch
    from doubles.nxd_runtime import nxd_checkpoint_wrapper
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from bmojo_neuron import BMojoConfig, BMojoForCausalLM
    from bmojo_neuron.modeling_bmojo import BMojoDecoderLayer

    config = BMojoConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, layer_pattern="AB",
                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=32, window_size=4,
                         fading_window=4, memory_chunk=4, memory_size=4, memory_picks=1, ssm_state_size=8,
                         ssm_head_dim=8, ssm_chunk_size=16)
    torch.manual_seed(0)
    model = BMojoForCausalLM(config)
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=nxd_checkpoint_wrapper,
                                   check_fn=lambda m: isinstance(m, BMojoDecoderLayer))
    kept = []
    for module in model.modules():
        if type(module).__name__ == "NxDCheckpointWrapper":
            module.register_forward_pre_hook(lambda m, a: kept.extend(t for t in a if torch.is_tensor(t)))
    ids = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = model(ids, labels=ids).loss
    assert len(kept) == 2 and all(t.shape == (2, 16, 16) for t in kept)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss.backward()  # the recomputation of each layer is what saves tensors here
    for kept_input in kept:  # the norm saves its input, here as a (tokens, d) view
        holding = [t for t in saved if t.numel() == kept_input.numel() and t.dtype == kept_input.dtype
                   and torch.equal(t.reshape(kept_input.shape), kept_input)]
        assert holding, "the recomputed layer saves nothing of its input: the estimate would count it for nothing"
        pointer = kept_input.untyped_storage().data_ptr()
        assert all(t.untyped_storage().data_ptr() == pointer for t in holding), "a copy of the kept input"


def test_hbm_estimate_of_a_hand_counted_two_stage_pipeline():
    """The hand-computed case above (per token: 9224 bytes a layer, 512 a residual-stream tensor, 2048 the logits
    and their fp32 copy) cut into pp 2 stages of one layer each, 4 micro-batches of 2 × 128 tokens a step.
    NxD v2.28.0's 1F1B (pipeline/scheduler.py lines 179-184): stage 0 warms up with pp - 0 - 1 = 1 forward, runs
    a 2nd before its first backward, then one forward per backward, so it holds 2 micro-batches at its peak;
    stage 1 has no warm-up (forward, backward, ...): 1. Stage 0 keeps, besides its layer (whose input is the
    embedding output), the output it sent to stage 1 (NxD holds it for the backward, pipeline/model.py lines 1325 and 1366);
    stage 1 the final norm's input and output and the logits."""
    r = load_recipe("cpu-tiny", [
        "model.layer_pattern=AA", "model.num_hidden_layers=2", "model.hidden_size=128",
        "model.num_attention_heads=2", "model.num_key_value_heads=2", "model.intermediate_size=256",
        "model.tie_word_embeddings=false", "data.vocab_size=256", "data.seq_len=128", "train.batch_size=8",
        "train.precision=fp32", "train.activation_checkpointing=false", "parallel.pp=2", "parallel.microbatches=4"])
    first, last = estimate_memory(r, 2).stages  # dp 1: 8 sequences, 4 micro-batches of 2
    tokens = 2 * 128
    assert first.activations_full == tokens * (9224 + 512) == 2_492_416
    assert last.activations_full == tokens * (9224 + 2 * 512 + 256 * (4 + 4)) == 3_147_776
    assert (first.microbatches_in_flight, last.microbatches_in_flight) == (2, 1)
    assert (first.activations, last.activations) == (2 * 2_492_416, 3_147_776)


def test_1f1b_keeps_pp_minus_stage_microbatches_in_flight():
    r = recipe("trn1/bmojo-130m", "parallel.pp=4", "parallel.microbatches=8", "train.batch_size=64",
               "model.tie_word_embeddings=false")
    validate_for_trainium(r, 32)  # dp 8: 8 sequences per data rank, 8 micro-batches of 1
    stages = estimate_memory(r, 32).stages
    assert [s.microbatches_in_flight for s in stages] == [4, 3, 2, 1]
    assert all(s.activations == s.activations_per_microbatch * s.microbatches_in_flight for s in stages)
    few = estimate_memory(r.with_overrides(["parallel.microbatches=2"]), 32).stages
    assert [s.microbatches_in_flight for s in few] == [2, 2, 2, 1]  # a step of 2 holds at most 2
    accum = estimate_memory(r.with_overrides(["parallel.microbatches=2", "train.grad_accum=2"]), 32).stages
    assert [s.microbatches_in_flight for s in accum] == [4, 3, 2, 1]  # grad_accum folds into NxD's micro-batches
