"""The NKI 0.2.0 language front end: a kernel's source is checked before the emulator runs it.

NKI 0.2.0's compiler parses a kernel (and every function it calls) as source in a
subset of Python; it does not run it as Python (nki-migration-guide.rst, "Background:
NKI has a Compiler!"). The emulator does run it as Python, so without this pass code
the real compiler rejects would run fine here. `check_kernel` walks the kernel's
source and the source of every Python function and class it reaches, and

* raises `NKILanguageError` ("file:line: rule (detail)") for what the 0.2.0 documents
  rule out:
  - classes used in a kernel must inherit `nl.NKIObject` and no other class
    (nki-language-guide.rst, "Class Support"; enumerations are the exception,
    "Enumerations");
  - dictionaries take only string keys (migration guide, "What features in
    neuronxcc.nki.* are not available": "Dictionaries support only string keys";
    language guide, "NKI Values": "Dictionaries with string-value keys"). Checked
    statically where a key's type is evident (a literal, a tuple, a loop over a range,
    an annotated parameter, a function's return annotation, a class instance);
  - APIs the migration guide removed (`nl.load`, `nl.store`, `nl.arange`, `nl.mgrid`,
    `nl.par_dim`, the `mask=` parameter) and names `nki.language` / `nki.isa` do not have;
  - sub-kernels decorated with `nki.jit` (migration guide, "Remove nki.jit decorator
    on sub-kernels");
  - using the value of a `nki.isa` instruction: 0.2 instructions write `dst` and
    return nothing (migration guide, "All ISA functions require a destination parameter");
  - binary operators other than == and != on enumeration values (language guide,
    "Enumerations");
* warns, as the 0.2 compiler's tracing does, about keyword-only arguments;
* warns (`NKILanguageWarning`) about Python constructs and builtins that no AWS NKI 0.2
  kernel uses (the kernels of aws-neuron/nki-library 0759719 and the 0.2 examples at
  aws-neuron-sdk 3c46990d): lambdas, sets, `del`, dict and generator comprehensions,
  `try`/`with`/`global`/`nonlocal`/`yield`, nested function definitions, and builtins
  outside the set those kernels call. Our kernels use none of them.

Nested slicing (also on the migration guide's list) is a property of values, not of
syntax: `core.NkiTensor` rejects it when the kernel runs. So are the rules on what a
kernel takes and returns (HBM tensors; an unreturned `shared_hbm` tensor needs a name):
`check_io` applies them when the kernel returns.
"""

from __future__ import annotations

import ast
import builtins
import enum
import inspect
import sys
import textwrap
import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from .core import HBM_BUFFERS, NKIRuleError, NkiTensor


class NKILanguageError(NKIRuleError):
    """A kernel's source uses what the NKI 0.2.0 language does not have."""


class NKILanguageWarning(UserWarning):
    """A kernel's source uses a construct no AWS NKI 0.2 kernel uses."""


# ---------------------------------------------------------------------------- rules
CLASS_BASE = "classes used in a NKI kernel must inherit nl.NKIObject and no other class (language guide, Class Support)"
DICT_KEYS = "dictionaries take only string keys (migration guide; language guide, NKI Values)"
REMOVED_API = "removed in NKI 0.2 (migration guide)"
UNKNOWN_API = "not in the NKI 0.2.0 API"
MASK = "the mask parameter is no longer supported (migration guide, Deprecation of masking)"
JIT_SUBKERNEL = "functions called from a kernel must not be decorated with nki.jit (migration guide)"
RESULT_USED = ("nki.isa instructions return nothing in NKI 0.2: the result goes to dst= "
               "(migration guide, All ISA functions require a destination parameter)")
UNUSED_BY_AWS = "used by no AWS NKI 0.2 kernel"
ENUM_OPS = ("enumeration values support == and != only: no other binary operator "
            "(language guide, Enumerations)")
KEYWORD_ONLY = ("keyword-only arguments are not supported in NKI (the 0.2 compiler's tracing warning, "
                "quickstart-implement-run-kernel.rst, Confirmation)")
KERNEL_IO = ("the input and output parameters of a NKI kernel must be HBM tensor references "
             "(memory-hierarchy-overview.rst, device memory)")
SHARED_HBM_NAME = ("a shared_hbm tensor that is not a kernel input or output must be given a name "
                   "(nki.language stub, ndarray: name)")

_REMOVED = {
    "load": "use nisa.dma_copy", "store": "use nisa.dma_copy", "arange": "use slicing or tensor.ap",
    "mgrid": "use slicing or tensor.ap", "par_dim": "the partition axis is always first",
    "load_transpose2d": "use nisa.dma_copy and nisa.nc_transpose",
}
# nki.isa instructions that do return a value
_RETURNING = {"register_alloc", "get_nc_version"}

# Python syntax no AWS 0.2 kernel uses -> what to say
_WARN_NODES: dict[type, str] = {
    ast.Lambda: "lambda", ast.Set: "set display", ast.SetComp: "set comprehension", ast.Delete: "del",
    ast.DictComp: "dict comprehension", ast.GeneratorExp: "generator expression", ast.Try: "try/except",
    ast.With: "with", ast.Yield: "yield", ast.YieldFrom: "yield from", ast.Global: "global",
    ast.Nonlocal: "nonlocal", ast.NamedExpr: "assignment expression (:=)", ast.Await: "await",
    ast.AsyncFor: "async for", ast.AsyncWith: "async with", ast.Match: "match",
}
if hasattr(ast, "TryStar"):
    _WARN_NODES[ast.TryStar] = "try/except*"
# comparisons the language guide leaves to enumeration values: structural equality; `is` and `in` are
# not operators on the values themselves
_ENUM_COMPARE_OK = (ast.Eq, ast.NotEq, ast.Is, ast.IsNot, ast.In, ast.NotIn)
# builtins AWS 0.2 kernels call, plus the containers and helpers the language guide names
_BUILTINS_OK = {
    "divmod", "enumerate", "float", "getattr", "int", "isinstance", "len", "list", "map", "max", "min", "print",
    "range", "slice", "str", "tuple", "zip", "dict", "bool", "abs", "ValueError", "TypeError", "RuntimeError",
    "AssertionError", "NotImplementedError", "ImportError", "hasattr", "round", "super",
}
# modules whose functions kernels may call as compile-time helpers (nki-library uses math)
_MODULES_OK = {"math", "typing", "dataclasses", "enum", "functools"}


@dataclass(frozen=True)
class Finding:
    """One problem found in a kernel's source."""

    path: str
    line: int
    rule: str
    detail: str
    error: bool

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.rule} ({self.detail})"


# ---------------------------------------------------------------------------- entry point
_CACHE: dict[Any, tuple[Finding, ...]] = {}


def check_kernel(kernel: Callable, args: tuple = (), kwargs: dict | None = None) -> list[Finding]:
    """Check `kernel`'s source and everything it reaches; raise on errors, warn on the rest.

    Returns the warnings. Results are cached per function. `args` / `kwargs` (the call's
    arguments) bring in the classes of objects passed to the kernel.
    """
    key = getattr(kernel, "__code__", kernel)
    if key not in _CACHE:
        _CACHE[key] = tuple(_Checker().run(kernel))
    findings = list(_CACHE[key])
    checker = _Checker()
    for value in (*args, *(kwargs or {}).values()):
        cls = type(value)
        if _user_class(cls):
            findings += checker.run_class(cls, inspect.getsourcefile(kernel) or "<kernel>", 0)
    errors = [f for f in findings if f.error]
    if errors:
        head = str(errors[0])
        more = "".join(f"\n  {f}" for f in errors[1:])
        raise NKILanguageError(f"{head}{more}" if not more else f"{len(errors)} NKI language errors:\n  {head}{more}")
    found = [f for f in findings if not f.error]
    for f in found:
        warnings.warn(NKILanguageWarning(str(f)), stacklevel=3)
    return found


def check_io(kernel: Callable, args: tuple, kwargs: dict, result: Any, run: Any) -> None:
    """The rules on what a kernel takes and returns, checked when it returns (they are about values).

    Tensors passed in and returned must be in HBM (tuples and lists of outputs are walked; `None`
    is let through); a `shared_hbm` tensor the kernel made without a name must be one of its
    outputs. Raises `NKILanguageError` naming the kernel (or allocation) line.
    """
    path = inspect.getsourcefile(kernel) or "<kernel>"
    try:
        line = inspect.getsourcelines(kernel)[1]
    except (OSError, TypeError):
        line = 0
    errors = [Finding(path, line, KERNEL_IO, f"argument {name} is a tensor in {value.buffer}", True)
              for name, value in _named_args(kernel, args, kwargs)
              if isinstance(value, NkiTensor) and value.buffer not in HBM_BUFFERS]
    returned: set[int] = set()
    for where, value in _outputs(result, "return value"):
        if isinstance(value, NkiTensor) and value.buffer in HBM_BUFFERS:
            returned.add(id(value._alloc))
        elif value is not None:
            what = f"a tensor in {value.buffer}" if isinstance(value, NkiTensor) else f"a {type(value).__name__}"
            errors.append(Finding(path, line, KERNEL_IO, f"{where} is {what}", True))
    for alloc, site_path, site_line in run.unnamed_shared_hbm:
        if id(alloc) not in returned:
            shape = tuple(alloc.data.shape)
            errors.append(Finding(site_path, site_line, SHARED_HBM_NAME,
                                  f"nl.ndarray({shape}, buffer=nl.shared_hbm) is not returned", True))
    if errors:
        head = "".join(f"\n  {f}" for f in errors)
        raise NKILanguageError(str(errors[0]) if len(errors) == 1 else f"{len(errors)} NKI language errors:{head}")


def _named_args(kernel: Callable, args: tuple, kwargs: dict) -> list[tuple[str, Any]]:
    names = list(inspect.signature(kernel).parameters)
    return [*((names[i] if i < len(names) else str(i), a) for i, a in enumerate(args)), *kwargs.items()]


def _outputs(value: Any, where: str) -> list[tuple[str, Any]]:
    """The leaves of a kernel's return value, each with where it sits (`return value[1]`)."""
    if isinstance(value, (tuple, list)):
        return [leaf for i, v in enumerate(value) for leaf in _outputs(v, f"{where}[{i}]")]
    return [(where, value)]


def _emulator_or_nki(obj: Any) -> bool:
    module = getattr(obj, "__module__", None) or getattr(obj, "__name__", "")
    return isinstance(module, str) and (module == "nki" or module.startswith(("nki.", "nki_kernels.emulator")))


def _user_class(cls: type) -> bool:
    return (isinstance(cls, type) and not _emulator_or_nki(cls) and cls.__module__ not in ("builtins", "numpy")
            and not cls.__module__.startswith(("numpy", "ml_dtypes", "enum", "typing")))


def _nki_namespace(obj: Any) -> str | None:
    """'language' / 'isa' / 'nki' when `obj` is the (emulated or real) NKI module of that name."""
    if not isinstance(obj, types.ModuleType):
        return None
    name = obj.__name__
    for suffix in ("language", "isa"):
        if name in (f"nki.{suffix}", f"nki_kernels.emulator.{suffix}"):
            return suffix
    if name in ("nki", "nki_kernels.emulator"):
        return "nki"
    return None


# ---------------------------------------------------------------------------- static types
def _annotation_type(node: ast.AST | None) -> Any:
    """A tiny reading of annotations: 'str', 'int', 'tuple', ('list', T), ('dict', K), class names."""
    if node is None:
        return None
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        try:
            return _annotation_type(ast.parse(node.value, mode="eval").body)
        except SyntaxError:
            return None
    if isinstance(node, ast.Constant) and node.value is None:
        return "None"
    if isinstance(node, ast.Name):
        return {"Tuple": "tuple", "List": "list", "Dict": "dict", "Any": None}.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        return "tensor" if node.attr == "ndarray" else None
    if isinstance(node, ast.Subscript):
        outer = _annotation_type(node.value)
        inner = node.slice
        args = inner.elts if isinstance(inner, ast.Tuple) else [inner]
        if outer in ("list", "List"):
            return ("list", _annotation_type(args[0]))
        if outer in ("dict", "Dict"):
            return ("dict", _annotation_type(args[0]))
        if outer in ("tuple", "Tuple"):
            return "tuple"
        if outer == "Optional":
            return _annotation_type(args[0])
        return None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):  # X | None
        left, right = _annotation_type(node.left), _annotation_type(node.right)
        return left if right == "None" else (right if left == "None" else None)
    return None


def _is_str(t: Any) -> bool:
    return t == "str"


def _known_not_str(t: Any) -> bool:
    return t is not None and not _is_str(t)


def _describe(t: Any) -> str:
    return f"{t[0]}[{_describe(t[1])}]" if isinstance(t, tuple) else str(t)


# ---------------------------------------------------------------------------- the checker
class _Checker:
    """Walks functions and classes reachable from a kernel, collecting findings."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self.seen: set[Any] = set()

    def run(self, kernel: Callable) -> list[Finding]:
        self._function(kernel, called_from=None)
        return self.findings

    def run_class(self, cls: type, path: str, line: int) -> list[Finding]:
        self._class(cls, path, line)
        return self.findings

    def add(self, path: str, line: int, rule: str, detail: str, error: bool = True) -> None:
        self.findings.append(Finding(path, line, rule, detail, error))

    # -------------------------------------------------------------- functions and classes
    def _function(self, fn: Any, called_from: tuple[str, int] | None) -> None:
        fn = inspect.unwrap(fn) if not hasattr(fn, "__nki_func__") else fn.__nki_func__
        code = getattr(fn, "__code__", None)
        if code is None or code in self.seen:
            return
        self.seen.add(code)
        try:
            lines, start = inspect.getsourcelines(fn)
            path = inspect.getsourcefile(fn) or code.co_filename
        except (OSError, TypeError):
            where = called_from or (code.co_filename, code.co_firstlineno)
            self.add(*where, "the compiler parses a kernel's functions from source", f"no source for {fn!r}",
                     error=False)
            return
        tree = ast.parse(textwrap.dedent("".join(lines)))
        node = tree.body[0]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            _FunctionWalker(self, fn, path, start - 1).walk(node)
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Lambda):
            _FunctionWalker(self, fn, path, start - 1).walk_lambda(node.value)

    def _class(self, cls: type, path: str, line: int) -> None:
        if cls in self.seen or not _user_class(cls):
            return
        self.seen.add(cls)
        from . import language

        bases = cls.__bases__
        ok = issubclass(cls, enum.Enum) or (  # enumerations: language guide, "Enumerations"
            len(bases) == 1 and (bases[0] is language.NKIObject
                                 or (bases[0].__name__ == "NKIObject" and _emulator_or_nki(bases[0]))))
        if not ok:
            bases = ", ".join(b.__name__ for b in cls.__bases__)
            self.add(*self._where(cls, path, line), CLASS_BASE, f"class {cls.__name__}({bases})")
        for attr in vars(cls).values():
            target = attr.__func__ if isinstance(attr, (staticmethod, classmethod)) else attr
            if isinstance(target, property):
                target = target.fget
            # methods written in the class body (not the ones @dataclass generates, which have no file)
            if (isinstance(target, types.FunctionType)
                    and not inspect.unwrap(target).__code__.co_filename.startswith("<")
                    and getattr(target, "__qualname__", "").startswith(cls.__qualname__ + ".")):
                self._function(target, None)

    @staticmethod
    def _where(obj: Any, path: str, line: int) -> tuple[str, int]:
        try:
            return inspect.getsourcefile(obj) or path, inspect.getsourcelines(obj)[1]
        except (OSError, TypeError):
            return path, line

    def reached(self, obj: Any, path: str, line: int) -> None:
        """Something the kernel's code refers to: check it if it is user Python code."""
        if _emulator_or_nki(obj) or _nki_namespace(obj):
            return
        if isinstance(obj, type):
            self._class(obj, path, line)
        elif hasattr(obj, "__nki_func__"):  # an nki.jit kernel (`nki_kernels.emulator.Kernel`)
            self.add(path, line, JIT_SUBKERNEL, f"{obj.__name__} is decorated with nki.jit")
            self.reached(obj.__nki_func__, path, line)
        elif isinstance(obj, types.FunctionType):
            if getattr(obj, "__nki_jit__", False):
                self.add(path, line, JIT_SUBKERNEL, f"{obj.__name__} is decorated with nki.jit")
            origin = _origin(obj)
            if origin == "user":
                self._function(obj, (path, line))
            elif origin not in _MODULES_OK:
                self.add(path, line, f"calling {origin} code from a kernel is {UNUSED_BY_AWS}",
                         f"{obj.__module__}.{obj.__qualname__}", error=False)
        elif isinstance(obj, types.MethodType):
            self.reached(obj.__func__, path, line)


class _FunctionWalker(ast.NodeVisitor):
    """One function's body: syntax rules, name resolution, dict-key types."""

    def __init__(self, checker: _Checker, fn: Any, path: str, offset: int) -> None:
        self.c, self.fn, self.path, self.offset = checker, fn, path, offset
        self.globals = getattr(fn, "__globals__", {})
        closure = getattr(fn, "__closure__", None) or ()
        names = getattr(getattr(fn, "__code__", None), "co_freevars", ())
        self.closure = {}
        for n, cell in zip(names, closure):
            try:
                self.closure[n] = cell.cell_contents
            except ValueError:  # an empty cell: defined later in the enclosing function
                pass
        self.types: dict[str, Any] = {}
        self.depth = 0

    # -------------------------------------------------------------- helpers
    def line(self, node: ast.AST) -> int:
        return getattr(node, "lineno", 1) + self.offset

    def add(self, node: ast.AST, rule: str, detail: str, error: bool = True) -> None:
        self.c.add(self.path, self.line(node), rule, detail, error)

    def resolve(self, node: ast.AST) -> Any:
        """The runtime object an expression names, if it is a plain (dotted) name; else None."""
        if isinstance(node, ast.Name):
            if node.id in self.closure:
                return self.closure[node.id]
            if node.id in self.globals:
                return self.globals[node.id]
            return getattr(builtins, node.id, None)
        if isinstance(node, ast.Attribute):
            base = self.resolve(node.value)
            if base is None or not isinstance(base, (types.ModuleType, type)):
                return None
            return getattr(base, node.attr, None)
        return None

    # -------------------------------------------------------------- entry points
    def walk(self, node: ast.FunctionDef) -> None:
        args = node.args
        if args.kwonlyargs:
            self.add(node, KEYWORD_ONLY, f"def {node.name}(..., *, {', '.join(a.arg for a in args.kwonlyargs)})",
                     error=False)
        for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
            t = _annotation_type(a.annotation)
            self.types[a.arg] = t
            self._check_dict_annotation(a.annotation, a)
        for stmt in node.body:
            self.visit(stmt)

    def walk_lambda(self, node: ast.Lambda) -> None:
        self.visit(node.body)

    # -------------------------------------------------------------- syntax not used by AWS kernels
    def generic_visit(self, node: ast.AST) -> None:
        what = _WARN_NODES.get(type(node))
        if what is not None:
            self.add(node, f"{what} is {UNUSED_BY_AWS}", what, error=False)
        super().generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:  # a nested def
        self.add(node, f"nested function definitions are {UNUSED_BY_AWS}", f"def {node.name}", error=False)
        inner = _FunctionWalker(self.c, self.fn, self.path, self.offset)
        inner.types = dict(self.types)
        inner.walk(node)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.add(node, f"classes defined inside a kernel function are {UNUSED_BY_AWS}", f"class {node.name}",
                 error=False)
        self.generic_visit(node)

    # -------------------------------------------------------------- names and calls
    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load) and node.id not in self.types:
            obj = self.resolve(node)
            if obj is not None:
                self.c.reached(obj, self.path, self.line(node))
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        base = self.resolve(node.value)
        space = _nki_namespace(base)
        if space is not None and not hasattr(base, node.attr):
            prefix = {"language": "nl", "isa": "nisa", "nki": "nki"}[space]
            if space == "language" and node.attr in _REMOVED:
                self.add(node, f"{prefix}.{node.attr} {REMOVED_API}", _REMOVED[node.attr])
            else:
                self.add(node, f"{prefix}.{node.attr} is {UNKNOWN_API}", f"{base.__name__} has no {node.attr}")
        elif isinstance(base, (types.ModuleType, type)) and not space:
            obj = getattr(base, node.attr, None)
            if obj is not None and not isinstance(base, type):
                self.c.reached(obj, self.path, self.line(node))
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        obj = self.resolve(node.func)
        if _is_isa(obj):
            for kw in node.keywords:
                if kw.arg == "mask":
                    self.add(kw.value, MASK, f"{_name(node.func)}(mask=...)")
        if isinstance(obj, types.BuiltinFunctionType) or (isinstance(obj, type) and obj.__module__ == "builtins"):
            name = getattr(obj, "__name__", "")
            if getattr(builtins, name, None) is obj and name not in _BUILTINS_OK:
                self.add(node, f"builtin {name}() is {UNUSED_BY_AWS}", f"{name}(...)", error=False)
        self._dict_access_call(node)
        self.generic_visit(node)

    # -------------------------------------------------------------- statements that use a value
    def visit_Assign(self, node: ast.Assign) -> None:
        self._result_used(node.value)
        t = self.type_of(node.value)
        for target in node.targets:
            if isinstance(target, ast.Name):
                self.types[target.id] = t
            elif isinstance(target, ast.Subscript):
                self._dict_subscript(target)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._check_dict_annotation(node.annotation, node)
        if node.value is not None:
            self._result_used(node.value)
        if isinstance(node.target, ast.Name):
            self.types[node.target.id] = _annotation_type(node.annotation) or (
                self.type_of(node.value) if node.value is not None else None)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self._result_used(node.value)
        self.generic_visit(node)

    def visit_Return(self, node: ast.Return) -> None:
        if node.value is not None:
            self._result_used(node.value)
        self.generic_visit(node)

    def visit_For(self, node: ast.For) -> None:
        self._bind_loop(node.target, node.iter)
        self.generic_visit(node)

    def visit_comprehension(self, node: ast.comprehension) -> None:
        self._bind_loop(node.target, node.iter)
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:
        for key in node.keys:
            if key is None:
                continue
            t = self.type_of(key)
            if _known_not_str(t):
                self.add(key, DICT_KEYS, f"a key of type {_describe(t)}")
        self.generic_visit(node)

    def visit_DictComp(self, node: ast.DictComp) -> None:
        for gen in node.generators:
            self._bind_loop(gen.target, gen.iter)
        t = self.type_of(node.key)
        if _known_not_str(t):
            self.add(node.key, DICT_KEYS, f"keys of type {_describe(t)}")
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if isinstance(node.ctx, ast.Load):
            self._dict_subscript(node)
        self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        for side in (node.left, node.right):
            if self._enum_value(side):
                self.add(node, ENUM_OPS, f"{type(node.op).__name__} on {ast.unparse(side)}")
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:
        left = node.left
        for op, right in zip(node.ops, node.comparators):
            if (not isinstance(op, _ENUM_COMPARE_OK) and (self._enum_value(left) or self._enum_value(right))
                    and not (self._nc_version(left) and self._nc_version(right))):
                self.add(node, ENUM_OPS, f"{type(op).__name__} between {ast.unparse(left)} and {ast.unparse(right)}")
            left = right
        for op, right in zip(node.ops, node.comparators):
            if isinstance(op, (ast.In, ast.NotIn)) and self._is_dict(right):
                t = self.type_of(node.left)
                if _known_not_str(t):
                    self.add(node.left, DICT_KEYS, f"membership test with a key of type {_describe(t)}")
        self.generic_visit(node)

    # -------------------------------------------------------------- rule helpers
    def _enum_value(self, node: ast.AST) -> bool:
        """An enumeration member (`E.x`), or a name annotated with an Enum class (`e: E`)."""
        if isinstance(self.resolve(node), enum.Enum):
            return True
        if isinstance(node, ast.Name) and isinstance(self.types.get(node.id), str):
            cls = self.globals.get(self.types[node.id])
            return isinstance(cls, type) and issubclass(cls, enum.Enum)
        return False

    def _nc_version(self, node: ast.AST) -> bool:
        """`nisa.get_nc_version()` or a `nisa.nc_version` member. The guide's enumeration rule is
        about the enum classes a kernel defines, which the compiler translates to NKIObjects; the
        target version is the API's own and ordered: nki-library 0759719 gates its paths on
        `nisa.get_nc_version() >= nisa.nc_version.gen3` (`core/qkv/qkv_cte_utils.py` line 663,
        `core/moe/moe_cte/moe_cte_utils.py` line 201, `core/attention/attention_tkg.py` line 2315)."""
        if isinstance(node, ast.Call) and not node.args and not node.keywords:
            return getattr(self.resolve(node.func), "__name__", "") == "get_nc_version" and _is_isa(
                self.resolve(node.func))
        member = self.resolve(node)
        return isinstance(member, enum.Enum) and type(member).__name__ == "nc_version" and type(member).__module__ in (
            "nki.isa", "nki_kernels.emulator.isa")

    def _result_used(self, value: ast.AST) -> None:
        if isinstance(value, ast.Call) and _is_isa(self.resolve(value.func)):
            name = _name(value.func)
            if name.split(".")[-1] not in _RETURNING:
                self.add(value, RESULT_USED, f"the value of {name}(...) is used")

    def _check_dict_annotation(self, annotation: ast.AST | None, node: ast.AST) -> None:
        t = _annotation_type(annotation)
        if isinstance(t, tuple) and t[0] == "dict" and _known_not_str(t[1]):
            self.add(node, DICT_KEYS, f"annotated dict[{_describe(t[1])}, ...]")

    def _is_dict(self, node: ast.AST) -> bool:
        t = self.type_of(node)
        return t == "dict" or (isinstance(t, tuple) and t[0] == "dict")

    def _dict_subscript(self, node: ast.Subscript) -> None:
        if self._is_dict(node.value):
            t = self.type_of(node.slice)
            if _known_not_str(t):
                self.add(node, DICT_KEYS, f"indexing a dict with a key of type {_describe(t)}")

    def _dict_access_call(self, node: ast.Call) -> None:
        func = node.func
        if (isinstance(func, ast.Attribute) and func.attr in ("get", "setdefault", "pop") and node.args
                and self._is_dict(func.value)):
            t = self.type_of(node.args[0])
            if _known_not_str(t):
                self.add(node, DICT_KEYS, f".{func.attr}() with a key of type {_describe(t)}")

    def _bind_loop(self, target: ast.AST, it: ast.AST) -> None:
        if not isinstance(target, ast.Name):
            return
        elem = None
        if isinstance(it, ast.Call):
            callee = self.resolve(it.func)
            name = _name(it.func).split(".")[-1]
            if callee is range or name in ("affine_range", "sequential_range", "static_range"):
                elem = "int"
        t = self.type_of(it)
        if isinstance(t, tuple) and t[0] == "list":
            elem = t[1]
        self.types[target.id] = elem

    def type_of(self, node: ast.AST | None) -> Any:
        """What this expression evaluates to, when evident; None when not."""
        if node is None:
            return None
        if isinstance(node, ast.Constant):
            return "None" if node.value is None else type(node.value).__name__
        if isinstance(node, ast.JoinedStr):
            return "str"
        if isinstance(node, ast.Tuple):
            return "tuple"
        if isinstance(node, (ast.Dict, ast.DictComp)):
            return "dict"
        if isinstance(node, (ast.List, ast.ListComp)):
            return ("list", self.type_of(node.elts[0])) if isinstance(node, ast.List) and node.elts else "list"
        if isinstance(node, ast.Name):
            if node.id in self.types:
                return self.types[node.id]
            return None
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = self.type_of(node.left), self.type_of(node.right)
            return left if left == right else None
        if isinstance(node, ast.Call):
            callee = self.resolve(node.func)
            if callee is dict:
                return "dict"
            if callee is str:
                return "str"
            if callee in (int, len):
                return "int"
            if isinstance(callee, type) and _user_class(callee):
                return callee.__name__
            if isinstance(callee, types.FunctionType):
                ann = getattr(callee, "__annotations__", {}).get("return")
                if isinstance(ann, str):
                    return _annotation_type(ast.Constant(ann))
                if isinstance(ann, type):
                    return ann.__name__
        return None


def _origin(fn: types.FunctionType) -> str:
    """'user' for project / kernel-library code, else the stdlib module name or 'third-party'."""
    module = (getattr(fn, "__module__", "") or "").split(".")[0]
    if module in sys.stdlib_module_names:
        return module
    path = fn.__code__.co_filename
    return "third-party" if ("site-packages" in path or "dist-packages" in path) else "user"


def _is_isa(obj: Any) -> bool:
    return callable(obj) and (getattr(obj, "__module__", "") in ("nki.isa", "nki_kernels.emulator.isa"))


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return "<expr>"


__all__ = ["CLASS_BASE", "DICT_KEYS", "ENUM_OPS", "Finding", "JIT_SUBKERNEL", "KERNEL_IO", "KEYWORD_ONLY", "MASK",
           "NKILanguageError", "NKILanguageWarning", "REMOVED_API", "RESULT_USED", "SHARED_HBM_NAME", "UNKNOWN_API",
           "UNUSED_BY_AWS", "check_io", "check_kernel"]
