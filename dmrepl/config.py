"""The configuration file: groups of protected devices, read from TOML and validated up front.

    [dmrepl]
    state_dir = "/var/lib/dmrepl"          # optional
    metrics_file = "/var/lib/prometheus/node-exporter/dmrepl.prom"   # optional (docs/metrics.md)

    [group.db]
    block_size = "2MiB"                    # optional default for the group's devices
    spool_size = "4GiB"                    # optional cap of the group's replication log

    [group.db.device.data]                 # gate: /dev/mapper/data
    origin = "/dev/vdb"
    metadata = "/dev/vdc"                  # device holding the era metadata area
    metadata_offset = "0"                  # optional (sectors or units)
    metadata_size = "8MiB"                 # optional; default: dmrepl's computed size
    block_size = "2MiB"                    # era block size (multiple of 4 KiB)
    cow_size = "1GiB"                      # or cow = "/dev/vdd": copy-on-write space for cuts
    mirror_legs = ["/dev/vde"]             # optional local synchronous mirror legs
    mirror_log = "core"                    # core | disk (then mirror_log_device = "...")
    mirror_region_size = "512KiB"          # optional

    [group.db.site.dr]                     # a replica of every device of the group
    transport = "blockdev"                 # blockdev | dir | ssh | nbd | s3
    policy = "asynchronous"                # asynchronous | synchronous (blockdev) | stall
    fall_behind = { ios = 1000, size = "64MiB", timeout = "30s" }   # optional limits
    stall_limit = "60s"                    # longest writers are held for this site
    journal = "/dev/vdh"                   # blockdev: optional; default a file in the state dir
    path = "/srv/dr"                       # dir: where delta files go (instead of replicas)
    keep = "1h:24, 1d:7"                   # dir: optional retention grid (default: keep all)
    [group.db.site.dr.replica]
    data = "/dev/nbd0"                     # blockdev: one replica per group device
    [group.db.site.dr.export]
    data = "nbd://dr:10809/db-data"        # nbd: one export per group device (docs/replication.md)

All problems are collected and reported at once, each naming its key and the file.
Nothing here touches a device: checks against the system live in `dmrepl.safety`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from dmrepl.errors import DmreplError, ExitCode, InvalidInput
from dmrepl.policy import DEFAULT_STALL_LIMIT_S, FallBehind, Policy
from dmrepl.sizing import validate_block_size
from dmrepl.units import parse_size_sectors

DEFAULT_PATH = Path("/etc/dmrepl/dmrepl.toml")
DEFAULT_STATE_DIR = Path("/var/lib/dmrepl")
DEFAULT_BLOCK = "2MiB"
DEFAULT_REGION = "512KiB"
DEFAULT_SPOOL = "4GiB"
POLICIES = tuple(p.value for p in Policy)
# Names become dm device names and parts of dm UUIDs ("DMREPL-<layer>-<group>.<device>"),
# so no dots and nothing udev would have to escape.
NAME_RE = re.compile(r"^[A-Za-z0-9_+][A-Za-z0-9_+-]{0,63}$")

# /dev/mapper/control is device-mapper's own node; recent kernels refuse the name.
RESERVED_NAMES = frozenset({"control"})
DM_UUID_MAX = 128  # DM_UUID_LEN (129) less its terminating NUL
MAX_DEVICE_SECTORS = 2**63 // 512  # sector_t: the largest device the kernel addresses
# dm-era keeps its metadata with the persistent-data library, whose metadata space map
# addresses 255 bitmaps of 16320 blocks of 4 KiB (just under 16 GiB).
MAX_METADATA_SECTORS = 255 * 16320 * 8

# The keys each table takes (a test checks that `dmrepl config example` sets every one).
_DMREPL_KEYS = frozenset({"state_dir", "metrics_file"})
_GROUP_KEYS = {"block_size", "device", "site", "spool_size"}
# Every transport's own keys come on top of these.
_SITE_KEYS = frozenset({"transport", "policy", "fall_behind", "stall_limit"})
_DEVICE_KEYS = {
    "origin", "metadata", "metadata_offset", "metadata_size", "block_size", "cow", "cow_size",
    "mirror_legs", "mirror_log", "mirror_log_device", "mirror_region_size",
}  # fmt: skip
_FALL_BEHIND_KEYS = frozenset({"ios", "size", "timeout"})
_RECEIVE_KEYS = frozenset({"replica", "journal", "primary"})


class ConfigError(DmreplError):
    """The configuration has problems; all of them are listed."""

    exit_code = ExitCode.CONFIG

    def __init__(self, path: Path, problems: list[str]):
        self.path = path
        self.problems = problems
        count = f"{len(problems)} problem" + ("s" if len(problems) != 1 else "")
        super().__init__(
            f"{path}: {count} in the configuration",
            context="\n".join(f"- {p}" for p in problems),
            hint="fix them and run `dmrepl check-config`",
        )


@dataclass(frozen=True)
class MirrorSpec:
    """Local synchronous mirror legs under the snapshot-origin layer."""

    legs: tuple[str, ...]
    log: str  # "core" or "disk"
    log_device: str | None
    region_sectors: int


@dataclass(frozen=True)
class DeviceSpec:
    """One protected device of a group, as configured."""

    group: str
    name: str
    origin: str
    metadata: str
    metadata_offset: int  # sectors
    metadata_size: int | None  # sectors; None: computed
    block_sectors: int
    cow: str | None
    cow_sectors: int | None
    mirror: MirrorSpec | None
    # Replicas of this device at synchronous sites: legs its mirror layer takes on once
    # a site has caught up (dmrepl.stack.mirror_target).
    sync_replicas: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"group.{self.group}.device.{self.name}"


@dataclass(frozen=True)
class SiteSpec:
    """A place holding one replica of every device of a group.

    Each transport (dmrepl.sites.registry) subclasses it with its own fields, the keys
    it reads (`KEYS`) and `parse`; the cross-file checks ask it through the methods below.
    """

    KEYS: ClassVar[frozenset[str]] = frozenset()

    group: str
    name: str
    transport: str
    policy: str  # a dmrepl.policy.Policy value
    # Common to every transport, set after the transport's own `parse` (keyword-only, so
    # the transports' positional fields come right after `policy`).
    fall_behind: FallBehind = dataclasses.field(default=FallBehind(), kw_only=True)
    stall_limit_s: float = dataclasses.field(default=DEFAULT_STALL_LIMIT_S, kw_only=True)

    @property
    def key(self) -> str:
        return f"group.{self.group}.site.{self.name}"

    @classmethod
    def parse(
        cls, reader: FieldReader, spec: SiteSpec, raw: dict[str, Any], devices: list[str]
    ) -> SiteSpec | None:
        """This transport's spec from its keys in `raw`, or None after reporting problems."""
        return cls(spec.group, spec.name, spec.transport, spec.policy)

    def claims(self) -> list[tuple[str, str, str]]:
        """(key, field, path) of every device this site writes: no path may have two roles."""
        return []

    def state_dir_problems(self, state_dir: Path) -> list[str]:
        """Problems with where the site keeps things, relative to the state directory."""
        return []

    def filesystem_problems(self) -> list[str]:
        """Problems found by looking at (never changing) the filesystem when loading."""
        return []


@dataclass(frozen=True)
class GroupSpec:
    name: str
    devices: tuple[DeviceSpec, ...]
    sites: tuple[SiteSpec, ...] = ()
    spool_bytes: int = 4 * 2**30

    def site(self, name: str) -> SiteSpec:
        for site in self.sites:
            if site.name == name:
                return site
        known = ", ".join(s.name for s in self.sites) or "none"
        raise InvalidInput(
            f"group {self.name} has no site {name!r}", hint=f"configured sites: {known}"
        )


@dataclass(frozen=True)
class SshAddress:
    """How OpenSSH reaches another host: an ssh site's receiver, or a DR host's primary."""

    host: str
    user: str | None = None
    port: int | None = None
    identity: str | None = None
    options: tuple[str, ...] = ()
    program: str = "ssh"  # the OpenSSH client to run

    def argv(self, *remote: str) -> list[str]:
        """`ssh -T -o BatchMode=yes [-p][-i][-l] OPTIONS HOST REMOTE...` (a forced command
        on the other side may replace REMOTE)."""
        argv = [self.program, "-T", "-o", "BatchMode=yes"]
        if self.port is not None:
            argv += ["-p", str(self.port)]
        if self.identity is not None:
            argv += ["-i", self.identity]
        if self.user is not None:
            argv += ["-l", self.user]
        return [*argv, *self.options, self.host, *remote]


SSH_ADDRESS_KEYS = frozenset({"host", "user", "port", "identity", "ssh_options", "ssh"})


@dataclass(frozen=True)
class ReceiveGrant:
    """`[receive.GROUP]`: what this host's receiver (`dmrepl serve`) lets a primary write for
    one group: exactly these replicas, through this journal; and how to ask that primary
    whether it still holds the group (`dmrepl promote`)."""

    group: str
    replicas: dict[str, str]  # group device name -> replica device path on this host
    journal: str | None  # None: a file in this host's state directory
    primary: SshAddress | None = None  # `[receive.GROUP.primary]`

    @property
    def key(self) -> str:
        return f"receive.{self.group}"


@dataclass(frozen=True)
class Config:
    path: Path
    state_dir: Path
    groups: dict[str, GroupSpec]
    receive: dict[str, ReceiveGrant] = dataclasses.field(default_factory=dict)
    # Where `sync` and `run` publish the metrics after each cycle (node_exporter's textfile
    # collector); None: nowhere.
    metrics_file: Path | None = None

    def select(self, group: str | None) -> list[GroupSpec]:
        """The named group, or all groups when `group` is None."""
        if group is None:
            return list(self.groups.values())
        if group not in self.groups:
            known = ", ".join(sorted(self.groups)) or "none"
            raise InvalidInput(
                f"no group {group!r} in {self.path}", hint=f"configured groups: {known}"
            )
        return [self.groups[group]]


def example_text() -> str:
    """The commented configuration `dmrepl config example` prints (dmrepl/example.toml)."""
    return resources.files("dmrepl").joinpath("example.toml").read_text(encoding="utf-8")


def load_config(path: Path) -> Config:
    """Read and validate a configuration file (and that no dir site's path is a file)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(path, ["the file does not exist (create it or pass --config)"]) from None
    except OSError as exc:
        raise ConfigError(path, [f"cannot read the file: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            path, [f"not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at offset {exc.start}"]
        ) from None
    config = parse_config(text, path)
    problems = [
        problem
        for group in config.groups.values()
        for site in group.sites
        for problem in site.filesystem_problems()
    ]
    if problems:
        raise ConfigError(path, problems)
    return config


def parse_config(text: str, path: Path) -> Config:
    """Validate TOML text; raise ConfigError listing every problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [f"not valid TOML: {exc}"]) from None
    reader = FieldReader()
    top = raw.get("dmrepl", {})
    reader.unknown(top, _DMREPL_KEYS, "dmrepl")
    unknown_top = set(raw) - {"dmrepl", "group", "receive"}
    for key in sorted(unknown_top):
        reader.problem(key, "unknown section (expected [dmrepl], [group.NAME] or [receive.NAME])")
    state_dir = Path(reader.path(top, "state_dir", "dmrepl", required=False) or DEFAULT_STATE_DIR)
    metrics_file = reader.metrics_file(top, state_dir)
    groups: dict[str, GroupSpec] = {}
    grants = reader.grants(raw.get("receive", {}))
    raw_groups = raw.get("group", {})
    if not isinstance(raw_groups, dict) or (not raw_groups and "receive" not in raw):
        reader.problem("group", "no groups configured (add a [group.NAME.device.NAME] table)")
        raw_groups = {}
    for group_name, group_raw in raw_groups.items():
        group = reader.group(group_name, group_raw)
        if group:
            groups[group_name] = group
    reader.cross_checks(groups, state_dir)
    seen: dict[str, str] = {}
    for grant in grants.values():
        reader.claim([(f"{grant.key}.replica", d, p) for d, p in grant.replicas.items()], seen)
        if grant.journal is not None:
            reader.claim([(grant.key, "journal", grant.journal)], seen)
    if reader.problems:
        raise ConfigError(path, reader.problems)
    return Config(
        path=path, state_dir=state_dir, groups=groups, receive=grants, metrics_file=metrics_file
    )


def _with_sync_legs(device: DeviceSpec, sites: list[SiteSpec]) -> DeviceSpec:
    """The device with the replicas synchronous sites keep of it (their mirror legs)."""
    legs = tuple(getattr(site, "replicas", {}).get(device.name) for site in sites)
    return dataclasses.replace(device, sync_replicas=tuple(leg for leg in legs if leg))


def _size_limit(field: str) -> tuple[int, str]:
    """The largest value a size field may take, in sectors, and how to say it."""
    if field == "metadata_size":
        return MAX_METADATA_SECTORS, "dm-era's metadata can address (about 15.9 GiB)"
    return MAX_DEVICE_SECTORS, "the largest device the kernel addresses (8 EiB)"


def inside(path: Path, directory: Path) -> bool:
    """Whether `path` is `directory` or below it (lexically: config paths are not probed)."""
    normal, top = Path(os.path.normpath(path)), Path(os.path.normpath(directory))
    return normal == top or top in normal.parents


class FieldReader:
    """Collects problems while reading the raw TOML tree."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def problem(self, key: str, text: str) -> None:
        self.problems.append(f"{key}: {text}")

    def unknown(self, table: dict[str, Any], allowed: AbstractSet[str], where: str) -> None:
        for key in sorted(set(table) - allowed):
            self.problem(f"{where}.{key}", f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def name(self, name: str, key: str) -> bool:
        if not NAME_RE.match(name):
            self.problem(key, f"name {name!r} must be 1-64 of A-Z a-z 0-9 _ + - (no dots)")
            return False
        if name in RESERVED_NAMES:
            self.problem(key, f"name {name!r} is reserved by device-mapper (/dev/mapper/{name})")
            return False
        return True

    def string(self, table: dict[str, Any], field: str, where: str) -> str | None:
        value = table.get(field)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            self.problem(f"{where}.{field}", f"must be a non-empty string, not {value!r}")
            return None
        return value

    def path(self, table: dict[str, Any], field: str, where: str, required: bool) -> str | None:
        value = self.string(table, field, where)
        if value is None:
            if required and field not in table:
                self.problem(f"{where}.{field}", "missing (a block device path)")
            return None
        if not value.startswith("/"):
            self.problem(f"{where}.{field}", f"{value!r} is not an absolute path")
            return None
        if any(char.isspace() or not char.isprintable() for char in value):
            self.problem(
                f"{where}.{field}",
                f"{value!r} contains whitespace or control characters, which a dm table "
                "cannot hold (use a /dev/disk/by-id link or rename it)",
            )
            return None
        return value

    def metrics_file(self, top: dict[str, Any], state_dir: Path) -> Path | None:
        """`[dmrepl] metrics_file`: an absolute `*.prom` path outside the state directory."""
        value = self.path(top, "metrics_file", "dmrepl", required=False)
        if value is None:
            return None
        key = "dmrepl.metrics_file"
        if not value.endswith(".prom") or value.endswith("/.prom"):
            self.problem(key, f"{value!r} must end in .prom (node_exporter reads only those)")
            return None
        if inside(Path(value), state_dir):
            self.problem(key, f"{value} is inside state_dir {state_dir}, which only root may read")
            return None
        return Path(value)

    def size(
        self, table: dict[str, Any], field: str, where: str, *, zero_ok: bool = False
    ) -> int | None:
        """A size in sectors; 0 only where `zero_ok` (an offset), never above what dm addresses."""
        value = table.get(field)
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            self.problem(
                f"{where}.{field}", f'must be a size like "2MiB" or sectors, not {value!r}'
            )
            return None
        try:
            sectors = int(parse_size_sectors(value, what=field))
        except InvalidInput as exc:
            self.problem(f"{where}.{field}", exc.message + (f" ({exc.hint})" if exc.hint else ""))
            return None
        limit, limit_text = _size_limit(field)
        if sectors == 0 and not zero_ok:
            self.problem(
                f"{where}.{field}", "must be greater than 0 (leave it out for the default)"
            )
            return None
        if sectors > limit:
            self.problem(f"{where}.{field}", f"{value} is more than {limit_text}")
            return None
        return sectors

    def group(self, name: str, raw: Any) -> GroupSpec | None:
        key = f"group.{name}"
        if not self.name(name, key):
            return None
        if not isinstance(raw, dict):
            self.problem(key, "must be a table")
            return None
        self.unknown(raw, _GROUP_KEYS, key)
        default_block = self.size(raw, "block_size", key)
        devices_raw = raw.get("device", {})
        if not isinstance(devices_raw, dict):
            self.problem(f"{key}.device", "must be a table of [group.NAME.device.NAME] tables")
            return None
        if not devices_raw:
            self.problem(f"{key}.device", "no devices (add a [group.NAME.device.NAME] table)")
            return None
        devices = []
        for device_name, device_raw in devices_raw.items():
            device = self.device(name, device_name, device_raw, default_block)
            if device:
                devices.append(device)
        spool = self.size(raw, "spool_size", key)
        if spool is None:
            spool = int(parse_size_sectors(DEFAULT_SPOOL))
        sites_raw = raw.get("site", {})
        if not isinstance(sites_raw, dict):
            self.problem(f"{key}.site", "must be a table of [group.NAME.site.NAME] tables")
            sites_raw = {}
        # Every configured device, also one with problems of its own: a site naming it is
        # not wrong, and saying so would be a second, misleading problem.
        names = list(devices_raw)
        sites = [self.site(name, s, r, names) for s, r in sites_raw.items()]
        synchronous = [s for s in sites if s is not None and s.policy == Policy.SYNCHRONOUS]
        if synchronous:
            devices = [_with_sync_legs(d, synchronous) for d in devices]
        return GroupSpec(
            name=name,
            devices=tuple(devices),
            sites=tuple(s for s in sites if s is not None),
            spool_bytes=spool * 512,
        )

    def site(self, group: str, name: str, raw: Any, devices: list[str]) -> SiteSpec | None:
        # The registry's spec classes build on this module, so it is imported here.
        from dmrepl.sites.registry import TRANSPORTS

        key = f"group.{group}.site.{name}"
        if not self.name(name, key):
            return None
        if not isinstance(raw, dict):
            self.problem(key, "must be a table")
            return None
        before = len(self.problems)
        known = ", ".join(TRANSPORTS)
        transport = raw.get("transport")
        chosen = TRANSPORTS.get(transport) if isinstance(transport, str) else None
        every_key = _SITE_KEYS.union(*(t.spec.KEYS for t in TRANSPORTS.values()))
        for field in sorted(set(raw) - _SITE_KEYS - (chosen.spec.KEYS if chosen else set())):
            users = [t.name for t in TRANSPORTS.values() if field in t.spec.KEYS]
            if field not in every_key:
                self.problem(
                    f"{key}.{field}", f"unknown key (allowed: {', '.join(sorted(every_key))})"
                )
            elif chosen is not None:
                only = " or ".join(f'transport = "{user}"' for user in users)
                self.problem(f"{key}.{field}", f"only used with {only}")
        if transport is None:
            self.problem(f"{key}.transport", f"missing (one of {known})")
        elif chosen is None:
            self.problem(f"{key}.transport", f"{transport!r} is not one of {known}")
        policy = raw.get("policy", Policy.ASYNCHRONOUS.value)
        if policy not in POLICIES:
            self.problem(f"{key}.policy", f"{policy!r} is not one of {', '.join(POLICIES)}")
        elif policy == Policy.SYNCHRONOUS and chosen is not None and chosen.name != "blockdev":
            self.problem(
                f"{key}.policy",
                f"synchronous needs replicas that are block devices on this host (transport = "
                f'"blockdev", e.g. an NBD or iSCSI disk); a {chosen.name} site can be '
                "asynchronous or stall",
            )
        fall_behind = self.fall_behind(raw, key)
        stall_limit = self.duration(raw, "stall_limit", key)
        if policy == Policy.SYNCHRONOUS and fall_behind.limited:
            self.problem(
                f"{key}.fall_behind",
                "has no meaning for a synchronous site: its replicas are mirror legs, so it "
                "is never behind while joined (and catches up at once when not)",
            )
        elif stall_limit is not None and policy == Policy.ASYNCHRONOUS and not fall_behind.limited:
            self.problem(
                f"{key}.stall_limit",
                'only used with policy = "stall" or "synchronous" (how long writers may be held '
                "while it drains or joins) or a fall_behind limit",
            )
        if chosen is None:
            return None
        common = SiteSpec(group, name, chosen.name, str(policy))
        spec = chosen.spec.parse(self, common, raw, devices)
        if spec is None or len(self.problems) > before:
            return None
        return dataclasses.replace(
            spec,
            fall_behind=fall_behind,
            stall_limit_s=DEFAULT_STALL_LIMIT_S if stall_limit is None else stall_limit,
        )

    def fall_behind(self, raw: dict[str, Any], key: str) -> FallBehind:
        """`fall_behind = { ios = N, size = "64MiB", timeout = "30s" }` (any of the three)."""
        table = raw.get("fall_behind")
        where = f"{key}.fall_behind"
        if table is None:
            return FallBehind()
        if not isinstance(table, dict) or not table:
            self.problem(
                where, 'must be a table like { ios = 1000, size = "64MiB", timeout = "30s" }'
            )
            return FallBehind()
        self.unknown(table, _FALL_BEHIND_KEYS, where)
        ios = table.get("ios")
        if ios is not None and (isinstance(ios, bool) or not isinstance(ios, int) or ios < 0):
            self.problem(f"{where}.ios", f"{ios!r} is not a count of writes (0 or more)")
            ios = None
        sectors = self.size(table, "size", where)
        return FallBehind(
            ios=ios,
            bytes=None if sectors is None else sectors * 512,
            seconds=self.duration(table, "timeout", where),
        )

    def duration(self, table: dict[str, Any], field: str, where: str) -> float | None:
        """Seconds, from a number or a string like "90s", "3m", "1h"."""
        value = table.get(field)
        if value is None:
            return None
        text = str(value) if isinstance(value, (int, float)) else value
        units = {"s": 1, "m": 60, "h": 3600}
        if isinstance(text, str) and text and text[-1] in units:
            number, unit = text[:-1], units[text[-1]]
        else:
            number, unit = str(text), 1
        try:
            seconds = float(number) * unit
        except ValueError:
            seconds = -1.0
        if isinstance(value, bool) or not 1 <= seconds <= 86400:
            self.problem(f"{where}.{field}", f"{value!r} is not a duration of 1s to 24h")
            return None
        return seconds

    def grants(self, raw: Any) -> dict[str, ReceiveGrant]:
        """`[receive.GROUP]` tables: a replica path per device, and optionally a journal."""
        if not isinstance(raw, dict):
            self.problem("receive", "must be a table of [receive.GROUP] tables")
            return {}
        grants = {}
        for group, table in raw.items():
            key = f"receive.{group}"
            if not self.name(group, key):
                continue
            if not isinstance(table, dict):
                self.problem(key, "must be a table")
                continue
            self.unknown(table, _RECEIVE_KEYS, key)
            journal = self.path(table, "journal", key, required=False)
            primary = None
            if "primary" in table:
                primary = self.ssh_address(table["primary"], f"{key}.primary")
            replicas_raw = table.get("replica")
            if not isinstance(replicas_raw, dict) or not replicas_raw:
                self.problem(f"{key}.replica", "missing: a table naming each device's replica")
                continue
            replicas = {}
            for device in replicas_raw:
                if self.name(device, f"{key}.replica.{device}"):
                    path = self.path(replicas_raw, device, f"{key}.replica", required=True)
                    if path is not None:
                        replicas[device] = path
            grants[group] = ReceiveGrant(group, replicas, journal, primary)
        return grants

    def ssh_address(self, raw: Any, key: str, *, alone: bool = True) -> SshAddress | None:
        """host, user, port, identity, ssh_options and ssh of a table (`alone`: the table
        holds nothing else, so any other key is a problem)."""
        if not isinstance(raw, dict):
            self.problem(key, "must be a table (host, user, port, identity, ssh_options, ssh)")
            return None
        if alone:
            self.unknown(raw, set(SSH_ADDRESS_KEYS), key)
        host = self.string(raw, "host", key)
        if host is None and "host" not in raw:
            self.problem(f"{key}.host", "missing (the host to reach)")
        user = self.string(raw, "user", key)
        port = raw.get("port")
        if port is not None and (not isinstance(port, int) or not 0 < port < 65536):
            self.problem(f"{key}.port", f"{port!r} is not a TCP port")
            port = None
        identity = self.path(raw, "identity", key, required=False)
        options = raw.get("ssh_options", [])
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            self.problem(f"{key}.ssh_options", 'must be a list of strings, like ["-4"]')
            options = []
        program = self.string(raw, "ssh", key) or "ssh"
        if host is None:
            return None
        return SshAddress(host, user, port, identity, tuple(options), program)

    def device(
        self, group: str, name: str, raw: Any, default_block: int | None
    ) -> DeviceSpec | None:
        key = f"group.{group}.device.{name}"
        if not self.name(name, key):
            return None
        if not isinstance(raw, dict):
            self.problem(key, "must be a table")
            return None
        before = len(self.problems)
        self.unknown(raw, _DEVICE_KEYS, key)
        origin = self.path(raw, "origin", key, required=True)
        metadata = self.path(raw, "metadata", key, required=True)
        offset = self.size(raw, "metadata_offset", key, zero_ok=True) or 0
        if offset % 8:
            self.problem(f"{key}.metadata_offset", f"{offset} sectors is not 4 KiB aligned")
        metadata_size = self.size(raw, "metadata_size", key)
        block = self.size(raw, "block_size", key)
        if block is None and "block_size" not in raw:
            block = default_block
        if block is None:
            block = int(parse_size_sectors(DEFAULT_BLOCK))
        try:
            validate_block_size(block)
        except InvalidInput as exc:
            self.problem(f"{key}.block_size", exc.message)
        cow = self.path(raw, "cow", key, required=False)
        cow_sectors = self.size(raw, "cow_size", key)
        if cow and cow_sectors:
            self.problem(f"{key}.cow", "give either cow (a device) or cow_size, not both")
        mirror = self.mirror(raw, key)
        if len(self.problems) > before or origin is None or metadata is None:
            return None
        return DeviceSpec(
            group=group,
            name=name,
            origin=origin,
            metadata=metadata,
            metadata_offset=offset,
            metadata_size=metadata_size,
            block_sectors=block,
            cow=cow,
            cow_sectors=cow_sectors,
            mirror=mirror,
        )

    def mirror(self, raw: dict[str, Any], key: str) -> MirrorSpec | None:
        legs = raw.get("mirror_legs")
        log = raw.get("mirror_log", "core")
        log_device = self.path(raw, "mirror_log_device", key, required=False)
        region = self.size(raw, "mirror_region_size", key)
        if region is None:
            region = int(parse_size_sectors(DEFAULT_REGION))
        if legs is None:
            for field in ("mirror_log", "mirror_log_device", "mirror_region_size"):
                if field in raw:
                    self.problem(f"{key}.{field}", "set without mirror_legs")
            return None
        if not isinstance(legs, list) or not legs or not all(isinstance(x, str) for x in legs):
            self.problem(f"{key}.mirror_legs", "must be a non-empty list of device paths")
            return None
        for leg in legs:
            if not leg.startswith("/"):
                self.problem(f"{key}.mirror_legs", f"{leg!r} is not an absolute path")
        if log not in ("core", "disk"):
            self.problem(f"{key}.mirror_log", f"{log!r} is not core or disk")
        elif log == "disk" and log_device is None:
            self.problem(f"{key}.mirror_log_device", 'required when mirror_log = "disk"')
        elif log == "core" and log_device is not None:
            self.problem(f"{key}.mirror_log_device", 'only used with mirror_log = "disk"')
        if region & (region - 1):
            self.problem(f"{key}.mirror_region_size", f"{region} sectors is not a power of two")
        return MirrorSpec(tuple(legs), str(log), log_device, region)

    def cross_checks(self, groups: dict[str, GroupSpec], state_dir: Path) -> None:
        """Names unique across groups (also as dm names of their layers); no device path used
        twice as origin or leg; no dir site inside the state directory."""
        from dmrepl.stack import Layer, layer_name, layer_uuid  # stack imports this module

        seen_names: dict[str, str] = {}
        seen_paths: dict[str, str] = {}
        dm_names: dict[str, str] = {}
        for group in groups.values():
            for device in group.devices:
                if device.metadata == device.origin:
                    self.problem(f"{device.key}.metadata", f"{device.metadata} is also the origin")
                for layer in Layer:
                    dm_name = layer_name(device.name, layer)
                    if dm_name in dm_names and dm_names[dm_name] != device.key:
                        self.problem(
                            device.key,
                            f"its dm device {dm_name} would also be a layer of {dm_names[dm_name]}",
                        )
                    dm_names.setdefault(dm_name, device.key)
                longest = max(len(layer_uuid(group.name, device.name, layer)) for layer in Layer)
                if longest > DM_UUID_MAX:
                    self.problem(
                        device.key,
                        f"group and device names together are too long: dm UUIDs of its layers "
                        f"would be {longest} characters, dm allows {DM_UUID_MAX}",
                    )
                if device.name in seen_names:
                    self.problem(
                        device.key,
                        f"device name {device.name!r} also used by {seen_names[device.name]}",
                    )
                seen_names[device.name] = device.key
                used = [(device.key, "origin", device.origin)]
                if device.mirror:
                    used += [(device.key, "mirror_legs", leg) for leg in device.mirror.legs]
                self.claim(used, seen_paths)
            for site in group.sites:
                self.problems += site.state_dir_problems(state_dir)
                used = site.claims()
                self.claim(used, seen_paths)
                for device in group.devices:
                    if device.metadata in [path for _, _, path in used]:
                        self.problem(site.key, f"{device.metadata} is {device.key}.metadata")

    def claim(self, used: list[tuple[str, str, str]], seen_paths: dict[str, str]) -> None:
        """Report a path that two roles want (an origin, a leg, a replica, a journal)."""
        for where, field, path in used:
            if path in seen_paths:
                self.problem(f"{where}.{field}", f"{path} is also {seen_paths[path]}")
            seen_paths[path] = f"{where}.{field}"
