"""The dm-era on-disk metadata, parsed: which era blocks were written since an era.

Pure: the walk reads blocks through a `Blocks` source and nothing else; the
device I/O is in `dmrepl.erareader`. What `written_since` computes is what
`era_invalidate --written-since E` lists: every era block whose entry in the era
array is >= E, plus every bit set in an archived (not yet digested) writeset of
an era >= E. The current writeset is not read: in a metadata snapshot it is the
empty one the snapshot's own era rollover started.

Format facts (the kernel's drivers/md/dm-era-target.c, persistent-data/dm-btree*,
dm-array.c, dm-bitset.c), all little endian, in blocks of 4096 bytes, block N at
byte N * 4096:

- Every block begins with a le32 checksum of the rest of the block (bytes 4 to
  4096): crc32c seeded with ~0 and without the final inversion, XOR a constant
  per kind of block. Each block also records its own block number.
- A btree node: a 32-byte header (csum, flags, blocknr, nr_entries,
  max_entries, value_size, padding), then max_entries le64 keys, then
  max_entries values of value_size bytes. Internal nodes hold le64 child block
  numbers; leaves hold the tree's values.
- An array (dm-array): a btree from the index of an array block to its le64
  block number. An array block has a 24-byte header (csum, max_entries,
  nr_entries, value_size, blocknr) and then its entries; array block k holds
  entries k * max_entries onwards, and every block but the last is full.
- The era array: an array of le32 eras, one per era block.
- A writeset: a bitset, i.e. an array of le64 words; bit i is bit i % 64 of
  word i // 64, so the bitset's bytes read as one little-endian bit string.
- The writeset tree: a one-level btree from era (le64 key) to a 12-byte
  packed value {le32 nr_bits, le64 root of the bitset}.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import pairwise

from dmrepl.ranges import Extent

BLOCK_SIZE = 4096
SUPERBLOCK_MAGIC = 2126579579
SUPERBLOCK_CSUM_XOR = 146538381
BTREE_CSUM_XOR = 121107
ARRAY_CSUM_XOR = 595846735
SUPPORTED_VERSION = 1

_INTERNAL_NODE, _LEAF_NODE = 1, 2
_MAX_DEPTH = 12  # far more than any tree of a metadata device can have; stops a cycle

# superblock_disk: csum u32 @0, flags u32 @4, blocknr u64 @8, uuid[16] @16, magic u64 @32,
# version u32 @40, space map root[128] @44, data_block_size u32 @172,
# metadata_block_size u32 @176, nr_blocks u32 @180, current_era u32 @184,
# current writeset {nr_bits u32, root u64} @188, writeset_tree_root u64 @200,
# era_array_root u64 @208, metadata_snap u64 @216.
_SUPERBLOCK = struct.Struct("<IIQ16xQI128xIIIIIQQQQ")
_NODE_HEADER = struct.Struct("<IIQIIII")
_ARRAY_HEADER = struct.Struct("<IIIIQ")
_WRITESET = struct.Struct("<IQ")


class MetadataDoubt(Exception):
    """The metadata is not what this reader understands or trusts: use era_invalidate."""


# -- crc32c ----------------------------------------------------------------------------------


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def _crc32c_python(data: bytes | memoryview) -> int:
    """Standard CRC-32C (Castagnoli), byte at a time: slow, for when `crc32c` is missing."""
    crc = 0xFFFFFFFF
    table = _TABLE
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


crc32c: Callable[[bytes | memoryview], int]
try:  # a C implementation (SSE 4.2 where the CPU has it): about 1 us per block
    from crc32c import crc32c as _crc32c_fast

    crc32c, FAST_CHECKSUMS = _crc32c_fast, True
except ImportError:  # pragma: no cover - depends on the environment
    crc32c, FAST_CHECKSUMS = _crc32c_python, False


def block_checksum(block: bytes | memoryview, xor: int) -> int:
    """The checksum persistent-data stores in a block's first 4 bytes.

    The kernel's `dm_bm_checksum` is crc32c(~0, data) ^ xor without the final
    inversion of standard CRC-32C, hence the extra ^ 0xFFFFFFFF.
    """
    return crc32c(memoryview(block)[4:BLOCK_SIZE]) ^ 0xFFFFFFFF ^ xor


def _check_block(block: bytes | memoryview, location: int, xor: int, kind: str) -> None:
    if len(block) != BLOCK_SIZE:
        raise MetadataDoubt(f"{kind} block {location}: {len(block)} bytes, not {BLOCK_SIZE}")
    stored = int.from_bytes(block[:4], "little")
    if stored != block_checksum(block, xor):
        raise MetadataDoubt(f"{kind} block {location}: bad checksum")


# -- superblock ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Superblock:
    """The fields of a dm-era superblock that listing changes needs."""

    location: int
    data_block_size: int  # sectors per era block
    nr_blocks: int  # era blocks
    current_era: int
    writeset_tree_root: int
    era_array_root: int
    metadata_snap: int  # block of the snapshot's superblock; 0: no snapshot held


def parse_superblock(block: bytes | memoryview, location: int) -> Superblock:
    """Check and decode the superblock read from block `location`."""
    _check_block(block, location, SUPERBLOCK_CSUM_XOR, "superblock")
    (_csum, _flags, blocknr, magic, version, data_block_size, metadata_block_size,
     nr_blocks, current_era, _ws_bits, _ws_root, ws_tree, era_array, snap,
     ) = _SUPERBLOCK.unpack_from(block)  # fmt: skip
    if magic != SUPERBLOCK_MAGIC:
        raise MetadataDoubt(f"superblock {location}: magic {magic}, not dm-era's")
    if blocknr != location:
        raise MetadataDoubt(f"superblock {location}: says it is block {blocknr}")
    if version != SUPPORTED_VERSION:
        raise MetadataDoubt(f"superblock {location}: metadata version {version}")
    if metadata_block_size != BLOCK_SIZE // 512:
        raise MetadataDoubt(f"superblock {location}: metadata blocks of {metadata_block_size} s")
    return Superblock(location, data_block_size, nr_blocks, current_era, ws_tree, era_array, snap)


# -- btrees ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """One checked btree node: its keys, and its values as one buffer."""

    leaf: bool
    keys: tuple[int, ...]
    values: memoryview  # nr_entries * value_size bytes
    value_size: int

    def value(self, index: int) -> memoryview:
        return self.values[index * self.value_size : (index + 1) * self.value_size]


def parse_node(block: bytes | memoryview, location: int, leaf_value_size: int) -> Node:
    """Check and decode a btree node whose leaves hold values of `leaf_value_size` bytes."""
    _check_block(block, location, BTREE_CSUM_XOR, "btree node")
    _csum, flags, blocknr, nr_entries, max_entries, value_size, _pad = _NODE_HEADER.unpack_from(
        block
    )
    where = f"btree node {location}"
    if blocknr != location:
        raise MetadataDoubt(f"{where}: says it is block {blocknr}")
    if flags not in (_INTERNAL_NODE, _LEAF_NODE):
        raise MetadataDoubt(f"{where}: flags {flags:#x}")
    leaf = flags == _LEAF_NODE
    if value_size != (leaf_value_size if leaf else 8):
        raise MetadataDoubt(f"{where}: values of {value_size} bytes")
    values_at = _NODE_HEADER.size + 8 * max_entries
    if nr_entries > max_entries or values_at + max_entries * value_size > BLOCK_SIZE:
        raise MetadataDoubt(f"{where}: {nr_entries} of {max_entries} entries do not fit")
    keys = struct.unpack_from(f"<{nr_entries}Q", block, _NODE_HEADER.size)
    if any(a >= b for a, b in pairwise(keys)):
        raise MetadataDoubt(f"{where}: keys out of order")
    values = memoryview(block)[values_at : values_at + nr_entries * value_size]
    return Node(leaf, keys, values, value_size)


ReadBlock = Callable[[int], bytes]


def btree_leaves(read: ReadBlock, root: int, value_size: int) -> Iterator[tuple[int, memoryview]]:
    """(key, value) of every leaf entry under `root`, in key order."""
    yield from _walk(read, root, value_size, 0)


def _walk(
    read: ReadBlock, location: int, value_size: int, depth: int
) -> Iterator[tuple[int, memoryview]]:
    if depth > _MAX_DEPTH:
        raise MetadataDoubt(f"btree deeper than {_MAX_DEPTH} at block {location}")
    node = parse_node(read(location), location, value_size)
    for index, key in enumerate(node.keys):
        if node.leaf:
            yield key, node.value(index)
        else:
            child = int.from_bytes(node.value(index), "little")
            yield from _walk(read, child, value_size, depth + 1)


# -- arrays ----------------------------------------------------------------------------------


def array_block_locations(read: ReadBlock, root: int) -> list[int]:
    """The block numbers of an array's blocks, in index order (the keys must be 0, 1, ...)."""
    locations = []
    for expected, (key, value) in enumerate(btree_leaves(read, root, 8)):
        if key != expected:
            raise MetadataDoubt(f"array {root}: block index {key} where {expected} was due")
        locations.append(int.from_bytes(value, "little"))
    return locations


def array_block_entries(block: bytes | memoryview, location: int, value_size: int) -> memoryview:
    """Check an array block; return its entries' bytes (nr_entries * value_size)."""
    _check_block(block, location, ARRAY_CSUM_XOR, "array block")
    _csum, max_entries, nr_entries, size, blocknr = _ARRAY_HEADER.unpack_from(block)
    where = f"array block {location}"
    if blocknr != location:
        raise MetadataDoubt(f"{where}: says it is block {blocknr}")
    if size != value_size or max_entries != entries_per_block(value_size):
        raise MetadataDoubt(f"{where}: {max_entries} entries of {size} bytes")
    if nr_entries > max_entries:
        raise MetadataDoubt(f"{where}: {nr_entries} entries of {max_entries}")
    start = _ARRAY_HEADER.size
    return memoryview(block)[start : start + nr_entries * value_size]


def entries_per_block(value_size: int) -> int:
    """How many entries of `value_size` bytes one array block holds (1018 eras, 509 words)."""
    return (BLOCK_SIZE - _ARRAY_HEADER.size) // value_size


# -- the change set --------------------------------------------------------------------------


PIECE_BYTES = entries_per_block(8) * 8  # the bitmap bytes one writeset array block holds
PIECE_BITS = PIECE_BYTES * 8
_ZERO_PIECE = bytes(PIECE_BYTES)


class BlockSet:
    """A set of era blocks, kept as the pieces of a bitmap that have a bit set.

    Piece p holds era blocks p * PIECE_BITS onwards as a little-endian bit string
    (block b is bit b % 8 of byte b // 8), the layout of one writeset array block.
    Only pieces with a member exist, so what a list costs follows the changes,
    not the device: a writeset of 16 TiB in 2 MiB era blocks is 258 pieces, and a
    dense bitmap of it (1 MiB) cost more to allocate and scan than the rest of
    the list.
    """

    def __init__(self, nr_blocks: int) -> None:
        self.nr_blocks = nr_blocks
        self.pieces: dict[int, bytearray] = {}

    def add(self, block: int) -> None:
        piece, bit = divmod(block, PIECE_BITS)
        bits = self.pieces.get(piece)
        if bits is None:
            bits = self.pieces[piece] = bytearray(PIECE_BYTES)
        bits[bit >> 3] |= 1 << (bit & 7)

    def add_range(self, begin: int, end: int) -> None:
        """Add era blocks begin .. end - 1."""
        while begin < end:
            piece, first = divmod(begin, PIECE_BITS)
            last = min(end - piece * PIECE_BITS, PIECE_BITS)
            self._or_piece(piece, ((1 << (last - first)) - 1) << first)
            begin = (piece + 1) * PIECE_BITS

    def merge_piece(self, piece: int, data: bytes | memoryview) -> None:
        """OR in a bit string of at most PIECE_BYTES as piece `piece` (one writeset array block)."""
        if len(data) > PIECE_BYTES:
            raise ValueError(f"{len(data)} bytes do not fit in a piece of {PIECE_BYTES}")
        if bytes(data) == _ZERO_PIECE[: len(data)]:  # most of a writeset is zeros
            return  # (comparing bytes is memcmp; comparing memoryviews, 40x slower)
        self._or_piece(piece, int.from_bytes(data, "little"))

    def _or_piece(self, piece: int, value: int) -> None:
        bits = self.pieces.get(piece)
        mine = 0 if bits is None else int.from_bytes(bits, "little")
        self.pieces[piece] = bytearray((mine | value).to_bytes(PIECE_BYTES, "little"))

    def extents(self) -> list[Extent]:
        """The set as ascending, coalesced extents of era blocks (none at or past nr_blocks)."""
        found: list[Extent] = []
        begin = end = -1
        for piece in sorted(self.pieces):
            for run in re.finditer(rb"[^\x00]+", self.pieces[piece]):  # skips zeros at C speed
                base = piece * PIECE_BITS + run.start() * 8
                value = int.from_bytes(run.group(), "little")
                while value:
                    low = (value & -value).bit_length() - 1  # first set bit
                    value >>= low
                    ones = (~value & (value + 1)).bit_length() - 1  # the run of ones there
                    value >>= ones
                    start, base = base + low, base + low + ones
                    if start == end:
                        end = base
                    else:
                        if end > begin >= 0:
                            found.append(Extent(begin, end))
                        begin, end = start, base
        if end > begin >= 0:
            found.append(Extent(begin, end))
        while found and found[-1].end > self.nr_blocks:  # a writeset's spare bits past the end
            last = found.pop()
            if last.begin < self.nr_blocks:
                found.append(Extent(last.begin, self.nr_blocks))
        return found


def mark_eras_since(result: BlockSet, entries: memoryview, first_block: int, era: int) -> None:
    """Add the era blocks of one era-array block whose era is >= `era`."""
    values = entries.cast("I")
    if not values or max(values) < era:  # the usual case: nothing this recent
        return
    if min(values) >= era:  # after a long outage: everything
        result.add_range(first_block, first_block + len(values))
        return
    for index, value in enumerate(values):
        if value >= era:
            result.add(first_block + index)


# -- the whole walk --------------------------------------------------------------------------


@dataclass(frozen=True)
class Writeset:
    era: int
    nr_bits: int
    root: int


def archived_writesets(read: ReadBlock, tree_root: int) -> list[Writeset]:
    """Every archived writeset in the writeset tree, oldest era first."""
    found = []
    for era, value in btree_leaves(read, tree_root, _WRITESET.size):
        nr_bits, root = _WRITESET.unpack(value)
        found.append(Writeset(era, nr_bits, root))
    return found


ReadMany = Callable[[list[int]], Iterator[tuple[int, bytes]]]


def written_since(sb: Superblock, read: ReadBlock, read_many: ReadMany, era: int) -> BlockSet:
    """The era blocks `era_invalidate --written-since era` lists for superblock `sb`.

    `read` fetches one block; `read_many` fetches many, yielding (location,
    block) in any order, so that it can read contiguous runs at once.
    """
    result = BlockSet(sb.nr_blocks)
    writesets = archived_writesets(read, sb.writeset_tree_root)
    for ws in writesets:
        if ws.era < era:
            continue
        if ws.nr_bits != sb.nr_blocks:  # a resize: era_invalidate would list bits we cannot
            raise MetadataDoubt(f"writeset of era {ws.era} has {ws.nr_bits} bits")
        _merge_writeset(result, read, read_many, ws)
    # The kernel digests the oldest writeset first and deletes it only once it is
    # all in the era array, so every era in the array is <= the oldest archived
    # era. When that is <= `era`, the array adds nothing the writesets did not.
    if writesets and writesets[0].era <= era:
        return result
    _mark_era_array(result, read, read_many, sb, era)
    return result


def _merge_writeset(result: BlockSet, read: ReadBlock, read_many: ReadMany, ws: Writeset) -> None:
    locations = array_block_locations(read, ws.root)
    if len(locations) != -(-ws.nr_bits // PIECE_BITS):
        raise MetadataDoubt(f"writeset of era {ws.era}: {len(locations)} array blocks")
    index_of = {location: index for index, location in enumerate(locations)}
    if len(index_of) != len(locations):
        raise MetadataDoubt(f"writeset of era {ws.era}: an array block is listed twice")
    words = 0
    for location, block in read_many(locations):
        index = index_of[location]
        entries = array_block_entries(block, location, 8)
        words += len(entries) // 8
        result.merge_piece(index, entries)
    if words != -(-ws.nr_bits // 64):
        raise MetadataDoubt(f"writeset of era {ws.era}: {words} words for {ws.nr_bits} bits")


def _mark_era_array(
    result: BlockSet, read: ReadBlock, read_many: ReadMany, sb: Superblock, era: int
) -> None:
    locations = array_block_locations(read, sb.era_array_root)
    per_block = entries_per_block(4)
    if len(locations) != -(-sb.nr_blocks // per_block):
        raise MetadataDoubt(f"era array: {len(locations)} blocks for {sb.nr_blocks} era blocks")
    index_of = {location: index for index, location in enumerate(locations)}
    if len(index_of) != len(locations):
        raise MetadataDoubt("era array: an array block is listed twice")
    entries_seen = 0
    for location, block in read_many(locations):
        index = index_of[location]
        entries = array_block_entries(block, location, 4)
        count = len(entries) // 4
        if count != min(per_block, sb.nr_blocks - index * per_block):
            raise MetadataDoubt(f"era array block {index}: {count} entries")
        entries_seen += count
        mark_eras_since(result, entries, index * per_block, era)
    if entries_seen != sb.nr_blocks:
        raise MetadataDoubt(f"era array: {entries_seen} entries for {sb.nr_blocks} era blocks")
