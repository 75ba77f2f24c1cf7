"""Tensor (and sequence) parallelism over gloo on CPU equals the single-process model.

One start of two ranks (`rank_processes`) runs every case (process start-up dominates the cost). Each
rank builds the single-process model itself (same seed), so no tensors travel
between the test and the workers; assertions inside a rank fail the start.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from doubles import nxd_api
from naive import tiny_config
from rank_processes import start_ranks

from bmojo_neuron import BMojoCache, BMojoForCausalLM
from bmojo_neuron.layers.factory import use_layer_factory
from bmojo_neuron.parallel import (
    TorchTensorParallelFactory,
    consolidate_state_dicts,
    shard_state_dict,
    split_dims,
    sync_sequence_parallel_grads,
)

WORLD = 2
LENGTH = 40  # divisible by 2 for sequence parallelism; spans 8 memory chunks


def _config(mixer: str):
    return tiny_config(
        layer_pattern="BFMSA", ssm_mixer=mixer, ssm_n_groups=2, num_attention_heads=4, num_key_value_heads=2,
        tie_fading_projections=False, memory_decay=0.9, ssm_residual=True, fading_overlap=True,
    )


def _config_with_primed_options(mixer: str):
    """`_config` with the options priming uses: q/k norms (a weight shared by the heads of every rank),
    biases on q/k/v/o and scaled RoPE."""
    config = _config(mixer)
    config.update({"qk_norm": True, "attention_bias": True, "attention_output_bias": True,
                   "rope_scaling_params": {"rope_type": "linear", "factor": 2.0}})
    return config


def single_process_run(config, length: int):
    """The float64 single-process model after forward and backward on a fixed batch: (model, ids, labels, output)."""
    torch.manual_seed(0)
    full = BMojoForCausalLM(config).double()
    ids = torch.randint(0, config.vocab_size, (2, length), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :3] = -100
    ref = full(ids, labels=labels)
    ref.loss.backward()
    return full, ids, labels, ref


def load_shard(full: BMojoForCausalLM, factory, rank: int, world: int):
    """`full`'s model built by `factory` holding this rank's shard of `full`'s weights, and its local shapes."""
    with use_layer_factory(factory):
        model = BMojoForCausalLM(full.config).double()
    shapes = {name: p.shape for name, p in model.state_dict().items()}
    model.load_state_dict(shard_state_dict(full.state_dict(), shapes, rank, world))
    return model, shapes


def gather_grad(local: torch.Tensor, dim: int | None, world: int) -> torch.Tensor:
    if dim is None:
        return local
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts, dim=dim)


def assert_rank_matches(model, out, full, ref, shapes: dict, world: int, rtol: float = 1e-5,
                        atol: float = 1e-9) -> None:
    """Losses, logits and every gradient (gathered over the ranks) equal the single-process ones (`rtol`)."""
    for name in ("loss", "lm_loss", "aux_loss"):
        torch.testing.assert_close(getattr(out, name).to(ref.loss.dtype), getattr(ref, name), rtol=rtol,
                                   atol=atol / 10, msg=name)
    torch.testing.assert_close(out.logits.to(ref.logits.dtype), ref.logits, rtol=rtol, atol=atol)
    dims = split_dims(full.state_dict(), shapes, world)
    full_params = dict(full.named_parameters())
    for name, param in model.named_parameters():
        grad = gather_grad(param.grad, dims[name], world)
        torch.testing.assert_close(grad.to(full_params[name].grad.dtype), full_params[name].grad, rtol=rtol,
                                   atol=atol, msg=lambda m, name=name: f"grad of {name}: {m}")


def run_cases(rank: int, init_file: str, world: int, check, cases: list[tuple[str, bool]]) -> None:
    """In a rank's process: join the gloo group, then `check(rank, mixer, sequence_parallel)` for each case."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for mixer, sequence_parallel in cases:
            try:
                check(rank, mixer, sequence_parallel)
            except AssertionError as error:
                raise AssertionError(f"{mixer}, sequence_parallel={sequence_parallel}: {error}") from error
        dist.barrier()  # all ranks done before any tears the group down: an early exit can abort a peer
    finally:
        dist.destroy_process_group()


def _check_case(rank: int, mixer: str, sequence_parallel: bool) -> None:
    config = _config_with_primed_options(mixer)
    full, ids, labels, ref = single_process_run(config, LENGTH)
    model, shapes = load_shard(full, TorchTensorParallelFactory(sequence_parallel=sequence_parallel), rank, WORLD)
    out = model(ids, labels=labels)
    out.loss.backward()
    sync_sequence_parallel_grads(model)
    assert_rank_matches(model, out, full, ref, shapes, WORLD)

    if not sequence_parallel:  # the eidetic memory picks the same tokens on every rank and on one device
        with torch.no_grad():
            ref_cache, cache = BMojoCache(config.num_hidden_layers), BMojoCache(config.num_hidden_layers)
            full(ids, cache=ref_cache, use_cache=True)
            model(ids, cache=cache, use_cache=True)
        picked = cache.layers[0].ring.position  # the memories after the last chunks (batch, memory_lag, M)
        assert (picked >= 0).sum() > 0
        assert torch.equal(picked, ref_cache.layers[0].ring.position)
        gathered = [torch.empty_like(picked) for _ in range(WORLD)]
        dist.all_gather(gathered, picked)
        assert torch.equal(gathered[0], gathered[1])

    shards = [None] * WORLD
    dist.all_gather_object(shards, {k: v.clone() for k, v in model.state_dict().items()})
    full_shapes = {k: v.shape for k, v in full.state_dict().items()}
    rebuilt = consolidate_state_dicts(shards, full_shapes)
    for name, tensor in full.state_dict().items():
        assert torch.equal(rebuilt[name], tensor), name


def _worker(rank: int, init_file: str) -> None:
    cases = [(mixer, sp) for mixer in ("mamba2", "mamba1") for sp in (False, True)]
    run_cases(rank, init_file, WORLD, _check_case, cases)


def test_tensor_and_sequence_parallel_equal_single_process(tmp_path):
    start_ranks(_worker, (str(tmp_path / "init"),), nprocs=WORLD)


@pytest.mark.parametrize(
    "tp, overrides, field",
    [
        (3, dict(vocab_size=66, num_attention_heads=4, num_key_value_heads=2), "num_attention_heads"),
        (2, dict(vocab_size=66, num_attention_heads=4, num_key_value_heads=1), "num_key_value_heads"),
        (2, dict(layer_pattern="M", ssm_n_groups=1), "ssm_n_groups"),
        (3, dict(vocab_size=66, layer_pattern="M", ssm_mixer="mamba1"), "ssm_inner_size"),
        (2, dict(layer_pattern="S", vocab_size=63), "vocab_size"),
    ],
)
def test_degrees_that_do_not_divide_are_rejected(tp, overrides, field):
    class CountingOnlyFactory(TorchTensorParallelFactory):
        def __init__(self):  # divisibility is checked before any collective runs
            self.group, self.tp_size, self.tp_rank, self.sequence_parallel = None, tp, 0, False

    with use_layer_factory(CountingOnlyFactory()), pytest.raises(ValueError, match=field):
        BMojoForCausalLM(tiny_config(**overrides))


def test_trainium_factory_builds_nxd_layers_with_the_right_arguments(monkeypatch):
    """Wiring only (no Neuron here): a test double of NxD's module API records what is built.

    With tensor-parallel size 1 the doubles behave like plain layers, so the model built
    through the NxD factory must also compute what the single-device model computes.
    """
    from bmojo_neuron.parallel import nxd

    built = []
    nxd_api.patch_imports(monkeypatch, nxd_api.parallel_layers(built), nxd)
    config = _config("mamba1")
    torch.manual_seed(0)
    reference = BMojoForCausalLM(config)
    with use_layer_factory(nxd.NxDTensorParallelFactory()):
        model = BMojoForCausalLM(config)
    model.load_state_dict(reference.state_dict())

    kinds = [kind for kind, _, _ in built]
    assert kinds.count("embedding") == 1 and built[0] == ("embedding", (64, 32), {})
    assert all(kw == {"bias": False, "gather_output": False} for k, _, kw in built if k == "column")
    assert all(kw == {"bias": False, "input_is_parallel": True} for k, _, kw in built if k == "row")
    q_proj = next(args for kind, args, _ in built if kind == "column")
    assert q_proj == (32, config.num_attention_heads * config.head_dim)
    ids = torch.randint(0, 64, (2, 24))
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        want, got = reference(ids, labels=labels), model(ids, labels=labels)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss)  # sequence parallelism: tests/test_parallel_nxd.py


def test_nxd_factory_without_neuron_says_what_to_install():
    from bmojo_neuron.neuron import NeuronUnavailableError
    from bmojo_neuron.parallel.nxd import NxDTensorParallelFactory

    with pytest.raises(NeuronUnavailableError, match="neuronx"):
        NxDTensorParallelFactory()
