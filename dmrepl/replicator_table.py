"""dm-replicator tables in and out: `dmrepl import-table` and `dmrepl export-table`.

dm-replicator (never merged) configured replication with device-mapper tables, in three
dialects that all parse here:

- the paper's and the slides' single `replicator` table: a log (`default`), then site links
  (`local`), each followed by the devices on it (`2 <dev_nr> <path>`) and their dirty log;
- the 2009 patches': one `replicator` table with the log (`ringbuffer`) and the site links
  (`blockdev`), and one `replicator-dev` table per device naming its path on every site link.

Tables become dmrepl TOML (`render_toml`), with a comment for every part that has no meaning
here; a dmrepl group becomes patch-form tables (`export_tables`). Pure: no I/O.
"""

from __future__ import annotations

import re
import string
import textwrap
from dataclasses import dataclass, field

from dmrepl.config import MAX_DEVICE_SECTORS, NAME_RE, POLICIES, GroupSpec
from dmrepl.errors import InvalidInput
from dmrepl.policy import DEFAULT_STALL_LIMIT_S, FallBehind

TARGETS = ("replicator", "replicator-dev")
LOG_TYPES = ("default", "ringbuffer")
LINK_TYPES = ("local", "blockdev")
LOG_MODES = ("auto", "create", "open")
NO_LOG = ("-", "nolog")
DASHES = {"\u2013": "-", "\u2014": "-"}  # the paper typesets "-" as an en dash
# Separators besides whitespace: line continuations and the quotes the paper puts around tables.
_FALLBEHIND = {
    "ios": re.compile(r"^[0-9]+$"),
    "size": re.compile(r"^[0-9]+[sSkKmMgGtTpPeE]?$"),
    "timeout": re.compile(r"^[0-9]+[tTsSmMhHdD]?$"),
}
_FALLBEHIND_NAMES = {"ios": "ios", "size": "size", "data": "size", "timeout": "timeout"}
# dm-replicator's fall-behind units, as its blockdev site link reads them: a size counts
# 512-byte sectors, its unit letters being binary multiples (k = KiB = 2 sectors, ... e = EiB);
# a timeout counts milliseconds, its letters t (ms), s, m, h, d; either case. This is the
# grammar's meaning and the parser's own comment: the stored v0.022 parser looks its multipliers
# up one entry too far (`s` would be 2 sectors, `k` 1 MiB), and the v0.028 ring buffer adds each
# write's size in bytes to the count it compares with the sectors.
SIZE_UNIT_SECTORS = {"e": 2**51, "p": 2**41, "t": 2**31, "g": 2**21, "m": 2**11, "k": 2, "s": 1}
TIMEOUT_UNIT_MS = {"d": 86_400_000, "h": 3_600_000, "m": 60_000, "s": 1000, "t": 1}
REPLICATOR_SIZE_UNITS = {letter: letter for letter in SIZE_UNIT_SECTORS}
REPLICATOR_TIMEOUT_UNITS = {letter: letter for letter in TIMEOUT_UNIT_MS}
MAX_THRESHOLD = 2**63 - 1  # the kernel reads the number with %lld
# How dmrepl spells them (FieldReader.size and .duration), and the range it takes.
DMREPL_SIZE_UNITS = {
    "e": "EiB", "p": "PiB", "t": "TiB", "g": "GiB", "m": "MiB", "k": "KiB", "s": "s",
}  # fmt: skip
DMREPL_TIMEOUT_UNITS = {"h": "h", "m": "m", "s": "s"}  # no d, no ms: "1.5s" for 1500 ms
MAX_SIZE_SECTORS = MAX_DEVICE_SECTORS
MIN_TIMEOUT_MS, MAX_TIMEOUT_MS = 1000, 86_400_000
PLACEHOLDER_METADATA = "/dev/SET-ME/{name}-metadata"


class TableError(InvalidInput):
    """A dm-replicator table that cannot be read: names the token and its position."""


@dataclass(frozen=True)
class Token:
    text: str  # dashes normalised
    line: int
    column: int
    index: int = 0  # 1-based position in its table; 0 until split into tables

    def where(self) -> str:
        return f"token {self.index} {self.text!r} (line {self.line}, column {self.column})"


@dataclass(frozen=True)
class Fallbehind:
    kind: str  # ios | size | timeout
    value: str  # as written, with its unit
    spelled: str  # the table's spelling: "ios=100", "data 100", ...

    def amount(self) -> int:
        """Writes (ios), 512-byte sectors (size) or milliseconds (timeout)."""
        number, unit = _number_and_unit(self.value)
        if self.kind == "size":
            return number * SIZE_UNIT_SECTORS[unit or "s"]
        if self.kind == "timeout":
            return number * TIMEOUT_UNIT_MS[unit or "t"]
        return number


def _number_and_unit(value: str) -> tuple[int, str]:
    """`64m` -> (64, "m"), `100` -> (100, ""): a threshold's number and its unit letter."""
    digits = value.rstrip(string.ascii_letters)
    return int(digits), value[len(digits) :].lower()


@dataclass(frozen=True)
class ReplicationLog:
    type: str  # default | ringbuffer
    device: str
    start: int
    mode: str | None  # auto | create | open
    size_sectors: int | None


@dataclass(frozen=True)
class SiteLink:
    type: str  # local | blockdev
    number: int
    policy: tuple[str, ...]  # full names; several when compound ("synchronous+stall")
    fallbehind: Fallbehind | None

    def same(self, other: SiteLink) -> bool:
        return (self.number, self.policy, self.fallbehind) == (
            other.number,
            other.policy,
            other.fallbehind,
        )


@dataclass(frozen=True)
class DirtyLog:
    type: str  # nolog | core | disk
    region: int | None = None
    device: str | None = None
    sync: str | None = None  # sync | nosync

    def describe(self) -> str:
        if self.type == "nolog":
            return "no dirty log"
        parts = [f"{self.type} dirty log"]
        if self.device:
            parts.append(f"on {self.device}")
        if self.region is not None:
            parts.append(f"region {self.region} sectors")
        if self.sync:
            parts.append(self.sync)
        return " ".join(parts)


@dataclass(frozen=True)
class Leg:
    """A device on one site link: the local device on link 0, a replica on the others."""

    link: int
    path: str
    dirty_log: DirtyLog
    token: Token


@dataclass
class Replication:
    """What a file of dm-replicator tables says."""

    log: ReplicationLog
    links: dict[int, SiteLink]
    devices: dict[int, list[Leg]]  # device number -> its legs, in table order
    notes: list[str] = field(default_factory=list)  # tolerated quirks, shown as comments


# --- tokens -----------------------------------------------------------------------------


def tokenize(text: str) -> list[Token]:
    """Words with their line and column; `#` starts a comment, backslashes and quotes separate."""
    tokens = []
    for number, line in enumerate(text.splitlines(), start=1):
        position = 0
        for match in re.finditer(r"[^\s\\\u201c\u201d\"]+", line):
            word = match.group()
            if word.startswith("#"):
                break
            position = match.start()
            tokens.append(Token(DASHES.get(word, word), number, position + 1))
    return tokens


def split_tables(tokens: list[Token]) -> list[list[Token]]:
    """Tables start with `<start> <length> replicator|replicator-dev`."""
    starts = [
        i
        for i in range(len(tokens) - 2)
        if tokens[i + 2].text in TARGETS and _is_int(tokens[i].text) and _is_int(tokens[i + 1].text)
    ]
    if not tokens:
        raise TableError("no table: the input holds no tokens")
    if not starts or starts[0] != 0:
        first = Token(tokens[0].text, tokens[0].line, tokens[0].column, 1)
        raise TableError(
            f"{first.where()}: expected a table, '<start> <length> replicator ...'",
            hint="a table starts with its segment: e.g. `0 311296 replicator default 4 ...`",
        )
    tables = []
    for n, begin in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(tokens)
        tables.append(
            [Token(t.text, t.line, t.column, i) for i, t in enumerate(tokens[begin:end], start=1)]
        )
    return tables


def _is_int(text: str) -> bool:
    return text.isascii() and text.isdigit()


class _Reader:
    """A cursor over one table's tokens that raises TableError naming the token."""

    def __init__(self, tokens: list[Token]):
        self.tokens = tokens
        self.pos = 0

    def done(self) -> bool:
        return self.pos >= len(self.tokens)

    def peek(self) -> Token | None:
        return None if self.done() else self.tokens[self.pos]

    def take(self, what: str) -> Token:
        if self.done():
            last = self.tokens[-1]
            raise TableError(f"the table ends after {last.where()}: expected {what}")
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def number(self, what: str) -> tuple[int, Token]:
        token = self.take(what)
        if not _is_int(token.text):
            raise TableError(f"{token.where()}: expected {what}, a whole number")
        return int(token.text), token

    def fail(self, token: Token, text: str) -> TableError:
        return TableError(f"{token.where()}: {text}")


# --- parsing ----------------------------------------------------------------------------


def parse_tables(text: str) -> Replication:
    """Parse every table of `text` into one replication group; TableError if malformed."""
    tables = split_tables(tokenize(text))
    log: ReplicationLog | None = None
    links: dict[int, SiteLink] = {}
    devices: dict[int, list[Leg]] = {}
    notes: list[str] = []
    dev_tables = []
    for table in tables:
        reader = _Reader(table)
        reader.take("a start")
        reader.take("a length")
        target = reader.take("a target")
        if target.text == "replicator-dev":
            dev_tables.append(reader)
            continue
        this_log = _log(reader, notes)
        if log is None:
            log = this_log
        elif (this_log.device, this_log.start) != (log.device, log.start):
            raise reader.fail(
                table[3],
                f"this table's log {this_log.device} is not the first table's {log.device}",
            )
        elif this_log != log:
            notes.append(
                f"the table at line {table[0].line} opens the same log "
                f"({this_log.mode or 'no mode'}); the first table's settings are kept"
            )
        _links_and_devices(reader, links, devices, not links, notes)
    if log is None:
        raise TableError(
            "no `replicator` table: the replicator-dev tables need the log and site links of one",
        )
    for reader in dev_tables:
        _device_table(reader, links, devices)
    for number, legs in devices.items():
        if not any(leg.link == 0 for leg in legs):
            raise TableError(
                f"{legs[0].token.where()}: device {number} has no local device on site link 0"
            )
    return Replication(log, links, devices, notes)


def _log(reader: _Reader, notes: list[str]) -> ReplicationLog:
    kind = reader.take("a replication log type")
    if kind.text not in LOG_TYPES:
        raise reader.fail(kind, f"unknown replication log type (expected {' or '.join(LOG_TYPES)})")
    count, count_token = reader.number("the number of log parameters")
    if not 2 <= count <= 4:
        raise reader.fail(count_token, "a replication log takes 2 to 4 parameters")
    device = reader.take("the log device").text
    start, _ = reader.number("the log's start sector")
    mode = size = None
    if count >= 3:
        following = reader.peek()
        if following is not None and following.text in LINK_TYPES:
            notes.append(f"the log counts {count} parameters but gives 2 (read as 2)")
            count = 2
        else:
            mode_token = reader.take("auto, create or open")
            if mode_token.text not in LOG_MODES:
                raise reader.fail(mode_token, "expected auto, create or open")
            mode = mode_token.text
    if count == 4:
        following = reader.peek()
        if following is not None and following.text in LINK_TYPES:
            notes.append(f"the log counts 4 parameters but gives 3 (read as 3): no size to {mode}")
        else:
            size, size_token = reader.number("the log size in sectors")
            if size == 0:
                raise reader.fail(size_token, "a log size of 0 sectors")
    return ReplicationLog(kind.text, device, start, mode, size)


def _policy(token: Token, reader: _Reader) -> tuple[str, ...]:
    names = []
    for part in token.text.split("+"):
        matches = [p for p in POLICIES if part and p.startswith(part)]
        if len(matches) != 1:
            which = "ambiguous" if matches else "unknown"
            raise reader.fail(token, f"{which} policy {part!r} (expected {', '.join(POLICIES)})")
        names.append(matches[0])
    return tuple(names)


def _fallbehind(kind: Token, value: str, reader: _Reader, spelled: str) -> Fallbehind:
    name = _FALLBEHIND_NAMES.get(kind.text)
    if name is None:
        raise reader.fail(kind, "expected a fall-behind threshold: ios, size, data or timeout")
    if not _FALLBEHIND[name].match(value):
        units = {"ios": "", "size": " with s|k|m|g|t|p|e", "timeout": " with t|s|m|h|d"}[name]
        raise reader.fail(kind, f"{value!r} is not a number{units} for {kind.text}")
    if _number_and_unit(value)[0] > MAX_THRESHOLD:
        raise reader.fail(kind, f"{value!r} is more than a threshold can be (2^63 - 1)")
    return Fallbehind(name, value, spelled)


def _link(reader: _Reader, kind: Token, notes: list[str]) -> SiteLink:
    count, count_token = reader.number("the number of site link parameters")
    if count not in (1, 2, 3, 4):
        raise reader.fail(count_token, "a site link takes 1, 2, 3 (ios=N) or 4 parameters")
    number, _ = reader.number("the site link number")
    policy: tuple[str, ...] = ("asynchronous",)
    fallbehind = None
    if count >= 2:
        policy = _policy(reader.take("a policy"), reader)
    if count == 3:
        fallbehind = _old_fallbehind(reader.take("a fall-behind threshold like ios=100"), reader)
    elif count == 4:
        which = reader.take("a fall-behind threshold: ios, size, data or timeout")
        value = reader.take(f"the {which.text} threshold").text
        fallbehind = _fallbehind(which, value, reader, f"{which.text} {value}")
    following = reader.peek()
    if count == 2 and following is not None and "=" in following.text:
        # The slides' `local 2 0 async ios=0`: the old threshold form, not counted.
        fallbehind = _old_fallbehind(reader.take("a threshold"), reader)
        notes.append(
            f"site link {number} counts 2 parameters but gives 3 ({fallbehind.spelled} is not "
            "counted): read as a threshold"
        )
    return SiteLink(kind.text, number, policy, fallbehind)


def _old_fallbehind(token: Token, reader: _Reader) -> Fallbehind:
    name, sep, value = token.text.partition("=")
    if not sep:
        raise reader.fail(token, "expected a fall-behind threshold like ios=100")
    return _fallbehind(
        Token(name, token.line, token.column, token.index), value, reader, token.text
    )


def _dirty_log(reader: _Reader) -> DirtyLog:
    kind = reader.take("a dirty log type (-, nolog, core or disk)")
    count, count_token = reader.number(f"the number of {kind.text} dirty log parameters")
    if kind.text in NO_LOG:
        if count != 0:
            raise reader.fail(count_token, f"`{kind.text}` takes 0 parameters")
        return DirtyLog("nolog")
    if kind.text == "core":
        if count not in (1, 2):
            raise reader.fail(count_token, "a core dirty log takes 1 or 2 parameters")
        region, _ = reader.number("the region size in sectors")
        return DirtyLog("core", region, None, _sync(reader) if count == 2 else None)
    if kind.text == "disk":
        if count not in (2, 3):
            raise reader.fail(count_token, "a disk dirty log takes 2 or 3 parameters")
        first, second = reader.take("the dirty log device"), reader.take("the region size")
        # The patches give `<dev> <region>`, the slides `<region> <dev>`.
        device, size = (second, first) if _is_int(first.text) else (first, second)
        if not _is_int(size.text):
            raise reader.fail(size, "expected the region size in sectors, a whole number")
        return DirtyLog("disk", int(size.text), device.text, _sync(reader) if count == 3 else None)
    raise reader.fail(kind, "unknown dirty log type (expected -, nolog, core or disk)")


def _sync(reader: _Reader) -> str:
    token = reader.take("sync or nosync")
    if token.text not in ("sync", "nosync"):
        raise reader.fail(token, "expected sync or nosync")
    return token.text


def _add_leg(devices: dict[int, list[Leg]], number: int, leg: Leg, reader: _Reader) -> None:
    legs = devices.setdefault(number, [])
    if any(other.link == leg.link for other in legs):
        raise reader.fail(leg.token, f"device {number} is already on site link {leg.link}")
    legs.append(leg)


def _links_and_devices(
    reader: _Reader,
    links: dict[int, SiteLink],
    devices: dict[int, list[Leg]],
    first: bool,
    notes: list[str],
) -> None:
    if reader.done():
        raise reader.fail(reader.tokens[-1], "the table ends before its first site link")
    while not reader.done():
        kind = reader.take("a site link type")
        if kind.text not in LINK_TYPES:
            raise reader.fail(kind, f"expected a site link type ({' or '.join(LINK_TYPES)})")
        link = _link(reader, kind, notes)
        if first and not links and link.number != 0:
            raise reader.fail(kind, "the first site link must be 0, the local one")
        known = links.get(link.number)
        if known is not None and not known.same(link):
            raise reader.fail(kind, f"site link {link.number} was given other settings before")
        links.setdefault(link.number, link)
        # The paper's form: the devices on this link follow it, `2 <dev_nr> <path>` each.
        while (following := reader.peek()) is not None and _is_int(following.text):
            count, count_token = reader.number("the number of device parameters")
            if count != 2:
                raise reader.fail(count_token, "a device takes 2 parameters: number and path")
            number, _ = reader.number("the device number")
            path = reader.take("the device path")
            _add_leg(devices, number, Leg(link.number, path.text, _dirty_log(reader), path), reader)


def _device_table(
    reader: _Reader, links: dict[int, SiteLink], devices: dict[int, list[Leg]]
) -> None:
    reader.take("the replicator device")
    number, _ = reader.number("the device number")
    if reader.done():
        raise reader.fail(reader.tokens[-1], "the table ends before the device's first site link")
    while not reader.done():
        link_number, link_token = reader.number("a site link number")
        if link_number not in links:
            raise reader.fail(link_token, f"no site link {link_number} in the replicator table")
        count, count_token = reader.number("the number of device parameters")
        if count != 1:
            raise reader.fail(count_token, "a replicator-dev site takes 1 parameter: the path")
        path = reader.take("the device path")
        _add_leg(devices, number, Leg(link_number, path.text, _dirty_log(reader), path), reader)


# --- fall-behind thresholds as dmrepl limits -------------------------------------------


@dataclass(frozen=True)
class Limit:
    """A fall-behind threshold as dmrepl's `fall_behind.<key>`."""

    key: str  # ios | size | timeout
    value: int | str | None  # its TOML value; None: no limit (dm-replicator's 0)
    amount: str  # the threshold in plain units: "100 writes", "2048 sectors of 512 bytes"
    out_of_range: str = ""  # why `value` is not the threshold but the nearest dmrepl accepts


def size_text(sectors: int, units: dict[str, str]) -> str:
    """A count of sectors in its largest exact binary unit, spelled through `units`
    (letter -> suffix: dmrepl's "MiB" or the replicator's "m"; "s" for sectors)."""
    letter = next(u for u, size in SIZE_UNIT_SECTORS.items() if sectors % size == 0)
    return f"{sectors // SIZE_UNIT_SECTORS[letter]}{units[letter]}"


def timeout_text(milliseconds: int, units: dict[str, str]) -> str:
    """Milliseconds in their largest exact unit, spelled through `units` (letter -> suffix);
    without a "t" (ms) entry, a part of a second is written as decimal seconds ("1.5s")."""
    for letter, size in TIMEOUT_UNIT_MS.items():
        if letter in units and milliseconds % size == 0:
            return f"{milliseconds // size}{units[letter]}"
    seconds = f"{milliseconds // 1000}.{milliseconds % 1000:03d}".rstrip("0")
    return f"{seconds}{units['s']}"


def fall_behind_limit(threshold: Fallbehind) -> Limit:
    """dmrepl's limit for a site link's threshold.

    dm-replicator checks no threshold of 0 (its ring buffer skips the check), so 0 of any
    kind is no limit. A size or timeout outside what dmrepl accepts becomes the nearest value
    it accepts, and says so."""
    amount = threshold.amount()
    if threshold.kind == "ios":
        return Limit("ios", amount or None, f"{amount} writes")
    if threshold.kind == "size":
        plain = f"{amount} sectors of 512 bytes"
        sectors = min(amount, MAX_SIZE_SECTORS)
        text = size_text(sectors, DMREPL_SIZE_UNITS) if amount else None
        beyond = "more than dmrepl's largest size (8 EiB)" if sectors != amount else ""
        return Limit("size", text, plain, beyond)
    plain = f"{amount} ms"
    milliseconds = max(MIN_TIMEOUT_MS, min(amount, MAX_TIMEOUT_MS))
    text = timeout_text(milliseconds, DMREPL_TIMEOUT_UNITS) if amount else None
    beyond = ""
    if amount and milliseconds != amount:
        side = "shorter" if amount < milliseconds else "longer"
        beyond = f"{side} than dmrepl's timeouts (1s to 24h)"
    return Limit("timeout", text, plain, beyond)


def describe_limit(threshold: Fallbehind, limit: Limit) -> str:
    """What became of a threshold, for a comment of the imported file."""
    head = f"fall-behind threshold {threshold.spelled} ({limit.amount})"
    if limit.value is None:
        text = f"{head}: 0 is no threshold in dm-replicator (it never checks it), so no limit"
        if limit.key == "ios":
            text += " (dmrepl's `ios = 0` would hold writers whenever a write is behind)"
        return text
    if limit.out_of_range:
        return f"{head} is {limit.out_of_range}: fall_behind.{limit.key} is the nearest it takes"
    return (
        f"{head}: fall_behind.{limit.key} (over it, writers are held while the site catches "
        "up, as in dm-replicator)"
    )


def changed_limits(rep: Replication) -> list[str]:
    """The remote links' thresholds that import had to bring into dmrepl's range."""
    changed = []
    for number, link in sorted(rep.links.items()):
        if number != 0 and link.fallbehind is not None:
            limit = fall_behind_limit(link.fallbehind)
            if limit.out_of_range:
                changed.append(
                    f"site link {number}: {link.fallbehind.spelled} ({limit.amount}) is "
                    f'{limit.out_of_range}: imported as {limit.key} = "{limit.value}"'
                )
    return changed


# --- rendering as dmrepl TOML -------------------------------------------------------------


def device_names(rep: Replication) -> dict[int, str]:
    """A dmrepl name per device number: its local device's basename, else dev<N>."""
    names: dict[int, str] = {}
    for number in sorted(rep.devices):
        local = next(leg for leg in rep.devices[number] if leg.link == 0)
        base = local.path.rstrip("/").rsplit("/", 1)[-1]
        name = base if NAME_RE.match(base) else f"dev{number}"
        if name in names.values() or name == "control":
            name = f"dev{number}"
        names[number] = name
    return names


def site_policy(link: SiteLink) -> str:
    """The one dmrepl policy of a (possibly compound) dm-replicator policy."""
    for policy in ("stall", "synchronous"):
        if policy in link.policy:
            return policy
    return "asynchronous"


def _q(text: str) -> str:
    """A TOML basic string."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in escaped) + '"'


def _comment(lines: list[str], text: str) -> None:
    lines += textwrap.wrap(
        f"# replicator: {text}", width=98, subsequent_indent="#   ", break_on_hyphens=False
    )


def _describe_link(link: SiteLink) -> str:
    text = f"site link {link.number} (`{link.type}`, {'+'.join(link.policy)}"
    if link.fallbehind:
        text += f", {link.fallbehind.spelled}"
    return text + ")"


def render_toml(rep: Replication, group: str, source: str) -> str:
    """dmrepl TOML for the group; every part without meaning here becomes a comment."""
    names = device_names(rep)
    out = [
        f"# dmrepl configuration imported from the dm-replicator tables in {source}.",
        '# Comments starting with "replicator:" say what became of each part of the tables, and',
        "# which parts mean nothing to dmrepl.",
    ]
    for note in rep.notes:
        _comment(out, f"read leniently: {note}")
    log = rep.log
    out += ["", f"[group.{group}]"]
    mode = f", {log.mode}" if log.mode else ""
    _comment(
        out,
        f"the `{log.type}` replication log on {log.device} from sector {log.start}{mode}: dmrepl "
        "spools deltas as files in state_dir instead",
    )
    if log.size_sectors is not None:
        _comment(out, f"the log's size of {log.size_sectors} sectors becomes spool_size")
        out.append(f'spool_size = "{log.size_sectors}s"')
    local = rep.links.get(0)
    if local is not None:
        _comment(
            out,
            f"{_describe_link(local)} is this host: its devices are the origins below; its "
            "policy and threshold have no meaning here",
        )
    for number in sorted(rep.devices):
        name = names[number]
        legs = {leg.link: leg for leg in rep.devices[number]}
        out += ["", f"[group.{group}.device.{name}]"]
        _comment(out, f"device {number}; on site link 0 with {legs[0].dirty_log.describe()}")
        out.append(f"origin = {_q(legs[0].path)}")
        out.append(
            "# dm-replicator has no dm-era metadata: set the device (or area of one) dmrepl "
            "keeps it on"
        )
        out.append("# (`dmrepl size` tells how big) in place of this placeholder.")
        out.append(f"metadata = {_q(PLACEHOLDER_METADATA.format(name=name))}")
    for link_number in sorted(rep.links):
        if link_number == 0:
            continue
        link = rep.links[link_number]
        site = f"slink{link_number}"
        policy = site_policy(link)
        out += ["", f"[group.{group}.site.{site}]"]
        _comment(
            out,
            f"{_describe_link(link)}: `{link.type}` reaches its devices through device nodes "
            "here, a blockdev site",
        )
        if len(link.policy) > 1:
            _comment(out, f"the compound policy {'+'.join(link.policy)} becomes {policy}")
        if policy == "stall":
            _comment(
                out,
                "stall: dm-replicator holds writers until the link has what it needs, however "
                "long; dmrepl holds them for at most stall_limit (60 s unless set)",
            )
        limit = None
        if link.fallbehind and policy == "synchronous":
            _comment(
                out,
                f"{link.fallbehind.spelled}: a synchronous dmrepl site has no fall-behind limit "
                "(its replicas are mirror legs, never behind while joined): left out",
            )
        elif link.fallbehind:
            limit = fall_behind_limit(link.fallbehind)
            _comment(out, describe_limit(link.fallbehind, limit))
        out.append('transport = "blockdev"')
        out.append(f"policy = {_q(policy)}")
        if limit and limit.value is not None:
            value = limit.value if isinstance(limit.value, int) else _q(limit.value)
            out.append(f"fall_behind = {{ {limit.key} = {value} }}")
        out.append(f"[group.{group}.site.{site}.replica]")
        for number in sorted(rep.devices):
            leg = next((g for g in rep.devices[number] if g.link == link_number), None)
            if leg is None:
                _comment(
                    out,
                    f"device {number} ({names[number]}) has no device on this link: dmrepl "
                    "needs a replica of every device of the group",
                )
                continue
            _comment(
                out,
                f"{leg.dirty_log.describe()}: dmrepl tracks changes with dm-era on the "
                "primary instead",
            )
            out.append(f"{names[number]} = {_q(leg.path)}")
    return "\n".join(out) + "\n"


def import_table(text: str, group: str, source: str) -> str:
    """The dmrepl TOML of a file of dm-replicator tables."""
    if not NAME_RE.match(group):
        raise InvalidInput(f"group name {group!r} must be 1-64 of A-Z a-z 0-9 _ + - (no dots)")
    return render_toml(parse_tables(text), group, source)


# --- export ------------------------------------------------------------------------------


def link_numbers(group: GroupSpec) -> dict[str, int]:
    numbers: dict[str, int] = {}
    for site in group.sites:
        match = re.fullmatch(r"slink([1-9][0-9]*)", site.name)
        if match and int(match.group(1)) not in numbers.values():
            numbers[site.name] = int(match.group(1))
    for site in group.sites:
        if site.name not in numbers:
            numbers[site.name] = max([0, *numbers.values()]) + 1
    return numbers


def table_threshold(limits: FallBehind) -> tuple[str | None, list[str]]:
    """The one fall-behind threshold a site link can carry (`ios 100`): the first of ios, size
    and timeout that has a table form; and what of the limits the table leaves out."""
    candidates: list[tuple[str, str]] = []  # (the limit as dmrepl's key, as the table's)
    left_out = []
    if limits.ios == 0:
        left_out.append("fall_behind.ios = 0: dm-replicator reads a threshold of 0 as none")
    elif limits.ios is not None:
        candidates.append((f"fall_behind.ios = {limits.ios}", f"ios {limits.ios}"))
    if limits.bytes is not None:
        sectors = limits.bytes // 512
        size = size_text(sectors, DMREPL_SIZE_UNITS)
        table = size_text(sectors, REPLICATOR_SIZE_UNITS)
        candidates.append((f'fall_behind.size = "{size}"', f"size {table}"))
    if limits.seconds is not None:
        milliseconds = round(limits.seconds * 1000)
        table = timeout_text(milliseconds, REPLICATOR_TIMEOUT_UNITS)
        # Seconds are a float: "2066.939s" is whole milliseconds, if not exactly so in binary.
        if abs(limits.seconds * 1000 - milliseconds) < 1e-6:
            timeout = timeout_text(milliseconds, DMREPL_TIMEOUT_UNITS)
        else:
            timeout = f"{limits.seconds:.15g}s"
            if not candidates:
                left_out.append(f"fall_behind.timeout's part below a millisecond ({timeout})")
        candidates.append((f'fall_behind.timeout = "{timeout}"', f"timeout {table}"))
    left_out += [f"{key}: a link carries one threshold" for key, _ in candidates[1:]]
    return (candidates[0][1] if candidates else None), left_out


def export_tables(group: GroupSpec, state_dir: str, lengths: dict[str, int | None]) -> str:
    """The group as dm-replicator tables in the 2009 patches' form.

    `lengths`: each device's size in sectors (None: unknown, printed as 0)."""
    out = [
        f"# dmrepl group {group.name} as dm-replicator tables (the 2009 patches' form).",
        f"# The ring-buffer log stands for dmrepl's spool (files under {state_dir}); its size is",
        "# spool_size. Dirty logs are `core` with the era block size as region. A site link has",
        "# its site's policy and the first of its fall_behind limits (ios, size, timeout) that has",
        "# a table form: sizes in 512-byte sectors (s) or k m g t p e (KiB to EiB), timeouts in",
        "# t (ms), s, m, h or d.",
    ]
    numbers = link_numbers(group)
    replicas: dict[str, dict[str, str]] = {}
    links = ["blockdev 2 0 asynchronous"]
    for site in group.sites:
        site_replicas = getattr(site, "replicas", None)
        if site.transport != "blockdev" or not isinstance(site_replicas, dict):
            out.append(
                f"# site {site.name} (transport {site.transport}) has no dm-replicator form: "
                "left out"
            )
            continue
        replicas[site.name] = dict(site_replicas)
        number = numbers[site.name]
        threshold, left_out = table_threshold(site.fall_behind)
        if threshold:
            links.append(f"blockdev 4 {number} {site.policy} {threshold}")
        else:
            links.append(f"blockdev 2 {number} {site.policy}")
        if site.name != f"slink{number}":
            out.append(f"# site link {number}: site {site.name}")
        if site.stall_limit_s != DEFAULT_STALL_LIMIT_S:
            stall = timeout_text(round(site.stall_limit_s * 1000), DMREPL_TIMEOUT_UNITS)
            left_out.append(f'stall_limit = "{stall}" (dm-replicator stalls without a limit)')
        out += [f"# site link {number}: left out: {what}" for what in left_out]
    spool = group.spool_bytes // 512
    control = f"/dev/mapper/{group.name}-replicator"
    log = f"ringbuffer 4 {state_dir.rstrip('/')}/spool 0 auto {spool}"
    out.append(f"0 {spool} replicator {log} " + " ".join(links))
    for number, device in enumerate(group.devices):
        length = lengths.get(device.name)
        note = "" if length is not None else f"; length unknown ({device.origin} not readable)"
        out.append(f"# device {number}: {device.name}{note}")
        parts = [f"0 {length or 0} replicator-dev {control} {number}"]
        parts.append(f"0 1 {device.origin} nolog 0")
        for site in group.sites:
            if site.name in replicas and device.name in replicas[site.name]:
                path = replicas[site.name][device.name]
                parts.append(f"{numbers[site.name]} 1 {path} core 1 {device.block_sectors}")
        out.append(" ".join(parts))
    return "\n".join(out) + "\n"
