"""The NeuronCore generation a kernel is compiled for, as NKI 0.2.0 picks it.

The `nki.jit` docstring (`nki/api/nki/__init__.py` lines 14-16 at 3c46990d) sets the target with
the ``NEURON_PLATFORM_TARGET_OVERRIDE`` environment variable, "trn1"/"gen2", "trn2"/"gen3" or
"trn3"/"gen4"; the quickstart (`nki/get-started/quickstart-implement-run-kernel.rst` lines
240-242) says it "sets the target architecture for compilation" and gives trn1 for Trn1 and
Inf2. A kernel is compiled when it is called, so the variable is read then (AWS's examples set
it at import, before either: `tensor_addition_nki_kernels.py` line 13).

Unset, the stack picks a target itself ("You might need to explicitly set the target
platform"; no 0.2.0 source says how); the emulator stands for a Trn1, so it takes "trn1"
(NeuronCore-v2). The SDK's simulator tests point the same way: those using v3 features name
`platform_target="trn2"`, the others nothing (`nki/test/test_nki_isa_dma_transpose.py` lines
23-73, the Beta 1 API).

A kernel can also name its target in its decorator, `@nki.jit(platform_target="trn2")`: the
0.2.0 stub takes it through ``**kwargs`` (`nki/api/nki/__init__.py` line 6), nki-library 0759719
passes "trn2" and "trn3" (`core/loss/cross_entropy.py` line 28, `core/moe/moe_cte/bwmm_shard_on_I_mx.py`
line 95), and the SDK's simulator tests pass "trn2" to run v3-only instructions
(`nki/test/test_nki_isa_range_select.py` line 18). The values are the instance families of
nki-library's `Platforms` (`test/utils/common_dataclasses.py` lines 199-214: trn1, trn2, trn3;
its trn3_a0 compiles as trn3), not the variable's "genN" aliases. Both names are checked: a
kernel runs only when neither names a generation the emulator does not model.

Only NeuronCore-v2 is emulated: its rules where generations differ (engines per instruction,
fp32 Tensor-engine transposes, no hardware DGE, 64/128 matmul tiles, no scalar activation
bias, one logical core) and its cost model. A v3 or v4 target is refused before the kernel
runs rather than checked against v2's rules, which would refuse what those targets accept.
"""

from __future__ import annotations

import os

from .core import EMULATED_GEN, NKIRuleError

ENV_VAR = "NEURON_PLATFORM_TARGET_OVERRIDE"
# nki/api/nki/__init__.py lines 15-16: 'Supported values are "trn1"/"gen2", "trn2"/"gen3", and "trn3"/"gen4"'
GEN_BY_TARGET = {"trn1": 2, "gen2": 2, "trn2": 3, "gen3": 3, "trn3": 4, "gen4": 4}
DEFAULT_TARGET = "trn1"  # the emulator stands for a Trn1 (module docstring)
EMULATED_GENS = (EMULATED_GEN,)
# test/utils/common_dataclasses.py lines 199-214 at nki-library 0759719: `Platforms.get_compile_target()`
GEN_BY_PLATFORM_TARGET = {"trn1": 2, "trn2": 3, "trn3": 4}


def target_name() -> str:
    """The target the environment names, or the default when the variable is unset or empty."""
    return os.environ.get(ENV_VAR, "") or DEFAULT_TARGET


def target_gen() -> int:
    """The NeuronCore generation of the target; a value NKI 0.2.0 does not list is an error."""
    name = target_name()
    if name not in GEN_BY_TARGET:
        raise ValueError(f"error: {ENV_VAR}={name!r} is not a target NKI 0.2.0 supports; supported: "
                         f"{', '.join(GEN_BY_TARGET)} (nki/api/nki/__init__.py lines 14-16)")
    return GEN_BY_TARGET[name]


def platform_target_gen(platform_target: str) -> int:
    """The generation `@nki.jit(platform_target=...)` names; a value that is not a target is an error."""
    if platform_target not in GEN_BY_PLATFORM_TARGET:
        raise ValueError(f"error: nki.jit: platform_target={platform_target!r} is not a target; supported: "
                         f"{', '.join(GEN_BY_PLATFORM_TARGET)} (nki-library test/utils/common_dataclasses.py "
                         "lines 199-214)")
    return GEN_BY_PLATFORM_TARGET[platform_target]


def require_emulated_target(platform_target: str | None = None) -> int:
    """The target's generation, if the emulator models it; otherwise one clear error before any work.

    `platform_target` is the kernel's own `@nki.jit(platform_target=...)`, checked before the variable.
    """
    if platform_target is not None:
        gen = platform_target_gen(platform_target)
        if gen not in EMULATED_GENS:
            raise NKIRuleError(f"error: @nki.jit(platform_target={platform_target!r}) compiles for NeuronCore-v{gen}; "
                               "the emulator models NeuronCore-v2 (trn1) only, whose rules would refuse what v"
                               f"{gen} accepts: drop platform_target or pass 'trn1' (docs/kernels.md)")
    gen = target_gen()
    if gen not in EMULATED_GENS:
        raise NKIRuleError(f"error: {ENV_VAR}={target_name()!r} compiles for NeuronCore-v{gen}; the emulator models "
                           "NeuronCore-v2 (trn1/gen2) only, whose rules would refuse what v"
                           f"{gen} accepts: unset the variable or set it to trn1 (docs/kernels.md)")
    return gen
