"""The NKI 0.2.0 language front end: each documented rule broken by a small kernel and honoured by another;
constructs no AWS NKI 0.2 kernel uses are warned about; our six kernels pass with no finding."""

from __future__ import annotations

import warnings
from enum import Enum

import numpy as np
import pytest
from emulator_helpers import load, rand, run, store

from nki_kernels.emulator import NKILanguageError, NKILanguageWarning, NKIRuleError, frontend, nisa, nki, nl


class _PlainTiles:
    """A helper class that does not inherit NKIObject."""

    def __init__(self, n: int) -> None:
        self.n = n


class _Tiles(nl.NKIObject):
    def __init__(self, n: int) -> None:
        self.n = n


class _Mode(Enum):
    copy = 1
    double = 2


def copy_kernel(a):
    out = nl.ndarray(a.shape, dtype=nl.float32)
    nisa.tensor_copy(dst=out, src=load(a))
    return store(out)


def language_error(kernel, *args, match: str) -> str:
    with pytest.raises(NKILanguageError, match=match) as info:
        run(kernel, *args)
    return str(info.value)


# ----------------------------------------------------------------------------- classes
def test_classes_must_inherit_nkiobject():
    def plain(a):
        t = _PlainTiles(a.shape[0])
        return copy_kernel(a[0:t.n, :])

    msg = language_error(plain, rand(4, 4), match="must inherit nl.NKIObject")
    assert "test_nki_language.py:" in msg and "_PlainTiles" in msg

    def derived(a):
        t = _Tiles(a.shape[0])
        return copy_kernel(a[0:t.n, :])

    a = rand(4, 4)
    np.testing.assert_array_equal(run(derived, a), a)


def test_enumerations_are_allowed_and_objects_passed_in_are_checked():
    def with_enum(a, mode):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        factor = 2.0 if mode == _Mode.double else 1.0
        nisa.tensor_scalar(dst=out, data=load(a), op0=nl.multiply, operand0=factor)
        return store(out)

    a = rand(4, 4)
    np.testing.assert_array_equal(run(with_enum, a, _Mode.double), 2 * a)

    def with_object(a, tiles):
        return copy_kernel(a[0:tiles.n, :])

    language_error(with_object, a, _PlainTiles(2), match="must inherit nl.NKIObject")
    np.testing.assert_array_equal(run(with_object, a, _Tiles(2)), a[0:2])


# ----------------------------------------------------------------------------- dictionaries
def test_dictionary_keys_are_strings():
    def tuple_key(a):
        tiles = {(0, 1): load(a)}
        return store(tiles[(0, 1)])

    language_error(tuple_key, rand(4, 4), match="dictionaries take only string keys")

    def int_keys_from_a_loop(a):
        tiles = {}
        for i in range(2):
            tiles[i] = load(a)
        return store(tiles[0])

    language_error(int_keys_from_a_loop, rand(4, 4), match="indexing a dict with a key of type int")

    def annotated(a):
        tiles: dict[tuple, object] = {}
        return store(load(a))

    language_error(annotated, rand(4, 4), match=r"annotated dict\[tuple, ...\]")

    def object_keys(a):
        t = _Tiles(4)
        tiles = {t: load(a)}
        return store(tiles[t])

    language_error(object_keys, rand(4, 4), match="a key of type _Tiles")

    def string_keys(a):
        tiles = {"a": load(a)}
        for i in range(2):
            tiles[f"copy{i}"] = tiles["a"]
        return store(tiles["copy1"])

    a = rand(4, 4)
    np.testing.assert_array_equal(run(string_keys, a), a)


# ----------------------------------------------------------------------------- removed / unknown APIs
def test_apis_the_migration_guide_removed():
    def uses_load(a):
        return store(nl.load(a))

    language_error(uses_load, rand(4, 4), match="nl.load removed in NKI 0.2")

    def uses_mask(a):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.tensor_copy(dst=out, src=load(a), mask=None)

    language_error(uses_mask, rand(4, 4), match="mask parameter is no longer supported")

    def unknown(a):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.tensor_copy_fast(dst=out, src=load(a))

    language_error(unknown, rand(4, 4), match="nisa.tensor_copy_fast is not in the NKI 0.2.0 API")



def test_names_in_the_stub_the_emulator_cannot_run():
    """A 0.2.0 name the emulator does not implement parses (nki-library keeps such calls on paths a
    single-core v2 run never takes) and fails only when reached."""
    def never_reached(a, use_bn_stats=False):
        data = load(a)
        if use_bn_stats:
            nisa.bn_stats(dst=nl.ndarray((4, 6), dtype=nl.float32), data=data)
        return store(data)

    a = rand(4, 16)
    np.testing.assert_array_equal(run(never_reached, a), a)
    with pytest.raises(NKIRuleError, match="nisa.bn_stats: is in NKI 0.2.0 but not emulated"):
        run(never_reached, a, True)

    def packed_dtype(a):
        assert str(nl.float8_e4m3fn_x4) == "float8_e4m3fn_x4"
        nl.ndarray((4, 4), dtype=nl.float8_e4m3fn_x4)

    with pytest.raises(NKIRuleError, match="nl.float8_e4m3fn_x4: is in NKI 0.2.0 but not emulated"):
        run(packed_dtype, a)


def test_instructions_write_dst_and_return_nothing():
    def uses_result(a):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        result = nisa.tensor_copy(dst=out, src=load(a))
        return store(result)

    language_error(uses_result, rand(4, 4), match="nki.isa instructions return nothing")


@nki.jit
def _decorated_helper(a):
    return copy_kernel(a)


def _plain_helper(a):
    return copy_kernel(a)


def test_sub_kernels_are_not_decorated():
    def calls_decorated(a):
        return _decorated_helper(a)

    language_error(calls_decorated, rand(4, 4), match="must not be decorated with nki.jit")

    def launches_decorated(a):
        return _decorated_helper[1](a)

    language_error(launches_decorated, rand(4, 4), match="must not be decorated with nki.jit")

    def calls_plain(a):
        return _plain_helper(a)

    a = rand(4, 4)
    np.testing.assert_array_equal(run(calls_plain, a), a)


# ----------------------------------------------------------------------------- nested indexing (at run time)
def test_nested_indexing():
    """No access pattern or reshape on an indexed view ([aps] "Restriction on Nested Indexing"); slicing
    a slice is allowed, as AWS's own 0.2 attention_bwd.py does it."""
    def reshape_of_slice(a):
        t = load(a)
        return copy_kernel_tile(t[0:4, :].reshape((4, 2, 2)))

    with pytest.raises(NKIRuleError, match="nested indexing is not available"):
        run(reshape_of_slice, rand(8, 4))

    def ap_of_slice(a):
        t = load(a)
        return copy_kernel_tile(t[0:4, :].ap([[4, 4], [1, 2]]))

    with pytest.raises(NKIRuleError, match="nested indexing is not available"):
        run(ap_of_slice, rand(8, 4))

    def slice_of_ap(a):
        t = load(a)
        return copy_kernel_tile(t.ap([[4, 8], [1, 4]])[0:4, 1:3])

    a = rand(8, 4)
    np.testing.assert_array_equal(run(slice_of_ap, a), a[0:4, 1:3])

    def slice_of_slice(a):
        t = load(a)
        part = t[0:8, 1:4]
        return copy_kernel_tile(part[0:4, 1:3])

    np.testing.assert_array_equal(run(slice_of_slice, a), a[0:4, 2:4])


def copy_kernel_tile(t):
    out = nl.ndarray(t.shape, dtype=t.dtype)
    nisa.tensor_copy(dst=out, src=t)
    return store(out)


def test_access_patterns():
    """tensor.ap over the tensor flattened row-major; on chip the first pair walks the partitions."""

    def strided(a):
        t = load(a)
        return copy_kernel_tile(t.ap([[8, 4], [2, 4]], offset=1))  # rows 0..3, odd columns

    a = rand(4, 8)
    np.testing.assert_array_equal(run(strided, a), a[:, 1::2])

    def skips_partitions(a):
        t = load(a)
        return copy_kernel_tile(t.ap([[16, 2], [1, 8]]))

    with pytest.raises(NKIRuleError, match="its step must be the tensor's free size"):
        run(skips_partitions, rand(4, 8))


# ----------------------------------------------------------------------------- constructs AWS kernels do not use
def _unused_constructs(a):
    out = nl.ndarray(a.shape, dtype=nl.float32)
    pick = lambda t: t  # noqa: E731
    seen = set()
    total = sum(s for s in a.shape)
    names = {str(i): i for i in range(2)}
    tmp = load(a)
    del tmp
    nisa.tensor_copy(dst=out, src=pick(load(a)))
    print(seen, total, names)
    return store(out)


def test_constructs_no_aws_kernel_uses_are_warned_about():
    with pytest.warns(NKILanguageWarning) as record:
        run(_unused_constructs, rand(4, 4))
    found = " ".join(str(w.message) for w in record)
    for what in ("lambda", "builtin set()", "builtin sum()", "generator expression", "dict comprehension", "del"):
        assert f"{what} is used by no AWS NKI 0.2 kernel" in found or f"{what} is used by no" in found, what
    with warnings.catch_warnings():
        warnings.simplefilter("error", NKILanguageWarning)
        run(copy_kernel, rand(4, 4))  # a plain kernel: no warning


def test_our_kernels_pass_the_front_end_without_findings():
    from nki_kernels.attention_bwd import eidetic_attention_bwd
    from nki_kernels.attention_fwd import eidetic_attention_fwd
    from nki_kernels.selective_scan_bwd import selective_scan_bwd
    from nki_kernels.selective_scan_fwd import selective_scan_fwd
    from nki_kernels.ssd_bwd import ssd_bwd
    from nki_kernels.ssd_fwd import ssd_fwd

    for kernel in (selective_scan_fwd, selective_scan_bwd, ssd_fwd, ssd_bwd, eidetic_attention_fwd,
                   eidetic_attention_bwd):
        findings = frontend._Checker().run(kernel.__nki_func__)
        assert findings == [], (kernel.__name__, [str(f) for f in findings])


# ----------------------------------------------------------------------------- what a kernel takes and returns
def test_kernel_outputs_are_hbm_tensors():
    """memory-hierarchy-overview.rst: a kernel's input and output parameters are HBM tensor references."""

    def returns_sbuf(a):
        return load(a)

    msg = language_error(returns_sbuf, rand(4, 4), match="must be HBM tensor references")
    assert "test_nki_language.py:" in msg and "(return value is a tensor in sbuf)" in msg

    def returns_a_number(a):
        return copy_kernel(a), a.shape[0]

    msg = language_error(returns_a_number, rand(4, 4), match="must be HBM tensor references")
    assert "(return value[1] is a int)" in msg

    a = rand(4, 4)
    np.testing.assert_array_equal(run(copy_kernel, a), a)


def test_unreturned_shared_hbm_tensors_need_a_name():
    """The nl.ndarray stub: a shared_hbm tensor that is not a kernel input or output must be named."""

    def scratch_kernel(a, name):
        scratch = nl.ndarray(a.shape, dtype=nl.float32, buffer=nl.shared_hbm, name=name)
        nisa.dma_copy(dst=scratch, src=a)
        return copy_kernel(scratch)

    a = rand(4, 4)
    msg = language_error(scratch_kernel, a, "", match="shared_hbm tensor that is not a kernel input or output")
    assert "test_nki_language.py:" in msg and "nl.ndarray((4, 4), buffer=nl.shared_hbm) is not returned" in msg
    np.testing.assert_array_equal(run(scratch_kernel, a, "scratch"), a)


def test_enumeration_values_take_only_equality():
    """Language guide, Enumerations: == and != on enum values, no other binary operator."""

    def ordered(a, mode: _Mode):
        return copy_kernel(a) if mode < _Mode.double else store(load(a))

    msg = language_error(ordered, rand(4, 4), _Mode.copy, match="enumeration values support == and != only")
    assert "Lt between mode and _Mode.double" in msg

    def arithmetic(a):
        return copy_kernel(a[0:_Mode.copy.value + _Mode.double, :])

    language_error(arithmetic, rand(4, 4), match="enumeration values support == and != only")

    def equal(a, mode: _Mode):
        return copy_kernel(a) if mode != _Mode.double else store(load(a))

    a = rand(4, 4)
    np.testing.assert_array_equal(run(equal, a, _Mode.copy), a)


def _keyword_only(a, *, rows):
    return copy_kernel(a[0:rows, :])


def test_keyword_only_arguments_are_warned_about():
    """The 0.2 compiler warns 'keyword-only arguments are not supported in NKI' (quickstart, Confirmation)."""
    a = rand(4, 4)
    with pytest.warns(NKILanguageWarning, match=r"keyword-only arguments are not supported in NKI .*\*, rows"):
        nki.simulate_kernel(_keyword_only, a, rows=2)

    def positional(a, rows):
        return copy_kernel(a[0:rows, :])

    with warnings.catch_warnings():
        warnings.simplefilter("error", NKILanguageWarning)
        np.testing.assert_array_equal(nki.simulate_kernel(positional, a, rows=2), a[0:2])


def test_device_print_takes_a_string_and_an_sbuf_or_hbm_tensor(capsys):
    """The nl.device_print stub: print_prefix a constant string; the tensor in SBUF or HBM."""

    def from_psum(a):
        acc = nl.ndarray((4, 4), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=acc, stationary=load(a), moving=load(a))
        nl.device_print("acc", acc)
        return copy_kernel(a)

    with pytest.raises(NKIRuleError, match=r"nl.device_print: the tensor must be in SBUF or HBM"):
        run(from_psum, rand(4, 4))

    def number_prefix(a):
        nl.device_print(1, a)
        return copy_kernel(a)

    with pytest.raises(NKIRuleError, match=r"print_prefix must be a constant string \(nki.language stub\) "
                                           r"\(got int\)"):
        run(number_prefix, rand(4, 4))

    def from_sbuf(a):
        nl.device_print("tile", load(a))
        return copy_kernel(a)

    a = np.ones((2, 2), np.float32)
    run(from_sbuf, a)
    assert capsys.readouterr().out.startswith("tile [[1. 1.]")


# ----------------------------------------------------------------------------- API surface nki-library uses
def test_nki_modules_and_shared_constants_nki_library_imports():
    """`nki.isa.constants` (the isa enums), `nki.dtype`, `nki.tensor` trace-time tensors turned into HBM tensors by
    `nl.shared_constant` / `nl.shared_identity_matrix`, and `nki.collectives` names that refuse to run."""
    import importlib

    from nki_kernels.emulator import as_nki

    with as_nki():
        constants = importlib.import_module("nki.isa.constants")
        ntensor = importlib.import_module("nki.tensor")
        ncc = importlib.import_module("nki.collectives")
    assert constants.oob_mode.skip is nisa.oob_mode.skip and nisa.constants.engine.tensor is nisa.engine.tensor
    assert isinstance(nl.bfloat16, nki.dtype)

    def identity_rows(a):
        eye = nl.shared_constant(ntensor.identity(8, nl.int8), dtype=nl.float32)
        ramp = nl.shared_constant(ntensor.arange(0, 8, 1, dtype=nl.int32))
        ones = nl.shared_identity_matrix(4, dtype=nl.float32)
        tile = nl.ndarray((8, 8), dtype=nl.float32)
        nisa.dma_copy(dst=tile, src=eye)
        return store(tile), ramp, ones

    eye, ramp, ones = run(identity_rows, rand(1, 1))
    np.testing.assert_array_equal(eye, np.eye(8))
    assert ramp.dtype == np.int32 and list(ramp) == list(range(8))
    np.testing.assert_array_equal(ones, np.eye(4))
    np.testing.assert_array_equal(ntensor.zeros((2, 3), dtype=nl.int8) + 1, np.ones((2, 3)))
    with pytest.raises(TypeError, match="trace-time tensor"):
        nl.shared_constant([1, 2, 3])
    group = ncc.ReplicaGroup([[0, 1]])
    with pytest.raises(NKIRuleError, match="nki.collectives.all_gather: is in NKI 0.2.0 but not emulated"):
        ncc.all_gather(srcs=[], dsts=[], replica_group=group, collective_dim=0)


def test_nki_classes_get_the_compilers_initialiser():
    """Language guide, Class Support: with or without @dataclass, a class without its own __init__ takes its fields
    as optional arguments (default the class value, else None) and runs __post_init__; frozen ones too."""
    from dataclasses import dataclass

    @dataclass
    class Section(nl.NKIObject):  # plain class attributes, as nki-library's SectionParams
        index = None
        offset = 0

        def end(self):
            return self.offset + 1

    @dataclass(frozen=True)
    class Info(nl.NKIObject):
        rows: int
        cols: int = 4

        def __post_init__(self):
            assert self.cols > 0

    s = Section(index=2)
    assert (s.index, s.offset, s.end()) == (2, 0, 1)
    assert (Info(3).rows, Info(3).cols, Info().rows, Info(1, 5).cols) == (3, 4, None, 5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'width'"):
        Section(width=3)
    with pytest.raises(AssertionError):
        Info(1, 0)
    assert _Tiles(3).n == 3  # a class with its own __init__ keeps it


def test_neuroncore_versions_are_ordered():
    """nki-library gates its paths on `nisa.get_nc_version() >= nisa.nc_version.gen3`; the guide's
    equality-only rule stays for enums a kernel defines."""

    def gated(a):
        if nisa.get_nc_version() >= nisa.nc_version.gen3:
            return store(load(a))
        return copy_kernel(a)

    a = rand(4, 4)
    np.testing.assert_array_equal(run(gated, a), a)
    assert nisa.nc_version.gen2 < nisa.nc_version.gen3 < nisa.nc_version.gen4


def test_sequential_range_takes_ranges_forms_and_the_stubs_keywords():
    """The stub's `sequential_range(start, stop, step)` (no defaults, nki/api/nki/language/__init__.py line 235)
    against its example `sequential_range(n)` (line 271) and "any use of Python range(...) will be replaced with
    sequential_range(...)" (line 244): range's positional forms, or the stub's three keywords; not a partial
    keyword call, which the stub and range both refuse."""
    assert list(nl.sequential_range(4)) == [0, 1, 2, 3]
    assert list(nl.sequential_range(2, 5)) == [2, 3, 4]
    assert list(nl.sequential_range(9, 0, -3)) == [9, 6, 3]
    assert list(nl.sequential_range(start=1, stop=7, step=2)) == [1, 3, 5]
    assert list(nl.sequential_range(1, 7, step=3)) == [1, 4]
    for args, kwargs in (((8,), {"step": 2}), ((), {"stop": 8}), ((), {"start": 8}), ((0,), {"stop": 8}),
                         ((0, 8, 1), {"step": 2})):
        with pytest.raises(TypeError, match=r"sequential_range\(.*\): .*(range's positional forms)"):
            nl.sequential_range(*args, **kwargs)
    with pytest.raises(TypeError, match="takes 1 to 3 positional arguments as range does, got 4"):
        nl.sequential_range(0, 8, 1, 1)
    with pytest.raises(TypeError, match="takes 1 to 3 positional arguments as range does, got 0"):
        nl.sequential_range()


def test_affine_and_static_range_refuse_a_step_without_a_stop():
    """`affine_range` / `static_range(start, stop=None, step=1)` (stub lines 166, 288): one argument is range(n),
    two or three are range's; a step with no stop has no documented meaning and was silently dropped."""

    def loops(n):
        seen = list(nl.affine_range(n)) + list(nl.affine_range(1, n, 2))
        return seen + list(nl.static_range(n)) + list(nl.static_range(n, 0, -2))

    from nki_kernels.emulator import core

    core.push_state(core.RunState())  # affine_range records its iterations in the running kernel's state
    try:
        assert loops(5) == [0, 1, 2, 3, 4, 1, 3, 0, 1, 2, 3, 4, 5, 3, 1]
        for make in (nl.affine_range, nl.static_range):
            with pytest.raises(NKIRuleError, match=rf"nl.{make.__name__}: a step without a stop is not documented"):
                list(make(8, step=2))
    finally:
        core.pop_state()
