"""The header of a GGUF file: its metadata and tensor table, read and checked without any tensor data.

    header = read_gguf_header("model.gguf")          # or a UserError naming the file and the fix
    header.metadata["general.architecture"], header.tensors["token_embd.weight"].type_name
    header.value_types["general.file_type"]           # (4, None): a uint32, not an array

Pure Python (struct over a read-only mmap), so the preflight checks a .gguf model in a
fraction of a second without importing MLX or numpy: the magic and version, every key and
value, every tensor's name, dimensions and type, and that its bytes lie inside the file.
Each value's GGUF type is kept beside it (`value_types`), so that export writes the metadata
back as the source had it (a uint32 stays a uint32). A tensor type mipo-mlx does not import
(IQ2_XXS ... IQ4_XS, TQ*, MXFP4, ...) is one line naming it. The gguf package's GGUFReader
reads the same, but makes a numpy array of every string: 14 s and 250 MB for Qwen2.5's
151,936-token vocabulary, where this takes 0.3 s.
"""

import mmap
import os
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

from mipo_mlx.errors import UserError

# The GGML tensor types mipo-mlx imports (gguf.py's IMPORTS says how): id -> name, values and bytes per block.
TENSOR_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2),
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
}
# GGUF metadata value types: struct format of the scalar ones (8 is a string, 9 an array).
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
VERSIONS = (2, 3)
MOST_DIMENSIONS = 4  # GGML_MAX_DIMS
REDOWNLOAD = "the file is damaged or not a GGUF model: download it again"


class _Damaged(Exception):
    """What is wrong with the header, said to the user with REDOWNLOAD."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type_name: str  # e.g. "Q4_K"
    shape: tuple[int, ...]  # rows first, as numpy and MLX order it (GGUF lists the innermost dimension first)
    offset: int  # of its first byte in the file
    nbytes: int

    @property
    def row_bytes(self) -> int:
        return self.nbytes // prod(self.shape[:-1])


@dataclass(frozen=True)
class GGUFHeader:
    path: str
    metadata: dict  # key -> int, float, bool, str or a list of them
    value_types: dict[str, tuple[int, int | None]]  # key -> its GGUF value type and, for an array, its items'
    tensors: dict[str, GGUFTensor]  # in the file's order


class _Cursor:
    """Reads little-endian values from `data` and moves past them; never past the end."""

    def __init__(self, data):
        self.data, self.at = data, 0

    def raw(self, size: int) -> bytes:
        if self.at + size > len(self.data):
            raise _Damaged(f"a value at byte {self.at:,} needs {size:,} bytes, but the file ends at byte "
                           f"{len(self.data):,} (cut short, or a damaged length)")
        self.at += size
        return self.data[self.at - size : self.at]

    def take(self, fmt: str, count: int = 1) -> tuple:
        """`count` values of the one-letter struct format `fmt`."""
        return struct.unpack(f"<{count}{fmt}", self.raw(struct.calcsize(fmt) * count))

    def string(self) -> str:
        (length,) = self.take("Q")
        try:
            return self.raw(length).decode("utf-8")
        except UnicodeDecodeError:
            raise _Damaged(f"a string at byte {self.at - length:,} is not UTF-8") from None

    def typed_value(self) -> tuple[object, tuple[int, int | None]]:
        """A metadata value with its type, and its items' type when it is an array."""
        (kind,) = self.take("I")
        if kind != ARRAY:
            return self.value(kind), (kind, None)
        (item_kind,) = self.take("I")
        return self.array(item_kind), (ARRAY, item_kind)

    def value(self, kind: int):
        if kind in SCALAR_FORMATS:
            return self.take(SCALAR_FORMATS[kind])[0]
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            return self.array(self.take("I")[0])
        raise _Damaged(f"unknown metadata value type {kind} at byte {self.at:,}")

    def array(self, item_kind: int) -> list:
        (count,) = self.take("Q")
        if count > len(self.data) - self.at:  # every item takes a byte or more
            raise _Damaged(f"an array at byte {self.at:,} claims {count:,} items, more than the file holds")
        if item_kind in SCALAR_FORMATS:
            return list(self.take(SCALAR_FORMATS[item_kind], count))
        return [self.value(item_kind) for _ in range(count)]


def _type_name(type_id: int) -> str:
    """A GGML type's name, for naming one mipo-mlx does not import (the gguf package knows them all)."""
    from gguf.constants import GGMLQuantizationType

    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type {type_id}"


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """The metadata and tensor table of a GGUF file, checked (see the module docstring); else a UserError."""
    path = str(path)
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size < 24:
                raise _Damaged(f"it is {size} bytes, too few for a GGUF header (24 at least): it was cut short")
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _parse(path, data)
    except _Damaged as problem:
        raise UserError(f"cannot read this GGUF file: {problem}; {REDOWNLOAD}", file=path) from None
    except (OSError, ValueError) as error:  # ValueError: mmap of an empty file
        reason = getattr(error, "strerror", None) or str(error)
        raise UserError(f"cannot read this GGUF file ({reason}); {REDOWNLOAD}", file=path) from None


def _parse(path: str, data) -> GGUFHeader:
    cursor = _Cursor(data)
    if cursor.raw(4) != b"GGUF":
        raise _Damaged(f"it starts with {bytes(data[:4])!r}, not GGUF")
    (version,) = cursor.take("I")
    if version not in VERSIONS:
        raise _Damaged(f"GGUF version {version}, where mipo-mlx reads versions {' and '.join(map(str, VERSIONS))}")
    tensor_count, key_count = cursor.take("Q", 2)
    metadata, value_types = {}, {}
    for _ in range(key_count):
        key = cursor.string()
        metadata[key], value_types[key] = cursor.typed_value()
    listed = []
    for _ in range(tensor_count):
        name = cursor.string()
        (dimensions,) = cursor.take("I")
        if not 0 < dimensions <= MOST_DIMENSIONS:
            raise _Damaged(f"tensor {name} has {dimensions} dimensions")
        shape = tuple(reversed(cursor.take("Q", dimensions)))
        type_id, offset = cursor.take("I")[0], cursor.take("Q")[0]
        listed.append((name, shape, type_id, offset))
    unsupported = [(name, type_id) for name, _, type_id, _ in listed if type_id not in TENSOR_TYPES]
    if unsupported:
        kind = _type_name(unsupported[0][1])
        count = sum(type_id == unsupported[0][1] for _, type_id in unsupported)
        raise UserError(
            f"{count} of its tensors are {kind} (e.g. {unsupported[0][0]}), a type mipo-mlx does not import (it "
            f"imports {', '.join(name for name, _, _ in TENSOR_TYPES.values())}); use a Q4_K_M, Q5_K_M or Q8_0 "
            "file of this model, or its mlx-community version",
            file=path,
        )
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _Damaged(f"general.alignment is {alignment!r}, not a power of two")
    start = -(-cursor.at // alignment) * alignment  # tensor data begins at the next multiple of the alignment
    tensors = {}
    for name, shape, type_id, offset in listed:
        type_name, block, block_bytes = TENSOR_TYPES[type_id]
        if shape[-1] % block:
            raise _Damaged(f"tensor {name} has rows of {shape[-1]} values, not whole {type_name} blocks of {block}")
        nbytes = prod(shape) // block * block_bytes
        if start + offset + nbytes > len(data):
            raise _Damaged(f"tensor {name} ends at byte {start + offset + nbytes:,}, after the end of the file "
                           f"({len(data):,} bytes): it was cut short")
        if name in tensors:
            raise _Damaged(f"tensor {name} is listed twice")
        tensors[name] = GGUFTensor(name, type_name, shape, start + offset, nbytes)
    return GGUFHeader(path, metadata, value_types, tensors)
