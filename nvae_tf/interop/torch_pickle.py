"""Read PyTorch ``torch.save`` checkpoints (e.g. official NVAE ones) without torch.

Two on-disk formats are handled:

* The zip format written by ``torch.save`` since PyTorch 1.6: a zip archive
  (entries stored uncompressed) whose entries all live under one directory
  ``<prefix>/``:

  - ``<prefix>/data.pkl``: the pickled object (protocol 2 by default). Every
    tensor is pickled as ``torch._utils._rebuild_tensor_v2(storage, offset,
    size, stride, requires_grad, backward_hooks[, metadata])`` where
    ``storage`` is a *persistent id*
    ``('storage', torch.FloatStorage, '<key>', '<location>', numel)``;
  - ``<prefix>/data/<key>``: the raw bytes of each storage;
  - ``<prefix>/byteorder`` (``little``/``big``; little if absent),
    ``<prefix>/version`` and a few other bookkeeping records.

* The legacy stream format of PyTorch < 1.6 (``_use_new_zipfile_serialization
  =False``): consecutive pickles of the magic number, the protocol version
  (1001), a ``sys_info`` dict, the object itself (persistent ids
  ``('storage', type, root_key, location, numel, view_metadata)``) and the list
  of storage keys, followed by each storage as a little-endian int64 element
  count and its little-endian raw bytes. The even older tar-based format is not
  supported (a clear error explains how to re-save such a file).

Security: unpickling is restricted to a whitelist of globals (the torch rebuild
helpers and storage types, dtypes, ``torch.Size``, ``collections.OrderedDict``,
``argparse.Namespace``, harmless builtins and numpy scalar/array
reconstruction). Any other global raises :class:`ForbiddenGlobalError` (a
``pickle.UnpicklingError``) naming it; no module is ever imported on behalf of
the file.

Tensors come back as C-contiguous numpy arrays (copies, native byte order) with
the tensor's dtype; ``bfloat16`` tensors are widened to ``float32``.
Parameters come back as plain arrays as well.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import errno
import io
import os
import pickle
import struct
import tarfile
import zipfile
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

__all__ = [
    "load_torch_checkpoint",
    "TorchCheckpointUnpickler",
    "ForbiddenGlobalError",
    "CheckpointFormatError",
    "TorchDType",
    "LEGACY_MAGIC_NUMBER",
    "LEGACY_PROTOCOL_VERSION",
]

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

_ZIP_MAGIC = b"PK\x03\x04"

_RESAVE_HINT = (
    "re-save it with a current PyTorch, e.g. "
    "`torch.save(torch.load(f, map_location='cpu', weights_only=False), f2)`, "
    "and load the new file"
)


class ForbiddenGlobalError(pickle.UnpicklingError):
    """The pickle references a global that is not on the whitelist."""


class CheckpointFormatError(ValueError):
    """The file is not a readable PyTorch checkpoint."""


# --------------------------------------------------------------------------
# dtypes and storage types
# --------------------------------------------------------------------------


def _bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    """Widen native-order uint16 bfloat16 bit patterns to float32 (exact)."""
    return (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)


class _DTypeInfo:
    """How one torch element type is stored on disk and returned to the user."""

    __slots__ = ("torch_name", "raw", "convert")

    def __init__(self, torch_name: str, raw: str,
                 convert: Optional[Callable[[np.ndarray], np.ndarray]] = None):
        self.torch_name = torch_name
        self.raw = np.dtype(raw)  # on-disk element type (native byte order)
        self.convert = convert    # raw native array -> user-facing array

    @property
    def itemsize(self) -> int:
        return self.raw.itemsize

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(np.float32) if self.convert is not None else self.raw

    def decode(self, raw_bytes, count: int, byteorder: str) -> np.ndarray:
        """1-D array of ``count`` elements over ``raw_bytes`` (native order)."""
        disk = self.raw.newbyteorder("<" if byteorder == "little" else ">")
        arr = np.frombuffer(raw_bytes, dtype=disk, count=count)
        if not disk.isnative:
            arr = arr.astype(self.raw)
        if self.convert is not None:
            arr = self.convert(arr)
        return arr


_DTYPES: Dict[str, _DTypeInfo] = {
    info.torch_name: info
    for info in (
        _DTypeInfo("float32", "f4"),
        _DTypeInfo("float64", "f8"),
        _DTypeInfo("float16", "f2"),
        _DTypeInfo("bfloat16", "u2", _bfloat16_to_float32),
        _DTypeInfo("int64", "i8"),
        _DTypeInfo("int32", "i4"),
        _DTypeInfo("int16", "i2"),
        _DTypeInfo("int8", "i1"),
        _DTypeInfo("uint8", "u1"),
        _DTypeInfo("bool", "?"),
        _DTypeInfo("complex64", "c8"),
        _DTypeInfo("complex128", "c16"),
    )
}

_DTYPE_ALIASES = {
    "float": "float32", "double": "float64", "half": "float16",
    "long": "int64", "int": "int32", "short": "int16",
    "cfloat": "complex64", "cdouble": "complex128",
}

# Storage class name (``torch.<Name>``) -> element type.
_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",  # numel counts bytes
}

_STORAGE_MODULES = ("torch", "torch.storage", "torch.cuda")


class TorchDType:
    """Stand-in for a pickled ``torch.dtype`` (e.g. ``torch.float32``)."""

    __slots__ = ("name", "_info")

    def __init__(self, name: str):
        self.name = name
        self._info = _DTYPES[name]

    @property
    def numpy_dtype(self) -> np.dtype:
        """The numpy dtype tensors of this type are returned as."""
        return self._info.numpy_dtype

    def __eq__(self, other):
        return isinstance(other, TorchDType) and other.name == self.name

    def __hash__(self):
        return hash(("TorchDType", self.name))

    def __repr__(self):
        return f"torch.{self.name}"


class _StorageType:
    """Stand-in for a pickled storage class such as ``torch.FloatStorage``."""

    __slots__ = ("qualname", "info", "untyped")

    def __init__(self, qualname: str, info: _DTypeInfo, untyped: bool):
        self.qualname = qualname
        self.info = info
        self.untyped = untyped

    def __repr__(self):
        return self.qualname


class _PendingStorage:
    """Placeholder for a legacy storage during the first (scanning) pass."""

    __slots__ = ()


class _TypeMarker:
    """Stand-in for a class that is only ever passed as an argument
    (``torch.Tensor``, ``torch.nn.Parameter``) to a rebuild helper."""

    __slots__ = ("qualname",)

    def __init__(self, qualname: str):
        self.qualname = qualname

    def __repr__(self):
        return self.qualname


# --------------------------------------------------------------------------
# whitelisted plain callables
# --------------------------------------------------------------------------


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles store ``bytes`` as ``_codecs.encode(str, 'latin1')``.
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise pickle.UnpicklingError(f"unsupported _codecs.encode arguments ({type(obj).__name__}, {encoding!r})")
    return obj.encode(encoding, errors)


def _safe_bytes(*args):
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray, list, tuple)):
        return bytes(args[0])
    raise pickle.UnpicklingError("unsupported arguments for builtins.bytes")


def _torch_size(*args):
    return tuple(int(s) for s in (args[0] if args else ()))


def _torch_device(*args):
    return ":".join(str(a) for a in args if a is not None)


def _get_layout(name):
    return str(name)


def _numpy_globals() -> Dict[Tuple[str, str], Any]:
    try:
        from numpy._core import multiarray as _ma  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray as _ma  # type: ignore[no-redef]

    # ``numpy.ndarray`` itself is not exposed (calling it could wrap uninitialised
    # memory); it is only accepted as the first argument of ``_reconstruct``.
    ndarray_marker = _TypeMarker("numpy.ndarray")

    def _reconstruct(subtype, shape, dtype_code):
        if subtype is not ndarray_marker:
            raise pickle.UnpicklingError("only plain numpy.ndarray objects may be reconstructed")
        return _ma._reconstruct(np.ndarray, shape, dtype_code)

    out: Dict[Tuple[str, str], Any] = {("numpy", "ndarray"): ndarray_marker, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[(mod, "scalar")] = _ma.scalar
        out[(mod, "_reconstruct")] = _reconstruct
    return out


_PLAIN_GLOBALS: Dict[Tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
    ("builtins", "tuple"): tuple,
    ("builtins", "int"): int,
    ("builtins", "float"): float,
    ("builtins", "bool"): bool,
    ("builtins", "str"): str,
    ("builtins", "bytes"): _safe_bytes,
    ("_codecs", "encode"): _codecs_encode,
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _torch_device,
    ("torch.serialization", "_get_layout"): _get_layout,
    ("torch", "Tensor"): _TypeMarker("torch.Tensor"),
    ("torch._tensor", "Tensor"): _TypeMarker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _TypeMarker("torch.nn.Parameter"),
    ("torch.nn.parameter", "Buffer"): _TypeMarker("torch.nn.Buffer"),
}
_PLAIN_GLOBALS.update(_numpy_globals())

# (module, name) -> name of the TorchCheckpointUnpickler method implementing it.
_METHOD_GLOBALS: Dict[Tuple[str, str], str] = {
    ("torch._utils", "_rebuild_tensor"): "_rebuild_tensor",
    ("torch._utils", "_rebuild_tensor_v2"): "_rebuild_tensor_v2",
    ("torch._utils", "_rebuild_tensor_v3"): "_rebuild_tensor_v3",
    ("torch._utils", "_rebuild_parameter"): "_rebuild_parameter",
    ("torch._utils", "_rebuild_parameter_with_state"): "_rebuild_parameter_with_state",
    ("torch._tensor", "_rebuild_from_type"): "_rebuild_from_type",
    ("torch._tensor", "_rebuild_from_type_v2"): "_rebuild_from_type_v2",
    ("torch.tensor", "_rebuild_from_type"): "_rebuild_from_type",
    ("torch.tensor", "_rebuild_from_type_v2"): "_rebuild_from_type_v2",
}


def _as_int_tuple(value, what: str) -> Tuple[int, ...]:
    if isinstance(value, (int, np.integer)):
        value = (value,)
    if not isinstance(value, (tuple, list)):
        raise pickle.UnpicklingError(f"tensor {what} must be a tuple, got {type(value).__name__}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise pickle.UnpicklingError(f"tensor {what} must hold integers, got {value!r}")
        out.append(int(v))
    return tuple(out)


def _strided_copy(storage: np.ndarray, offset, size, stride) -> np.ndarray:
    """``storage.as_strided(size, stride, offset)`` (element units) as a
    C-contiguous copy, with bounds checked before any memory is touched."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise pickle.UnpicklingError(f"tensor storage must be a storage, got {type(storage).__name__}")
    size = _as_int_tuple(size, "size")
    stride = _as_int_tuple(stride, "stride")
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)):
        raise pickle.UnpicklingError(f"tensor storage offset must be an integer, got {offset!r}")
    offset = int(offset)
    if len(size) != len(stride):
        raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in length")
    if any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
        raise pickle.UnpicklingError(f"negative tensor size/stride/offset: {size}, {stride}, {offset}")
    if any(s == 0 for s in size):
        return np.zeros(size, dtype=storage.dtype)
    last = offset + sum((n - 1) * st for n, st in zip(size, stride))
    if last >= storage.shape[0]:
        raise pickle.UnpicklingError(
            f"tensor (size {size}, stride {stride}, offset {offset}) reaches element {last} "
            f"of a storage with {storage.shape[0]} elements")
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(st * itemsize for st in stride), writeable=False)
    return view.copy(order="C")


# --------------------------------------------------------------------------
# the unpickler
# --------------------------------------------------------------------------


class TorchCheckpointUnpickler(pickle.Unpickler):
    """Restricted unpickler for the object pickle of a ``torch.save`` file.

    ``storage_loader(storage_type_info, key, numel)`` must return the storage
    ``key`` as a 1-D native-order numpy array; it is called once per key (zip
    format). For the legacy format pass ``legacy_storages`` (root key -> array)
    instead, or ``legacy_scan=True`` to only record which storages exist (in
    ``self.legacy_storage_specs``) while returning ``None`` for tensors.
    Without any of these, any persistent id is an error (plain metadata
    pickles).
    """

    def __init__(self, file, *, storage_loader=None, byteorder: str = "little",
                 legacy_storages: Optional[Dict[str, np.ndarray]] = None,
                 legacy_scan: bool = False):
        super().__init__(file, encoding="utf-8")
        self._storage_loader = storage_loader
        self._byteorder = byteorder
        self._legacy_storages = legacy_storages
        self._legacy_scan = legacy_scan
        self._storage_cache: Dict[str, np.ndarray] = {}
        self.legacy_storage_specs: Dict[str, Tuple[_DTypeInfo, int]] = {}

    # -- globals ------------------------------------------------------------

    def find_class(self, module, name):
        if not isinstance(module, str) or not isinstance(name, str):
            raise ForbiddenGlobalError(f"refusing to load non-string global {module!r}.{name!r}")
        # Python-2 names written by protocol < 3 pickles (e.g. __builtin__.set).
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        if key in _PLAIN_GLOBALS:
            return _PLAIN_GLOBALS[key]
        if key in _METHOD_GLOBALS:
            return getattr(self, _METHOD_GLOBALS[key])
        if module == "torch":
            dname = _DTYPE_ALIASES.get(name, name)
            if dname in _DTYPES:
                return TorchDType(dname)
        if module in _STORAGE_MODULES and name.endswith("Storage"):
            if name not in _STORAGE_DTYPES:
                raise pickle.UnpicklingError(f"unsupported torch storage type {module}.{name}")
            return _StorageType(f"{module}.{name}", _DTYPES[_STORAGE_DTYPES[name]],
                                untyped=(name == "UntypedStorage"))
        raise ForbiddenGlobalError(
            f"refusing to load global '{module}.{name}': it is not on the whitelist of what a "
            "PyTorch weights checkpoint may reference (tensors, storages, dtypes, torch.Size, "
            "OrderedDict, argparse.Namespace, plain containers); such a file can run arbitrary "
            "code when unpickled, so it is not loaded")

    # -- storages -----------------------------------------------------------

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        typename = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if typename == "module":
            raise pickle.UnpicklingError(
                "the checkpoint contains a pickled torch.nn.Module, not only tensors; "
                "save model.state_dict() instead")
        if typename != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id type {typename!r}")
        legacy = self._legacy_storages is not None or self._legacy_scan
        if legacy:
            if len(pid) != 6:
                raise pickle.UnpicklingError(f"legacy storage id must have 6 fields, got {pid!r}")
            storage_type, key, _location, numel, view = pid[1:]
        else:
            if len(pid) != 5:
                raise pickle.UnpicklingError(f"storage id must have 5 fields, got {pid!r}")
            storage_type, key, _location, numel = pid[1:]
            view = None
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"persistent id names {storage_type!r}, not a storage type")
        if isinstance(key, bytes):
            key = key.decode("ascii")
        key = str(key)
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"bad storage size {numel!r}")

        if self._legacy_scan:
            self.legacy_storage_specs.setdefault(key, (storage_type.info, numel))
            return _PendingStorage()
        if legacy:
            if key not in self._legacy_storages:
                raise pickle.UnpicklingError(f"storage {key!r} has no data in the file")
            storage = self._legacy_storages[key]
            if view is not None:
                view_key, view_offset, view_size = view
                view_offset, view_size = int(view_offset), int(view_size)
                if view_offset < 0 or view_size < 0 or view_offset + view_size > storage.shape[0]:
                    raise pickle.UnpicklingError(f"storage view {view!r} exceeds storage {key!r}")
                storage = storage[view_offset:view_offset + view_size]
            return storage
        if self._storage_loader is None:
            raise pickle.UnpicklingError("this pickle references tensor storages but none are available")
        if key not in self._storage_cache:
            self._storage_cache[key] = self._storage_loader(storage_type.info, key, numel)
        return self._storage_cache[key]

    # -- tensor rebuild helpers (torch._utils / torch._tensor) ---------------

    def _rebuild_tensor(self, storage, storage_offset, size, stride):
        if isinstance(storage, _PendingStorage):
            return None
        return _strided_copy(storage, storage_offset, size, stride)

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride,
                           requires_grad=False, backward_hooks=None, metadata=None):
        return self._rebuild_tensor(storage, storage_offset, size, stride)

    def _rebuild_tensor_v3(self, storage, storage_offset, size, stride,
                           requires_grad, backward_hooks, dtype, metadata=None):
        # ``storage`` is an untyped (byte) storage; reinterpret it as ``dtype``.
        if isinstance(storage, _PendingStorage):
            return None
        if not isinstance(dtype, TorchDType):
            raise pickle.UnpicklingError(f"_rebuild_tensor_v3 needs a torch dtype, got {dtype!r}")
        if not isinstance(storage, np.ndarray) or storage.dtype != np.uint8 or storage.ndim != 1:
            raise pickle.UnpicklingError("_rebuild_tensor_v3 needs an untyped (byte) storage")
        info = dtype._info
        count = storage.shape[0] // info.itemsize
        typed = info.decode(storage.tobytes()[:count * info.itemsize], count, self._byteorder)
        return _strided_copy(typed, storage_offset, size, stride)

    def _rebuild_parameter(self, data, requires_grad=True, backward_hooks=None):
        return data

    def _rebuild_parameter_with_state(self, data, requires_grad, backward_hooks, state):
        return data

    def _rebuild_from_type(self, func, type_, args, dict_=None):
        return self._rebuild_from_type_v2(func, type_, args, None)

    def _rebuild_from_type_v2(self, func, new_type, args, state):
        allowed = {getattr(self, m) for m in set(_METHOD_GLOBALS.values())}
        if func not in allowed:
            raise pickle.UnpicklingError(f"_rebuild_from_type_v2 with unsupported function {func!r}")
        if not isinstance(new_type, _TypeMarker):
            raise pickle.UnpicklingError(f"_rebuild_from_type_v2 with unsupported type {new_type!r}")
        return func(*args)


# --------------------------------------------------------------------------
# file formats
# --------------------------------------------------------------------------


def _load_zip(fileobj) -> Any:
    with zipfile.ZipFile(fileobj) as zf:
        names = zf.namelist()
        if not names:
            raise CheckpointFormatError("the zip archive is empty")
        if any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in names):
            raise CheckpointFormatError(
                "it is a TorchScript archive (torch.jit.save), not a torch.save checkpoint")
        candidates = [n for n in names if n.endswith("data.pkl") and n.count("/") <= 1]
        if not candidates:
            raise CheckpointFormatError("the zip archive has no data.pkl record (not written by torch.save)")
        first_prefix = names[0].split("/", 1)[0] if "/" in names[0] else ""
        pkl_name = next((n for n in candidates if n.split("/", 1)[0] == first_prefix), candidates[0])
        prefix = pkl_name[: -len("data.pkl")]  # '' or '<dir>/'

        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointFormatError(f"unknown byteorder record {byteorder!r}")

        def load_storage(info: _DTypeInfo, key: str, numel: int) -> np.ndarray:
            record = f"{prefix}data/{key}"
            try:
                raw = zf.read(record)
            except KeyError:
                raise pickle.UnpicklingError(f"storage record {record!r} is missing") from None
            need = numel * info.itemsize
            if len(raw) < need:
                raise pickle.UnpicklingError(
                    f"storage record {record!r} has {len(raw)} bytes, expected {need}")
            return info.decode(raw, numel, byteorder)

        data = zf.read(pkl_name)
        unpickler = TorchCheckpointUnpickler(io.BytesIO(data), storage_loader=load_storage,
                                             byteorder=byteorder)
        return unpickler.load()


def _restricted_load(f):
    return TorchCheckpointUnpickler(f).load()


def _load_legacy(f) -> Any:
    magic = _restricted_load(f)
    if magic != LEGACY_MAGIC_NUMBER:
        raise CheckpointFormatError("it is a pickle file but not one written by torch.save (no magic number)")
    protocol = _restricted_load(f)
    if protocol != LEGACY_PROTOCOL_VERSION:
        raise CheckpointFormatError(f"unsupported legacy torch.save protocol version {protocol!r}")
    _restricted_load(f)  # sys_info: {'protocol_version', 'little_endian', 'type_sizes'}

    # Pass 1: find which storages the object pickle uses (their types and sizes),
    # and the position of the storage data that follows it.
    start = f.tell()
    scanner = TorchCheckpointUnpickler(f, legacy_scan=True)
    scanner.load()
    specs = scanner.legacy_storage_specs
    keys = _restricted_load(f)
    if not isinstance(keys, (list, tuple)):
        raise CheckpointFormatError("malformed legacy storage key list")

    storages: Dict[str, np.ndarray] = {}
    for key in keys:
        key = key.decode("ascii") if isinstance(key, bytes) else str(key)
        if key not in specs:
            raise CheckpointFormatError(f"storage {key!r} is listed but never used")
        info, _ = specs[key]
        header = f.read(8)
        if len(header) != 8:
            raise CheckpointFormatError(f"file ends inside the header of storage {key!r}")
        (numel,) = struct.unpack("<q", header)
        if numel < 0:
            raise CheckpointFormatError(f"negative size for storage {key!r}")
        nbytes = numel * info.itemsize
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise CheckpointFormatError(
                f"file ends inside storage {key!r} ({len(raw)} of {nbytes} bytes)")
        # Legacy torch.save always wrote little-endian storage data.
        storages[key] = info.decode(raw, numel, "little")

    # Pass 2: the real object, with the storages available.
    f.seek(start)
    return TorchCheckpointUnpickler(f, legacy_storages=storages).load()


def load_torch_checkpoint(path) -> Any:
    """Load a ``torch.save`` file without torch.

    Args:
        path: a path (str or os.PathLike) or a seekable binary file object.

    Returns:
        The unpickled object, with every tensor/parameter as a C-contiguous numpy
        array. For an official NVAE checkpoint this is a dict with ``state_dict``
        (``OrderedDict[str, np.ndarray]``), ``args`` (``argparse.Namespace``),
        ``optimizer``, ``global_step``, ``epoch``, ``arch_instance``, ...

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ForbiddenGlobalError: (a ``pickle.UnpicklingError``) the pickle references a
            global outside the whitelist, e.g. ``os.system``.
        CheckpointFormatError: (a ``ValueError``) the file is not a readable PyTorch
            checkpoint (not a zip/pickle, truncated, corrupt, legacy tar format, ...);
            the message includes the underlying reason.
    """
    if hasattr(path, "read"):
        name = getattr(path, "name", repr(path))
        return _load_any(path, name)
    fspath = os.fspath(path)
    if not os.path.exists(fspath):
        raise FileNotFoundError(errno.ENOENT, "PyTorch checkpoint not found", fspath)
    with open(fspath, "rb") as f:
        return _load_any(f, fspath)


def _load_any(f, name) -> Any:
    prefix = f"{name} is not a readable PyTorch checkpoint"
    try:
        start = f.tell()
        head = f.read(4)
        f.seek(start)
        if head == _ZIP_MAGIC:
            try:
                return _load_zip(f)
            except zipfile.BadZipFile as e:
                if "not a zip file" in str(e):
                    raise CheckpointFormatError(
                        f"BadZipFile: {e} (it starts like a zip archive but has no readable "
                        "central directory: the file is probably truncated)") from e
                raise
        if head[:1] == b"\x80":
            return _load_legacy(f)
        f.seek(start)
        try:
            is_tar = tarfile.is_tarfile(f)
        except Exception:  # pragma: no cover - defensive
            is_tar = False
        f.seek(start)
        if is_tar:
            raise CheckpointFormatError(
                "it is in the legacy tar-based torch.save format (PyTorch <= 0.3), which this "
                "loader does not read; " + _RESAVE_HINT)
        if not head:
            raise CheckpointFormatError("the file is empty")
        raise CheckpointFormatError(
            f"it is neither a zip archive (torch.save since PyTorch 1.6) nor a legacy torch.save "
            f"pickle stream (starts with bytes {head!r})")
    except ForbiddenGlobalError:
        raise
    except CheckpointFormatError as e:
        raise CheckpointFormatError(f"{prefix}: {e}") from e
    except (OSError, MemoryError):  # I/O problems are not format problems
        raise
    except RecursionError as e:
        raise CheckpointFormatError(f"{prefix}: the pickle is nested too deeply") from e
    except Exception as e:  # malformed pickle / zip: many exception types are possible
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if isinstance(e, EOFError) or "truncated" in str(e).lower():
            reason += " (the file looks truncated)"
        raise CheckpointFormatError(f"{prefix}: {reason}") from e
