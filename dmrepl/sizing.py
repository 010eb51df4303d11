"""Exact sizing of dm-era's metadata device.

dm-era cannot grow its metadata device and fails writes with EIO once the
metadata space map is full, so the device must be big enough for the worst
case from the start. Everything here is pure arithmetic on the on-disk
formats of ``drivers/md/dm-era-target.c`` and ``drivers/md/persistent-data/``.

What lives in the metadata device (all blocks are 4 KiB):

* the superblock, at block 0 (``SUPERBLOCK_LOCATION``), rewritten in place;
* the metadata space map (``dm-space-map-metadata.c``/``-common.c``): one
  index block, one bitmap block per 16320 metadata blocks (2 bits an entry)
  and a reference-count btree for counts above 2;
* the era array: one 32-bit era per era block in a ``dm-array`` (array blocks
  of 1018 values, indexed by a btree of 64-bit keys);
* one writeset per era: a ``dm-bitset`` (a ``dm-array`` of 64-bit words,
  32576 bits an array block) for the current era and for every archived era
  not yet digested into the era array;
* the writeset btree (era -> {nr_bits, bitset root}) of archived writesets.

Steady state (no metadata snapshot, all archived writesets digested)::

    4 + M + (A + T(A)) + (B + T(B))

with N era blocks, A = ceil(N / 1018) era-array blocks, B = ceil(N / 32576)
blocks per writeset, T(k) the btree nodes indexing k array blocks and
M = ceil(D / 16320) space-map bitmaps for a D-block device. The 4 are the
superblock, the space-map index, the reference-count btree root and the
writeset btree root.

Worst case: a metadata snapshot is held (``take_metadata_snap`` pins the era
array and the writeset btree), the live era array has since been entirely
rewritten by digestion, and a transaction is rewriting it once more. Blocks
freed inside a transaction are reusable only after the commit (the metadata
space map allocates from the last committed map), so that transaction holds
a third copy. Writesets: the current one, its in-transaction rewrite, P live
archived writesets awaiting digestion and up to P more pinned by the
snapshot. Space-map bitmaps and index are also shadowed once per
transaction. Hence::

    raw = 2 + 2 + 2M + 4 + 3 W + 3 (A + T(A)) + (2 + 2P) (B + T(B))
    worst = raw + ceil(5% of raw)

(2 superblocks, 2 index copies, 4 blocks for the reference-count btree, W
writeset-btree nodes for live, snapshot and shadow copies.) M depends on
the device size, which is the result, so a small fixed-point iteration is
used. About 12.7 bytes of metadata per era block before the margin.

Measured on the kernel (bench/metadata_sizing.py, docs/sizing.md) with a
stress that reaches every term of `raw` (a writeset costs B + T(B) blocks
even when empty: dm-array.c insert_full_ablocks gives every array block of a
new bitset its own metadata block; older kernels shared one), `raw` is 3
to 15 blocks above the smallest device that survives, and `worst` at most
1.32 times the highest use the kernel reported, from 16 to 2^20 era blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from dmrepl.errors import InvalidInput

METADATA_BLOCK_BYTES = 4096  # DM_ERA_METADATA_BLOCK_SIZE, dm-era-target.c
SECTOR_BYTES = 512
SECTORS_PER_METADATA_BLOCK = METADATA_BLOCK_BYTES // SECTOR_BYTES
MAX_ERA_BLOCKS = 2**31 - 1  # era blocks must be fewer than 2^31: valid_nr_blocks()

# dm-era-target.c: MIN_BLOCK_SIZE 8; valid_block_size() wants a multiple of it.
# The block size is parsed with "%u" and stored as __le32 data_block_size.
MIN_BLOCK_SECTORS = 8
MAX_BLOCK_SECTORS = 2**32 - 8  # largest multiple of 8 that fits in 32 bits

# dm-array.c: struct array_block is csum, max_entries, nr_entries, value_size
# (4 x __le32) + blocknr (__le64) = 24 bytes; calc_max_entries() divides the rest.
ARRAY_BLOCK_HEADER_BYTES = 24
ERA_VALUE_BYTES = 4  # setup_era_array_info(): vt.size = sizeof(__le32)
ERAS_PER_ARRAY_BLOCK = (METADATA_BLOCK_BYTES - ARRAY_BLOCK_HEADER_BYTES) // ERA_VALUE_BYTES  # 1018
# dm-bitset.c: BITS_PER_ARRAY_ENTRY 64, one __le64 word per array entry.
BITSET_WORD_BITS = 64
BITSET_WORDS_PER_ARRAY_BLOCK = (METADATA_BLOCK_BYTES - ARRAY_BLOCK_HEADER_BYTES) // 8  # 509
BITS_PER_BITSET_BLOCK = BITSET_WORDS_PER_ARRAY_BLOCK * BITSET_WORD_BITS  # 32576

# dm-btree-internal.h: struct node_header is 32 bytes (csum, flags, blocknr,
# nr_entries, max_entries, value_size, padding); keys are __le64.
BTREE_NODE_HEADER_BYTES = 32
BTREE_KEY_BYTES = 8
BTREE_INDEX_VALUE_BYTES = 8  # array-block locations and internal-node children (__le64)
WRITESET_VALUE_BYTES = 12  # struct writeset_disk {__le32 nr_bits; __le64 root;} __packed
REFCOUNT_VALUE_BYTES = 4  # ref_count_info.value_type.size = sizeof(uint32_t)

# dm-space-map-common.h: struct disk_bitmap_header is 16 bytes, ENTRIES_PER_BYTE 4.
SM_BITMAP_HEADER_BYTES = 16
SM_ENTRIES_PER_BITMAP = (METADATA_BLOCK_BYTES - SM_BITMAP_HEADER_BYTES) * 4  # 16320
# MAX_METADATA_BITMAPS 255 (one index block); DM_SM_METADATA_MAX_BLOCKS in
# dm-space-map-metadata.h. Blocks beyond this are never used by the kernel.
SM_MAX_BITMAPS = 255
MAX_METADATA_BLOCKS = SM_MAX_BITMAPS * SM_ENTRIES_PER_BITMAP  # 4161600, ~15.9 GiB

# Archived writesets assumed to await digestion at once (live; as many more may
# be pinned by a held snapshot). Every checkpoint, take_metadata_snap and
# suspend/resume archives one; the worker digests 100 bits a step
# (INSERTS_PER_STEP) and not at all while suspended. Two covers "checkpoint,
# then take_metadata_snap" before digestion catches up.
DEFAULT_PENDING_WRITESETS = 2

# Fixed-size allowances (blocks).
_SUPERBLOCKS = 2  # block 0 and the snapshot's shadow copy (metadata_take_snap)
_SM_INDEX_BLOCKS = 2  # the index block and its per-transaction shadow (metadata_ll_commit)
_REFCOUNT_TREE_BLOCKS = 4  # counts > 2 are rare in dm-era; root + shadow + slack
_STEADY_FIXED_BLOCKS = 4  # superblock, sm index, ref-count root, writeset btree root

# Safety margin on top of the model: covers kernel-version differences in btree
# fill and transient nodes, and a few more pending writesets than assumed (5 %
# of raw is about 4.8 writesets at large counts, one at 16 era blocks).
# Calibrated on Debian 6.1 (bench/metadata_sizing.py, docs/sizing.md): the model
# alone is above the measured minimum at every grid point (by 3 to 15 blocks),
# so a fixed block allowance would only inflate small devices past 1.5 times the
# kernel's peak; it is 0, and the 5 % stays.
SAFETY_MARGIN_PERCENT = 5
SAFETY_MARGIN_BLOCKS = 0


class SizingError(InvalidInput, ValueError):
    """Invalid sizing input; message says what was wrong and what to do."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def btree_max_entries(value_bytes: int) -> int:
    """Entries per btree node for a value size (dm-btree.c calc_max_entries: 3n)."""
    per_node = (METADATA_BLOCK_BYTES - BTREE_NODE_HEADER_BYTES) // (BTREE_KEY_BYTES + value_bytes)
    return 3 * (per_node // 3)


def btree_nodes(entries: int, value_bytes: int = BTREE_INDEX_VALUE_BYTES) -> int:
    """Upper bound on the nodes of a dm-btree holding `entries` leaf entries.

    In a tree that is only inserted into, every node except the root holds at
    least half its maximum (splits halve a full node; redistribution and
    two-into-three splits give fuller nodes). A root leaf holds up to its
    maximum (a full leaf is not split on an overwrite); a full internal root is
    split on the next insert through it (dm-btree.c has_space_for_insert).
    """
    leaf_max = btree_max_entries(value_bytes)
    if entries <= leaf_max:
        return 1
    internal_max = btree_max_entries(BTREE_INDEX_VALUE_BYTES)
    level = _ceil_div(entries, leaf_max // 2)
    total = level
    while level >= internal_max:
        level = _ceil_div(level, internal_max // 2)
        total += level
    return total + 1  # the root


def era_array_blocks(era_blocks: int) -> int:
    """Array blocks holding one 32-bit era per era block (A)."""
    return _ceil_div(era_blocks, ERAS_PER_ARRAY_BLOCK)


def writeset_blocks(era_blocks: int) -> int:
    """Array blocks of one writeset bitset (B); dm_bitset_resize() sizes it in 64-bit words."""
    return _ceil_div(_ceil_div(era_blocks, BITSET_WORD_BITS), BITSET_WORDS_PER_ARRAY_BLOCK)


def space_map_bitmaps(metadata_blocks: int) -> int:
    """Metadata space-map bitmap blocks covering a device of `metadata_blocks` (M)."""
    covered = min(max(metadata_blocks, 1), MAX_METADATA_BLOCKS)
    return _ceil_div(covered, SM_ENTRIES_PER_BITMAP)


@dataclass(frozen=True)
class MetadataSize:
    """Metadata needs of one dm-era device, in 4 KiB metadata blocks."""

    era_blocks: int  # N
    steady_blocks: int  # 4 KiB metadata blocks used in steady state
    worst_blocks: int  # worst case (held snapshot + full rewrite + CoW transients), incl. margin

    @property
    def steady_bytes(self) -> int:
        """Bytes used in steady state."""
        return self.steady_blocks * METADATA_BLOCK_BYTES

    @property
    def required_bytes(self) -> int:
        """Smallest safe metadata device, in bytes."""
        return self.worst_blocks * METADATA_BLOCK_BYTES

    @property
    def required_sectors(self) -> int:
        """Smallest safe metadata device, in 512-byte sectors."""
        return self.worst_blocks * SECTORS_PER_METADATA_BLOCK

    def rounded_sectors(self, align_sectors: int = 2048) -> int:
        """Required size rounded up to `align_sectors` (default 1 MiB).

        A bigger device needs more space-map bitmaps (two blocks each, with the
        shadow copy); if rounding crosses a bitmap boundary the extra blocks are
        added and the size rounded again.
        """
        if not _is_int(align_sectors) or align_sectors <= 0 or align_sectors % 8:
            raise SizingError(
                f"alignment {align_sectors!r} sectors is not a positive multiple of 8 sectors"
                " (4 KiB); use e.g. 8 or 2048 sectors"
            )
        base_bitmaps = space_map_bitmaps(self.worst_blocks)
        blocks = self.worst_blocks
        while True:
            sectors = _ceil_div(blocks * SECTORS_PER_METADATA_BLOCK, align_sectors) * align_sectors
            extra = 2 * (space_map_bitmaps(sectors // SECTORS_PER_METADATA_BLOCK) - base_bitmaps)
            if self.worst_blocks + extra <= blocks:
                return sectors
            blocks = self.worst_blocks + extra


def validate_block_size(block_sectors: int) -> None:
    """Check an era block size in sectors as dm-era's constructor does."""
    examples = "use e.g. 8, 128 or 4096 sectors"
    if not _is_int(block_sectors):
        raise SizingError(
            f"era block size {block_sectors!r} is not a whole number of sectors; {examples}"
        )
    if block_sectors <= 0:
        raise SizingError(f"era block size {block_sectors} sectors is not positive; {examples}")
    if block_sectors % MIN_BLOCK_SECTORS:
        raise SizingError(
            f"era block size {block_sectors} sectors is not a multiple of 8 sectors (4 KiB);"
            f" {examples}"
        )
    if block_sectors > MAX_BLOCK_SECTORS:
        raise SizingError(
            f"era block size {block_sectors} sectors does not fit dm-era's 32-bit block size;"
            f" use at most {MAX_BLOCK_SECTORS} sectors"
        )


def _validate_origin(origin_sectors: int) -> None:
    if not _is_int(origin_sectors) or origin_sectors <= 0:
        raise SizingError(
            f"origin size {origin_sectors!r} sectors is not a positive whole number; give the"
            " origin device's size in 512-byte sectors (e.g. from `blockdev --getsz`)"
        )


def era_block_count(origin_sectors: int, block_sectors: int) -> int:
    """Era blocks N = ceil(origin / block), as dm-era's calc_nr_blocks(); N < 2^31."""
    _validate_origin(origin_sectors)
    validate_block_size(block_sectors)
    count = _ceil_div(origin_sectors, block_sectors)
    if count > MAX_ERA_BLOCKS:
        smallest = _ceil_div(_ceil_div(origin_sectors, MAX_ERA_BLOCKS), 8) * 8
        raise SizingError(
            f"origin of {origin_sectors} sectors in era blocks of {block_sectors} sectors gives"
            f" {count} era blocks; dm-era supports fewer than 2^31 ({2**31});"
            f" use an era block size of at least {smallest} sectors"
        )
    return count


def _worst_raw(era_blocks: int, bitmaps: int, pending: int) -> int:
    array = era_array_blocks(era_blocks)
    array_total = array + btree_nodes(array)
    bitset = writeset_blocks(era_blocks)
    bitset_total = bitset + btree_nodes(bitset)
    writeset_tree = btree_nodes(pending, WRITESET_VALUE_BYTES)
    return (
        _SUPERBLOCKS
        + _SM_INDEX_BLOCKS
        + 2 * bitmaps  # each bitmap and its per-transaction shadow (sm_ll_mutate)
        + _REFCOUNT_TREE_BLOCKS
        + 3 * writeset_tree  # live, snapshot and in-transaction copies
        + 3 * array_total  # snapshot copy, live copy, in-transaction rewrite
        + (2 + 2 * pending) * bitset_total  # current + its rewrite + live and pinned archives
    )


def _with_margin(raw: int) -> int:
    return raw + _ceil_div(raw * SAFETY_MARGIN_PERCENT, 100) + SAFETY_MARGIN_BLOCKS


def _worst_blocks(era_blocks: int, pending: int) -> int:
    """Least D with D = worst(M(D)): the device size covers its own bitmaps."""
    device = 0
    while True:
        needed = _with_margin(_worst_raw(era_blocks, space_map_bitmaps(device), pending))
        if needed <= device:
            return device
        device = needed


def metadata_size(
    origin_sectors: int,
    block_sectors: int,
    *,
    pending_writesets: int = DEFAULT_PENDING_WRITESETS,
) -> MetadataSize:
    """Metadata blocks dm-era needs for an origin split into era blocks.

    `pending_writesets` is how many archived writesets may await digestion at
    once (see DEFAULT_PENDING_WRITESETS). The origin must not grow later: the
    era array grows with it but the metadata device cannot.
    """
    era_blocks = era_block_count(origin_sectors, block_sectors)
    if not _is_int(pending_writesets) or pending_writesets < 1:
        raise SizingError(
            f"pending writesets {pending_writesets!r} is not a positive whole number;"
            f" use {DEFAULT_PENDING_WRITESETS} unless eras are rolled over faster"
        )
    worst = _worst_blocks(era_blocks, pending_writesets)
    if worst > MAX_METADATA_BLOCKS:
        larger = block_sectors
        while True:
            larger *= 2
            n = _ceil_div(origin_sectors, larger)
            if _worst_blocks(n, pending_writesets) <= MAX_METADATA_BLOCKS:
                break
        raise SizingError(
            f"origin of {origin_sectors} sectors in era blocks of {block_sectors} sectors"
            f" ({era_blocks} era blocks) needs {worst} metadata blocks in the worst case, more"
            f" than the {MAX_METADATA_BLOCKS} blocks (about 15.9 GiB) a dm-era metadata device"
            f" can use; use an era block size of at least {larger} sectors"
        )
    steady = _steady_blocks(era_blocks, worst)
    return MetadataSize(era_blocks=era_blocks, steady_blocks=steady, worst_blocks=worst)


def _steady_blocks(era_blocks: int, device_blocks: int) -> int:
    """Blocks in use with nothing archived or held: fixed blocks, one era array, one writeset."""
    array = era_array_blocks(era_blocks)
    bitset = writeset_blocks(era_blocks)
    return (
        _STEADY_FIXED_BLOCKS
        + space_map_bitmaps(device_blocks)
        + array
        + btree_nodes(array)
        + bitset
        + btree_nodes(bitset)
    )


def cut_headroom_blocks(origin_sectors: int, block_sectors: int) -> int:
    """Free metadata blocks a cut may need above the steady state (the model, without margin).

    The model allows DEFAULT_PENDING_WRITESETS archived writesets awaiting the
    digest. Cuts taken faster than dm-era digests leave more, each as large as
    the current writeset; a cut taken with less free than this could fill the
    metadata device, and dm-era then fails writes.
    """
    era_blocks = era_block_count(origin_sectors, block_sectors)
    worst = _worst_blocks(era_blocks, DEFAULT_PENDING_WRITESETS)
    raw = _worst_raw(era_blocks, space_map_bitmaps(worst), DEFAULT_PENDING_WRITESETS)
    return raw - _steady_blocks(era_blocks, worst)


def published_regression_bytes(origin_sectors: int) -> int:
    """Published rule of thumb: metadata_KiB = round((2.5e-6 * origin_KiB + 128) / 4) * 4.

    Exact rational arithmetic; halves round up.
    """
    _validate_origin(origin_sectors)
    origin_kib = Fraction(origin_sectors * SECTOR_BYTES, 1024)
    quarter = (origin_kib * Fraction(25, 10**7) + 128) / 4
    kib = int(quarter + Fraction(1, 2)) * 4  # floor(x + 1/2) for x >= 0
    return kib * 1024


def published_per_mille_bytes(origin_sectors: int) -> int:
    """Published rule of thumb: metadata = origin size / 1000 (rounded up to a byte)."""
    _validate_origin(origin_sectors)
    return _ceil_div(origin_sectors * SECTOR_BYTES, 1000)
