"""Our own lazy GGUF reader: header, metadata and tensor infos parsed over a memory map.

Nothing is copied or decoded that the caller does not ask for: vocabulary arrays are only
walked over at open time (their strings are decoded on demand), and tensor data stays in the
page cache as read-only numpy views. Every count, length and offset read from the file is
checked against the file size before it is used, so a corrupt or hostile file ends in one
`GGUFError` naming the file and the problem, never in a huge allocation or a traceback.

numpy is imported only when a numpy view is asked for: opening a file and building its
config stays cheap for commands that never touch the weights (`llmapp show`).
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import threading
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import IntEnum
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, overload

from llmapp.runtime.errors import GGUFError
from llmapp.runtime.files.ggml_types import TYPE_TRAITS, type_name

if TYPE_CHECKING:
    import numpy as np

# The files of a split model: NAME-00001-of-00003.gguf, ...
_SHARD_RE = re.compile(r"(.+)-(\d{5})-of-(\d{5})\.gguf")

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml tensors have at most four dimensions
RELEASE_EVERY_S = 0.02  # releasing_pages: the map holds ~20 ms of reading (a few MB)

_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GGUFValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# struct format character per fixed-size value type (little-endian is added by users).
_SCALAR_FORMATS: dict[int, str] = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "B",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}
_SCALAR_STRUCTS = {t: struct.Struct("<" + f) for t, f in _SCALAR_FORMATS.items()}
_NUMPY_DTYPES: dict[int, str] = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}


def value_type_name(value_type: int) -> str:
    try:
        return GGUFValueType(value_type).name
    except ValueError:
        return f"value type {value_type}"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in the file. `shape` is in GGUF order: shape[0] is the row length."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # absolute byte offset in the file
    n_bytes: int
    shard: int = 0  # which file of a split model holds it (0: the first, or the only one)

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def row_len(self) -> int:
        return self.shape[0]

    @property
    def n_rows(self) -> int:
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)


class GGUFArray(Sequence[Any]):
    """A metadata array left in the file: items are decoded only when read.

    Numeric arrays read straight from the map. String arrays record only where they start;
    the offset of every item is found by one walk the first time an item is asked for.
    """

    def __init__(self, owner: GGUFFile, key: str, elem_type: int, count: int, start: int) -> None:
        self._owner = owner
        self.key = key
        self.elem_type = elem_type
        self._count = count
        self._start = start  # offset of the first item
        # String arrays: file offset of each item's length field, filled on first use.
        self._item_offsets: array[int] | None = None

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"GGUFArray({self.key!r}, {value_type_name(self.elem_type)}, len={self._count})"

    @overload
    def __getitem__(self, index: int) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        i = index + self._count if index < 0 else index
        if not 0 <= i < self._count:
            raise IndexError(f"{self.key}: index {index} out of range ({self._count} items)")
        if self.elem_type == GGUFValueType.STRING:
            return self._decode(self.item_bytes(i), i)
        packer = _SCALAR_STRUCTS[self.elem_type]
        value = packer.unpack_from(self._owner._buffer(), self._start + i * packer.size)[0]
        return bool(value) if self.elem_type == GGUFValueType.BOOL else value

    def item_bytes(self, index: int) -> bytes:
        """Raw bytes of one string item (tokenizers may want bytes, not str)."""
        if self.elem_type != GGUFValueType.STRING:
            raise TypeError(f"{self.key} is an array of {value_type_name(self.elem_type)}")
        offsets = self._offsets()
        buf = self._owner._buffer()
        at = offsets[index]
        n = _U64.unpack_from(buf, at)[0]
        return buf[at + 8 : at + 8 + n]

    def to_list(self) -> list[Any]:
        if self.elem_type == GGUFValueType.STRING:
            return [self._decode(b, i) for i, b in enumerate(self.all_bytes())]
        fmt = f"<{self._count}{_SCALAR_FORMATS[self.elem_type]}"
        values = list(struct.unpack_from(fmt, self._owner._buffer(), self._start))
        if self.elem_type == GGUFValueType.BOOL:
            return [bool(v) for v in values]
        return values

    def __iter__(self) -> Iterator[Any]:
        return iter(self.to_list())

    def all_bytes(self) -> list[bytes]:
        """Every string item's raw bytes in one pass (also fills the offset cache)."""
        if self.elem_type != GGUFValueType.STRING:
            raise TypeError(f"{self.key} is an array of {value_type_name(self.elem_type)}")
        buf = self._owner._buffer()
        unpack = _U64.unpack_from
        items: list[bytes] = []
        offsets = array("q")
        at = self._start
        for _ in range(self._count):
            n = unpack(buf, at)[0]
            offsets.append(at)
            items.append(buf[at + 8 : at + 8 + n])
            at += 8 + n
        self._item_offsets = offsets
        return items

    def to_numpy(self) -> np.ndarray:
        """A zero-copy, read-only view of a numeric array."""
        dtype = _NUMPY_DTYPES.get(self.elem_type)
        if dtype is None:
            raise TypeError(f"{self.key}: an array of strings has no numpy view")
        import numpy as np

        buf = self._owner._buffer()
        return np.frombuffer(buf, dtype=np.dtype(dtype), count=self._count, offset=self._start)

    def _decode(self, raw: bytes, index: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(
                self._owner.path, f"item {index} of {_q(self.key)} is not valid UTF-8"
            ) from None

    def _offsets(self) -> array[int]:
        # The walk at open time already proved every length stays inside the file.
        if self._item_offsets is None:
            buf = self._owner._buffer()
            unpack = _U64.unpack_from
            offsets = array("q")
            at = self._start
            for _ in range(self._count):
                offsets.append(at)
                at += 8 + unpack(buf, at)[0]
            self._item_offsets = offsets
        return self._item_offsets


class _Cursor:
    """Bounds-checked sequential reads over the map; every read names what it was reading."""

    def __init__(self, path: Path, buf: mmap.mmap, size: int) -> None:
        self.path = path
        self.buf = buf
        self.size = size
        self.pos = 0

    def fail(self, problem: str) -> GGUFError:
        return GGUFError(self.path, problem)

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(
                f"truncated while reading {what} at offset {self.pos} "
                f"(needs {n} bytes, file is {self.size} bytes)"
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        value: int = _U32.unpack_from(self.buf, self.pos)[0]
        self.pos += 4
        return value

    def u64(self, what: str) -> int:
        self.need(8, what)
        value: int = _U64.unpack_from(self.buf, self.pos)[0]
        self.pos += 8
        return value

    def raw_string(self, what: str) -> bytes:
        n = self.u64(f"length of {what}")
        if n > self.size - self.pos:
            raise self.fail(
                f"length {n} of {what} at offset {self.pos - 8} is out of bounds "
                f"(file is {self.size} bytes)"
            )
        data = self.buf[self.pos : self.pos + n]
        self.pos += n
        return data

    def text(self, what: str) -> str:
        raw = self.raw_string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def check_count(self, count: int, min_item_bytes: int, what: str) -> None:
        """Fail fast on a count the rest of the file cannot possibly hold."""
        if count * min_item_bytes > self.size - self.pos:
            raise self.fail(
                f"{what} {count} at offset {self.pos} is out of bounds (file is {self.size} bytes)"
            )

    def skip_strings(self, count: int, what: str) -> None:
        # The one hot loop of opening: a 150k-token vocabulary is walked, never decoded.
        buf, pos, unpack = self.buf, self.pos, _U64.unpack_from
        try:
            for _ in range(count):
                pos += 8 + unpack(buf, pos)[0]
        except (struct.error, OverflowError):  # a length ran past the end of the map
            pos = self.size + 1
        if pos > self.size:
            raise self.fail(f"truncated inside {what} (file is {self.size} bytes)")
        self.pos = pos


class GGUFFile:
    """A GGUF file opened over a read-only memory map.

    Attributes: path, version, alignment, data_offset (absolute start of the tensor data
    section), file_size, metadata (key -> int/float/bool/str or GGUFArray), tensors
    (name -> TensorInfo, in file order).
    """

    def __init__(self, path: str | Path, *, _shard_of: int | None = None) -> None:
        self.path = Path(path)
        self._mm = self._map(self.path)
        self._closed = False
        self.file_size = len(self._mm)
        self._shards: list[GGUFFile] = []  # the other files of a split model
        try:
            self._parse()
            if _shard_of is None:
                self._open_shards()
        except BaseException:
            self.close()
            raise

    # -- opening ---------------------------------------------------------------------------

    @staticmethod
    def _map(path: Path) -> mmap.mmap:
        try:
            fd = os.open(path, os.O_RDONLY)
        except IsADirectoryError:
            raise GGUFError(path, "is a directory, not a GGUF file") from None
        except FileNotFoundError:
            raise GGUFError(path, "no such file") from None
        except OSError as e:
            raise GGUFError(path, f"cannot open: {e.strerror or e}") from None
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                raise GGUFError(path, "empty file, not a GGUF file")
            return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise GGUFError(path, f"cannot map file: {e}") from None
        finally:
            os.close(fd)

    def _parse(self) -> None:
        cur = _Cursor(self.path, self._mm, self.file_size)
        self._parse_header(cur)
        self._metadata: dict[str, Any] = {}
        self._value_types: dict[str, int] = {}
        for i in range(self._kv_count):
            self._parse_kv(cur, i)
        self.metadata: Mapping[str, Any] = MappingProxyType(self._metadata)
        self.alignment = self._read_alignment()
        raw_infos = [self._parse_tensor_info(cur, i) for i in range(self._tensor_count)]
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, ggml_type, rel_offset in raw_infos:
            self.tensors[name] = self._make_tensor_info(name, shape, ggml_type, rel_offset)
        self._check_no_overlap()

    def _parse_header(self, cur: _Cursor) -> None:
        if self.file_size < 4 or self._mm[:4] != GGUF_MAGIC:
            raise GGUFError(self.path, "not a GGUF file (bad magic)")
        cur.pos = 4
        self.version = cur.u32("header version")
        if self.version not in SUPPORTED_VERSIONS:
            hint = " (big-endian files are not supported)" if self.version >= 1 << 16 else ""
            raise GGUFError(self.path, f"unsupported GGUF version {self.version}{hint}")
        self._tensor_count = cur.u64("header tensor count")
        self._kv_count = cur.u64("header metadata count")
        # Smallest possible entries: key length + value type + one byte of value (13 bytes);
        # tensor name length + n_dims + one dim + type + offset (32 bytes).
        cur.check_count(self._kv_count, 13, "metadata count")
        cur.check_count(self._tensor_count, 32, "tensor count")

    def _parse_kv(self, cur: _Cursor, index: int) -> None:
        key = cur.text(f"key of metadata entry {index}")
        if key in self._metadata:
            raise GGUFError(self.path, f"duplicate metadata key {_q(key)}")
        value_type = cur.u32(f"value type of key {_q(key)}")
        self._value_types[key] = value_type
        self._metadata[key] = self._parse_value(cur, key, value_type)

    def _parse_value(self, cur: _Cursor, key: str, value_type: int) -> Any:
        what = f"value of key {_q(key)}"
        if value_type == GGUFValueType.STRING:
            raw = cur.raw_string(what)
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise GGUFError(self.path, f"{what} is not valid UTF-8") from None
        if value_type == GGUFValueType.ARRAY:
            return self._parse_array(cur, key)
        packer = _SCALAR_STRUCTS.get(value_type)
        if packer is None:
            raise GGUFError(self.path, f"key {_q(key)} has unknown {value_type_name(value_type)}")
        cur.need(packer.size, what)
        value = packer.unpack_from(self._mm, cur.pos)[0]
        cur.pos += packer.size
        return bool(value) if value_type == GGUFValueType.BOOL else value

    def _parse_array(self, cur: _Cursor, key: str) -> GGUFArray:
        elem_type = cur.u32(f"element type of array {_q(key)}")
        count = cur.u64(f"length of array {_q(key)}")
        start = cur.pos
        if elem_type == GGUFValueType.STRING:
            cur.check_count(count, 8, f"length of array {_q(key)}:")
            cur.skip_strings(count, f"array {_q(key)}")
        elif elem_type in _SCALAR_STRUCTS:
            item_size = _SCALAR_STRUCTS[elem_type].size
            cur.check_count(count, item_size, f"length of array {_q(key)}:")
            cur.pos += count * item_size
        elif elem_type == GGUFValueType.ARRAY:
            raise GGUFError(self.path, f"array {_q(key)} holds arrays (not supported)")
        else:
            raise GGUFError(
                self.path, f"array {_q(key)} has unknown element {value_type_name(elem_type)}"
            )
        return GGUFArray(self, key, elem_type, count, start)

    def _read_alignment(self) -> int:
        if "general.alignment" not in self._metadata:
            return DEFAULT_ALIGNMENT
        value = self._metadata["general.alignment"]
        if type(value) is not int or value <= 0 or value & (value - 1):
            raise GGUFError(self.path, f"general.alignment {value!r} is not a power of two")
        return value

    def _parse_tensor_info(self, cur: _Cursor, index: int) -> tuple[str, tuple[int, ...], int, int]:
        name = cur.text(f"name of tensor {index}")
        what = f"info of tensor {_q(name)}"
        n_dims = cur.u32(what)
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(
                self.path, f"tensor {_q(name)} has {n_dims} dimensions (1 to 4 allowed)"
            )
        shape = tuple(cur.u64(what) for _ in range(n_dims))
        ggml_type = cur.u32(what)
        rel_offset = cur.u64(what)
        return name, shape, ggml_type, rel_offset

    def _make_tensor_info(
        self, name: str, shape: tuple[int, ...], ggml_type: int, rel_offset: int
    ) -> TensorInfo:
        if name in self.tensors:
            raise GGUFError(self.path, f"duplicate tensor {_q(name)}")
        traits = TYPE_TRAITS.get(ggml_type)
        if traits is None:
            known = type_name(ggml_type) != f"type {ggml_type}"
            kind = (
                f"type {type_name(ggml_type)} (id {ggml_type})" if known else f"type id {ggml_type}"
            )
            raise GGUFError(self.path, f"tensor {_q(name)} has unsupported tensor {kind}")
        if any(d == 0 for d in shape):
            raise GGUFError(self.path, f"tensor {_q(name)} has a zero dimension {list(shape)}")
        if shape[0] % traits.block_size:
            raise GGUFError(
                self.path,
                f"tensor {_q(name)} row length {shape[0]} is not a multiple of the "
                f"{type_name(ggml_type)} block size {traits.block_size}",
            )
        n_elements = 1
        for d in shape:
            n_elements *= d
        n_bytes = n_elements // traits.block_size * traits.type_size
        if rel_offset % self.alignment:
            raise GGUFError(
                self.path, f"tensor {_q(name)} offset {rel_offset} is not {self.alignment}-aligned"
            )
        start = self.data_offset + rel_offset
        if start + n_bytes > self.file_size:
            raise GGUFError(
                self.path,
                f"tensor {_q(name)} data [{start}, {start + n_bytes}) is out of bounds "
                f"(file is {self.file_size} bytes)",
            )
        return TensorInfo(name, shape, ggml_type, start, n_bytes)

    def _check_no_overlap(self) -> None:
        spans = sorted((t.offset, t.offset + t.n_bytes, t.name) for t in self.tensors.values())
        for (_, end, name), (start, _, next_name) in zip(spans, spans[1:], strict=False):
            if start < end:
                raise GGUFError(self.path, f"tensors {_q(name)} and {_q(next_name)} overlap")

    # -- split models ----------------------------------------------------------------------

    def _open_shards(self) -> None:
        """A split model (`NAME-00001-of-00003.gguf`, llama.cpp's gguf-split): the first file
        holds the metadata; every file holds some tensors. They are opened together and their
        tensors listed as one model, each remembering its file."""
        count = self._metadata.get("split.count", 1)
        if not isinstance(count, int) or count <= 1:
            return
        if self._metadata.get("split.no", 0) != 0:
            raise GGUFError(self.path, "is not the first file of a split model (split.no != 0)")
        match = _SHARD_RE.fullmatch(self.path.name)
        if match is None or int(match.group(3)) != count:
            raise GGUFError(self.path, f"a split model of {count} files needs the name "
                            f"PREFIX-00001-of-{count:05d}.gguf")  # fmt: skip
        for no in range(1, count):
            sibling = self.path.with_name(f"{match.group(1)}-{no + 1:05d}-of-{count:05d}.gguf")
            shard = GGUFFile(sibling, _shard_of=no)
            self._shards.append(shard)
            if shard.get("split.no") != no:
                raise GGUFError(sibling, f"split.no is {shard.get('split.no')}, expected {no}")
            for name, info in shard.tensors.items():
                if name in self.tensors:
                    raise GGUFError(sibling, f"duplicate tensor {_q(name)}")
                self.tensors[name] = replace(info, shard=no)
        expected = self._metadata.get("split.tensors.count")
        if isinstance(expected, int) and expected != len(self.tensors):
            raise GGUFError(
                self.path, f"the split model has {len(self.tensors)} tensors, expected {expected}"
            )

    @property
    def files(self) -> list[Path]:
        """Every file of the model, in order (one, unless it is split)."""
        return [self.path, *(shard.path for shard in self._shards)]

    # -- access ----------------------------------------------------------------------------

    def _buffer(self) -> mmap.mmap:
        if self._closed:
            raise GGUFError(self.path, "file is closed")
        return self._mm

    def value_type(self, key: str) -> int:
        """The GGUF value type id of a metadata key (GGUFValueType)."""
        return self._value_types[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self._metadata.get(key, default)

    def require(self, key: str, expected_type: type | tuple[type, ...] | None = None) -> Any:
        """A metadata value that must exist (and be of expected_type, when given).

        bool never passes for int; an int passes for float (GGUF files mix f32 and ints).
        """
        if key not in self._metadata:
            raise GGUFError(self.path, f"missing required key {_q(key)}")
        value = self._metadata[key]
        if expected_type is not None and not _is_instance(value, expected_type):
            names = (
                " or ".join(t.__name__ for t in expected_type)
                if isinstance(expected_type, tuple)
                else expected_type.__name__
            )
            actual = value_type_name(self._value_types[key])
            raise GGUFError(self.path, f"key {_q(key)} has type {actual}, expected {names}")
        return value

    def tensor_info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(self.path, f"missing tensor {_q(name)}") from None

    def tensor_data(self, name: str) -> np.ndarray:
        """Read-only uint8 view [n_rows, row_bytes] of a tensor's bytes, straight over the map."""
        info = self.tensor_info(name)
        import numpy as np

        self._buffer()  # raises once the model is closed
        owner = self._shards[info.shard - 1] if info.shard else self
        flat = np.frombuffer(
            owner._buffer(), dtype=np.uint8, count=info.n_bytes, offset=info.offset
        )
        return flat.reshape(info.n_rows, info.n_bytes // info.n_rows)

    def release_pages(self, names: Iterable[str] | None = None) -> None:
        """Drop resident pages of the map: the named tensors' (after packing them into our
        own arrays), or every page of every file of the model when no names are given.

        The mapping is read-only and file-backed, so this loses nothing: a later read (an
        embedding row) faults its page back in from the page cache, and only what is still
        used counts toward resident memory. Pages shared with a neighbouring tensor are
        dropped too; they come back the same way if that tensor is read again.
        """
        if self._closed or not hasattr(mmap, "MADV_DONTNEED"):
            return
        if names is None:
            for owner in (self, *self._shards):
                owner._advise(mmap.MADV_DONTNEED, 0, owner.file_size)
            return
        for name in names:
            self._advise_tensor(mmap.MADV_DONTNEED, name)

    @contextmanager
    def releasing_pages(self, every_s: float = RELEASE_EVERY_S) -> Iterator[None]:
        """While the body runs, a thread drops the map's resident pages every `every_s`
        seconds, so a long sequential read through the map (packing every tensor, the largest
        first) keeps only what it touched in that time resident, not whole tensors. A page
        dropped before the reader got to it is faulted back in from the page cache."""
        stop = threading.Event()

        def drop() -> None:
            while not stop.wait(every_s):
                try:
                    self.release_pages()
                except ValueError:  # closed meanwhile
                    return

        thread = threading.Thread(target=drop, name="llmapp-gguf-release", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.release_pages()

    def resident_bytes(self) -> int | None:
        """Bytes of the model's files resident in this process's maps (None where the
        system cannot tell: no mincore-like view through /proc)."""
        files = {str(p.resolve()) for p in self.files}
        total, current = 0, ""
        try:
            with open("/proc/self/smaps", encoding="utf-8", errors="replace") as smaps:
                for line in smaps:
                    head, _, rest = line.partition(" ")
                    if head.endswith(":"):
                        if head == "Rss:" and current in files:
                            total += int(rest.split()[0]) * 1024
                    else:  # a mapping's first line: range perms offset dev inode [path]
                        fields = rest.split(maxsplit=4)
                        current = fields[4].strip() if len(fields) == 5 else ""
        except OSError:
            return None
        return total

    def _advise_tensor(self, option: int, name: str) -> None:
        info = self.tensor_info(name)
        owner = self._shards[info.shard - 1] if info.shard else self
        owner._advise(option, info.offset, info.n_bytes)

    def _advise(self, option: int, offset: int, n_bytes: int) -> None:
        # madvise wants a page-aligned start; the range is widened to whole pages.
        start = offset - offset % mmap.PAGESIZE
        length = min(offset + n_bytes, self.file_size) - start
        if length > 0 and not self._closed:
            self._mm.madvise(option, start, length)

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Release the map. Views from tensor_data()/to_numpy() keep it alive until dropped."""
        if self._closed:
            return
        self._closed = True
        for shard in self._shards:
            shard.close()
        try:
            self._mm.close()
        except BufferError:
            pass  # numpy views still point into the map; it is unmapped when they go

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"GGUFFile({str(self.path)!r}, version={self.version}, "
            f"{len(self._metadata)} keys, {len(self.tensors)} tensors)"
        )


def _is_instance(value: Any, expected: type | tuple[type, ...]) -> bool:
    types = expected if isinstance(expected, tuple) else (expected,)
    for t in types:
        if t is float and type(value) in (int, float):
            return True
        if t is int and type(value) is int:
            return True
        if t not in (int, float) and isinstance(value, t):
            return True
    return False


def _q(text: str) -> str:
    """Quote a name from the file for a one-line message (escapes control characters)."""
    return repr(text if len(text) <= 80 else text[:80] + "...")
