"""NxD 0.17's tensor-parallel layers, mappings and loss over a pluggable tensor-parallel group.

One double of ``neuronx_distributed.parallel_layers`` (``layers``, ``mappings``,
``loss_functions``, ``grads``; tag ``v2.28.0``) for two groups: `SingleRank`
(tp = 1, no process group: `doubles.nxd_api`), `GlooWorld` (tp = the gloo world:
`doubles.nxd_gloo`) and `GridGroup` (this rank's tensor-parallel group of NxD's grid: the training loop's
`doubles.nxd_runtime`). Every class and function has NxD's exact signature
(``tests/test_doubles.py`` holds the real ones as data); what the double does not
model raises ``NotImplementedError`` instead of quietly doing something else.

Modelled as NxD does it, because a wrong call gives wrong numbers or wrong dtypes:

- ``ParallelEmbedding`` keeps its ``dtype`` argument (fp32 by default) and at
  tp > 1 casts its masked lookup with it: ``.to(self.dtype)`` when that is fp32,
  else ``.to(torch.bfloat16)`` (``layers.py`` 361-364). ``model.to(bf16)`` does not
  change the attribute, so a bf16 model built with the default gets an fp32 residual
  stream. With ``sequence_parallel_enabled`` and a non-zero ``sequence_dimension`` it
  returns the un-reduced per-rank lookup; with dimension 0 it reduce-scatters the
  transposed (sequence-first) output;
- weights are created in ``dtype`` and initialised as NxD does on the CPU: the whole
  fp32 master tensor with ``init_method``, cast, this rank's block kept; they carry
  NxD's tensor-parallel attributes (``num_partitions`` included); the row-parallel
  bias carries ``sequence_parallel_enabled``;
- ``RowParallelLinear`` reduces in ``reduce_dtype`` (fp32 by default) and casts back
  to its input's dtype; sequence-parallel layers default ``sequence_dimension`` to 0;
  ``ColumnParallelLinear`` refuses ``gather_output`` with sequence parallelism in its
  forward (not when built, as NxD);
- the backward issues NxD's collectives, in NxD's order: each mapping's pair (``mappings.py``), and the
  parallel linear layers' matmul is NxD's ``LinearWithAsyncCommunication`` (`_LinearWithAsyncCommunication`):
  a column-parallel layer all-reduces its input gradient in its backward (no copy mapping in its forward at
  tp > 1), under sequence parallelism all-gathers its input again and reduce-scatters its input gradient; at
  bf16 with the default fp32 ``reduce_dtype`` NxD's all-reduce of the input gradient lands in a cast copy and
  is lost, so the double's is too;
- ``parallel_cross_entropy`` subtracts each row's maximum from its input *in place*
  (``loss_functions.py``: ``vocab_parallel_logits.sub_``), so a caller's logits
  change when it passes a view of them;
- the mappings and the loss are autograd Functions in NxD, which cannot take an FX
  proxy: the doubles refuse one (a pipeline trace must keep them as leaf calls).
"""

from __future__ import annotations

import inspect
import math
import types
import warnings
from functools import partial
from typing import Any, Callable, Optional

import torch
import torch.fx
import torch.nn.functional as F
import torch.nn.init as init
from torch import Tensor, nn

MAPPING_NAMES = ("copy_to_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region",
                 "gather_from_tensor_model_parallel_region", "scatter_to_sequence_parallel_region",
                 "scatter_to_tensor_model_parallel_region")


def refuse_proxy(name: str, x: Any) -> None:
    """NxD's collectives are autograd Functions: traced through, an FX proxy reaches code that needs a tensor."""
    if isinstance(x, torch.fx.Proxy):
        raise RuntimeError(f"NxD's {name} was traced into (an FX proxy reached its autograd Function): pass its "
                           "module in the pipeline's autowrap_modules")


def _not_modelled(what: str) -> None:
    raise NotImplementedError(f"the NxD double does not model {what}")


# ---------------------------------------------------------------------------------------- tensor-parallel groups


class SingleRank:
    """Tensor-parallel size 1: every collective is the identity."""

    size, rank = 1, 0

    def all_reduce(self, x: Tensor, op: str = "sum") -> Tensor:
        return x

    def copy_to(self, x: Tensor) -> Tensor:
        return x

    def reduce_from(self, x: Tensor) -> Tensor:
        return x

    def gather(self, x: Tensor, dim: int) -> Tensor:
        return x

    def scatter(self, x: Tensor, dim: int) -> Tensor:
        return x

    def reduce_scatter(self, x: Tensor, dim: int, grad_dtype: Optional[torch.dtype] = None) -> Tensor:
        return x

    def linear(self, x: Tensor, weight: Tensor, async_grad_allreduce: bool, sequence_parallel: bool,
               sequence_dimension: Optional[int], reduce_dtype: torch.dtype) -> Tensor:
        return torch.einsum("...m,mn->...n", x, weight.t())


def _identity_on_one_rank(collective: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """A collective over a group of one rank returns its input (no gloo group of one rank is made)."""
    def run(self: Any, x: Tensor, *args: Any) -> Tensor:
        return x if self.size == 1 else collective(self, x, *args)
    return run


class GlooWorld:
    """The whole gloo world is the tensor-parallel group. Each mapping is an autograd Function whose backward
    issues the collective NxD's does (``mappings.py`` 290-467 at v2.28.0: an all-reduce for a copy, an all-gather
    for a scatter, a split for a gather, an all-gather for a reduce-scatter), and the linear layers' backward
    issues those of NxD's ``LinearWithAsyncCommunication`` (`_LinearWithAsyncCommunication`). Every collective,
    forward or backward, goes through `traced`. They are the doubles' own, so a torch.distributed call recorded
    as our code's (`doubles.neuron_sdk`) is never one the double made."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.size, self.rank = dist.get_world_size(), dist.get_rank()

    @property
    def group(self) -> Any:
        """The gloo group the collectives run over (None: the world)."""
        return None

    def traced(self, kind: str, x: Tensor, backward: bool = False) -> None:
        """Where a collective is recorded (`GridGroup` records into the doubles' log); `backward`: issued by an
        autograd Function's backward."""

    # the collectives over `group`, each recorded where it is issued (`backward`: by a backward)
    def _sum(self, x: Tensor, backward: bool = False) -> Tensor:
        self.traced("all_reduce", x, backward)
        out = x.contiguous().clone()
        self.dist.all_reduce(out, group=self.group)
        return out

    def _sum_in_place(self, x: Tensor, backward: bool = False) -> None:
        """An all-reduce into `x` itself (gloo needs a contiguous buffer; XLA has no strides)."""
        self.traced("all_reduce", x, backward)
        if x.is_contiguous():
            self.dist.all_reduce(x, group=self.group)
        else:
            summed = x.contiguous()
            self.dist.all_reduce(summed, group=self.group)
            x.copy_(summed)

    def _gather(self, x: Tensor, dim: int, backward: bool = False) -> Tensor:
        self.traced("all_gather", x, backward)
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def _reduce_scatter(self, x: Tensor, dim: int, backward: bool = False) -> Tensor:
        """NxD's ``_reduce_scatter_along_dim`` (mappings.py 235-272): its error for a dimension it cannot split;
        gloo has no reduce-scatter here, so a sum, then this rank's block (what the collective leaves)."""
        if x.shape[dim] % self.size:
            raise RuntimeError(f"unable to create {self.size} partitions along dim {dim} of tensor of shape "
                               f"{tuple(x.shape)} due to not being evenly divisible.")
        self.traced("reduce_scatter", x, backward)
        out = x.contiguous().clone()
        self.dist.all_reduce(out, group=self.group)
        return out.chunk(self.size, dim=dim)[self.rank].contiguous()

    def _slice(self, x: Tensor, dim: int) -> Tensor:
        if x.shape[dim] % self.size:
            raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by the tensor-parallel size "
                             f"{self.size}")
        return x.chunk(self.size, dim=dim)[self.rank].contiguous()

    @_identity_on_one_rank
    def all_reduce(self, x: Tensor, op: str = "sum") -> Tensor:
        self.traced("all_reduce", x)
        self.dist.all_reduce(x, op=self.dist.ReduceOp.MAX if op == "max" else self.dist.ReduceOp.SUM,
                             group=self.group)
        return x

    @_identity_on_one_rank
    def copy_to(self, x: Tensor) -> Tensor:
        """``_CopyToModelParallelRegion``: the identity; backward, an all-reduce."""
        return _Mapping.apply(x, lambda t: t.view_as(t), partial(self._sum, backward=True))

    @_identity_on_one_rank
    def reduce_from(self, x: Tensor) -> Tensor:
        """``_ReduceFromModelParallelRegion``: an all-reduce in place; backward, the identity."""
        return _ReduceInPlace.apply(x, self)

    @_identity_on_one_rank
    def gather(self, x: Tensor, dim: int) -> Tensor:
        """``_GatherFromModelParallelRegion``: an all-gather along the last dimension; backward, a split."""
        if dim % x.dim() != x.dim() - 1:
            _not_modelled("a gather along a dimension other than the last")
        return _Mapping.apply(x, partial(self._gather, dim=-1), partial(self._slice, dim=-1))

    @_identity_on_one_rank
    def scatter(self, x: Tensor, dim: int) -> Tensor:
        """``_ScatterToModelParallelRegion`` (last dimension) or ``_ScatterToSequenceParallelRegion``: a split;
        backward, an all-gather."""
        return _Mapping.apply(x, partial(self._slice, dim=dim), partial(self._gather, dim=dim, backward=True))

    @_identity_on_one_rank
    def reduce_scatter(self, x: Tensor, dim: int, grad_dtype: Optional[torch.dtype] = None) -> Tensor:
        """``_ReduceScatterToSequenceParallelRegion`` (437-467): a reduce-scatter; backward, the gradient cast to
        `grad_dtype` (its ``dtype`` argument) when given, then an all-gather."""
        def backward(grad: Tensor) -> Tensor:
            return self._gather(grad if grad_dtype is None else grad.to(grad_dtype), dim, backward=True)
        return _Mapping.apply(x, partial(self._reduce_scatter, dim=dim), backward)

    def linear(self, x: Tensor, weight: Tensor, async_grad_allreduce: bool, sequence_parallel: bool,
               sequence_dimension: Optional[int], reduce_dtype: torch.dtype) -> Tensor:
        """NxD's ``linear_with_async_allreduce`` (layers.py 508-533): at tp = 1 no collective runs, as NxD's bypass
        the group of one (a plain matmul here)."""
        if self.size == 1:
            return torch.einsum("...m,mn->...n", x, weight.t())
        return _LinearWithAsyncCommunication.apply(x, weight, self, async_grad_allreduce, sequence_parallel,
                                                   sequence_dimension, reduce_dtype)


class _Mapping(torch.autograd.Function):
    """One of NxD's mappings: a collective `forward` whose gradient is the collective `backward` of the incoming
    gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, forward: Callable[[Tensor], Tensor], backward: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.backward_collective = backward
        return forward(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.backward_collective(grad), None, None


class _LinearWithAsyncCommunication(torch.autograd.Function):
    """NxD's ``LinearWithAsyncCommunication`` (layers.py 435-505, with ``layers_utils.py`` 16-140 at v2.28.0), the
    matmul of both parallel linear layers, no bias (the layers add theirs).

    Forward: with sequence parallelism the input is all-gathered along the sequence dimension first. Backward,
    in NxD's order: with sequence parallelism the saved (local) input is all-gathered again for the weight
    gradient; without it and with ``async_grad_allreduce`` (a column-parallel layer at tp > 1) the input gradient
    is cast to ``reduce_dtype`` and all-reduced *into that cast*; with sequence parallelism the input gradient is
    cast to ``reduce_dtype``, reduce-scattered and cast back. When the cast is a copy (a bf16 layer with NxD's
    fp32 default), NxD's all-reduce lands in the copy, which ``_linear_autograd_bwd_grad_reduce`` drops (it
    rebinds its own local name, 98-102): the layer's input gradient stays this rank's partial sum, as here."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, tp: Any, async_grad_allreduce: bool, sequence_parallel: bool,
                sequence_dimension: Optional[int], reduce_dtype: torch.dtype) -> Tensor:
        ctx.tp, ctx.async_grad_allreduce, ctx.sequence_parallel = tp, async_grad_allreduce, sequence_parallel
        ctx.sequence_dimension, ctx.reduce_dtype = sequence_dimension, reduce_dtype
        ctx.save_for_backward(x, weight)
        total = tp._gather(x, sequence_dimension) if sequence_parallel else x
        return torch.einsum("...m,mn->...n", total, weight.t())

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        tp, total, (x, weight) = ctx.tp, None, ctx.saved_tensors
        weight_grad = weight.requires_grad  # NxD's compute_weight_gradient
        if weight_grad:
            total = tp._gather(x, ctx.sequence_dimension, backward=True) if ctx.sequence_parallel else x
        grad_input = grad_output.matmul(weight)
        original = grad_input.dtype
        if ctx.async_grad_allreduce:  # reduces `grad_input` itself only when the cast is no copy
            tp._sum_in_place(grad_input.to(ctx.reduce_dtype), backward=True)
        grad_weight = None
        if weight_grad:  # NxD views 3-d tensors as 2-d (reshape: an XLA tensor has no strides to refuse a view)
            flat_out = grad_output.reshape(-1, grad_output.shape[-1]) if grad_output.dim() == 3 else grad_output
            flat_in = total.reshape(-1, total.shape[-1]) if total.dim() == 3 else total
            grad_weight = flat_out.t().matmul(flat_in)
        if ctx.sequence_parallel:
            grad_input = tp._reduce_scatter(grad_input.to(ctx.reduce_dtype), ctx.sequence_dimension,
                                            backward=True).to(original)
        return grad_input, grad_weight, None, None, None, None, None


class GridGroup(GlooWorld):
    """This rank's tensor-parallel group in NxD's grid (`doubles.env.Env`, set by ``initialize_model_parallel``),
    read when a layer is built or runs: tp = 1 (or no grid yet) is `SingleRank`'s identity; at tp > 1 the
    collectives run over the gloo group of this rank's tensor-parallel replica group and each one, forward or
    backward, is traced into the pending graph (as NxD's ``xm`` collectives are: forward and backward of a
    micro-batch are one XLA graph), a backward's with a last ``"backward"`` field (the doubles' own mark)."""

    def __init__(self, env: Any) -> None:
        import torch.distributed as dist

        self.dist, self.env = dist, env

    @property
    def initialized(self) -> bool:
        """Whether NxD's parallel state is up (``model_parallel_is_initialized``)."""
        return bool(self.env.grid)

    @property
    def size(self) -> int:  # type: ignore[override]
        return self.env.grid.get("tp", 1)

    @property
    def rank(self) -> int:  # type: ignore[override]
        return self.env.group_index("tp")[1]

    @property
    def group(self) -> Any:
        return self.env.group_of(self.env.group_index("tp")[0])

    def traced(self, kind: str, x: Tensor, backward: bool = False) -> None:
        self.env.log.trace(kind, self.env.replica_groups["tp"], tuple(x.shape), x.dtype,
                           *(("backward",) if backward else ()))


class _ReduceInPlace(torch.autograd.Function):
    """NxD's ``reduce_from_tensor_model_parallel_region``: an all-reduce *in place* (NxD's ``comm.all_reduce``)."""

    @staticmethod
    def forward(ctx, x: Tensor, tp: Any) -> Tensor:
        tp._sum_in_place(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


# ---------------------------------------------------------------------------------------- layers


def _set_parallel_attributes(tensor: Tensor, dim: int, num_partitions: int) -> None:
    """What NxD's ``set_tensor_model_parallel_attributes`` leaves on a sharded parameter."""
    tensor.tensor_model_parallel, tensor.partition_dim, tensor.partition_stride = True, dim, 1
    tensor.num_partitions, tensor.rank_ordering = num_partitions, None


def _local_init(param: Tensor, dim: int, tp: Any, init_method: Callable[[Tensor], Any]) -> None:
    """NxD's CPU initialisation: the whole fp32 master tensor, `init_method`, cast, this rank's block."""
    shape = list(param.shape)
    shape[dim] *= tp.size
    master = torch.empty(shape, dtype=torch.float32)
    init_method(master)
    with torch.no_grad():
        param.copy_(master.to(param.dtype).chunk(tp.size, dim=dim)[tp.rank])
    _set_parallel_attributes(param, dim, tp.size)


def _kaiming(weight: Tensor) -> None:
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class _Recorded(nn.Module):
    """Records ``(kind, args, kwargs)`` of every construction into the class's ``built`` list."""

    kind = ""
    built: list = []
    tp: Any = SingleRank()

    def __init__(self) -> None:
        super().__init__()
        if not getattr(self.tp, "initialized", True):
            _fall_back_to_one_rank()

    def _record(self, args: tuple, given: dict, signature: Any) -> None:
        """Append ``(kind, args, the keyword arguments that differ from NxD's defaults)``."""
        changed = {k: v for k, v in given.items() if not _is_default(v, signature[k].default)}
        self.built.append((self.kind, args, changed))


def _fall_back_to_one_rank() -> None:
    """NxD's ``BaseParallelLayer`` built before ``initialize_model_parallel`` (layers.py 174-183): a warning, then
    ``initialize_fallback_parallel_state`` (utils.py 318-335), whose ``init_process_group(world_size=1, rank=0)``
    torch refuses when a process group exists, as it does in every run of ours (``NeuronRuntime.start``)."""
    import torch.distributed as dist

    warnings.warn("Parallel state is not initialized. Falling back to non-parallel equivalent.", UserWarning,
                  stacklevel=3)
    if dist.is_initialized():
        raise ValueError("trying to initialize the default process group twice!")
    _not_modelled("NxD's one-rank fallback state (a parallel layer built before any process group)")


def _is_default(value: Any, default: Any) -> bool:
    if value is default:
        return True
    return type(value) is type(default) and not callable(value) and value == default


class ParallelEmbedding(_Recorded):
    kind = "embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None,
                 max_norm: Optional[float] = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 sparse: bool = False, init_method: Callable[[Any], Any] = init.normal_,
                 device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32,
                 shard_across_embedding: bool = False, pad: bool = False, sequence_parallel_enabled: bool = False,
                 tensor_model_parallel_group: Any = None, use_spmd_rank: bool = False,
                 sequence_dimension: Optional[int] = None, tile_cc: bool = False, rank_ordering: Optional[list] = None,
                 collect_output: bool = True) -> None:
        super().__init__()
        given = {k: v for k, v in locals().items() if k not in ("self", "__class__", "num_embeddings", "embedding_dim")}
        self._record((num_embeddings, embedding_dim), given, _EMBEDDING_DEFAULTS)
        if (shard_across_embedding or pad or use_spmd_rank or tile_cc or rank_ordering is not None
                or tensor_model_parallel_group is not None or not collect_output or device is not None
                or padding_idx is not None or max_norm is not None or sparse or scale_grad_by_freq):
            _not_modelled("ParallelEmbedding beyond a vocabulary-sharded lookup on the CPU")
        tp = self.tp
        if num_embeddings % tp.size:
            raise AssertionError(f"{num_embeddings} is not divisible by {tp.size}")
        per_rank = num_embeddings // tp.size
        self.start_index, self.end_index = tp.rank * per_rank, (tp.rank + 1) * per_rank
        self.dtype, self.tensor_model_parallel_size = dtype, tp.size
        self.sequence_parallel_enabled, self.sequence_dim = sequence_parallel_enabled, sequence_dimension
        self.weight = nn.Parameter(torch.empty(per_rank, embedding_dim, dtype=dtype))
        _local_init(self.weight, 0, tp, init_method)

    def forward(self, input_: Tensor) -> Tensor:
        tp = self.tp
        if tp.size > 1:
            mask = (input_ >= self.start_index) & (input_ < self.end_index)
            local = (input_.clone() - self.start_index) * mask.long()
        else:
            local = input_
        out = F.embedding(local.long(), self.weight)
        if tp.size > 1:  # NxD's cast: fp32 stays fp32, any other dtype becomes bf16
            if self.dtype == torch.float32:
                out = (out * mask.float().unsqueeze(-1)).to(self.dtype)
            else:
                out = (out * mask.bfloat16().unsqueeze(-1)).to(torch.bfloat16)
        if self.sequence_parallel_enabled:
            if self.sequence_dim:
                return out  # NxD returns the un-reduced lookup here
            return tp.reduce_scatter(out.transpose(0, 1).contiguous(), 0)
        return tp.reduce_from(out)


_EMBEDDING_DEFAULTS = inspect.signature(ParallelEmbedding.__init__).parameters


# NxD's words (layers.py 646-647, 896-897) when sequence parallelism is on without a sequence dimension
_NO_SEQUENCE_DIMENSION = ("`sequence_parallel_enabled` is set to `True`, but got `sequence_dimension` as `None`. "
                          "Defaulting `sequence_dimension` to 0.")


class ColumnParallelLinear(_Recorded):
    kind = "column"

    def __init__(self, input_size: int, output_size: int, bias: bool = True, gather_output: bool = True,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None, stride: int = 1,
                 init_method: Optional[Callable[[Any], Tensor]] = None, sequence_parallel_enabled: bool = False,
                 sequence_dimension: Optional[int] = None, keep_master_weight: bool = False,
                 skip_bias_add: bool = False, pad: bool = False, pad_alignment_size_per_rank: int = 1,
                 keep_padded_output: bool = False, tensor_model_parallel_group: Any = None,
                 reduce_dtype: torch.dtype = torch.float32, rank_ordering: Optional[list] = None) -> None:
        super().__init__()
        given = {k: v for k, v in locals().items() if k not in ("self", "__class__", "input_size", "output_size")}
        self._record((input_size, output_size), given, _COLUMN_DEFAULTS)
        if (device is not None or stride != 1 or keep_master_weight or skip_bias_add or pad or keep_padded_output
                or tensor_model_parallel_group is not None or rank_ordering is not None):
            _not_modelled("ColumnParallelLinear beyond a plain sharded linear on the CPU")
        tp = self.tp
        if sequence_parallel_enabled and tp.size <= 1:  # NxD's constructor (layers.py 641-643): sp over one rank
            warnings.warn(f"`sequence_parallel_enabled` is set to `True`, but got world_size of {tp.size}")
        if sequence_parallel_enabled and sequence_dimension is None:
            warnings.warn(_NO_SEQUENCE_DIMENSION)  # layers.py 645-649
            sequence_dimension = 0
        if output_size % tp.size:
            raise AssertionError(f"{output_size} is not divisible by {tp.size}")
        self.gather_output, self.dtype = gather_output, dtype
        self.reduce_dtype = reduce_dtype if reduce_dtype is not None else dtype  # NxD: None means dtype
        self.sequence_parallel_enabled, self.sequence_dimension = sequence_parallel_enabled, sequence_dimension
        self.weight = nn.Parameter(torch.empty(output_size // tp.size, input_size, dtype=dtype))
        _local_init(self.weight, 0, tp, init_method or _kaiming)
        self.bias = None
        if bias:
            size = output_size if gather_output else output_size // tp.size
            self.bias = nn.Parameter(torch.empty(size, dtype=dtype))
            bound = 1 / math.sqrt(input_size) if input_size > 0 else 0  # NxD: 1 / sqrt(fan_in of the weight)
            nn.init.uniform_(self.bias, -bound, bound)
            if not gather_output:
                _set_parallel_attributes(self.bias, 0, tp.size)

    def forward(self, input: Tensor, slice_indices: Optional[Tensor] = None) -> Tensor:
        if slice_indices is not None:
            _not_modelled("slice_indices")
        tp = self.tp
        # NxD (layers.py 640, 803-813): at tp > 1 the input gradient's all-reduce (or, with sequence parallelism,
        # the all-gather and reduce-scatter) belong to the matmul's autograd Function; at tp = 1, a copy
        async_grad_allreduce = not self.sequence_parallel_enabled and tp.size > 1
        x = input if async_grad_allreduce or self.sequence_parallel_enabled else tp.copy_to(input)
        out = tp.linear(x, self.weight, async_grad_allreduce, self.sequence_parallel_enabled, self.sequence_dimension,
                        self.reduce_dtype)
        if self.gather_output:
            assert not self.sequence_parallel_enabled  # NxD's forward (layers.py 794), not its constructor
            out = tp.gather(out, -1)
        return out if self.bias is None else out + self.bias


_COLUMN_DEFAULTS = inspect.signature(ColumnParallelLinear.__init__).parameters


class RowParallelLinear(_Recorded):
    kind = "row"

    def __init__(self, input_size: int, output_size: int, bias: bool = True, input_is_parallel: bool = False,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None, stride: int = 1,
                 init_method: Optional[Callable[..., Any]] = None, sequence_parallel_enabled: bool = False,
                 sequence_dimension: Optional[int] = None, keep_master_weight: bool = False,
                 skip_bias_add: bool = False, pad: bool = False, reduce_output: bool = True,
                 tensor_model_parallel_group: Any = None, reduce_dtype: torch.dtype = torch.float32,
                 tile_cc: bool = False, rank_ordering: Optional[list] = None) -> None:
        super().__init__()
        given = {k: v for k, v in locals().items() if k not in ("self", "__class__", "input_size", "output_size")}
        self._record((input_size, output_size), given, _ROW_DEFAULTS)
        if (device is not None or stride != 1 or keep_master_weight or skip_bias_add or pad or not reduce_output
                or tensor_model_parallel_group is not None or tile_cc or rank_ordering is not None):
            _not_modelled("RowParallelLinear beyond a plain sharded linear on the CPU")
        tp = self.tp
        if sequence_parallel_enabled and not input_is_parallel:
            raise RuntimeError("To enable `sequence_parallel_enabled`, `input_is_parallel` must be `True`")
        if sequence_parallel_enabled and sequence_dimension is None:
            warnings.warn(_NO_SEQUENCE_DIMENSION)  # layers.py 894-898
            sequence_dimension = 0
        if input_size % tp.size:
            raise AssertionError(f"{input_size} is not divisible by {tp.size}")
        self.input_is_parallel, self.dtype = input_is_parallel, dtype
        self.reduce_dtype = reduce_dtype if reduce_dtype is not None else dtype  # NxD: None means dtype
        self.sequence_parallel_enabled, self.sequence_dimension = sequence_parallel_enabled, sequence_dimension
        self.weight = nn.Parameter(torch.empty(output_size, input_size // tp.size, dtype=dtype))
        _local_init(self.weight, 1, tp, init_method or _kaiming)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size, dtype=dtype))
            bound = 1 / math.sqrt(input_size // tp.size) if input_size else 0  # NxD: this rank's input features
            nn.init.uniform_(self.bias, -bound, bound)
            self.bias.sequence_parallel_enabled = sequence_parallel_enabled

    def forward(self, input_: Tensor, slice_indices: Optional[Tensor] = None) -> Tensor:
        if slice_indices is not None:
            _not_modelled("slice_indices")
        tp = self.tp
        x = input_ if self.input_is_parallel else tp.scatter(input_, -1)
        out = tp.linear(x, self.weight, False, False, self.sequence_dimension, self.reduce_dtype)
        original = out.dtype
        out = out.to(self.reduce_dtype)
        if self.sequence_parallel_enabled:  # layers.py 1036-1044: the gradient cast back before its all-gather
            out = tp.reduce_scatter(out, self.sequence_dimension, original)
        else:
            out = tp.reduce_from(out)
        out = out.to(original)
        return out if self.bias is None else out + self.bias


_ROW_DEFAULTS = inspect.signature(RowParallelLinear.__init__).parameters


# ---------------------------------------------------------------------------------------- loss


class _ParallelCrossEntropy(torch.autograd.Function):
    """NxD's vocabulary-parallel cross-entropy, including the in-place shift of its input."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, label_smoothing: float, tp: Any) -> Tensor:
        row_max = tp.all_reduce(torch.max(logits, dim=-1)[0], "max")
        logits.sub_(row_max.unsqueeze(-1))  # in place, as NxD: the caller's tensor changes
        vocab = logits.shape[-1]
        start = tp.rank * vocab
        mine = (target >= start) & (target < start + vocab)
        index = (target.clone() - start) * mine.long()
        flat = logits.view(-1, vocab)
        picked = flat[torch.arange(flat.shape[0]), index.view(-1)].clone().view_as(target)
        picked = tp.all_reduce(picked * mine.float())
        exp = torch.exp(logits)
        total = tp.all_reduce(exp.sum(dim=-1))
        loss = torch.log(total) - picked
        exp.div_(total.unsqueeze(-1))
        ctx.save_for_backward(exp, mine, index.view(-1))
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        softmax, mine, index = ctx.saved_tensors
        vocab = softmax.shape[-1]
        grad_2d = softmax.view(-1, vocab)
        grad_2d[torch.arange(grad_2d.shape[0]), index] -= mine.view(-1).float()
        softmax.mul_(grad.unsqueeze(-1))
        return softmax, None, None, None


# ---------------------------------------------------------------------------------------- modules


def make(tp: Any, built: list, fake_module: Callable[..., types.ModuleType], **state: Callable
         ) -> dict[str, types.ModuleType]:
    """NxD's ``layers``, ``mappings``, ``loss_functions``, ``grads`` and ``parallel_state`` modules over `tp`.

    Every layer built is appended to `built` as ``(kind, args, keyword arguments other than the defaults)``;
    `state` adds functions to (or replaces them in) ``parallel_state``.
    """
    bound = {name: type(name, (cls,), {"tp": tp, "built": built})
             for name, cls in (("ParallelEmbedding", ParallelEmbedding), ("ColumnParallelLinear", ColumnParallelLinear),
                               ("RowParallelLinear", RowParallelLinear))}

    def copy_to_tensor_model_parallel_region(input_: Tensor, process_group: Any = None) -> Tensor:
        refuse_proxy("copy_to_tensor_model_parallel_region", input_)
        return tp.copy_to(input_)

    def reduce_from_tensor_model_parallel_region(input_: Tensor, process_group: Any = None) -> Tensor:
        refuse_proxy("reduce_from_tensor_model_parallel_region", input_)
        return tp.reduce_from(input_)

    def gather_from_tensor_model_parallel_region(input_: Tensor, process_group: Any = None) -> Tensor:
        refuse_proxy("gather_from_tensor_model_parallel_region", input_)
        return tp.gather(input_, -1)

    def scatter_to_sequence_parallel_region(input_: Tensor, sequence_dimension: int = 0,
                                            process_group: Any = None) -> Tensor:
        refuse_proxy("scatter_to_sequence_parallel_region", input_)
        return tp.scatter(input_, sequence_dimension)

    def scatter_to_tensor_model_parallel_region(input_: Tensor, process_group: Any = None) -> Tensor:
        refuse_proxy("scatter_to_tensor_model_parallel_region", input_)
        return tp.scatter(input_, -1)

    def parallel_cross_entropy(vocab_parallel_logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
        refuse_proxy("parallel_cross_entropy", vocab_parallel_logits)
        if label_smoothing:
            _not_modelled("label smoothing")
        return _ParallelCrossEntropy.apply(vocab_parallel_logits, target, label_smoothing, tp)

    def allreduce_sequence_parallel_gradients(optimizer: Any) -> None:
        # NxD (grads.py 330-346): the groups from ``optimizer.__getstate__()`` (NxDOptimizer's is the wrapped
        # optimizer's); the gradient, or the ZeRO-1 hooks' main_grad when they took it
        for group in optimizer.__getstate__()["param_groups"]:
            for p in group["params"]:
                if getattr(p, "sequence_parallel_enabled", False):
                    if p.grad is not None:
                        tp.all_reduce(p.grad)
                    elif hasattr(p, "main_grad"):
                        tp.all_reduce(p.main_grad)

    mappings = {f.__name__: f for f in (copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region,
                                        gather_from_tensor_model_parallel_region, scatter_to_sequence_parallel_region,
                                        scatter_to_tensor_model_parallel_region)}
    parallel_state = {"get_tensor_model_parallel_size": lambda: tp.size, "get_tensor_model_parallel_rank": lambda: tp.rank,
                      **state}
    prefix = "neuronx_distributed.parallel_layers"
    return {
        f"{prefix}.layers": fake_module(f"{prefix}.layers", **bound),
        f"{prefix}.mappings": fake_module(f"{prefix}.mappings", **mappings),
        f"{prefix}.loss_functions": fake_module(f"{prefix}.loss_functions",
                                                parallel_cross_entropy=parallel_cross_entropy),
        f"{prefix}.grads": fake_module(f"{prefix}.grads",
                                       allreduce_sequence_parallel_gradients=allreduce_sequence_parallel_gradients),
        f"{prefix}.parallel_state": fake_module(f"{prefix}.parallel_state", **parallel_state),
    }
