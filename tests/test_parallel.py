"""Tensor (and sequence) parallelism over gloo on CPU equals the single-process model.

One spawn of two ranks runs every case (process start-up dominates the cost). Each
rank builds the single-process model itself (same seed), so no tensors travel
between the test and the workers; assertions inside a rank fail the spawn.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from naive import tiny_config

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
        tie_fading_projections=False, memory_decay=0.9,
    )


def _gather_grad(local: torch.Tensor, dim: int | None) -> torch.Tensor:
    if dim is None:
        return local
    parts = [torch.empty_like(local) for _ in range(WORLD)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts, dim=dim)


def _check_case(rank: int, mixer: str, sequence_parallel: bool) -> None:
    config = _config(mixer)
    torch.manual_seed(0)
    full = BMojoForCausalLM(config).double()
    ids = torch.randint(0, config.vocab_size, (2, LENGTH), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :3] = -100
    ref = full(ids, labels=labels)
    ref.loss.backward()

    factory = TorchTensorParallelFactory(sequence_parallel=sequence_parallel)
    with use_layer_factory(factory):
        model = BMojoForCausalLM(config).double()
    shapes = {name: p.shape for name, p in model.state_dict().items()}
    model.load_state_dict(shard_state_dict(full.state_dict(), shapes, rank, WORLD))
    out = model(ids, labels=labels)
    out.loss.backward()
    sync_sequence_parallel_grads(model)

    for name in ("loss", "lm_loss", "aux_loss"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=1e-5, atol=1e-10, msg=name)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-9)
    dims = split_dims(full.state_dict(), shapes, WORLD)
    full_params = dict(full.named_parameters())
    for name, param in model.named_parameters():
        grad = _gather_grad(param.grad, dims[name])
        torch.testing.assert_close(grad, full_params[name].grad, rtol=1e-5, atol=1e-9, msg=lambda m, name=name: f"grad of {name}: {m}")

    if not sequence_parallel:  # the eidetic memory picks the same tokens on every rank and on one device
        with torch.no_grad():
            ref_cache, cache = BMojoCache(config.num_hidden_layers), BMojoCache(config.num_hidden_layers)
            full(ids, cache=ref_cache, use_cache=True)
            model(ids, cache=cache, use_cache=True)
        picked = cache.layers[0].memory.position
        assert (picked >= 0).sum() > 0
        assert torch.equal(picked, ref_cache.layers[0].memory.position)
        for j, snapshot in cache.layers[0].snapshots.items():
            assert torch.equal(snapshot.position, ref_cache.layers[0].snapshots[j].position)
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
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for mixer in ("mamba2", "mamba1"):
            for sequence_parallel in (False, True):
                try:
                    _check_case(rank, mixer, sequence_parallel)
                except AssertionError as error:
                    raise AssertionError(f"{mixer}, sequence_parallel={sequence_parallel}: {error}") from error
    finally:
        dist.destroy_process_group()


def test_tensor_and_sequence_parallel_equal_single_process(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path / "init"),), nprocs=WORLD, start_method="spawn", join=True)


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
    from types import SimpleNamespace

    from bmojo_neuron.parallel import nxd

    built = []

    def layer(kind, make):
        def build(*args, **kwargs):
            built.append((kind, args, kwargs))
            return make(*args)
        return build

    fake = {
        "neuronx_distributed.parallel_layers.layers": SimpleNamespace(
            ColumnParallelLinear=layer("column", lambda i, o: torch.nn.Linear(i, o, bias=False)),
            RowParallelLinear=layer("row", lambda i, o: torch.nn.Linear(i, o, bias=False)),
            ParallelEmbedding=layer("embedding", torch.nn.Embedding),
        ),
        "neuronx_distributed.parallel_layers.mappings": SimpleNamespace(
            copy_to_tensor_model_parallel_region=lambda x: x,
            reduce_from_tensor_model_parallel_region=lambda x: x,
            gather_from_tensor_model_parallel_region=lambda x: x,
        ),
        "neuronx_distributed.parallel_layers.parallel_state": SimpleNamespace(
            get_tensor_model_parallel_size=lambda: 1, get_tensor_model_parallel_rank=lambda: 0
        ),
        "neuronx_distributed.parallel_layers.loss_functions": SimpleNamespace(
            parallel_cross_entropy=lambda logits, labels: torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        ),
    }
    monkeypatch.setattr(nxd, "import_neuron_module", lambda name, feature: fake[name])
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
