"""Property tests (hypothesis) of import-table and export-table with policies and fall-behind
thresholds: any table in the patches' form imports to a config that exports and imports again
to the same config; every threshold means for dmrepl what it meant for dm-replicator; and an
exported link carries its site's policy and the first of its limits that has a table form."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmrepl.config import parse_config
from dmrepl.policy import FallBehind
from dmrepl.replicator_table import export_tables, import_table

PATH = Path("/etc/dmrepl/imported.toml")
SETTINGS = settings(
    max_examples=300,
    deadline=None,
    database=None,  # no .hypothesis directory in the checkout
    suppress_health_check=[HealthCheck.too_slow],
)

# The grammar's units (../shared/REPLICATOR.md), written out here as the specification:
# a size counts 512-byte sectors, a timeout milliseconds.
SECTORS_PER = {"": 1, "s": 1, "k": 2, "m": 2048, "g": 2**21, "t": 2**31, "p": 2**41, "e": 2**51}
MS_PER = {"": 1, "t": 1, "s": 1000, "m": 60 * 1000, "h": 3600 * 1000, "d": 86400 * 1000}
LARGEST_SIZE_BYTES = 2**63  # dmrepl's sizes: at most 8 EiB
# (spelling, the dmrepl policy it becomes); a prefix is enough, compounds join with "+"
POLICIES = [
    ("async", "asynchronous"),
    ("asynchronous", "asynchronous"),
    ("a", "asynchronous"),
    ("sync", "synchronous"),
    ("synchronous", "synchronous"),
    ("stall", "stall"),
    ("st", "stall"),
    ("async+stall", "stall"),
    ("synchronous+stall", "stall"),
    ("sync+async", "synchronous"),
]


@dataclass(frozen=True)
class Threshold:
    kind: str  # ios | size | data | timeout
    number: int
    unit: str  # as written, possibly upper case; "" for none
    old_form: bool  # `ios=N` in a link of 3 parameters, else `ios N` in one of 4

    def spelled(self) -> str:
        return f"{self.kind}{'=' if self.old_form else ' '}{self.number}{self.unit}"

    def expected(self) -> FallBehind:
        """What dmrepl must read: 0 is no threshold; beyond its range, the nearest value."""
        if self.number == 0:
            return FallBehind()
        if self.kind == "ios":
            return FallBehind(ios=self.number)
        if self.kind in ("size", "data"):
            size = self.number * SECTORS_PER[self.unit.lower()] * 512
            return FallBehind(bytes=min(size, LARGEST_SIZE_BYTES))
        milliseconds = self.number * MS_PER[self.unit.lower()]
        return FallBehind(seconds=min(max(milliseconds, 1000), 86_400_000) / 1000)


@st.composite
def thresholds(draw: st.DrawFn) -> Threshold:
    kind = draw(st.sampled_from(["ios", "size", "data", "timeout"]))
    number = draw(
        st.one_of(
            st.integers(0, 3),
            st.integers(0, 100_000),
            st.integers(0, 2**63 - 1),
            # multiples of powers of two, so that every unit is the largest exact one
            st.builds(lambda small, shift: small << shift, st.integers(1, 9), st.integers(0, 59)),
        )
    )
    units = {"ios": [""], "timeout": list(MS_PER)}.get(kind, list(SECTORS_PER))
    unit = draw(st.sampled_from(units))
    if draw(st.booleans()):
        unit = unit.upper()
    return Threshold(kind, number, unit, draw(st.booleans()))


@dataclass(frozen=True)
class Link:
    number: int
    policy: tuple[str, str]  # (as the table spells it, the dmrepl policy)
    threshold: Threshold | None

    def table(self) -> str:
        if self.threshold is None:
            return f"blockdev 2 {self.number} {self.policy[0]}"
        count = 3 if self.threshold.old_form else 4
        return f"blockdev {count} {self.number} {self.policy[0]} {self.threshold.spelled()}"


@st.composite
def replications(draw: st.DrawFn) -> tuple[str, list[Link]]:
    """A file of tables in the patches' form: 1-3 remote links, 1-2 devices."""
    numbers = draw(st.lists(st.integers(1, 9), min_size=1, max_size=3, unique=True))
    links = [
        Link(n, draw(st.sampled_from(POLICIES)), draw(st.none() | thresholds())) for n in numbers
    ]
    spool = draw(st.integers(1, 2**40))
    lines = [
        f"0 8 replicator ringbuffer 4 /dev/vg/rlog 0 auto {spool} blockdev 2 0 async "
        + " ".join(link.table() for link in links)
    ]
    for device in range(draw(st.integers(1, 2))):
        legs = " ".join(f"{n} 1 /dev/dr{n}/lv{device} core 1 1024" for n in numbers)
        lines.append(
            f"0 2048 replicator-dev /dev/mapper/vg-repl {device} "
            f"0 1 /dev/vg/lv{device} nolog 0 {legs}"
        )
    return "\n".join(lines) + "\n", links


@SETTINGS
@given(replications())
def test_import_export_import_gives_the_same_config(case: tuple[str, list[Link]]) -> None:
    text, _ = case
    first = import_table(text, "g", "first")
    config = parse_config(first, PATH)
    exported = export_tables(config.groups["g"], str(config.state_dir), {})
    second = import_table(exported, "g", "second")
    again = parse_config(second, PATH)
    assert again.groups == config.groups
    assert tomllib.loads(second) == tomllib.loads(first)
    assert export_tables(again.groups["g"], str(again.state_dir), {}) == exported


@SETTINGS
@given(replications())
def test_every_link_keeps_its_policy_and_threshold(case: tuple[str, list[Link]]) -> None:
    text, links = case
    group = parse_config(import_table(text, "g", "t"), PATH).groups["g"]
    for link in links:
        site = group.site(f"slink{link.number}")
        assert site.policy == link.policy[1]
        expected = link.threshold.expected() if link.threshold else FallBehind()
        if site.policy == "synchronous":  # never behind while joined: no limit
            expected = FallBehind()
        assert site.fall_behind == expected, link.table()


@st.composite
def limits(draw: st.DrawFn) -> dict[str, object]:
    """A site's `fall_behind` table as dmrepl takes it: any of ios, size, timeout."""
    table: dict[str, object] = {}
    if draw(st.booleans()):
        table["ios"] = draw(st.integers(0, 2**63 - 1))
    if draw(st.booleans()):
        table["size"] = f"{draw(st.integers(1, 2**54))}s"
    if draw(st.booleans()):
        table["timeout"] = draw(
            st.integers(1, 86_400) | st.integers(1000, 86_400_000).map(lambda ms: f"{ms / 1000}s")
        )
    return table


def _inline(table: dict[str, object]) -> str:
    """A TOML inline table (JSON's integers and plain strings are TOML's)."""
    return "{ " + ", ".join(f"{key} = {json.dumps(value)}" for key, value in table.items()) + " }"


@SETTINGS
@given(limits(), st.sampled_from(["asynchronous", "stall"]))  # synchronous takes no limits
def test_export_carries_the_first_limit_with_a_table_form(
    table: dict[str, object], policy: str
) -> None:
    text = (
        '[group.g.device.a]\norigin = "/dev/a"\nmetadata = "/dev/m"\n'
        f'[group.g.site.slink1]\ntransport = "blockdev"\npolicy = "{policy}"\n'
        + (f"fall_behind = {_inline(table)}\n" if table else "")
        + '[group.g.site.slink1.replica]\na = "/dev/b"\n'
    )
    group = parse_config(text, PATH).groups["g"]
    site = group.site("slink1")
    exported = export_tables(group, "/var/lib/dmrepl", {})
    again = parse_config(import_table(exported, "g", "t"), PATH).groups["g"].site("slink1")
    assert again.policy == policy
    ios = site.fall_behind.ios or None  # a table's 0 is no threshold: ios = 0 is left out
    if ios is not None:
        assert again.fall_behind == FallBehind(ios=ios)
    elif site.fall_behind.bytes is not None:
        assert again.fall_behind == FallBehind(bytes=site.fall_behind.bytes)
    elif site.fall_behind.seconds is not None:
        seconds = round(site.fall_behind.seconds * 1000) / 1000  # the table counts ms
        assert again.fall_behind == FallBehind(seconds=seconds)
    else:
        assert again.fall_behind == FallBehind()
    carried = sum(x is not None for x in (ios, site.fall_behind.bytes, site.fall_behind.seconds))
    left_out = [line for line in exported.splitlines() if line.startswith("# site link 1:")]
    assert len(left_out) == max(carried - 1, 0) + (site.fall_behind.ios == 0)
