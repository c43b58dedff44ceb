"""safetensors without torch: a strict header check, reading tensors as numpy, atomic writing.

Format: 8-byte little-endian header length N, N bytes of JSON ({name: {dtype, shape,
data_offsets}, "__metadata__": {str: str}}), then the data. The check refuses anything the
format does not allow (offsets outside the data, overlaps, holes, byte counts that do not fit the
shape), so a truncated or garbled file is caught before an engine sees it.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The module, not the package: deployments' engines import checkpoints, so the package may be half-initialised.
from checkpoints._errors import AdapterError
from checkpoints._files import replacing

MAX_HEADER = 100 * 2**20

# safetensors dtype -> numpy storage dtype. BF16 is kept as raw uint16 (numpy has no bfloat16).
DTYPES: dict[str, str] = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
    "F8_E4M3": "u1", "F8_E5M2": "u1",
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_NUMPY_TO_ST = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32",
                "int16": "I16", "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16",
                "uint8": "U8", "bool": "BOOL"}


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: dtype, shape and byte range inside the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass
class Tensor:
    """A tensor read from (or to be written to) safetensors: its dtype tag and a numpy array.

    `array` holds the raw storage (BF16 as uint16), so copying and transposing keep every bit.
    """

    dtype: str
    array: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def float32(self) -> np.ndarray:
        """The values as float32 (BF16 widened exactly)."""
        if self.dtype == "BF16":
            return (self.array.astype(np.uint32) << 16).view(np.float32)
        return self.array.astype(np.float32)

    def transposed(self) -> "Tensor":
        """The 2-D transpose, same dtype, contiguous."""
        return Tensor(self.dtype, np.ascontiguousarray(self.array.T))

    @classmethod
    def from_numpy(cls, arr: np.ndarray, dtype: str | None = None) -> "Tensor":
        """Wrap a numpy array (dtype tag from the array unless given, e.g. "BF16" for uint16 bits)."""
        tag = dtype or _NUMPY_TO_ST.get(arr.dtype.name)
        if tag is None:
            raise ValueError(f"numpy dtype {arr.dtype} has no safetensors equivalent")
        return cls(tag, np.ascontiguousarray(arr, dtype=np.dtype(DTYPES[tag])))


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and check a safetensors header. Returns (tensors, metadata, data offset).

    Args:
        path: the file.

    Raises:
        AdapterError: naming the file and what is wrong with it.
    """
    path = Path(path)
    where = str(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise AdapterError(where, f"not a safetensors file: {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > MAX_HEADER or 8 + n > size:
                raise AdapterError(where, f"not a safetensors file: header length {n} does not fit a {size}-byte file")
            raw = f.read(n)
    except FileNotFoundError:
        raise AdapterError(where, "no such file") from None
    except IsADirectoryError:
        raise AdapterError(where, "is a directory, expected a .safetensors file") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(where, f"not a safetensors file: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise AdapterError(where, "not a safetensors file: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise AdapterError(where, "safetensors __metadata__ must map strings to strings")
    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) - {"dtype", "shape", "data_offsets"} or len(e) != 3:
            raise AdapterError(where, f"tensor {name!r}: header entry must have dtype, shape, data_offsets")
        dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if dtype not in DTYPES:
            raise AdapterError(where, f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise AdapterError(where, f"tensor {name!r}: bad shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)
                or not 0 <= offs[0] <= offs[1] <= data_len):
            raise AdapterError(where, f"tensor {name!r}: data_offsets {offs!r} outside the {data_len}-byte data section"
                                      " (file truncated?)")
        need = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
        if offs[1] - offs[0] != need:
            raise AdapterError(where, f"tensor {name!r}: {offs[1] - offs[0]} bytes for shape {shape} {dtype} (needs {need})")
        tensors[name] = TensorInfo(name, dtype, tuple(shape), offs[0], offs[1])
    pos = 0
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if t.start != pos:
            kind = "overlaps another tensor" if t.start < pos else f"leaves a gap at byte {pos}"
            raise AdapterError(where, f"tensor {t.name!r} {kind} (file truncated or garbled?)")
        pos = t.end
    if pos != data_len:
        raise AdapterError(where, f"data section is {data_len} bytes but the tensors cover {pos} (truncated or padded?)")
    return tensors, meta, 8 + n


def read_tensors(path: str | Path, names: list[str] | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read tensors (all, or `names`) after checking the header. Returns (tensors, metadata).

    Args:
        path: the file.
        names: only these tensors (None: all).
    """
    infos, meta, offset = read_header(path)
    want = infos if names is None else {n: infos[n] for n in names}
    out: dict[str, Tensor] = {}
    mm = np.memmap(path, dtype=np.uint8, mode="r") if want else None
    for name, t in want.items():
        raw = np.array(mm[offset + t.start: offset + t.end]) if mm is not None else np.zeros(0, np.uint8)
        arr = raw.view(np.dtype(DTYPES[t.dtype])).reshape(t.shape)
        out[name] = Tensor(t.dtype, arr)
    del mm
    return out, meta


def write_safetensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors (sorted by name) atomically: temp file, fsync, rename.

    Args:
        path: the destination file.
        tensors: name -> Tensor.
        metadata: the optional `__metadata__` strings.
    """
    path = Path(path)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    pos = 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        nbytes = t.array.nbytes
        header[name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            f.write(np.ascontiguousarray(tensors[name].array).tobytes())
