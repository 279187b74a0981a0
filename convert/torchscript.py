"""A torch-free reader of TorchScript archives (`decoder.pt`), docs/model.md.

The archive is a ZIP: `<root>/data.pkl` pickles the module tree, `<root>/data/<key>` hold raw
little-endian storages, `<root>/constants.pkl` + `<root>/constants/<key>` the code's tensor
constants. A pickle can run arbitrary code, so the unpickler resolves only the handful of
globals this format needs and refuses every other one, naming it. Every storage reference is
checked (key exists, sizes and strides sane, offset + extent inside the storage) before any
data is read, and data is read one tensor at a time.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import zipfile
import zlib
from typing import Any, Iterator

import numpy as np

from jaxconsdec.convert.errors import WeightFileError
from jaxconsdec.files import open_regular

# torch storage class name -> numpy dtype (little-endian).
STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"), "HalfStorage": np.dtype("<f2"),
    "DoubleStorage": np.dtype("<f8"), "BFloat16Storage": None,  # resolved below
    "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"), "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?"),
}
try:  # ml_dtypes ships with jax
  import ml_dtypes
  STORAGE_DTYPES["BFloat16Storage"] = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
  del STORAGE_DTYPES["BFloat16Storage"]

MAX_ELEMENTS = 1 << 34  # 16 G elements: far above any real tensor, far below overflow
# The pickles describe the module tree (a few hundred KB in the released file). Their size
# is capped before they are read: ZIP members can be deflate bombs.
MAX_PICKLE_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class StorageType:
  name: str


@dataclasses.dataclass(frozen=True)
class StorageRef:
  folder: str  # "data" or "constants"
  key: str
  dtype: np.dtype
  numel: int


@dataclasses.dataclass(frozen=True)
class TensorRef:
  """A validated view into a storage; `read()` it later, one at a time."""
  storage: StorageRef
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]


class ScriptObject:
  """Stands in for any `__torch__.*` module object: keeps its attributes, runs nothing."""

  def __init__(self, qualname: str):
    self.qualname = qualname
    self.attributes: dict[str, Any] = {}

  def __setstate__(self, state):
    if isinstance(state, dict):
      self.attributes.update(state)


def _script_class(qualname: str):
  # A fresh subclass per TorchScript class name, so the pickle's NEWOBJ builds a stub.
  return type("ScriptObject", (ScriptObject,), {"__new__": lambda cls, *a: _new(cls, qualname)})


def _new(cls, qualname):
  obj = object.__new__(cls)
  ScriptObject.__init__(obj, qualname)
  return obj


def _build_list(*args):
  return list(args[0]) if args else []


def _restore_type_tag(value, type_str=None):
  return value


class _Device(str):
  pass


class _RestrictedUnpickler(pickle.Unpickler):
  def __init__(self, data: bytes, folder: str, source: str, max_elements: int):
    super().__init__(io.BytesIO(data))
    self.folder = folder
    self.source = source
    self.max_elements = max_elements
    self.storages: dict[str, StorageRef] = {}

  def find_class(self, module: str, name: str):
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return self._rebuild_tensor
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch.jit._pickle" and name.startswith("build_") and name.endswith("list"):
      return _build_list
    if module == "torch.jit._pickle" and name == "restore_type_tag":
      return _restore_type_tag
    if module == "torch" and name == "device":
      return _Device
    if module == "torch" and name in STORAGE_DTYPES:
      return StorageType(name)
    if module.startswith("__torch__") and "." not in name and name.isidentifier():
      return _script_class(f"{module}.{name}")
    raise WeightFileError(
        f"{self.source}: refusing to load: the pickle asks for the global {module}.{name},"
        " which a TorchScript weight archive never needs (a hostile or foreign file?).")

  def persistent_load(self, pid):
    if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
        or not isinstance(pid[1], StorageType) or not isinstance(pid[2], str)
        or not isinstance(pid[4], int)):
      raise WeightFileError(f"{self.source}: malformed storage reference {pid!r:.200}")
    _, stype, key, _location, numel = pid
    if not key.isalnum():
      raise WeightFileError(f"{self.source}: storage key {key!r:.50} is not a plain name")
    if numel < 0 or numel > self.max_elements:
      raise WeightFileError(
          f"{self.source}: storage {key} claims {numel:,} elements, more than the whole model"
          f" being built has ({self.max_elements:,}): a hostile or foreign file (or pass the"
          " --config it was made for)")
    ref = StorageRef(self.folder, key, STORAGE_DTYPES[stype.name], numel)
    self.storages[key] = ref
    return ref

  def _rebuild_tensor(self, storage, offset, size, stride, *_rest):
    if not isinstance(storage, StorageRef):
      raise WeightFileError(f"{self.source}: tensor built from something other than a storage")
    ints = lambda v: isinstance(v, (tuple, list)) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in v)
    if not (isinstance(offset, int) and ints(size) and ints(stride) and len(size) == len(stride)):
      raise WeightFileError(f"{self.source}: malformed tensor (offset {offset!r:.50},"
                            f" size {size!r:.80}, stride {stride!r:.80})")
    if offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
      raise WeightFileError(f"{self.source}: tensor with a negative offset, size or stride"
                            f" (offset {offset}, size {tuple(size)}, stride {tuple(stride)})")
    count = int(np.prod(size, dtype=object)) if size else 1
    if count > self.max_elements:
      raise WeightFileError(f"{self.source}: tensor of size {tuple(size)} is implausibly large")
    extent = 0 if count == 0 else 1 + sum((n - 1) * s for n, s in zip(size, stride))
    if offset + extent > storage.numel:
      raise WeightFileError(
          f"{self.source}: tensor (offset {offset}, size {tuple(size)}, stride {tuple(stride)})"
          f" reaches past the end of its storage {storage.key} ({storage.numel} elements)")
    return TensorRef(storage, offset, tuple(size), tuple(stride))


class TorchScriptArchive:
  """Tensors of a TorchScript archive by attribute path, plus the code's tensor constants."""

  def __init__(self, path: str, max_elements: int = MAX_ELEMENTS):
    """max_elements: the most elements any storage or tensor may declare; the converter
    passes the model's parameter count, so nothing larger than the model is ever read."""
    self.path = path
    self.max_elements = max_elements
    try:
      self._file = open_regular(path)
    except OSError as e:
      raise WeightFileError(f"{path}: cannot read ({e.strerror})")
    try:
      self._zip = zipfile.ZipFile(self._file)
      names = self._zip.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      self._file.close()
      raise WeightFileError(f"{path}: not a readable ZIP/TorchScript archive ({e}); is the"
                            " file truncated? Compare its size and SHA-256 with the source.")
    if not names or "/" not in names[0]:
      raise WeightFileError(f"{path}: ZIP without the single root folder of a TorchScript archive")
    self.root = names[0].split("/", 1)[0]
    self._entries = set(names)
    if f"{self.root}/data.pkl" not in self._entries:
      raise WeightFileError(f"{path}: ZIP without {self.root}/data.pkl: not a TorchScript archive")
    self.tensors = dict(self._walk(self._unpickle("data"), ""))
    self.constants: list[TensorRef] = []
    if f"{self.root}/constants.pkl" in self._entries:
      self.constants = [v for v in _flatten(self._unpickle("constants")) if isinstance(v, TensorRef)]

  def _unpickle(self, folder: str):
    name = f"{self.root}/{folder}.pkl"
    size = self._zip.getinfo(name).file_size  # what the member declares; reads stop there
    if size > MAX_PICKLE_BYTES:
      raise WeightFileError(f"{self.path}: {folder}.pkl declares {size:,} bytes, far more than"
                            f" a module tree needs (at most {MAX_PICKLE_BYTES:,}): refused")
    try:
      data = self._zip.read(name)
      unpickler = _RestrictedUnpickler(data, folder, self.path, self.max_elements)
      obj = unpickler.load()
    except WeightFileError:
      raise
    except Exception as e:  # a truncated or malformed pickle: say so, never a traceback soup
      raise WeightFileError(f"{self.path}: {folder}.pkl is not a valid TorchScript pickle ({e})")
    for ref in unpickler.storages.values():
      self._check_storage(ref)
    return obj

  def _check_storage(self, ref: StorageRef) -> None:
    name = f"{self.root}/{ref.folder}/{ref.key}"
    if name not in self._entries:
      raise WeightFileError(f"{self.path}: storage {ref.folder}/{ref.key} is referenced but"
                            " missing from the archive (truncated or tampered file)")
    info = self._zip.getinfo(name)
    if info.file_size < ref.numel * ref.dtype.itemsize:
      raise WeightFileError(f"{self.path}: storage {ref.folder}/{ref.key} holds"
                            f" {info.file_size} bytes, less than its {ref.numel} elements need")

  def _walk(self, obj, prefix: str) -> Iterator[tuple[str, TensorRef]]:
    if isinstance(obj, TensorRef):
      yield prefix, obj
    elif isinstance(obj, ScriptObject):
      for name, value in obj.attributes.items():
        yield from self._walk(value, f"{prefix}.{name}" if prefix else str(name))

  def read(self, ref: TensorRef) -> np.ndarray:
    name = f"{self.root}/{ref.storage.folder}/{ref.storage.key}"
    itemsize = ref.storage.dtype.itemsize
    count = int(np.prod(ref.shape)) if ref.shape else 1
    extent = 0 if count == 0 else 1 + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
    try:
      with self._zip.open(name) as f:
        f.seek(ref.offset * itemsize)
        raw = f.read(extent * itemsize)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
      raise WeightFileError(f"{self.path}: storage {ref.storage.key} is unreadable ({e})")
    if len(raw) != extent * itemsize:
      raise WeightFileError(f"{self.path}: storage {ref.storage.key} ends early (truncated?)")
    flat = np.frombuffer(raw, dtype=ref.storage.dtype)
    strides = tuple(s * itemsize for s in ref.stride)
    return np.lib.stride_tricks.as_strided(flat, ref.shape, strides).copy()

  def close(self):
    self._zip.close()
    self._file.close()


def _flatten(obj) -> Iterator[Any]:
  if isinstance(obj, (tuple, list)):
    for item in obj:
      yield from _flatten(item)
  elif isinstance(obj, dict):
    for item in obj.values():
      yield from _flatten(item)
  else:
    yield obj
