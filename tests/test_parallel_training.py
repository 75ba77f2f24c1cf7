"""`train` under tensor/sequence parallelism, data parallelism with ZeRO-1, sharded checkpoints and their
conversion equal one-process training.

The one-process reference runs here; one start of two gloo ranks then runs every
parallel case by calling `training.train` directly (no torchrun). ``train.batch_size``
is the global micro-batch, so a data-parallel run sees exactly the reference's batches.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from baseline import RECORDED_RECIPE, check_run, reference_ops_for_module  # noqa: F401
from rank_processes import start_ranks
from safetensors.torch import load_file

from bmojo_neuron.checkpoints import sharded as fmt
from bmojo_neuron.checkpoints.convert import consolidate_checkpoint, shard_checkpoint
from bmojo_neuron.parallel.layout import ParallelLayout
from bmojo_neuron.recipes import load_recipe

# The recorded numbers are the torch reference ops' (baseline.reference_ops).
pytestmark = pytest.mark.usefixtures("reference_ops_for_module")

WORLD = 2
STEPS = 4
OVERRIDES = [
    "run.device=cpu", "run.seed=3", "data.vocab_size=64", "data.seq_len=32", "data.num_kv_pairs=4",
    "data.train_examples=64", "data.eval_examples=8", "model.hidden_size=32", "model.num_hidden_layers=2",
    "model.layer_pattern=BM", "model.num_attention_heads=2", "model.intermediate_size=64", "model.window_size=8",
    "model.fading_window=8", "model.memory_chunk=8", "model.memory_size=16", "model.memory_picks=4",
    "model.ssm_state_size=8", "model.ssm_head_dim=16", "model.ssm_chunk_size=16", "model.ssm_n_groups=2",
    f"train.steps={STEPS}", "train.batch_size=4", "train.log_every=1", "optim.warmup_steps=1", "optim.lr=3e-3",
    "optim.grad_clip=0.5", f"eval.every={STEPS}", "eval.batches=1", "eval.length_multipliers=[1]",
    "checkpoint.every=2", "checkpoint.keep_last=5",
]


def _recipe(*extra: str):
    return load_recipe(RECORDED_RECIPE, [*OVERRIDES, *extra])


def _losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records if r["type"] == "train"]


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), what
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=2e-4, atol=2e-5,
                                   msg=lambda m, name=name: f"{what}: {name}: {m}")


def _worker(rank: int, init_file: str, root: str, reference: list[float]) -> None:
    from bmojo_neuron.training import train

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    root_dir = Path(root)
    want_weights = _final_weights(root_dir / "reference")
    try:
        cases = [("tp2-sp", ["parallel.tp=2", "parallel.sp=true"]), ("dp2-zero1", ["parallel.zero1=true"])]
        for name, extra in cases:
            result = train(_recipe(*extra), root_dir / name, progress=False)
            torch.testing.assert_close(_losses(result.metrics), reference, rtol=2e-4, atol=0, msg=name)
            if rank == 0:
                _assert_same(_final_weights(root_dir / name), want_weights, name)

        # a tp=2 run stopped at step 2, converted to tp=1 and resumed with dp=2 + ZeRO-1
        first = train(_recipe("parallel.tp=2"), root_dir / "tp2", progress=False, stop_after=2)
        assert first.step == 2
        if rank == 0:
            consolidate_checkpoint(root_dir / "tp2", root_dir / "tp2-full")
            shard_checkpoint(root_dir / "tp2-full", root_dir / "tp1", tp=1)
        dist.barrier()
        resumed = train(_recipe("parallel.tp=1", "parallel.zero1=true"), root_dir / "tp1", resume=True,
                        progress=False)
        torch.testing.assert_close(_losses(resumed.metrics), reference, rtol=2e-4, atol=0, msg="resumed")
        if rank == 0:
            _assert_same(_final_weights(root_dir / "tp1"), want_weights, "resumed at tp=1")
        _stop_on_one_rank_stops_all(rank, root_dir / "stop")
        dist.barrier()  # all ranks done before any tears the group down: an early exit can abort a peer
    finally:
        dist.destroy_process_group()


def _stop_on_one_rank_stops_all(rank: int, run_dir: Path) -> None:
    """A stop asked on rank 0 only (a signal reaches ranks at different moments): every rank stops at that step
    and the sharded checkpoint is written whole."""
    from bmojo_neuron.checkpoints import layout
    from bmojo_neuron.training import Trainer
    from bmojo_neuron.training.backend import open_backend

    recipe = _recipe("parallel.zero1=true")
    backend = open_backend(recipe)
    trainer = Trainer(recipe, backend, run_dir, progress=False)
    step = backend.step

    def step_then_stop_on_rank_0(*args):
        out = step(*args)
        if rank == 0:
            trainer.request_stop()
        return out

    backend.step = step_then_stop_on_rank_0
    stopped = trainer.run()
    assert stopped.step == 1 and stopped.final_dir is None, (rank, stopped.step)
    dist.barrier()
    assert layout.latest_checkpoint(run_dir).name == "step-0000001"


def test_parallel_training_equals_one_process(tmp_path):
    from bmojo_neuron.training import train

    ref = train(_recipe(), tmp_path / "reference", progress=False)
    reference = _losses(ref.metrics)
    assert len(reference) == STEPS
    start_ranks(_worker, (str(tmp_path / "init"), str(tmp_path), reference), nprocs=WORLD)

    for name in ("reference", "tp2-sp", "dp2-zero1", "tp1"):
        check_run(f"parallel-{name}", tmp_path / name)

    # the sharded checkpoints follow the documented layout
    step = tmp_path / "tp2-sp" / "step-0000004"
    names = sorted(p.name for p in step.iterdir())
    assert names == ["config.json", "manifest.json", "optim-00-00-000.pt", "optim-01-00-000.pt", "parallel.json",
                     "rank-00-00.safetensors", "rank-01-00.safetensors", "recipe.json", "trainer_state.json"]
    assert (tmp_path / "tp2-sp" / "latest").read_text().strip() == "step-0000004"
    zero = tmp_path / "dp2-zero1" / "step-0000004"
    assert {p.name for p in zero.glob("optim-*")} == {"optim-00-00-000.pt", "optim-00-00-001.pt"}

    # consolidate -> shard at another degree -> consolidate is the identity (weights and optimizer states)
    once = consolidate_checkpoint(step, tmp_path / "c1")
    shard_checkpoint(once, tmp_path / "re-tp1", tp=1)
    twice = consolidate_checkpoint(tmp_path / "re-tp1", tmp_path / "c2")
    shard_checkpoint(twice, tmp_path / "re-tp2", tp=2)
    thrice = consolidate_checkpoint(tmp_path / "re-tp2", tmp_path / "c3")
    first = load_file(str(once / "model.safetensors"))
    for other in (twice, thrice):
        again = load_file(str(other / "model.safetensors"))
        assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
        a = torch.load(once / fmt.TRAINING_STATE_FILE, weights_only=False)["optimizer"]
        b = torch.load(other / fmt.TRAINING_STATE_FILE, weights_only=False)["optimizer"]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])
    _assert_same(first, _final_weights(tmp_path / "reference"), "consolidated tp2-sp")
    info = json.loads((once / "bmojo_run.json").read_text())
    assert info["step"] == STEPS


def test_layout_puts_tensor_parallel_ranks_next_to_each_other():
    layout = ParallelLayout.from_world(8, tp=2, pp=2, rank=5)
    # NxD v2.28's order (parallel_state.py, the ranks reshaped to [pp, dp, cp, tp]): pipeline slowest.
    assert (layout.dp, layout.dp_rank, layout.pp_rank, layout.tp_rank) == (2, 0, 1, 1)
    assert layout.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.pp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.dp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    for r in range(8):
        at = ParallelLayout(2, 2, 2, r)
        assert at.rank_of(at.dp_rank, at.pp_rank, at.tp_rank) == r
    with pytest.raises(ValueError, match="not divisible by parallel.tp × parallel.pp"):
        ParallelLayout.from_world(6, tp=4, pp=1)


def test_parallel_recipe_errors_come_before_any_work():
    from bmojo_neuron.training.backends.torchrun import check_parallel_recipe

    with pytest.raises(ValueError, match="train.batch_size"):
        check_parallel_recipe(_recipe("train.batch_size=3"), world=2)
    with pytest.raises(ValueError, match="parallel.sp"):
        check_parallel_recipe(_recipe("parallel.tp=3", "parallel.sp=true", "data.seq_len=32"), world=3)
    # one process (a plain `bmojo-neuron train`): the error says how many ranks to start, and how
    with pytest.raises(ValueError, match=r"world size 1\): launch it with torchrun --nproc-per-node 4 "):
        check_parallel_recipe(_recipe("parallel.tp=2", "parallel.pp=2"), world=1)


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.ssm_n_groups=1"], "model.ssm_n_groups (1) must be divisible by parallel.tp (2)"),
    (["model.num_key_value_heads=1"], "model.num_key_value_heads (1) must be divisible by parallel.tp (2)"),
    (["model.vocab_size=257"], "model.vocab_size (257) must be divisible by parallel.tp (2)"),
    # 2·24 / 16 = 3 Mamba-2 heads; Mamba-1 with ssm_expand 1 has 33 channels
    (["model.hidden_size=24", "model.ssm_n_groups=1"],
     "model.ssm_num_heads (3, from ssm_expand·hidden_size / ssm_head_dim) must be divisible by parallel.tp (2)"),
    (["model.ssm_mixer=mamba1", "model.hidden_size=33", "model.head_dim=16", "model.ssm_expand=1"],
     "model.ssm_inner_size (33, from ssm_expand·hidden_size) must be divisible by parallel.tp (2)"),
])
def test_tensor_parallel_split_errors_name_the_recipe_keys(overrides, message):
    from bmojo_neuron.training.backends.torchrun import check_parallel_recipe

    with pytest.raises(ValueError) as raised:
        check_parallel_recipe(_recipe("parallel.tp=2", *overrides), world=2)
    assert str(raised.value) == message


PP_BATCH, PP_MICROBATCHES = 4, 4


def _check_pipeline_gradients(rank: int, tied: bool) -> None:
    from naive import tiny_config

    from bmojo_neuron import BMojoForCausalLM
    from bmojo_neuron.parallel.pipeline import PipelineStage, build_schedule, pipeline_loss, stage_io

    config = tiny_config(layer_pattern="BMFB", num_hidden_layers=4, tie_word_embeddings=tied, memory_decay=0.9)
    torch.manual_seed(0)
    full = BMojoForCausalLM(config).double()
    ids = torch.randint(0, config.vocab_size, (PP_BATCH, 24), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :3] = -100
    ref = full(ids, labels=labels)
    ref.loss.backward()
    want = {n: p.grad.clone() for n, p in full.named_parameters()}  # a tied head is named as the embedding

    torch.manual_seed(0)
    stage = PipelineStage(BMojoForCausalLM(config).double(), rank, WORLD)
    io = stage_io(stage, PP_BATCH // PP_MICROBATCHES, 24, train=True)
    schedule = build_schedule(stage, None, PP_MICROBATCHES, pipeline_loss(config, PP_MICROBATCHES), io)
    losses: list[torch.Tensor] = []
    if rank == 0:
        schedule.step(ids)
    else:
        schedule.step(target=labels, losses=losses)
        assert len(losses) == PP_MICROBATCHES
        torch.testing.assert_close(torch.stack(losses).sum(), ref.loss.detach(), rtol=1e-6, atol=1e-12)
    if tied:  # each copy saw one use of the tied matrix: their sum is the one-process gradient
        weight = stage.tied_weight()
        assert weight is not None
        dist.all_reduce(weight.grad)
    names = stage.full_named_parameters()
    owned = {n for n, _ in names}
    assert ("model.embed_tokens.weight" in owned) == (rank == 0) and ("lm_head.weight" in owned) == (rank == 1)
    for name, param in names:
        key = "model.embed_tokens.weight" if tied and name == "lm_head.weight" else name
        torch.testing.assert_close(param.grad, want[key], rtol=1e-6, atol=1e-12,
                                   msg=lambda m, name=name: f"tied={tied}, stage {rank}, grad of {name}: {m}")
    everything = [None] * WORLD
    dist.all_gather_object(everything, sorted(owned - ({"lm_head.weight"} if tied else set())))
    assert sorted(everything[0] + everything[1]) == sorted(want)


def _pipeline_worker(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for tied in (False, True):
            _check_pipeline_gradients(rank, tied)
        dist.barrier()  # all ranks done before any tears the group down: an early exit can abort a peer
    finally:
        dist.destroy_process_group()


def test_pipeline_parallel_equals_one_process_over_microbatches(tmp_path):
    """A 2-stage GPipe schedule over 4 micro-batches (float64, static shapes) gives the one-process loss and
    every gradient; with tied embeddings the two copies' gradients sum to the one-process gradient."""
    start_ranks(_pipeline_worker, (str(tmp_path / "init"),), nprocs=WORLD)


def test_pipeline_split_and_tied_embeddings():
    from naive import tiny_config

    from bmojo_neuron.parallel.pipeline import check_pipeline_config, split_layers, stage_of

    assert split_layers(5, 2) == [range(0, 3), range(3, 5)]
    config = tiny_config(num_hidden_layers=5, layer_pattern="BMBMB")
    assert [stage_of(f"model.layers.{i}.mlp.up_proj.weight", config, 2) for i in range(5)] == [0, 0, 0, 1, 1]
    assert stage_of("model.embed_tokens.weight", config, 3) == 0
    assert stage_of("lm_head.weight", config, 3) == stage_of("model.norm.weight", config, 3) == 2
    check_pipeline_config(config, 2)  # both pipeline wirings (torch, NxD) share a tied embedding
    with pytest.raises(ValueError, match="tie_word_embeddings=false"):
        check_pipeline_config(config, 2, allow_tied=False)
