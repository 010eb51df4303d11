"""Device-mapper table lines as values: one frozen class per target.

Each target class has `params()`, which renders its parameters in the kernel's canonical
form (what `dmsetup table` prints back), and a strict `parse(params)`, which raises
`ParseError` on any shape the kernel would not print or would refuse (wrong argument
counts, non-canonical integers, unknown or conflicting features).

The kernel reports every device in a table as "MAJOR:MINOR" (dm_get_device() names a
`struct dm_dev` with format_dev_t), never as the path that was loaded. To compare a wanted
table with an observed one, map the wanted table's paths to device numbers first:
`normalise_table(wanted, ids) == parse_table(observed)`. Probing the numbers is done
elsewhere (`dmrepl.probe.dev_id_of`).

Formats verified on Debian's 6.1 kernel; fixtures and the capture script are in
tests/data/dmsetup and tests/data/capture.sh.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import ClassVar, Literal, Protocol, Self, TypeVar, cast

from dmrepl.errors import DmreplError, ParseError

DeviceMap = Callable[[str], str]
T = TypeVar("T")

_UINT = re.compile(r"0|[1-9][0-9]*")
_DEV_ID = re.compile(r"[0-9]+:[0-9]+")


class Target(Protocol):
    """A target's type name, its canonical parameter string and the devices it names."""

    @property
    def kind(self) -> str: ...

    def params(self) -> str: ...

    def devices(self) -> tuple[str, ...]: ...

    def map_devices(self, fn: DeviceMap) -> Target: ...


def is_dev_id(device: str) -> bool:
    """Whether `device` is written as the kernel writes devices: "MAJOR:MINOR"."""
    return _DEV_ID.fullmatch(device) is not None


class _Args:
    """A cursor over whitespace-separated parameters; every problem is a `ParseError`."""

    def __init__(self, what: str, params: str):
        self.what = what
        self.raw = params
        self.tokens = params.split()
        self.pos = 0

    def fail(self, problem: str) -> ParseError:
        return ParseError(f"{self.what} ({problem})", self.raw)

    def left(self) -> int:
        return len(self.tokens) - self.pos

    def word(self, name: str) -> str:
        if self.pos >= len(self.tokens):
            raise self.fail(f"missing {name}")
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def uint(self, name: str, *, low: int = 0, high: int | None = None) -> int:
        token = self.word(name)
        if not _UINT.fullmatch(token):
            raise self.fail(f"{name} {token!r} is not a canonical unsigned integer")
        value = int(token)
        if value < low or (high is not None and value > high):
            raise self.fail(f"{name} {value} is out of range")
        return value

    def device(self, name: str) -> str:
        return self.word(name)

    def end(self) -> None:
        if self.pos != len(self.tokens):
            raise self.fail(f"unexpected {' '.join(self.tokens[self.pos :])!r}")

    def features(self, name: str, argc: Mapping[str, int]) -> dict[str, list[str]]:
        """`<#args> <feature [feature args]>...` where `argc` gives each feature's arg count.

        The count covers feature names and their arguments, as the kernel's dm_read_arg_group
        callers expect. Duplicates are refused. Returns each feature's arguments by name.
        """
        count = self.uint(f"number of {name} arguments")
        if count > self.left():
            raise self.fail(f"{name} count {count} exceeds the {self.left()} arguments left")
        stop = self.pos + count
        seen: dict[str, list[str]] = {}
        while self.pos < stop:
            feature = self.word(name)
            if feature not in argc:
                raise self.fail(f"unknown {name} {feature!r}")
            if feature in seen:
                raise self.fail(f"{name} {feature!r} given twice")
            if self.pos + argc[feature] > stop:
                raise self.fail(f"{name} {feature!r} lacks its arguments")
            seen[feature] = self.tokens[self.pos : self.pos + argc[feature]]
            self.pos += argc[feature]
        return seen


def _uint_arg(args: _Args, token: str, name: str, *, low: int = 0, high: int | None = None) -> int:
    if not _UINT.fullmatch(token) or int(token) < low or (high is not None and int(token) > high):
        raise args.fail(f"{name} {token!r} is not an integer in range")
    return int(token)


def _build(args: _Args, factory: Callable[[], T]) -> T:
    """Construct a value, turning its own validation (ValueError) into a ParseError."""
    try:
        return factory()
    except ValueError as exc:
        raise args.fail(str(exc)) from exc


# --- targets -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Linear:
    """`linear <device> <offset>`: maps onto a device starting at an offset (sectors)."""

    device: str
    offset: int = 0
    kind: ClassVar[str] = "linear"

    def params(self) -> str:
        return f"{self.device} {self.offset}"

    def devices(self) -> tuple[str, ...]:
        return (self.device,)

    def map_devices(self, fn: DeviceMap) -> Linear:
        return replace(self, device=fn(self.device))

    @classmethod
    def parse(cls, params: str) -> Self:
        args = _Args("linear table", params)
        device, offset = args.device("device"), args.uint("offset")
        args.end()
        return cls(device, offset)


@dataclass(frozen=True)
class Era:
    """`era <metadata dev> <origin dev> <block size>`: tracks writes per era block."""

    metadata: str
    origin: str
    block_sectors: int
    kind: ClassVar[str] = "era"

    def params(self) -> str:
        return f"{self.metadata} {self.origin} {self.block_sectors}"

    def devices(self) -> tuple[str, ...]:
        return (self.metadata, self.origin)

    def map_devices(self, fn: DeviceMap) -> Era:
        return replace(self, metadata=fn(self.metadata), origin=fn(self.origin))

    @classmethod
    def parse(cls, params: str) -> Self:
        # dm-era-target.c era_ctr: exactly 3 arguments.
        args = _Args("era table", params)
        metadata, origin = args.device("metadata device"), args.device("origin device")
        block = args.uint("block size", low=1)
        args.end()
        return cls(metadata, origin, block)


@dataclass(frozen=True)
class SnapshotOrigin:
    """`snapshot-origin <device>`: pass-through that copies chunks out to its snapshots."""

    device: str
    kind: ClassVar[str] = "snapshot-origin"

    def params(self) -> str:
        return self.device

    def devices(self) -> tuple[str, ...]:
        return (self.device,)

    def map_devices(self, fn: DeviceMap) -> SnapshotOrigin:
        return replace(self, device=fn(self.device))

    @classmethod
    def parse(cls, params: str) -> Self:
        args = _Args("snapshot-origin table", params)
        device = args.device("device")
        args.end()
        return cls(device)


Persistence = Literal["P", "N", "PO"]
_PERSISTENCE: tuple[Persistence, ...] = ("P", "N", "PO")


@dataclass(frozen=True)
class Snapshot:
    """`snapshot <origin> <cow> <P|N|PO> <chunk size> [<#features> <feature>...]`.

    `persistent`: P keeps exceptions on the COW device across reloads, N keeps them in
    memory only, PO is P where a full COW reports Overflow (writes to the snapshot fail,
    the snapshot stays readable) instead of invalidating it. Origin writes that do not fit
    invalidate it in every mode (seen on 6.1, see tests/data/dmsetup/snapshot-*).
    """

    origin: str
    cow: str
    persistent: Persistence
    chunk_sectors: int
    discard_zeroes_cow: bool = False
    discard_passdown_origin: bool = False
    kind: ClassVar[str] = "snapshot"

    def __post_init__(self) -> None:
        if self.persistent not in _PERSISTENCE:
            raise ValueError(f"persistence {self.persistent!r} is not P, N or PO")
        if self.chunk_sectors < 1 or self.chunk_sectors & (self.chunk_sectors - 1):
            raise ValueError(f"chunk size {self.chunk_sectors} is not a power of 2")
        if self.discard_passdown_origin and not self.discard_zeroes_cow:
            # dm-snap.c parse_snapshot_features.
            raise ValueError("discard_passdown_origin needs discard_zeroes_cow")

    def params(self) -> str:
        # dm-snap.c snapshot_status (STATUSTYPE_TABLE) and the store's status method:
        # "<origin> <cow> <P|PO|N> <chunk>" then the feature count and features, if any.
        text = f"{self.origin} {self.cow} {self.persistent} {self.chunk_sectors}"
        features = [
            name
            for name, on in (
                ("discard_zeroes_cow", self.discard_zeroes_cow),
                ("discard_passdown_origin", self.discard_passdown_origin),
            )
            if on
        ]
        if features:
            text += f" {len(features)} " + " ".join(features)
        return text

    def devices(self) -> tuple[str, ...]:
        return (self.origin, self.cow)

    def map_devices(self, fn: DeviceMap) -> Snapshot:
        return replace(self, origin=fn(self.origin), cow=fn(self.cow))

    @classmethod
    def parse(cls, params: str) -> Self:
        args = _Args("snapshot table", params)
        origin, cow = args.device("origin device"), args.device("COW device")
        # The kernel takes the flag's case loosely (toupper) and prints it upper case.
        flag = args.word("persistence flag").upper()
        if flag not in _PERSISTENCE:
            raise args.fail(f"persistence flag {flag!r} is not P, N or PO")
        chunk = args.uint("chunk size", low=1)
        found: dict[str, list[str]] = {}
        if args.left():
            found = args.features(
                "snapshot feature", {"discard_zeroes_cow": 0, "discard_passdown_origin": 0}
            )
        args.end()
        return _build(
            args,
            lambda: cls(
                origin,
                cow,
                flag,
                chunk,
                "discard_zeroes_cow" in found,
                "discard_passdown_origin" in found,
            ),
        )


MirrorSync = Literal["sync", "nosync"]
MAX_MIRROR_LEGS = 9  # dm-raid1.c: DM_KCOPYD_MAX_REGIONS + 1


@dataclass(frozen=True)
class Mirror:
    """`mirror <log> <#legs> <dev offset>... [<#features> handle_errors [keep_log]]`.

    The log is `core <#args> <region size> [sync|nosync]` or `disk <#args> <log dev>
    <region size> [sync|nosync]` (dm-log.c). `sync=None` is the kernel's default: the
    whole mirror is resynchronised from the first leg on activation; `nosync` declares
    every region in sync; `sync` forces a full resync even over a disk log's record.

    `handle_errors`: a failed leg is kicked out and the event raised, and a failed write
    is held until userspace reconfigures the mirror (dm-raid1.c do_failures/hold_bio).
    Without it, resync errors are ignored (kcopyd DM_KCOPYD_IGNORE_ERROR): on 6.1 a mirror
    resynced onto a dead leg reports that leg A and every region in sync. `keep_log`
    (needs handle_errors) keeps the log when a leg fails.
    """

    log: str  # "core" or "disk"
    region_sectors: int
    legs: tuple[tuple[str, int], ...]
    log_device: str | None = None
    sync: MirrorSync | None = None
    handle_errors: bool = False
    keep_log: bool = False
    kind: ClassVar[str] = "mirror"

    def __post_init__(self) -> None:
        if self.log not in ("core", "disk"):
            raise ValueError(f"mirror log {self.log!r} is not core or disk")
        if (self.log == "disk") != (self.log_device is not None):
            raise ValueError("a disk log needs a log device and a core log has none")
        if self.region_sectors < 1 or self.region_sectors & (self.region_sectors - 1):
            raise ValueError(f"region size {self.region_sectors} is not a power of 2")
        if not 2 <= len(self.legs) <= MAX_MIRROR_LEGS:
            raise ValueError(f"{len(self.legs)} legs (a mirror takes 2 to {MAX_MIRROR_LEGS})")
        if self.sync not in (None, "sync", "nosync"):
            raise ValueError(f"mirror sync {self.sync!r} is not sync or nosync")
        if self.keep_log and not self.handle_errors:
            # dm-raid1.c parse_features: "keep_log feature requires the handle_errors feature".
            raise ValueError("keep_log needs handle_errors")

    def log_params(self) -> str:
        """The dirty log's part, as dm-log.c core_status/disk_status print it."""
        extra = [self.sync] if self.sync else []
        if self.log == "disk":
            args = [str(self.log_device), str(self.region_sectors), *extra]
        else:
            args = [str(self.region_sectors), *extra]
        return f"{self.log} {len(args)} " + " ".join(args)

    def params(self) -> str:
        # dm-raid1.c mirror_status (STATUSTYPE_TABLE): log, legs, then the feature count and
        # features in the fixed order handle_errors, keep_log, whatever order they were given.
        legs = " ".join(f"{device} {offset}" for device, offset in self.legs)
        text = f"{self.log_params()} {len(self.legs)} {legs}"
        features = [name for name in ("handle_errors", "keep_log") if getattr(self, name)]
        if features:
            text += f" {len(features)} " + " ".join(features)
        return text

    def devices(self) -> tuple[str, ...]:
        log = (self.log_device,) if self.log_device is not None else ()
        return (*log, *(device for device, _ in self.legs))

    def map_devices(self, fn: DeviceMap) -> Mirror:
        return replace(
            self,
            log_device=None if self.log_device is None else fn(self.log_device),
            legs=tuple((fn(device), offset) for device, offset in self.legs),
        )

    @classmethod
    def parse(cls, params: str) -> Self:
        args = _Args("mirror table", params)
        log = args.word("log type")
        argc = args.uint("number of log arguments")
        if log == "core" and argc in (1, 2):
            log_device = None
        elif log == "disk" and argc in (2, 3):
            log_device = args.device("log device")
        else:
            raise args.fail(f"log {log!r} with {argc} arguments")
        region = args.uint("region size", low=1)
        sync: MirrorSync | None = None
        if argc == (3 if log == "disk" else 2):
            word = args.word("log sync argument")
            if word not in ("sync", "nosync"):
                raise args.fail(f"log sync argument {word!r}")
            sync = cast(MirrorSync, word)
        count = args.uint("number of legs", low=2, high=MAX_MIRROR_LEGS)
        legs = tuple((args.device("leg device"), args.uint("leg offset")) for _ in range(count))
        found: dict[str, list[str]] = {}
        if args.left():
            found = args.features("mirror feature", {"handle_errors": 0, "keep_log": 0})
        args.end()
        return _build(
            args,
            lambda: cls(
                log,
                region,
                legs,
                log_device=log_device,
                sync=sync,
                handle_errors="handle_errors" in found,
                keep_log="keep_log" in found,
            ),
        )


@dataclass(frozen=True)
class Zero:
    """`zero`: reads return zeros, writes are discarded."""

    kind: ClassVar[str] = "zero"

    def params(self) -> str:
        return ""

    def devices(self) -> tuple[str, ...]:
        return ()

    def map_devices(self, fn: DeviceMap) -> Zero:
        return self

    @classmethod
    def parse(cls, params: str) -> Self:
        _Args("zero table", params).end()
        return cls()


@dataclass(frozen=True)
class Error:
    """`error`: every I/O fails (used to fail a leg or a log on purpose)."""

    kind: ClassVar[str] = "error"

    def params(self) -> str:
        return ""

    def devices(self) -> tuple[str, ...]:
        return ()

    def map_devices(self, fn: DeviceMap) -> Error:
        return self

    @classmethod
    def parse(cls, params: str) -> Self:
        _Args("error table", params).end()
        return cls()


@dataclass(frozen=True)
class CorruptBioByte:
    """flakey's `corrupt_bio_byte <Nth byte> <r|w> <value> <bio flags>`: while down, set the
    Nth byte (from 1) of every matching bio's data to `value`."""

    nth_byte: int
    direction: Literal["r", "w"]
    value: int
    flags: int = 0

    def __post_init__(self) -> None:
        if self.nth_byte < 1 or self.direction not in ("r", "w") or not 0 <= self.value <= 255:
            raise ValueError(f"corrupt_bio_byte {self.nth_byte} {self.direction} {self.value}")


@dataclass(frozen=True)
class Flakey:
    """`flakey <dev> <offset> <up s> <down s> [<#args> <feature>...]`: fault injection.

    Up for `up_interval` seconds, then down for `down_interval`, repeating. While down,
    with no feature, every I/O fails; `drop_writes` silently drops writes (and, on 6.1,
    lets reads through); `error_writes` fails writes only; `error_reads` (newer kernels)
    fails reads. 6.1 knows drop_writes, error_writes and corrupt_bio_byte only.
    """

    device: str
    offset: int
    up_interval: int
    down_interval: int
    error_reads: bool = False
    drop_writes: bool = False
    error_writes: bool = False
    corrupt_bio_byte: CorruptBioByte | None = None
    random_read_corrupt: int | None = None  # probability in 1/1000000000 (newer kernels)
    random_write_corrupt: int | None = None
    kind: ClassVar[str] = "flakey"

    def __post_init__(self) -> None:
        if self.up_interval + self.down_interval == 0:
            raise ValueError("total (up + down) interval is zero")
        if self.drop_writes and self.error_writes:
            # dm-flakey.c parse_features: "Feature drop_writes conflicts with feature error_writes".
            raise ValueError("drop_writes conflicts with error_writes")

    def params(self) -> str:
        # dm-flakey.c flakey_status (STATUSTYPE_TABLE). The count is always printed, even 0,
        # and features come in this fixed order. 6.1 also prints a trailing space, which
        # parsing ignores.
        features: list[str] = []
        if self.error_reads:
            features.append("error_reads")
        if self.drop_writes:
            features.append("drop_writes")
        elif self.error_writes:
            features.append("error_writes")
        if self.corrupt_bio_byte is not None:
            c = self.corrupt_bio_byte
            features += ["corrupt_bio_byte", str(c.nth_byte), c.direction, str(c.value)]
            features.append(str(c.flags))
        if self.random_read_corrupt is not None:
            features += ["random_read_corrupt", str(self.random_read_corrupt)]
        if self.random_write_corrupt is not None:
            features += ["random_write_corrupt", str(self.random_write_corrupt)]
        head = f"{self.device} {self.offset} {self.up_interval} {self.down_interval}"
        return " ".join([head, str(len(features)), *features])

    def devices(self) -> tuple[str, ...]:
        return (self.device,)

    def map_devices(self, fn: DeviceMap) -> Flakey:
        return replace(self, device=fn(self.device))

    @classmethod
    def parse(cls, params: str) -> Self:
        args = _Args("flakey table", params)
        device, offset = args.device("device"), args.uint("offset")
        up, down = args.uint("up interval"), args.uint("down interval")
        found: dict[str, list[str]] = {}
        if args.left():
            found = args.features(
                "flakey feature",
                {
                    "error_reads": 0,
                    "drop_writes": 0,
                    "error_writes": 0,
                    "corrupt_bio_byte": 4,
                    "random_read_corrupt": 1,
                    "random_write_corrupt": 1,
                },
            )
        args.end()
        corrupt = None
        if "corrupt_bio_byte" in found:
            nth, direction, value, flags = found["corrupt_bio_byte"]
            if direction not in ("r", "w"):
                raise args.fail(f"corrupt_bio_byte direction {direction!r}")
            corrupt = _build(
                args,
                lambda: CorruptBioByte(
                    _uint_arg(args, nth, "corrupt_bio_byte byte", low=1),
                    cast(Literal["r", "w"], direction),
                    _uint_arg(args, value, "corrupt_bio_byte value", high=255),
                    _uint_arg(args, flags, "corrupt_bio_byte flags"),
                ),
            )
        chances = {
            name: _uint_arg(args, found[name][0], name, low=1, high=1_000_000_000)
            for name in ("random_read_corrupt", "random_write_corrupt")
            if name in found
        }
        return _build(
            args,
            lambda: cls(
                device,
                offset,
                up,
                down,
                error_reads="error_reads" in found,
                drop_writes="drop_writes" in found,
                error_writes="error_writes" in found,
                corrupt_bio_byte=corrupt,
                random_read_corrupt=chances.get("random_read_corrupt"),
                random_write_corrupt=chances.get("random_write_corrupt"),
            ),
        )


@dataclass(frozen=True)
class DelayClass:
    """One class of I/O for `delay`: where it goes and how long it waits (milliseconds)."""

    device: str
    offset: int
    delay_ms: int

    def render(self) -> str:
        return f"{self.device} {self.offset} {self.delay_ms}"


@dataclass(frozen=True)
class Delay:
    """`delay <read dev> <offset> <ms> [<write dev> <offset> <ms> [<flush dev> <offset> <ms>]]`.

    Without `write`, writes use the read class; without `flush`, flushes use the write
    class. The kernel prints back exactly the classes it was given (dm-delay.c
    delay_status looks at the constructor's argc), even one identical to the read class.
    """

    read: DelayClass
    write: DelayClass | None = None
    flush: DelayClass | None = None
    kind: ClassVar[str] = "delay"

    def __post_init__(self) -> None:
        if self.flush is not None and self.write is None:
            raise ValueError("a flush class needs a write class")

    def classes(self) -> tuple[DelayClass, ...]:
        return tuple(c for c in (self.read, self.write, self.flush) if c is not None)

    def params(self) -> str:
        return " ".join(c.render() for c in self.classes())

    def devices(self) -> tuple[str, ...]:
        return tuple(c.device for c in self.classes())

    def map_devices(self, fn: DeviceMap) -> Delay:
        def moved(c: DelayClass | None) -> DelayClass | None:
            return None if c is None else replace(c, device=fn(c.device))

        return Delay(cast(DelayClass, moved(self.read)), moved(self.write), moved(self.flush))

    @classmethod
    def parse(cls, params: str) -> Self:
        args = _Args("delay table", params)
        if args.left() not in (3, 6, 9):
            raise args.fail(f"{args.left()} arguments (3, 6 or 9 expected)")
        found = [
            DelayClass(args.device("device"), args.uint("offset"), args.uint("delay"))
            for _ in range(args.left() // 3)
        ]
        args.end()
        return _build(args, lambda: cls(*found))


PARSERS: Mapping[str, Callable[[str], Target]] = {
    Linear.kind: Linear.parse,
    Era.kind: Era.parse,
    SnapshotOrigin.kind: SnapshotOrigin.parse,
    Snapshot.kind: Snapshot.parse,
    Mirror.kind: Mirror.parse,
    Zero.kind: Zero.parse,
    Error.kind: Error.parse,
    Flakey.kind: Flakey.parse,
    Delay.kind: Delay.parse,
}


def parse_target(kind: str, params: str) -> Target:
    """The target of type `kind` from its parameters; unknown types are a `ParseError`."""
    parse = PARSERS.get(kind)
    if parse is None:
        raise ParseError(f"device-mapper table (unknown target type {kind!r})", params)
    return parse(params)


# --- tables ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableLine:
    """One line of a table: sectors [start, start + length) mapped by `target`."""

    start: int
    length: int
    target: Target

    def render(self) -> str:
        params = self.target.params()
        return f"{self.start} {self.length} {self.target.kind}" + (f" {params}" if params else "")

    def map_devices(self, fn: DeviceMap) -> TableLine:
        return TableLine(self.start, self.length, self.target.map_devices(fn))


def parse_table_line(line: str) -> TableLine:
    """One line of `dmsetup table` output: `<start> <length> <type> [params]`."""
    tokens = line.split(maxsplit=3)
    if len(tokens) < 3 or not all(_UINT.fullmatch(t) for t in tokens[:2]):
        raise ParseError("dmsetup table line", line)
    length = int(tokens[1])
    if length == 0:
        raise ParseError("dmsetup table line (zero length)", line)
    return TableLine(int(tokens[0]), length, parse_target(tokens[2], "".join(tokens[3:])))


def parse_table(text: str) -> tuple[TableLine, ...]:
    """All lines of `dmsetup table NAME` output (empty text: no table loaded).

    Lines must be contiguous from sector 0, as the kernel requires of a live table.
    """
    lines = tuple(parse_table_line(line) for line in text.splitlines() if line.strip())
    end = 0
    for line in lines:
        if line.start != end:
            raise ParseError(f"dmsetup table (line at {line.start} should start at {end})", text)
        end = line.start + line.length
    return lines


def render_table(lines: Iterable[TableLine]) -> str:
    """The table text as `dmsetup create` reads it from stdin."""
    return "".join(line.render() + "\n" for line in lines)


def single(length: int, target: Target) -> str:
    """A one-line table covering [0, length)."""
    return render_table([TableLine(0, length, target)])


def table_devices(lines: Iterable[TableLine]) -> tuple[str, ...]:
    """Every device the table names, in order of appearance, without repeats."""
    seen: dict[str, None] = {}
    for line in lines:
        for device in line.target.devices():
            seen.setdefault(device)
    return tuple(seen)


class UnknownDevice(DmreplError):
    """A table names a device whose number was not probed."""


def normalise_table(lines: Iterable[TableLine], ids: Mapping[str, str]) -> tuple[TableLine, ...]:
    """`lines` with every device path replaced by its "MAJOR:MINOR" from `ids`.

    Devices already written as numbers are kept. The result compares equal to
    `parse_table` of what `dmsetup table` prints for the same device stack.
    """

    def number(device: str) -> str:
        if is_dev_id(device):
            return device
        try:
            return ids[device]
        except KeyError:
            raise UnknownDevice(
                f"no device number known for {device}",
                hint="probe every device of the table (dmrepl.probe.dev_id_of) first",
            ) from None

    return tuple(line.map_devices(number) for line in lines)
