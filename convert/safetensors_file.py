"""The safetensors file format, read from its header alone (weights and latent files).

    8 bytes   little-endian u64 N, the header length
    N bytes   JSON: {name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]},
                     "__metadata__": {...} (optional)}
    the rest  the tensors' bytes; offsets are relative to the end of the header

Every declared size is checked against the bytes really on disk before any tensor is read,
so a header that lies (a shape bigger than its bytes, offsets past the end) is refused
without allocating anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import BinaryIO, Optional

import ml_dtypes
import numpy as np

# safetensors dtype names -> numpy (bfloat16 through ml_dtypes, which jax installs).
SAFETENSORS_DTYPES = {name: np.dtype(dtype) for name, dtype in (
    ("F16", np.float16), ("F32", np.float32), ("F64", np.float64), ("BF16", ml_dtypes.bfloat16),
    ("I8", np.int8), ("I16", np.int16), ("I32", np.int32), ("I64", np.int64), ("U8", np.uint8),
    ("BOOL", np.bool_))}

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


@dataclasses.dataclass(frozen=True)
class Entry:
  """One tensor of a safetensors file, as its header declares it (sizes already checked)."""
  dtype_name: str               # as written, e.g. "F32"; unknown names are kept
  dtype: np.dtype | None        # None for a dtype name not in SAFETENSORS_DTYPES
  shape: tuple[int, ...]
  offset: int                   # absolute byte offset of the data in the file
  nbytes: int


def read_header(f: BinaryIO) -> dict[str, Entry]:
  """Parses and checks the header of an open safetensors file. Raises ValueError saying what
  is wrong (truncated, malformed JSON, a shape that does not fit its bytes, ...)."""
  size = os.fstat(f.fileno()).st_size
  f.seek(0)
  head = f.read(8)
  if len(head) < 8:
    raise ValueError(f"{size} bytes: too short for a safetensors header")
  (n,) = struct.unpack("<Q", head)
  if n > min(MAX_HEADER_BYTES, size - 8):
    raise ValueError(f"the header claims {n} bytes, the file holds {size - 8} after the length"
                     " (truncated, or not a safetensors file)")
  try:
    header = json.loads(f.read(n))
  except (UnicodeDecodeError, ValueError) as e:
    raise ValueError(f"the header is not valid JSON ({e})")
  if not isinstance(header, dict):
    raise ValueError("the header is not a JSON object")
  data_start, data_size = 8 + n, size - 8 - n
  out = {}
  for name, spec in header.items():
    if name == "__metadata__":
      continue
    out[name] = _entry(name, spec, data_start, data_size)
  return out


def _entry(name: str, spec, data_start: int, data_size: int) -> Entry:
  if not isinstance(spec, dict):
    raise ValueError(f"tensor {name!r:.80}: its header entry is not an object")
  dtype_name, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
  is_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
  if (not isinstance(dtype_name, str) or not isinstance(shape, list)
      or not all(is_int(d) for d in shape) or not isinstance(offsets, list)
      or len(offsets) != 2 or not all(is_int(o) for o in offsets)):
    raise ValueError(f"tensor {name!r:.80}: malformed header entry {spec!r:.200}")
  begin, end = offsets
  if not begin <= end <= data_size:
    raise ValueError(f"tensor {name!r:.80}: data offsets [{begin}, {end}] lie outside the"
                     f" {data_size} data bytes of the file (truncated?)")
  dtype = SAFETENSORS_DTYPES.get(dtype_name)
  if dtype is not None:
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if need != end - begin:
      raise ValueError(f"tensor {name!r:.80}: shape {tuple(shape)} of {dtype_name} needs {need}"
                       f" bytes, its offsets span {end - begin}")
  return Entry(dtype_name, dtype, tuple(shape), data_start + begin, end - begin)


def to_bytes(tensors: dict[str, np.ndarray], metadata: Optional[dict[str, str]] = None) -> bytes:
  """A safetensors file holding `tensors` (and string `metadata`), as bytes."""
  names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
  header, blobs, offset = {}, [], 0
  for name, array in tensors.items():
    data = np.ascontiguousarray(array).tobytes()
    header[name] = {"dtype": names[np.dtype(array.dtype)], "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(data)]}
    blobs.append(data)
    offset += len(data)
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the library writes it
  return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def read_tensor(f: BinaryIO, entry: Entry) -> np.ndarray:
  """Reads one tensor's bytes into a fresh array (no memory map: see the converter)."""
  if entry.dtype is None:
    raise ValueError(f"dtype {entry.dtype_name} is not supported")
  f.seek(entry.offset)
  data = f.read(entry.nbytes)
  if len(data) != entry.nbytes:
    raise ValueError("the tensor ends early (the file was truncated after its header was read)")
  return np.frombuffer(data, entry.dtype).reshape(entry.shape)
