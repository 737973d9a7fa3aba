"""Raw ctypes bindings to WasmEdge's C API (`libwasmedge`), for the versions wasmflow supports.

Only what the WasmEdge engine uses is declared, each with its exact C prototype, so that a wrong
argument is a Python `ArgumentError` rather than a corrupted stack. The bindings were written against
the headers of WasmEdge 0.14.0 to 0.17.1; every function used exists with the same signature in all of
them except `WasmEdge_ModuleInstanceCreateWASIWithFds` (0.16+), which is optional here.

Layout notes (x86-64 and aarch64, the platforms WasmEdge ships for):
- `WasmEdge_Value` is `{unsigned __int128 Value; WasmEdge_ValType Type;}`: 16-byte aligned, 32 bytes.
  ctypes cannot express 16-byte alignment, so the struct is declared as two u64 halves, the 8-byte
  type and 8 bytes of tail padding. It is only ever passed by pointer, where only size and offsets
  matter.
- `WasmEdge_Result` is `{uint32_t Code;}`. A one-field struct of 4 bytes is returned in a register
  exactly like a `uint32_t` on both ABIs, so host-function callbacks (ctypes callbacks cannot return
  structs) are declared to return `c_uint32`.
- `WasmEdge_String` and `WasmEdge_Bytes` are `{uint32_t Length; const char *Buf;}` passed by value.
  We never ask WasmEdge to allocate one: names are wrapped views over Python `bytes` kept alive by
  the caller (what `WasmEdge_StringWrap` does), and every function we pass them to copies them.
  Strings WasmEdge returns (import and export names) are views owned by the AST: never deleted.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from ctypes import POINTER, Structure, c_bool, c_char_p, c_int32, c_uint8, c_uint32, c_uint64, c_void_p
from pathlib import Path
from typing import Any, Mapping, Optional

from .base import ModuleError

SUPPORTED = ((0, 14), (0, 17))  # inclusive range of (major, minor) the bindings were written for
ENV_VAR = "WASMFLOW_WASMEDGE_LIB"
WASM_PAGE = 65536

# What a host function returns (wasmedge_basic.h: WasmEdge_Result_Success / _Terminate)
RESULT_SUCCESS = 0x00
RESULT_TERMINATE = 0x01  # unwinds the guest at once (what WASI's proc_exit returns)
# WasmEdge_ErrCategory / error codes (include/common/enum.inc; identical in 0.14 to 0.17)
CATEGORY_WASM = 0x00
ERR_SUCCESS = 0x00
ERR_TERMINATED = 0x01
ERR_INTERRUPTED = 0x07
# WasmEdge_ExternalType
EXTERNAL_FUNCTION = 0x00
EXTERNAL_MEMORY = 0x02
# WasmEdge_RunMode
RUN_MODE_AOT = 2

INSTALL_HINT = (
    "install WasmEdge 0.14 to 0.17 with its official installer "
    "(curl -sSf https://raw.githubusercontent.com/WasmEdge/WasmEdge/master/utils/install.sh | bash "
    "-s -- -v 0.17.1, which puts it in ~/.wasmedge) or build it from source "
    "(cmake -DWASMEDGE_USE_LLVM=OFF gives the interpreter-only library), and point "
    f"{ENV_VAR} at libwasmedge.so or the directory holding it if it is not in a standard place"
)


class WasmEdgeUnavailable(ModuleError, RuntimeError):
    """libwasmedge is missing, unloadable, or of a version these bindings do not support.

    A `ModuleError` so that a flow choosing WasmEdge where it is not installed ends as a run of status
    `invalid` carrying this message (how to install it), the way any module that cannot start does,
    rather than as an exception out of the runtime.
    """


class String(Structure):
    _fields_ = [("Length", c_uint32), ("Buf", c_void_p)]


class Bytes(Structure):
    _fields_ = [("Length", c_uint32), ("Buf", c_void_p)]


class Result(Structure):
    _fields_ = [("Code", c_uint32)]


class ValType(Structure):
    _fields_ = [("Data", c_uint8 * 8)]


class Value(Structure):
    _fields_ = [("Lo", c_uint64), ("Hi", c_uint64), ("Type", ValType), ("_pad", c_uint8 * 8)]


if ctypes.sizeof(Value) != 32:  # WasmEdge passes values by this layout: any other size corrupts every call
    raise ImportError(f"WasmEdge_Value is 32 bytes in the C API, but ctypes lays it out in {ctypes.sizeof(Value)} "
                      "on this platform; use the wasmtime engine here")

# WasmEdge_Result (*)(void *Data, const WasmEdge_CallingFrameContext *, const WasmEdge_Value *Params,
#                     WasmEdge_Value *Returns)
HOST_FUNC = ctypes.CFUNCTYPE(c_uint32, c_void_p, c_void_p, POINTER(Value), POINTER(Value))

P = c_void_p  # every WasmEdge context is an opaque pointer

# name: (restype, argtypes, required)
_PROTOTYPES: dict[str, tuple[Any, tuple[Any, ...], bool]] = {
    "WasmEdge_VersionGet": (c_char_p, (), True),
    "WasmEdge_VersionGetMajor": (c_uint32, (), True),
    "WasmEdge_VersionGetMinor": (c_uint32, (), True),
    "WasmEdge_VersionGetPatch": (c_uint32, (), True),
    "WasmEdge_LogOff": (None, (), True),
    "WasmEdge_ResultGetCode": (c_uint32, (Result,), True),
    "WasmEdge_ResultGetCategory": (c_uint32, (Result,), True),
    "WasmEdge_ResultGetMessage": (c_char_p, (Result,), True),
    "WasmEdge_ValTypeGenI32": (ValType, (), True),
    "WasmEdge_ValTypeGenI64": (ValType, (), True),
    "WasmEdge_ValTypeIsI32": (c_bool, (ValType,), True),
    "WasmEdge_ValTypeIsI64": (c_bool, (ValType,), True),
    "WasmEdge_ValTypeIsF32": (c_bool, (ValType,), True),
    "WasmEdge_ValTypeIsF64": (c_bool, (ValType,), True),
    "WasmEdge_ValTypeIsV128": (c_bool, (ValType,), True),
    # configure
    "WasmEdge_ConfigureCreate": (P, (), True),
    "WasmEdge_ConfigureSetMaxMemoryPage": (None, (P, c_uint32), True),
    "WasmEdge_ConfigureDelete": (None, (P,), True),
    "WasmEdge_ConfigureCompilerSetInterruptible": (None, (P, c_bool), True),
    # 0.17+: the loader reads a module's AOT section only in RunMode AOT (before: whenever present)
    "WasmEdge_ConfigureSetRunMode": (None, (P, c_uint32), False),
    # loader, validator, AST
    "WasmEdge_LoaderCreate": (P, (P,), True),
    "WasmEdge_LoaderParseFromBytes": (Result, (P, POINTER(P), Bytes), True),
    "WasmEdge_LoaderDelete": (None, (P,), True),
    "WasmEdge_ValidatorCreate": (P, (P,), True),
    "WasmEdge_ValidatorValidate": (Result, (P, P), True),
    "WasmEdge_ValidatorDelete": (None, (P,), True),
    "WasmEdge_ASTModuleListImportsLength": (c_uint32, (P,), True),
    "WasmEdge_ASTModuleListImports": (c_uint32, (P, POINTER(P), c_uint32), True),
    "WasmEdge_ASTModuleDelete": (None, (P,), True),
    "WasmEdge_ImportTypeGetModuleName": (String, (P,), True),
    "WasmEdge_ImportTypeGetExternalName": (String, (P,), True),
    "WasmEdge_ImportTypeGetExternalType": (c_uint32, (P,), True),
    "WasmEdge_ImportTypeGetFunctionType": (P, (P, P), True),
    # function types
    "WasmEdge_FunctionTypeCreate": (P, (POINTER(ValType), c_uint32, POINTER(ValType), c_uint32), True),
    "WasmEdge_FunctionTypeGetParametersLength": (c_uint32, (P,), True),
    "WasmEdge_FunctionTypeGetParameters": (c_uint32, (P, POINTER(ValType), c_uint32), True),
    "WasmEdge_FunctionTypeGetReturnsLength": (c_uint32, (P,), True),
    "WasmEdge_FunctionTypeGetReturns": (c_uint32, (P, POINTER(ValType), c_uint32), True),
    "WasmEdge_FunctionTypeDelete": (None, (P,), True),
    # instances
    "WasmEdge_ModuleInstanceCreate": (P, (String,), True),
    "WasmEdge_ModuleInstanceCreateWASI": (
        P, (POINTER(c_char_p), c_uint32, POINTER(c_char_p), c_uint32, POINTER(c_char_p), c_uint32), True),
    "WasmEdge_ModuleInstanceCreateWASIWithFds": (
        P, (POINTER(c_char_p), c_uint32, POINTER(c_char_p), c_uint32, POINTER(c_char_p), c_uint32,
            c_int32, c_int32, c_int32), False),
    "WasmEdge_ModuleInstanceWASIGetExitCode": (c_uint32, (P,), True),
    "WasmEdge_ModuleInstanceFindFunction": (P, (P, String), True),
    "WasmEdge_ModuleInstanceFindMemory": (P, (P, String), True),
    "WasmEdge_ModuleInstanceAddFunction": (None, (P, String, P), True),
    "WasmEdge_ModuleInstanceDelete": (None, (P,), True),
    "WasmEdge_FunctionInstanceCreate": (P, (P, HOST_FUNC, c_void_p, c_uint64), True),
    "WasmEdge_FunctionInstanceGetFunctionType": (P, (P,), True),
    "WasmEdge_FunctionInstanceDelete": (None, (P,), True),
    "WasmEdge_MemoryInstanceGetPointer": (c_void_p, (P, c_uint64, c_uint64), True),
    "WasmEdge_MemoryInstanceGetPageSize": (c_uint64, (P,), True),
    "WasmEdge_CallingFrameGetModuleInstance": (c_void_p, (P,), True),
    # store and executor
    "WasmEdge_StoreCreate": (P, (), True),
    "WasmEdge_StoreDelete": (None, (P,), True),
    "WasmEdge_ExecutorCreate": (P, (P, P), True),
    "WasmEdge_ExecutorRegisterImport": (Result, (P, P, P), True),
    "WasmEdge_ExecutorInstantiate": (Result, (P, POINTER(P), P, P), True),
    "WasmEdge_ExecutorAsyncInvoke": (P, (P, P, POINTER(Value), c_uint32), True),
    "WasmEdge_ExecutorDelete": (None, (P,), True),
    "WasmEdge_AsyncWaitFor": (c_bool, (P, c_uint64), True),
    "WasmEdge_AsyncWait": (None, (P,), True),
    "WasmEdge_AsyncCancel": (None, (P,), True),
    "WasmEdge_AsyncGet": (Result, (P, POINTER(Value), c_uint32), True),
    "WasmEdge_AsyncDelete": (None, (P,), True),
    # AOT compiler: present in every build, returns NULL where WasmEdge was built without LLVM
    "WasmEdge_CompilerCreate": (P, (P,), False),
    "WasmEdge_CompilerCompileFromBytes": (Result, (P, Bytes, c_char_p), False),
    "WasmEdge_CompilerDelete": (None, (P,), False),
}


class Lib:
    """A loaded libwasmedge with its prototypes set; attributes are the C functions by name.

    Optional functions the library lacks are `None`, so callers test `lib.X is not None`.
    """

    def __init__(self, path: str, cdll: ctypes.CDLL) -> None:
        self.path = path
        self.cdll = cdll
        for name, (restype, argtypes, required) in _PROTOTYPES.items():
            try:
                fn = getattr(cdll, name)
            except AttributeError:
                if required:
                    raise WasmEdgeUnavailable(f"{path} lacks {name}: not a WasmEdge 0.14-0.17 library") from None
                setattr(self, name, None)
                continue
            fn.restype = restype
            fn.argtypes = argtypes
            setattr(self, name, fn)
        self.version: str = (self.WasmEdge_VersionGet() or b"?").decode("utf-8", "replace")
        self.version_tuple = (
            int(self.WasmEdge_VersionGetMajor()),
            int(self.WasmEdge_VersionGetMinor()),
            int(self.WasmEdge_VersionGetPatch()),
        )
        self.i32 = self.WasmEdge_ValTypeGenI32()
        self.i64 = self.WasmEdge_ValTypeGenI64()

    @property
    def has_fd_mapping(self) -> bool:
        """WASI stdio can be mapped to our own fds (0.16+); older versions write to fds 0-2."""
        return self.WasmEdge_ModuleInstanceCreateWASIWithFds is not None

    def type_name(self, vt: ValType) -> str:
        """A value type's name. Compared by name, not bytes: byte 0 of a ValType is uninitialized padding."""
        for name in ("I32", "I64", "F32", "F64", "V128"):
            if getattr(self, f"WasmEdge_ValTypeIs{name}")(vt):
                return name.lower()
        return "ref:" + bytes(vt.Data[1:]).hex()

    def ok(self, res: Result) -> bool:
        return res.Code == 0

    def message(self, res: Result) -> str:
        text = self.WasmEdge_ResultGetMessage(res)
        return text.decode("utf-8", "replace") if text else f"error code {res.Code:#x}"

    def code(self, res: Result) -> tuple[int, int]:
        """(category, code) of a result."""
        return int(self.WasmEdge_ResultGetCategory(res)), int(self.WasmEdge_ResultGetCode(res))


class Name:
    """A `WasmEdge_String` view over bytes this object keeps alive (nothing for WasmEdge to free)."""

    __slots__ = ("raw", "s")

    def __init__(self, text: str | bytes) -> None:
        self.raw = text.encode() if isinstance(text, str) else bytes(text)
        buf = ctypes.c_char_p(self.raw)
        self.s = String(len(self.raw), ctypes.cast(buf, c_void_p))


def read_string(s: String) -> str:
    """Copy a WasmEdge-owned string view into Python."""
    if not s.Buf or not s.Length:
        return ""
    return ctypes.string_at(s.Buf, s.Length).decode("utf-8", "replace")


def c_strings(items: list[bytes]) -> tuple[Any, int]:
    """A `const char *const *` array (kept alive by the returned object) and its length."""
    arr = (c_char_p * max(1, len(items)))(*items)
    return arr, len(items)


# -- finding and loading the library ------------------------------------------------------------

_LIB_NAMES = ("libwasmedge.so", "libwasmedge.so.0", "libwasmedge.dylib")
_STANDARD_DIRS = ("~/.wasmedge/lib", "/usr/local/lib", "/usr/lib")


def candidates(environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """Where the library is looked for, in order (the issue's order: env var, install places, loader)."""
    env = os.environ if environ is None else environ
    found: list[str] = []
    override = env.get(ENV_VAR)
    if override:
        path = Path(override).expanduser()
        if path.is_dir():
            found += [str(path / n) for n in _LIB_NAMES if (path / n).exists()]
        elif path.exists():
            found.append(str(path))
        return found  # an explicit setting is not second-guessed by falling back elsewhere
    for d in _STANDARD_DIRS:
        base = Path(d).expanduser()
        found += [str(base / n) for n in _LIB_NAMES if (base / n).exists()]
    name = ctypes.util.find_library("wasmedge")
    if name:
        found.append(name)
    return found


_loaded: Optional[Lib] = None
_load_lock = threading.Lock()


def load() -> Lib:
    """The process's libwasmedge, loaded once (WasmEdgeUnavailable, saying how to get one, if none)."""
    global _loaded
    with _load_lock:
        if _loaded is None:
            _loaded = open_library()
        return _loaded


def open_library(environ: Optional[Mapping[str, str]] = None) -> Lib:
    """Find, load and version-check libwasmedge (uncached: `load` is what the engine calls)."""
    env = os.environ if environ is None else environ
    paths = candidates(env)
    if not paths:
        where = (
            f"{ENV_VAR}={env[ENV_VAR]} names no libwasmedge"
            if env.get(ENV_VAR)
            else f"libwasmedge not found ({ENV_VAR} unset; looked in {', '.join(_STANDARD_DIRS)} and the loader path)"
        )
        raise WasmEdgeUnavailable(f"{where}: {INSTALL_HINT}")
    errors = []
    for path in paths:
        try:
            cdll = ctypes.CDLL(path)
        except OSError as exc:
            errors.append(f"{path}: {exc}")
            continue
        lib = Lib(path, cdll)
        check_version(lib)
        lib.WasmEdge_LogOff()  # traps are reported in RunResult; WasmEdge's own stderr lines are noise
        return lib
    raise WasmEdgeUnavailable(f"libwasmedge could not be loaded ({'; '.join(errors)}): {INSTALL_HINT}")


def check_version(lib: Lib) -> None:
    """Refuse a library outside the range the prototypes above were checked against."""
    major, minor, _ = lib.version_tuple
    low, high = SUPPORTED
    if not (low <= (major, minor) <= high):
        raise WasmEdgeUnavailable(
            f"{lib.path} is WasmEdge {lib.version}; wasmflow's bindings support WasmEdge "
            f"{low[0]}.{low[1]} to {high[0]}.{high[1]} only: {INSTALL_HINT}"
        )
