"""Mamba-2 mixer (SSD: scalar decay per head, chunked scan).

Pipeline: ``in_proj_{z,x,bc,dt}`` -> causal depthwise convs on x and on (B, C)
(+SiLU) -> SSD scan (``+ D x``) -> gated RMSNorm with ``silu(z)`` (grouped by
``ssm_n_groups``) -> ``out_proj``.

Tensor-parallel layout: one column-parallel projection per segment of Mamba-2's fused
``in_proj``; heads, channels and B/C groups are split over ranks (per-head tensors
``A_log``, ``D``, ``dt_bias`` and the convs are created at their local size).
``in_proj_bc`` orders its outputs group-major, ``[B_0, C_0, B_1, C_1, ...]`` (each
N wide), so a contiguous column shard holds whole groups with both their B and C;
the norm is per group, so sharding never changes the result. ``dt_bias`` is a
separate parameter handed to the scan (``dt_softplus=True``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bmojo_neuron import ops
from bmojo_neuron.configuration_bmojo import BMojoConfig
from bmojo_neuron.layers.compiled_step import CompiledOrEager, compiled_decode_enabled
from bmojo_neuron.layers.decode_pack import linear_weights, packed, plain_linears
from bmojo_neuron.layers.factory import check_tp_split, get_layer_factory
from bmojo_neuron.layers.mamba1 import _mark_no_weight_decay, _wide, init_dt_bias_
from bmojo_neuron.layers.norms import GatedRMSNorm
from bmojo_neuron.layers.ssm_state import SSMState, causal_conv1d_step, depthwise_conv

__all__ = ["Mamba2Mixer"]


class Mamba2Mixer(nn.Module):
    """Mamba-2 mixer: (batch, L, hidden) -> (batch, L, hidden), optionally with a decode `SSMState`."""

    def __init__(self, config: BMojoConfig, layer_idx: int | None = None) -> None:
        super().__init__()
        factory = get_layer_factory()
        tp = factory.tp_size
        self.config = config
        self.layer_idx = layer_idx
        self.tp_size = tp
        d, d_inner = config.hidden_size, config.ssm_inner_size
        heads, groups = config.ssm_num_heads, config.ssm_n_groups
        check_tp_split("ssm_num_heads", heads, tp)
        check_tp_split("ssm_n_groups", groups, tp)
        self.d_inner = d_inner
        self.head_dim = config.ssm_head_dim
        self.state_size = config.ssm_state_size
        self.conv_kernel = config.ssm_conv_kernel
        self.chunk_size = config.ssm_chunk_size
        self.num_heads_local = heads // tp
        self.n_groups_local = groups // tp
        self.d_inner_local = self.num_heads_local * self.head_dim
        bc_local = 2 * self.n_groups_local * self.state_size
        bias = config.ssm_proj_bias

        self.in_proj_z = factory.column_linear(d, d_inner, bias=bias)
        self.in_proj_x = factory.column_linear(d, d_inner, bias=bias)
        self.in_proj_bc = factory.column_linear(d, 2 * groups * self.state_size, bias=bias)
        self.in_proj_dt = factory.column_linear(d, heads, bias=bias)
        self.conv_x = depthwise_conv(self.d_inner_local, self.conv_kernel, config.ssm_conv_bias)
        self.conv_bc = depthwise_conv(bc_local, self.conv_kernel, config.ssm_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads_local))
        self.A_log = nn.Parameter(torch.empty(self.num_heads_local))
        self.D = nn.Parameter(torch.empty(self.num_heads_local))
        self.norm = GatedRMSNorm(self.d_inner_local, group_size=d_inner // groups, eps=config.rms_norm_eps)
        self.out_proj = factory.row_linear(d_inner, d, bias=bias)
        _mark_no_weight_decay(self.dt_bias, self.A_log, self.D)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """mamba_ssm init of the SSM-specific weights; idempotent, so the model's init may call it again.

        dt_bias: inverse-softplus of a log-uniform dt; A_log = log(U[A_init_range]) per
        head; D = 1; norm weight = 1; convs: torch default.
        """
        cfg = self.config
        init_dt_bias_(self.dt_bias, cfg.ssm_dt_min, cfg.ssm_dt_max, cfg.ssm_dt_init_floor)
        low, high = cfg.ssm_A_init_range
        a = torch.empty(self.num_heads_local, dtype=torch.float64, device=self.A_log.device).uniform_(low, high)
        self.A_log.copy_(torch.log(a))
        self.D.fill_(1.0)
        self.norm.reset_parameters()
        self.conv_x.reset_parameters()
        self.conv_bc.reset_parameters()

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> SSMState:
        """Empty decode state: conv state in ``dtype``, SSM state (batch, H, P, N) in fp32 (or wider).

        The two convs (x, and B/C) share one conv state, ``conv_states["xbc"]`` (batch,
        x channels + B/C channels, K - 1), x's channels first: the decode step runs them as
        one conv.
        """
        width = self.conv_kernel - 1
        channels = self.conv_x.in_channels + self.conv_bc.in_channels
        conv_states = {"xbc": torch.zeros(batch_size, channels, width, device=device, dtype=dtype)}
        ssm = torch.zeros(
            batch_size,
            self.num_heads_local,
            self.head_dim,
            self.state_size,
            device=device,
            dtype=torch.promote_types(dtype, torch.float32),
        )
        return SSMState(conv_states=conv_states, ssm_state=ssm, counter=torch.zeros((), dtype=torch.long, device=device))

    def _split_bc(self, bc: Tensor) -> tuple[Tensor, Tensor]:
        """(..., G*2*N) group-major -> B, C each (..., G, N).

        One `unbind`, not two selects: its backward stacks both gradients in one pass, where each select's
        would zero a tensor of the whole input, copy its half in, and the two would be added.
        """
        return bc.unflatten(-1, (self.n_groups_local, 2, self.state_size)).unbind(-2)

    def forward(self, hidden_states: Tensor, state: SSMState | None = None) -> Tensor:
        """Parallel forward; with ``state`` also continue from and update it.

        With a state, one token runs the recurrent step; several tokens run the chunked
        scan started from the state (conv prefixes + initial SSM state), which equals
        stepping token by token and also covers prefill of a fresh state.
        """
        if state is not None and hidden_states.shape[1] == 1:
            return self.step(hidden_states[:, 0], state).unsqueeze(1)
        z = self.in_proj_z(hidden_states)
        batch, length, _ = z.shape  # whole sequence (the input may be a sequence-parallel shard)
        dt = self.in_proj_dt(hidden_states)  # (batch, L, H)
        x_prefix = bc_prefix = None
        if state is not None:
            x_prefix, bc_prefix = state.conv_states["xbc"].split([self.d_inner_local, self.conv_bc.in_channels], 1)
        # The convs (with their SiLU) run on the projections' time-major rows (batch, L, channels).
        x, x_tail = ops.causal_conv1d_rows(self.in_proj_x(hidden_states), self.conv_x.weight, self.conv_x.bias,
                                           x_prefix, silu=True)
        bc, bc_tail = ops.causal_conv1d_rows(self.in_proj_bc(hidden_states), self.conv_bc.weight, self.conv_bc.bias,
                                             bc_prefix, silu=True)
        x = x.reshape(batch, length, self.num_heads_local, self.head_dim)
        B, C = self._split_bc(bc)
        out = ops.ssd_scan(
            x,
            dt,
            -torch.exp(_wide(self.A_log)),
            B,
            C,
            chunk_size=self.chunk_size,
            D=self.D,
            dt_bias=self.dt_bias,
            dt_softplus=True,
            initial_state=state.ssm_state if state is not None else None,
            return_final_state=state is not None,
        )
        if state is not None:
            y, final = out
            state.conv_states["xbc"] = torch.cat([x_tail, bc_tail], dim=1)
            state.ssm_state = final.contiguous()  # the layout every decode step writes into
            state.counter.add_(length)
        else:
            y = out
        y = self.norm(y.reshape(batch, length, self.d_inner_local), z)
        return self.out_proj(y)

    def step(self, h: Tensor, state: SSMState) -> Tensor:
        """One decoding token, as rows: h (batch, hidden) -> (batch, hidden); advances `state`.

        At one token per step the per-op overhead, not the arithmetic, is the cost, so the
        step stays on (batch, features) rows and takes views, never reshapes or copies. The
        four input projections run as one product over packed weights (`decode_pack`) and the
        two convs as one; where a pack does not apply (autograd on, sharded or wrapped
        projections) the step runs the projections one by one. With
        ``BMOJO_COMPILE_DECODE=1`` it runs compiled (`layers.compiled_step`).
        """
        conv_state, ssm_state = state.conv_states["xbc"], state.ssm_state
        pack = None if torch.compiler.is_compiling() or compiled_decode_enabled() else packed(self, "_decode_packed", state, self._pack_sources,
                                                              self._build_pack)
        if pack is None:  # compiled, under autograd, or projections that are not plain linears
            out, conv_state, ssm_state = _STEP(self, h, conv_state, ssm_state)
        else:
            weight, bias, conv_weight, conv_bias, A = pack
            out, conv_state, ssm_state = self._step_from(
                F.linear(h, weight, bias), conv_weight, conv_bias, A, conv_state, ssm_state, plain_out=True
            )
        state.store_step("xbc", conv_state, ssm_state)
        return out

    def _pack_sources(self) -> list[Tensor | None]:
        """What `_build_pack` reads."""
        modules = (self.in_proj_z, self.in_proj_x, self.in_proj_bc, self.in_proj_dt, self.conv_x, self.conv_bc)
        return [t for m in modules for t in (m.weight, m.bias)] + [self.A_log, self.out_proj.weight]

    def _build_pack(self) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor] | None:
        """The input projections as one weight (z, x, B/C, dt rows) and bias, then `_conv_and_decay`; None unless
        the projections (out_proj too) are plain linears."""
        linears = (self.in_proj_z, self.in_proj_x, self.in_proj_bc, self.in_proj_dt)
        if not plain_linears(*linears, self.out_proj):
            return None
        return (*linear_weights(*linears), *self._conv_and_decay())

    def _conv_and_decay(self) -> tuple[Tensor, Tensor | None, Tensor]:
        """Both convs' weights as one (x channels + B/C channels, K), their biases, and A = -exp(A_log)."""
        weight = torch.cat([self.conv_x.weight, self.conv_bc.weight]).squeeze(1)
        bias = None if self.conv_x.bias is None else torch.cat([self.conv_x.bias, self.conv_bc.bias])
        return weight, bias, -torch.exp(_wide(self.A_log))

    def _step_rows(self, h: Tensor, conv_state: Tensor, ssm_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The step as a pure function, projection by projection: output and the new conv and SSM states
        (nothing is written). What the compiled step captures, and the step under autograd."""
        zxbcdt = torch.cat([self.in_proj_z(h), self.in_proj_x(h), self.in_proj_bc(h), self.in_proj_dt(h)], dim=-1)
        return self._step_from(zxbcdt, *self._conv_and_decay(), conv_state, ssm_state)

    def _step_from(self, zxbcdt: Tensor, conv_weight: Tensor, conv_bias: Tensor | None, A: Tensor,
                   conv_state: Tensor, ssm_state: Tensor, plain_out: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """The step after the input projections: `zxbcdt` (batch, z | x | B/C | dt) -> output, new conv and SSM
        states. `plain_out`: out_proj is a plain linear, called as its weight product."""
        batch = zxbcdt.shape[0]
        d_inner, bc_width = self.d_inner_local, self.conv_bc.in_channels
        xbc, conv_state = causal_conv1d_step(zxbcdt.narrow(1, d_inner, d_inner + bc_width), conv_weight, conv_bias,
                                             conv_state)
        xbc = F.silu(xbc)
        bc = xbc.narrow(1, d_inner, bc_width).view(batch, self.n_groups_local, 2, self.state_size)  # [B_g, C_g]
        y, ssm_state = ops.ssd_state_update(
            ssm_state,
            xbc.narrow(1, 0, d_inner).view(batch, self.num_heads_local, self.head_dim),
            zxbcdt.narrow(1, 2 * d_inner + bc_width, self.num_heads_local),
            A,
            bc.select(2, 0),
            bc.select(2, 1),
            D=self.D,
            dt_bias=self.dt_bias,
            dt_softplus=True,
        )
        y = self.norm.rows(y.view(batch, d_inner), zxbcdt.narrow(1, 0, d_inner))
        out = F.linear(y, self.out_proj.weight, self.out_proj.bias) if plain_out else self.out_proj(y)
        return out, conv_state, ssm_state


_STEP = CompiledOrEager(Mamba2Mixer._step_rows)
