"""`train` with pipeline parallelism (alone, with dp / ZeRO-1, with tp + sp, with tied embeddings), its eval,
checkpoints, resume and degree conversion equal one-process training.

The one-process references run here (float32, as the recipe trains); the parallel
runs call `training.train` in gloo ranks (`rank_processes`) (no torchrun). The model has every
layer kind (``BFMSA``); the untied runs use Mamba-2, the tied ones Mamba-1.

Tolerances (float32): logged losses, gradient norms and eval numbers rtol 1e-5;
final weights rtol 1e-5 with atol 1e-5. The absolute term is needed because AdamW's
first steps are ``lr · g / |g|``-like: for an entry whose gradient is near zero,
float32 rounding differences of the gradient (micro-batches and tensor shards sum
in another order) move its update by a visible fraction of ``lr`` (3e-3; seen: up
to 4e-6 on a handful of entries); 1e-5 is a third of a percent of one step, far below
what a wrong gradient (a missing tied-embedding sum, a wrong scale) moves. A resumed
run of the same degrees is compared bitwise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from baseline import RECORDED_RECIPE, check_run, reference_ops_for_module  # noqa: F401
from rank_processes import start_ranks
from safetensors.torch import load_file

from bmojo_neuron.checkpoints import sharded as fmt
from bmojo_neuron.checkpoints.convert import consolidate_checkpoint, shard_checkpoint
from bmojo_neuron.recipes import Recipe, load_recipe

# The recorded numbers are the torch reference ops' (baseline.reference_ops).
pytestmark = pytest.mark.usefixtures("reference_ops_for_module")

STEPS = 4
BASE = [
    "run.device=cpu", "run.seed=3", "data.vocab_size=64", "data.seq_len=32", "data.num_kv_pairs=4",
    "data.train_examples=64", "data.eval_examples=8", "model.hidden_size=32", "model.num_hidden_layers=5",
    "model.layer_pattern=BFMSA", "model.num_attention_heads=2", "model.intermediate_size=64",
    "model.window_size=8", "model.fading_window=8", "model.memory_chunk=8", "model.memory_size=16",
    "model.memory_picks=4", "model.ssm_state_size=8", "model.ssm_head_dim=16", "model.ssm_chunk_size=16",
    "model.ssm_n_groups=2", "model.tie_word_embeddings=false", f"train.steps={STEPS}", "train.batch_size=4",
    "train.grad_accum=2", "train.log_every=1", "optim.warmup_steps=1", "optim.lr=3e-3", "optim.grad_clip=0.5",
    f"eval.every={STEPS}", "eval.batches=1", "eval.length_multipliers=[1,2]", "checkpoint.every=2",
    "checkpoint.keep_last=5",
]
TIED = ["model.tie_word_embeddings=true", "model.ssm_mixer=mamba1"]
PP2 = ["parallel.pp=2", "parallel.microbatches=2"]
TRAIN_KEYS = ("loss", "lm_loss", "aux_loss", "grad_norm")
EVAL_KEYS = ("eval_loss", "eval_perplexity", "eval_accuracy", "eval_tokens")


def _recipe(*extra: str) -> Recipe:
    return load_recipe(RECORDED_RECIPE, [*BASE, *extra])


def _numbers(result) -> dict[str, list[float]]:
    """Per-step training numbers, eval numbers and the length-generalisation losses of a `TrainResult`."""
    train = [r for r in result.metrics if r["type"] == "train"]
    evals = [r for r in result.metrics if r["type"] == "eval"]
    out = {key: [r[key] for r in train] for key in TRAIN_KEYS}
    out.update({key: [r[key] for r in evals] for key in EVAL_KEYS})
    out["length_loss"] = [r.loss for r in result.length_eval]
    out["length_accuracy"] = [r.accuracy for r in result.length_eval]
    return out


def _assert_numbers(got: dict, want: dict, what: str) -> None:
    assert len(want["loss"]) == STEPS and len(want["eval_loss"]) == 1 and len(want["length_loss"]) == 2
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=0, msg=lambda m, key=key: f"{what}: {key}: {m}")


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def _assert_weights(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5,
                                   msg=lambda m, name=name: f"{what}: {name}: {m}")


def _init(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


# ------------------------------------------------------------------------------ pp = 2 (two ranks)


def _check_eval_through_pipeline(rank: int) -> None:
    """`evaluate` through a 2-stage pipeline equals one process (batches of 4 rows in 2 micro-batches, then
    a last batch of 3 rows, which does not split and runs as one)."""
    from naive import tiny_config

    from bmojo_neuron import BMojoForCausalLM
    from bmojo_neuron.parallel.pipeline import PipelineRunner, PipelineStage
    from bmojo_neuron.evaluation import evaluate

    config = tiny_config(layer_pattern="BFMSA", tie_word_embeddings=True, memory_decay=0.9)
    torch.manual_seed(0)
    full = BMojoForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (7, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        predicted = full(ids).logits.argmax(-1)
    labels = torch.full_like(ids, -100)
    labels[:, 11::2] = predicted[:, 10:-1:2]  # right answers at half the scored positions ...
    labels[:, 12::2] = (predicted[:, 11:-1:2] + 1) % config.vocab_size  # ... wrong ones at the others
    data = {"input_ids": ids, "labels": labels}
    want = evaluate(full, data, batch_size=4, mqar=True)
    assert 0.3 < want["accuracy"] < 0.7

    stage = PipelineStage(BMojoForCausalLM(config), rank, 2)
    stage.load_state_dict({f"model.{k}": v for k, v in full.state_dict().items()
                           if f"model.{k}" in stage.state_dict()})
    got = evaluate(stage, data, batch_size=4, mqar=True, pipeline=PipelineRunner(stage, None, 2, last_rank=1))
    assert got.keys() == want.keys() and got["tokens"] == want["tokens"]
    for key in ("loss", "perplexity", "accuracy"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=0, msg=key)


def _pp_worker(rank: int, init_file: str, root: str, ref: dict, ref_tied: dict) -> None:
    from bmojo_neuron.training import train

    _init(rank, 2, init_file)
    root_dir = Path(root)
    try:
        _check_eval_through_pipeline(rank)

        run = train(_recipe(*PP2), root_dir / "pp2", progress=False)
        _assert_numbers(_numbers(run), ref, "pp=2")

        tied = train(_recipe(*TIED, *PP2, "train.activation_checkpointing=true"), root_dir / "pp2-tied",
                     progress=False)
        _assert_numbers(_numbers(tied), ref_tied, "pp=2, tied embeddings")

        # stopped at step 2 and resumed at the same degrees: the uninterrupted run, bitwise
        assert train(_recipe(*PP2), root_dir / "pp2-resumed", progress=False, stop_after=2).step == 2
        resumed = train(_recipe(*PP2), root_dir / "pp2-resumed", resume=True, progress=False)
        assert _numbers(resumed)["loss"] == _numbers(run)["loss"]

        # pp=2 step 2 -> consolidated -> sharded at tp=2, pp=1 -> resumed with tensor parallelism
        if rank == 0:
            full = consolidate_checkpoint(root_dir / "pp2" / "step-0000002", root_dir / "pp2-step2-full")
            shard_checkpoint(full, root_dir / "tp2-from-pp2", tp=2, pp=1)
        dist.barrier()
        converted = train(_recipe("parallel.tp=2"), root_dir / "tp2-from-pp2", resume=True, progress=False)
        _assert_numbers(_numbers(converted), ref, "pp=2 converted to tp=2")
        dist.barrier()  # all ranks done before any tears the group down: an early exit can abort a peer
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    """The one-process run both parallel tests compare with (its run folder and `_numbers`)."""
    from bmojo_neuron.training import train

    run_dir = tmp_path_factory.mktemp("pipeline") / "reference"
    numbers = _numbers(train(_recipe(), run_dir, progress=False))
    check_run("pipeline-reference", run_dir)
    return run_dir, numbers


def test_pipeline_training_equals_one_process(tmp_path, reference):
    from bmojo_neuron.training import train

    ref_dir, ref = reference
    ref_tied = train(_recipe(*TIED), tmp_path / "reference-tied", progress=False)
    start_ranks(_pp_worker, (str(tmp_path / "init"), str(tmp_path), ref, _numbers(ref_tied)), nprocs=2)

    for name in ("reference-tied", "pp2", "pp2-tied"):
        check_run(f"pipeline-{name}", tmp_path / name)
    check_run("pipeline-pp2", tmp_path / "pp2-resumed")
    check_run("pipeline-tp2-from-pp2", tmp_path / "tp2-from-pp2")

    want, want_tied = _weights(ref_dir), _weights(tmp_path / "reference-tied")
    _assert_weights(_weights(tmp_path / "pp2"), want, "pp=2")
    _assert_weights(_weights(tmp_path / "pp2-tied"), want_tied, "pp=2, tied")
    resumed = _weights(tmp_path / "pp2-resumed")
    assert all(torch.equal(resumed[k], v) for k, v in _weights(tmp_path / "pp2").items())
    _assert_weights(_weights(tmp_path / "tp2-from-pp2"), want, "pp=2 converted to tp=2")

    # one file per stage; a tied head is stored once, as stage 0's embedding
    step = tmp_path / "pp2-tied" / "step-0000004"
    assert sorted(p.name for p in step.iterdir()) == [
        "config.json", "manifest.json", "optim-00-00-000.pt", "optim-00-01-000.pt", "parallel.json",
        "rank-00-00.safetensors", "rank-00-01.safetensors", "recipe.json", "trainer_state.json"]
    first, last = load_file(str(step / fmt.model_file(0, 0))), load_file(str(step / fmt.model_file(0, 1)))
    assert fmt.EMBEDDING in first and fmt.TIED_HEAD not in last and "model.norm.weight" in last
    assert not set(first) & set(last)
    assert fmt.TIED_HEAD not in torch.load(step / fmt.optim_file(0, 1, 0), weights_only=False)["optimizer"]

    # consolidate -> shard at other (tp, pp) -> consolidate is the identity (weights and optimizer states)
    for name in ("pp2", "pp2-tied"):
        once = consolidate_checkpoint(tmp_path / name, tmp_path / f"{name}-c1")
        shard_checkpoint(once, tmp_path / f"{name}-tp2", tp=2, pp=1)
        twice = consolidate_checkpoint(tmp_path / f"{name}-tp2", tmp_path / f"{name}-c2")
        shard_checkpoint(twice, tmp_path / f"{name}-tp2pp3", tp=2, pp=3)
        thrice = consolidate_checkpoint(tmp_path / f"{name}-tp2pp3", tmp_path / f"{name}-c3")
        weights = load_file(str(once / "model.safetensors"))
        states = torch.load(once / fmt.TRAINING_STATE_FILE, weights_only=False)["optimizer"]
        assert set(states) == set(weights) - ({fmt.TIED_HEAD} if name.endswith("tied") else set())
        for other in (twice, thrice):
            again = load_file(str(other / "model.safetensors"))
            assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)
            b = torch.load(other / fmt.TRAINING_STATE_FILE, weights_only=False)["optimizer"]
            assert states.keys() == b.keys()
            assert all(torch.equal(states[n][k], b[n][k]) for n in states for k in states[n])
    assert len(list((tmp_path / "pp2-tp2pp3" / "step-0000004").glob("rank-*.safetensors"))) == 6


# ----------------------------------------------------------------------- tp = 2 × pp = 2 (four ranks)


def _tp_pp_worker(rank: int, init_file: str, root: str, ref: dict) -> None:
    from bmojo_neuron.training import train

    _init(rank, 4, init_file)
    root_dir = Path(root)
    try:
        run = train(_recipe(*PP2, "parallel.tp=2", "parallel.sp=true"), root_dir / "tp2pp2", progress=False)
        _assert_numbers(_numbers(run), ref, "tp=2 × pp=2 + sp")

        # tp=2 × pp=2 step 2 -> consolidated -> sharded at tp=1, pp=2 -> resumed as pp=2 × dp=2 with ZeRO-1
        if rank == 0:
            full = consolidate_checkpoint(root_dir / "tp2pp2" / "step-0000002", root_dir / "tp2pp2-step2-full")
            shard_checkpoint(full, root_dir / "pp2dp2", tp=1, pp=2)
        dist.barrier()
        resumed = train(_recipe(*PP2, "parallel.microbatches=1", "parallel.zero1=true"), root_dir / "pp2dp2",
                        resume=True, progress=False)
        _assert_numbers(_numbers(resumed), ref, "tp=2 × pp=2 converted to pp=2 × dp=2 + ZeRO-1")
        dist.barrier()  # all ranks done before any tears the group down: an early exit can abort a peer
    finally:
        dist.destroy_process_group()


def test_tensor_times_pipeline_parallel_equals_one_process(tmp_path, reference):
    ref_dir, ref = reference
    start_ranks(_tp_pp_worker, (str(tmp_path / "init"), str(tmp_path), ref), nprocs=4)
    check_run("pipeline-tp2-pp2-sp", tmp_path / "tp2pp2")
    check_run("pipeline-pp2-dp2-zero1-from-tp2-pp2", tmp_path / "pp2dp2")
    want = _weights(ref_dir)
    _assert_weights(_weights(tmp_path / "tp2pp2"), want, "tp=2 × pp=2")
    _assert_weights(_weights(tmp_path / "pp2dp2"), want, "converted to pp=2 × dp=2")
    names = sorted(p.name for p in (tmp_path / "tp2pp2" / "step-0000004").glob("rank-*"))
    assert names == ["rank-00-00.safetensors", "rank-00-01.safetensors", "rank-01-00.safetensors",
                     "rank-01-01.safetensors"]


# --------------------------------------------------------------------------------- recipe errors


def test_pipeline_recipe_errors_come_before_any_work():
    import pytest

    from bmojo_neuron.training.backends.torchrun import check_parallel_recipe

    with pytest.raises(ValueError, match="parallel.microbatches .3. must divide the per-data-rank batch"):
        check_parallel_recipe(_recipe("parallel.pp=2", "parallel.microbatches=3"), world=2)
    with pytest.raises(ValueError, match="parallel.microbatches only applies"):
        check_parallel_recipe(_recipe("parallel.microbatches=2"), world=2)
    with pytest.raises(ValueError, match="parallel.pp .6. must be between 1 and num_hidden_layers .5."):
        check_parallel_recipe(_recipe("parallel.pp=6"), world=6)
    layout = check_parallel_recipe(_recipe(*TIED, *PP2), world=4)  # tied embeddings are fine under pp
    assert (layout.tp, layout.pp, layout.dp) == (1, 2, 2)
