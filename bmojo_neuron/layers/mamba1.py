"""Mamba-1 mixer (selective SSM with per-channel, per-state decay).

Pipeline: ``in_proj_x``/``in_proj_z`` -> causal depthwise conv on x (+SiLU) ->
``x_proj`` -> (dt, B, C) -> selective scan (``+ D x``, ``* silu(z)``) -> ``out_proj``.

Tensor-parallel layout: Mamba's fused ``in_proj`` is split into one projection per
segment, so each can be column-sharded over channels without mixing segments; every
per-channel tensor (conv, ``dt_bias``, ``A_log``, ``D``) is created at its local size
``d_inner / tp_size``. ``x_proj`` reads the (sharded) channels and produces the small
shared (dt_rank + 2N) vector, so it is row-parallel (its partial sums are reduced);
on one device that is a plain linear. The dt bias is the separate ``dt_bias``
parameter (``dt_proj`` has no bias) and is passed to the scan as ``delta_bias`` with
``delta_softplus=True``, exactly as mamba_ssm passes ``dt_proj.bias``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bmojo_neuron import ops
from bmojo_neuron.configuration_bmojo import BMojoConfig
from bmojo_neuron.layers.factory import check_tp_split, get_layer_factory
from bmojo_neuron.layers.ssm_state import SSMState, causal_conv1d, causal_conv1d_step, depthwise_conv

__all__ = ["Mamba1Mixer", "init_dt_bias_"]


def init_dt_bias_(dt_bias: Tensor, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
    """Fill ``dt_bias`` so that ``softplus(dt_bias)`` is log-uniform in [dt_min, dt_max] (mamba_ssm init).

    Must run under ``torch.no_grad()`` (the caller's job) as it writes a leaf in place.
    """
    rand = torch.rand(dt_bias.shape, device=dt_bias.device, dtype=torch.float64)
    dt = torch.exp(rand * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
    dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus


def _wide(t: Tensor) -> Tensor:
    """Upcast half-precision parameters to fp32 (keep fp32/fp64 as they are)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _mark_no_weight_decay(*params: nn.Parameter) -> None:
    for p in params:
        p._no_weight_decay = True  # mamba_ssm convention; the optimizer also matches by name


class Mamba1Mixer(nn.Module):
    """Mamba-1 mixer: (batch, L, hidden) -> (batch, L, hidden), optionally with a decode `SSMState`."""

    def __init__(self, config: BMojoConfig, layer_idx: int | None = None) -> None:
        super().__init__()
        factory = self.factory = get_layer_factory()
        self.config = config
        self.layer_idx = layer_idx
        self.tp_size = factory.tp_size
        d, d_inner = config.hidden_size, config.ssm_inner_size
        check_tp_split("ssm_inner_size", d_inner, self.tp_size)
        self.d_inner = d_inner
        self.d_inner_local = d_inner // self.tp_size
        self.state_size = config.ssm_state_size
        self.dt_rank = config.ssm_dt_rank
        self.conv_kernel = config.ssm_conv_kernel
        bias = config.ssm_proj_bias

        self.in_proj_x = factory.column_linear(d, d_inner, bias=bias)
        self.in_proj_z = factory.column_linear(d, d_inner, bias=bias)
        self.conv_x = depthwise_conv(self.d_inner_local, self.conv_kernel, config.ssm_conv_bias)
        # x_proj and dt_proj work inside the mixer on the whole sequence: never sequence-sharded.
        self.x_proj = factory.row_linear(d_inner, self.dt_rank + 2 * self.state_size, bias=False, sequence_parallel=False)
        self.dt_proj = factory.column_linear(self.dt_rank, d_inner, bias=False, sequence_parallel=False)
        self.dt_bias = nn.Parameter(torch.empty(self.d_inner_local))
        self.A_log = nn.Parameter(torch.empty(self.d_inner_local, self.state_size))
        self.D = nn.Parameter(torch.empty(self.d_inner_local))
        self.out_proj = factory.row_linear(d_inner, d, bias=bias)
        _mark_no_weight_decay(self.dt_bias, self.A_log, self.D)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """mamba_ssm init of the SSM-specific weights; idempotent, so the model's init may call it again.

        dt_bias: inverse-softplus of a log-uniform dt; A_log = log(1..N) per channel
        (S4D-real); D = 1; dt_proj weight ~ U(+-dt_rank^-0.5); conv: torch default.
        """
        cfg = self.config
        init_dt_bias_(self.dt_bias, cfg.ssm_dt_min, cfg.ssm_dt_max, cfg.ssm_dt_init_floor)
        a = torch.arange(1, self.state_size + 1, dtype=torch.float64, device=self.A_log.device)
        self.A_log.copy_(torch.log(a).expand(self.d_inner_local, -1))
        self.D.fill_(1.0)
        bound = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        self.conv_x.reset_parameters()

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> SSMState:
        """Empty decode state: conv state in ``dtype``, SSM state in fp32 (or wider)."""
        conv = torch.zeros(batch_size, self.d_inner_local, self.conv_kernel - 1, device=device, dtype=dtype)
        ssm = torch.zeros(
            batch_size,
            self.d_inner_local,
            self.state_size,
            device=device,
            dtype=torch.promote_types(dtype, torch.float32),
        )
        return SSMState(conv_states={"x": conv}, ssm_state=ssm, counter=torch.zeros((), dtype=torch.long, device=device))

    def _dt_b_c(self, x_dbl: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """dt for this rank's channels, and B, C (shared by every rank's channels)."""
        dt_low, bc = torch.split(x_dbl, [self.dt_rank, 2 * self.state_size], dim=-1)
        B, C = self.factory.share_across_tp(bc).chunk(2, dim=-1)
        return self.dt_proj(dt_low), B, C

    def forward(self, hidden_states: Tensor, state: SSMState | None = None) -> Tensor:
        """Parallel forward; with ``state`` also continue from and update it.

        With a state, one token runs the recurrent step; several tokens run the parallel
        scan started from the state (conv prefix + initial SSM state), which equals
        stepping token by token and also covers prefill of a fresh state.
        """
        if state is not None and hidden_states.shape[1] == 1:
            return self.step(hidden_states[:, 0], state).unsqueeze(1)
        x = self.in_proj_x(hidden_states).transpose(1, 2)  # (batch, d_inner, L)
        z = self.in_proj_z(hidden_states).transpose(1, 2)
        prefix = state.conv_states["x"] if state is not None else None
        x, conv_tail = causal_conv1d(x, self.conv_x.weight, self.conv_x.bias, prefix)
        x = F.silu(x)
        dt, B, C = self._dt_b_c(self.x_proj(x.transpose(1, 2)))
        out = ops.selective_scan(
            x,
            dt.transpose(1, 2),
            -torch.exp(_wide(self.A_log)),
            B.transpose(1, 2),
            C.transpose(1, 2),
            D=self.D,
            z=z,
            delta_bias=self.dt_bias,
            delta_softplus=True,
            initial_state=state.ssm_state if state is not None else None,
            return_last_state=state is not None,
        )
        if state is not None:
            y, last = out
            state.conv_states["x"] = conv_tail
            state.ssm_state = last.contiguous()  # the layout every decode step writes into
            state.counter.add_(hidden_states.shape[1])
        else:
            y = out
        return self.out_proj(y.transpose(1, 2))

    def step(self, h: Tensor, state: SSMState) -> Tensor:
        """One decoding token, as rows: h (batch, hidden) -> (batch, hidden); advances `state`.

        Conv window update + `selective_state_update`, on rows (no sequence axis to add and drop).
        """
        x = self.in_proj_x(h)  # (batch, d_inner)
        z = self.in_proj_z(h)
        x, conv_state = causal_conv1d_step(x, self.conv_x.weight, self.conv_x.bias, state.conv_states["x"])
        x = F.silu(x)
        dt, B, C = self._dt_b_c(self.x_proj(x))
        y, new_state = ops.selective_state_update(
            state.ssm_state,
            x,
            dt,
            -torch.exp(_wide(self.A_log)),
            B,
            C,
            D=self.D,
            z=z,
            dt_bias=self.dt_bias,
            dt_softplus=True,
        )
        state.store_step("x", conv_state, new_state)
        return self.out_proj(y)
