"""`nki.isa.constants`: the instruction enums of `nki.isa`, under the module name AWS's kernels import.

The 0.2.0 stub (`nki/api/nki/isa/__init__.py` lines 6-101) defines `dge_mode`, `engine`,
`nc_version`, `oob_mode`, `reduce_cmd` and `matmul_perf_mode` in `nki.isa` itself and has no
`constants` module, but the SDK's guide names it (`nki/guides/architecture/trainium2_arch.rst`
line 209: `nisa.constants.engine.tensor`) and nki-library 0759719 imports from it in sixteen
files (`from nki.isa.constants import oob_mode, dge_mode`, e.g. `core/qkv/qkv.py`). The same enum
objects are re-exported, so `nisa.constants.oob_mode.skip is nisa.oob_mode.skip`.
"""

from __future__ import annotations

from .isa import dge_mode, engine, matmul_perf_mode, nc_version, oob_mode, reduce_cmd

__all__ = ["dge_mode", "engine", "matmul_perf_mode", "nc_version", "oob_mode", "reduce_cmd"]
