"""dm-era metadata sizing: constants from the kernel formats, pinned hand-computed sizes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmrepl.sizing import (
    BITS_PER_BITSET_BLOCK,
    ERAS_PER_ARRAY_BLOCK,
    MAX_ERA_BLOCKS,
    MAX_METADATA_BLOCKS,
    METADATA_BLOCK_BYTES,
    SM_ENTRIES_PER_BITMAP,
    MetadataSize,
    SizingError,
    btree_max_entries,
    btree_nodes,
    cut_headroom_blocks,
    era_array_blocks,
    era_block_count,
    metadata_size,
    published_per_mille_bytes,
    published_regression_bytes,
    space_map_bitmaps,
    validate_block_size,
    writeset_blocks,
)

TIB_SECTORS = 2**40 // 512


def test_format_constants_match_kernel_structures() -> None:
    assert METADATA_BLOCK_BYTES == 4096
    assert ERAS_PER_ARRAY_BLOCK == (4096 - 24) // 4 == 1018  # 24-byte struct array_block
    assert BITS_PER_BITSET_BLOCK == (4096 - 24) // 8 * 64 == 32576
    assert SM_ENTRIES_PER_BITMAP == (4096 - 16) * 4 == 16320  # 2 bits an entry
    assert MAX_METADATA_BLOCKS == 255 * 16320
    assert MAX_ERA_BLOCKS == 2**31 - 1


def test_btree_node_capacity() -> None:
    # (4096 - 32-byte header) / (8-byte key + value), rounded down to a multiple of 3
    assert btree_max_entries(8) == 252  # 254 -> 252
    assert btree_max_entries(12) == 201  # writeset_disk: 203 -> 201
    assert btree_max_entries(4) == 336  # ref counts: 338 -> 336


def test_btree_node_bound() -> None:
    assert btree_nodes(0) == 1
    assert btree_nodes(252) == 1  # a root leaf fills up completely
    assert btree_nodes(253) == 3 + 1  # leaves of >= 126: ceil(253/126) = 3, plus a root
    assert btree_nodes(516) == 5 + 1
    assert btree_nodes(126 * 251) == 251 + 1
    assert btree_nodes(126 * 252) == 252 + 2 + 1  # a full internal root splits
    assert btree_nodes(1, 12) == 1


def test_structure_block_counts_at_boundaries() -> None:
    assert [era_array_blocks(n) for n in (1, 1018, 1019, 2036, 2037)] == [1, 1, 2, 2, 3]
    assert [writeset_blocks(n) for n in (1, 64, 65, 32576, 32577)] == [1, 1, 1, 1, 2]
    assert [space_map_bitmaps(d) for d in (0, 1, 16320, 16321)] == [1, 1, 1, 2]
    assert space_map_bitmaps(10**9) == 255  # the kernel never covers more


# Hand computation with P = 2 pending writesets, M = 1 bitmap:
#   raw   = 2 sb + 2 index + 2M + 4 refcount + 3 wstree + 3(A+T(A)) + 6(B+T(B))
#   worst = raw + ceil(raw * 5 / 100)   (no fixed margin: calibrated on the kernel)
#   steady = 4 + M + (A+T(A)) + (B+T(B))
@pytest.mark.parametrize(
    ("era_blocks", "steady", "worst"),
    [
        (1, 9, 33),  # A=1,B=1: raw = 13 + 6 + 12 = 31; +2
        (1018, 9, 33),  # A still 1
        (1019, 10, 36),  # A=2: raw = 13 + 9 + 12 = 34; +2
        (32576, 40, 131),  # A=32, B=1: raw = 13 + 99 + 12 = 124; +7
        (32577, 42, 140),  # A=33, B=2: raw = 13 + 102 + 18 = 133; +7
    ],
)
def test_small_sizes_pinned(era_blocks: int, steady: int, worst: int) -> None:
    size = metadata_size(era_blocks * 8, 8)
    assert size == MetadataSize(era_blocks=era_blocks, steady_blocks=steady, worst_blocks=worst)


def test_one_tib_origin_at_2_mib_blocks() -> None:
    # N = 2^40 / 2^21 = 524288; A = 516 (1018*515 = 524270), T(A) = 5 leaves + root = 6
    # B = 17 (32576*16 = 521216), T(B) = 1
    # raw = 13 + 3*522 + 6*18 = 1687; worst = 1687 + 85 = 1772; steady = 4+1+522+18
    size = metadata_size(TIB_SECTORS, 4096)
    assert size.era_blocks == 524288
    assert size.steady_blocks == 545
    assert size.worst_blocks == 1772
    assert size.steady_bytes == 545 * 4096
    assert size.required_bytes == 1772 * 4096
    assert size.required_sectors == 1772 * 8 == 14176
    assert size.rounded_sectors() == 7 * 2048  # 6.92 MiB -> 7 MiB


def test_four_tib_origin_at_4_kib_blocks() -> None:
    # N = 2^30; A = 1054757 (1018*1054756 = 1073741608), T(A) = 8372 + 67 + 1 = 8440
    # B = 32962 (32576*32961 = 1073737536), T(B) = 262 + 3 + 1 = 266
    # M = 219: raw = 4 + 438 + 4 + 3 + 3*1063197 + 6*33228 = 3389408
    # worst = 3389408 + 169471 = 3558879 and ceil(3558879/16320) = 219 (fixed point)
    size = metadata_size(4 * TIB_SECTORS, 8)
    assert size.era_blocks == 2**30
    assert size.worst_blocks == 3558879
    assert size.steady_blocks == 4 + 219 + 1063197 + 33228
    assert -(-size.worst_blocks // 16320) == 219


def test_worst_case_is_about_12_7_bytes_per_era_block_plus_margin() -> None:
    size = metadata_size(TIB_SECTORS, 8)
    per_block = size.required_bytes / size.era_blocks
    assert 12.7 < per_block < 12.7 * 1.1


def test_fewer_pending_writesets_need_less() -> None:
    default = metadata_size(TIB_SECTORS, 8)
    one = metadata_size(TIB_SECTORS, 8, pending_writesets=1)
    assert one.worst_blocks < default.worst_blocks
    assert one.steady_blocks <= default.steady_blocks
    with pytest.raises(SizingError, match="pending writesets"):
        metadata_size(TIB_SECTORS, 8, pending_writesets=0)


def test_sixteen_tib_at_4_kib_blocks_has_too_many_era_blocks() -> None:
    # 16 TiB / 4 KiB = 2^32 era blocks >= 2^31
    with pytest.raises(SizingError, match=r"4294967296 era blocks.*at least 24 sectors"):
        era_block_count(16 * TIB_SECTORS, 8)
    with pytest.raises(SizingError, match="fewer than 2"):
        era_block_count(8 * TIB_SECTORS, 8)  # exactly 2^31
    assert era_block_count(8 * TIB_SECTORS - 8, 8) == MAX_ERA_BLOCKS


def test_metadata_beyond_the_space_map_limit_is_refused() -> None:
    # 5 TiB at 4 KiB: N = 1342177280, about 3 * 1.32M array blocks > 4161600
    with pytest.raises(SizingError, match="at least 16 sectors"):
        metadata_size(5 * TIB_SECTORS, 8)
    with pytest.raises(SizingError, match=r"15\.9 GiB"):
        metadata_size(8 * TIB_SECTORS - 8, 8)
    assert metadata_size(5 * TIB_SECTORS, 16).worst_blocks <= MAX_METADATA_BLOCKS


def test_sizes_grow_with_origin() -> None:
    for block in (8, 128, 4096):
        previous = metadata_size(block, block)
        origin = block
        limit = min(2**36, 4 * TIB_SECTORS * (block // 8))  # stay below the 15.9 GiB cap
        while origin * 5 // 4 + 7 < limit:
            origin = origin * 5 // 4 + 7
            current = metadata_size(origin, block)
            assert current.worst_blocks >= previous.worst_blocks
            assert current.steady_blocks >= previous.steady_blocks
            assert current.steady_blocks < current.worst_blocks
            previous = current
    previous = metadata_size(8, 8)
    for origin in range(8, 8 * 70000, 8 * 97):
        current = metadata_size(origin, 8)
        assert current.worst_blocks >= previous.worst_blocks
        previous = current


def test_worst_case_device_covers_its_own_bitmaps() -> None:
    for origin in (TIB_SECTORS // 8, TIB_SECTORS, 3 * TIB_SECTORS):
        size = metadata_size(origin, 8)
        bitmaps = space_map_bitmaps(size.worst_blocks)
        assert metadata_size(origin, 8).worst_blocks == size.worst_blocks
        assert bitmaps == -(-size.worst_blocks // 16320)


def test_era_block_count_rounds_up() -> None:
    assert era_block_count(1, 8) == 1
    assert era_block_count(8, 8) == 1
    assert era_block_count(9, 8) == 2
    assert era_block_count(TIB_SECTORS, 4096) == 524288


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (0, "era block size 0 sectors is not positive"),
        (-8, "era block size -8 sectors is not positive"),
        (
            12,
            "era block size 12 sectors is not a multiple of 8 sectors (4 KiB);"
            " use e.g. 8, 128 or 4096 sectors",
        ),
        (2**32, "does not fit"),
        (8.0, "not a whole number"),
        (True, "not a whole number"),
    ],
)
def test_invalid_block_sizes(block: object, message: str) -> None:
    with pytest.raises(SizingError) as caught:
        validate_block_size(block)  # type: ignore[arg-type]
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_valid_block_sizes() -> None:
    for block in (8, 16, 24, 128, 4096, 2**32 - 8):
        validate_block_size(block)


@pytest.mark.parametrize("origin", [0, -1, 1.5, None])
def test_invalid_origin(origin: object) -> None:
    with pytest.raises(SizingError, match=r"origin size .* sectors is not a positive"):
        era_block_count(origin, 8)  # type: ignore[arg-type]
    with pytest.raises(SizingError, match="blockdev --getsz"):
        metadata_size(origin, 8)  # type: ignore[arg-type]


def test_invalid_block_size_through_metadata_size() -> None:
    with pytest.raises(SizingError, match="multiple of 8"):
        metadata_size(TIB_SECTORS, 12)


def test_rounded_sectors_alignment() -> None:
    for origin in (8, 10**6, TIB_SECTORS, 3 * TIB_SECTORS):
        size = metadata_size(origin, 8)
        rounded = size.rounded_sectors()
        assert rounded % 2048 == 0
        assert size.required_sectors <= rounded < size.required_sectors + 2048
        assert size.rounded_sectors(8) == size.required_sectors
        assert size.rounded_sectors(4096) % 4096 == 0
    small = metadata_size(8, 8)
    assert small.rounded_sectors() == 2048  # 33 blocks -> 1 MiB


def test_rounded_sectors_adds_bitmaps_when_rounding_crosses_a_bitmap() -> None:
    size = MetadataSize(era_blocks=1, steady_blocks=1, worst_blocks=16320)
    # 16321 blocks need a second bitmap (+2 blocks with its shadow): 16322 > 16321, round again
    assert size.rounded_sectors(16321 * 8) == 2 * 16321 * 8
    # rounding to 1 MiB gives 16384 blocks, room for the 2 extra blocks
    assert size.rounded_sectors() == 131072


@pytest.mark.parametrize("align", [0, -2048, 12, 2048.0])
def test_rounded_sectors_rejects_bad_alignment(align: object) -> None:
    with pytest.raises(SizingError, match="positive multiple of 8"):
        metadata_size(8, 8).rounded_sectors(align)  # type: ignore[arg-type]


def test_published_regression_rule() -> None:
    # 1 TiB: (2.5e-6 * 2^30 + 128) / 4 = 703.09 -> 703 * 4 = 2812 KiB
    assert published_regression_bytes(TIB_SECTORS) == 2812 * 1024
    # tiny origin: 128 KiB floor
    assert published_regression_bytes(8) == 128 * 1024
    # exactly half way: 800000 KiB -> (2 + 128) / 4 = 32.5 rounds up to 33 -> 132 KiB
    assert published_regression_bytes(1_600_000) == 132 * 1024
    with pytest.raises(SizingError):
        published_regression_bytes(0)


def test_published_per_mille_rule() -> None:
    assert published_per_mille_bytes(TIB_SECTORS) == 1099511628  # 2^40 / 1000, rounded up
    assert published_per_mille_bytes(1) == 1  # 512 / 1000 rounded up
    assert published_per_mille_bytes(2000) == 1024
    with pytest.raises(SizingError):
        published_per_mille_bytes(-1)


def test_model_is_within_bounds_of_published_rules_at_large_blocks() -> None:
    # sanity: per-mille vastly over-provisions for 2 MiB blocks, the model does not
    size = metadata_size(TIB_SECTORS, 4096)
    assert size.required_bytes < published_per_mille_bytes(TIB_SECTORS) / 100


# --- against the kernel -------------------------------------------------------------------

# Measured by bench/metadata_sizing.py on Debian's user-mode Linux 6.1.176 (docs/sizing.md):
# era blocks -> (highest used count a status showed, smallest metadata that survived the
# stress), in 4 KiB blocks. Metadata depends on the number of era blocks only.
KERNEL_MEASURED = {
    16: (25, 28),
    64: (25, 28),
    256: (25, 28),
    8192: (49, 52),
    16384: (73, 76),
    25600: (100, 103),
    65536: (227, 232),
    262144: (842, 853),
    786433: (2473, 2500),
    1048576: (3290, 3325),
}
MAX_OVER_PEAK = 1.5  # issue 20, goal 7: at most 1.5 times the kernel's peak, never below it


@pytest.mark.parametrize(
    ("era_blocks", "peak", "minimum"), [(n, *m) for n, m in KERNEL_MEASURED.items()]
)
def test_size_lies_between_the_kernel_minimum_and_one_and_a_half_peaks(
    era_blocks: int, peak: int, minimum: int
) -> None:
    size = metadata_size(era_blocks * 8, 8)
    assert minimum <= size.worst_blocks <= MAX_OVER_PEAK * peak


def kernel_peak_floor(era_blocks: int) -> int:
    """A lower bound of the peak the stress drives the kernel to, at any number of era blocks.

    At its peak the kernel holds three copies of the era array (the snapshot's,
    the live one and the uncommitted rewrite), A blocks each. Everything else
    (superblocks, space map, btree nodes, writesets) took 22 blocks at 16 era
    blocks (25 - 3 one-block arrays) and never shrinks as the count grows.
    """
    return 3 * era_array_blocks(era_blocks) + 22


def test_the_floor_is_below_every_measured_peak() -> None:
    for era_blocks, (peak, _) in KERNEL_MEASURED.items():
        assert kernel_peak_floor(era_blocks) <= peak, era_blocks


@settings(max_examples=500, deadline=None)
@given(st.integers(min_value=1, max_value=2**30))
def test_size_is_at_most_one_and_a_half_floors_at_every_count(era_blocks: int) -> None:
    """Between the measured points too: the size never exceeds 1.5 times what the kernel uses."""
    size = metadata_size(era_blocks * 8, 8)
    assert size.worst_blocks <= MAX_OVER_PEAK * kernel_peak_floor(era_blocks)


@settings(max_examples=200)
@given(
    origin=st.integers(1, 64 * TIB_SECTORS),
    block=st.sampled_from([8, 128, 1024, 4096, 8192, 2**20]),
)
def test_a_device_of_the_required_size_has_room_for_a_cut_at_rest(origin: int, block: int) -> None:
    """The cut's room check passes on a device of exactly the required size at steady state,
    with at least the margin to spare, and covers two more era arrays than the steady state."""
    try:
        size = metadata_size(origin, block)
    except SizingError:
        return  # too many era blocks for one metadata device: refused elsewhere
    headroom = cut_headroom_blocks(origin, block)
    array = era_array_blocks(size.era_blocks)
    writeset = writeset_blocks(size.era_blocks)
    assert size.worst_blocks - size.steady_blocks >= headroom
    assert headroom >= 2 * array + 4 * writeset
