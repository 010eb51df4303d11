"""Replicas handed to users at the site that holds them: replay first, read-only, never torn.

While a committed journal is being applied, a raw replica device is between two cuts. So
every command that hands replicas to a user finishes a committed journal first and refuses
replicas whose journal names no cut. `open_replicas` exposes them as read-only dm devices
(`dmrepl-replica-<group>.<site>.<device>`); while they exist, the site refuses deliveries
(dmrepl.sites.journaled), so what a reader sees stays that cut. `replay` is what a receiver
host runs at boot: it finishes every committed journal it finds.

The replicas are found in this host's configuration: a `[receive.GROUP]` grant (a DR host
running `dmrepl serve`), else the group's `blockdev` site of that name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dmrepl import dm
from dmrepl.config import Config
from dmrepl.errors import DmreplError, InvalidInput
from dmrepl.executor import Runner
from dmrepl.ops import Op
from dmrepl.probe import REPLICA_VIEW_PREFIX as PREFIX
from dmrepl.probe import DeviceProblem, probe_block_device
from dmrepl.sites import SiteContext, SiteFailure
from dmrepl.sites.base import Delivery, RecordUnreadable
from dmrepl.sites.journaled import BlockdevSiteSpec, JournaledSite
from dmrepl.statedir import StateDir
from dmrepl.tables import Linear, TableLine, render_table

UUID_TAG = f"{dm.UUID_PREFIX}replica-"


@dataclass(frozen=True)
class Replicas:
    """One site's replicas of a group, as this host reaches them."""

    group: str
    site: str
    paths: dict[str, str]  # group device -> replica device
    journal: str | None  # None: the file in the state directory
    state_dir: Path

    def names(self) -> dict[str, str]:
        """Group device -> the dm name of its read-only view."""
        return {d: f"{PREFIX}{self.group}.{self.site}.{d}" for d in self.paths}


def find(config: Config, group: str, site: str) -> Replicas:
    """The replicas `site` holds of `group` on this host (a grant, or a blockdev site)."""
    grant = config.receive.get(group)
    if grant is not None:
        return Replicas(group, site, dict(grant.replicas), grant.journal, config.state_dir)
    if group not in config.groups:
        raise InvalidInput(
            f"{config.path} has neither a [receive.{group}] grant nor a group {group}",
            hint="on a DR host, run it with the receiver's configuration (--config)",
        )
    spec = config.groups[group].site(site)
    if not isinstance(spec, BlockdevSiteSpec):
        raise InvalidInput(
            f"site {site} of group {group} is a {spec.transport} site: its replicas are not "
            "block devices on this host",
            hint="run this on the host that holds them, with its receiver configuration",
        )
    return Replicas(group, site, dict(spec.replicas), spec.journal, config.state_dir)


def journaled(replicas: Replicas) -> JournaledSite:
    """The replicas behind their journal (each replica's size is its origin's)."""
    sizes = {}
    for device, path in replicas.paths.items():
        try:
            sizes[device] = probe_block_device(path, role=f"replica of {device}").size_sectors
        except DeviceProblem as exc:
            raise DmreplError(exc.message, hint=exc.hint) from None
    spec = BlockdevSiteSpec(
        replicas.group, replicas.site, "blockdev", "asynchronous", replicas.paths,
        replicas.journal,
    )  # fmt: skip
    return JournaledSite(spec, SiteContext(sizes, StateDir(replicas.state_dir)))


def replay(replicas: Replicas) -> tuple[Delivery | None, int | None]:
    """Finish a committed journal; (what was applied, the cut the replicas now hold)."""
    site = journaled(replicas)
    try:
        applied = site.recover()
        return applied, site.held()
    except SiteFailure as exc:
        raise DmreplError(exc.message, hint=exc.hint) from None


def open_replicas(runner: Runner, replicas: Replicas) -> tuple[int, dict[str, str]]:
    """Replay, then expose the replicas read-only; (the cut they hold, device -> path)."""
    names = replicas.names()
    opened = dm.observe(runner).names
    if any(name in opened for name in names.values()):
        raise InvalidInput(
            f"the replicas of {replicas.group} at site {replicas.site} are open already",
            hint=f"`dmrepl replica close {replicas.group} --site {replicas.site}` first",
        )
    _, held = replay(replicas)
    if held is None:
        raise DmreplError(
            f"the replicas of {replicas.group} at site {replicas.site} hold no whole cut "
            "(never seeded, or a seed was cut short)",
            hint="seed the site from the primary; nothing was opened",
        )
    views = read_only_views(replicas)
    done: dict[str, str] = {}
    try:
        for device, op in views.items():
            runner.run(op)
            done[device] = dm.mapper_path(names[device])
    except BaseException:
        for device in done:
            runner.run_best_effort(dm.remove(names[device]))
        raise
    return held, done


def read_only_views(replicas: Replicas) -> dict[str, Op]:
    """The command creating each replica's read-only view; refused for a replica held by
    something (a live mirror leg is no cut). Runs nothing."""
    names = replicas.names()
    views = {}
    for device, path in replicas.paths.items():
        found = probe_block_device(path, role=f"replica of {device}")
        if found.holders:
            raise DmreplError(
                f"replica {path} of {device} is held by {', '.join(found.holders)} (a mirror "
                "leg of a synchronous site, or open already): it is not a cut",
                hint="only an asynchronous site's replicas, or a detached one's, can be opened",
            )
        name = names[device]
        table = render_table([TableLine(0, found.size_sectors, Linear(path, 0))])
        views[device] = dm.create_readonly(name, table, f"{UUID_TAG}{name[len(PREFIX) :]}")
    return views


def close_replicas(runner: Runner, replicas: Replicas) -> list[str]:
    """Remove the read-only views; returns the names removed."""
    removed = opened_views(runner, replicas)
    for name in removed:
        runner.run(dm.remove(name))
    return removed


def opened_views(runner: Runner, replicas: Replicas) -> list[str]:
    """The dm names of the replicas' read-only views that exist now."""
    opened = dm.observe(runner).names
    return [name for name in replicas.names().values() if name in opened]


@dataclass(frozen=True)
class ReceivedState:
    """What a receiver host's journal says of one site's replicas (read-only)."""

    group: str
    site: str
    held: int | None  # the cut the replicas hold (None: none whole)
    pending: int | None  # a cut committed to the journal and not applied yet
    detail: str = ""

    @property
    def state(self) -> str:
        if self.detail:
            return "unreadable"
        if self.pending is not None:
            return "replay pending"
        return "holds a cut" if self.held is not None else "no cut"


def received(config: Config) -> list[ReceivedState]:
    """Every journal of this host's `[receive.GROUP]` grants, as `status` shows them. Reads
    only: a pending replay is reported, not done (`dmrepl replay` does it)."""
    found = []
    journals = StateDir(config.state_dir).journals
    for group, grant in sorted(config.receive.items()):
        if grant.journal is not None:
            sites = ["(configured journal)"]
        else:
            sites = sorted(
                p.name[len(group) + 1 : -len(".journal")]
                for p in (journals.glob(f"{group}.*.journal") if journals.is_dir() else [])
            )
        for site in sites:
            replicas = Replicas(group, site, dict(grant.replicas), grant.journal, config.state_dir)
            found.append(journal_state(replicas))
    return found


def journal_state(replicas: Replicas) -> ReceivedState:
    """What the replicas' journal says: the cut held and any replay pending (reads only)."""
    try:
        reader = journaled(replicas)
        held, recorded = reader.held(), reader.recorded()
    except (DmreplError, RecordUnreadable) as exc:
        return ReceivedState(replicas.group, replicas.site, None, None, str(exc))
    pending = recorded if recorded is not None and recorded != held else None
    return ReceivedState(replicas.group, replicas.site, held, pending)


@dataclass(frozen=True)
class Replayed:
    group: str
    site: str
    applied: Delivery | None
    held: int | None
    problem: str = ""


def replay_all(config: Config) -> list[Replayed]:
    """`dmrepl replay` (at boot on a receiver host): finish every committed journal of this
    host's `[receive.GROUP]` grants, so that no replica stays between two cuts."""
    done = []
    for state in received(config):
        if state.pending is None:
            continue
        try:
            applied, held = replay(find(config, state.group, state.site))
        except DmreplError as exc:
            done.append(Replayed(state.group, state.site, None, None, exc.message))
            continue
        done.append(Replayed(state.group, state.site, applied, held))
    return done
