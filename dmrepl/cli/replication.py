"""Replication commands: sync, seed, run, apply.

Registered on the app by `dmrepl.cli`, in the order `dmrepl --help` lists them.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path
from typing import Annotated

import typer

from dmrepl import compact, retention, s3restore
from dmrepl.cli.app import (
    USER_ERRORS,
    ConfigOption,
    GroupArg,
    JsonOption,
    Options,
    as_user_error,
    render_error,
    require_device_mapper,
    require_root,
)
from dmrepl.cli.metrics import publish_metrics
from dmrepl.cli.render import (
    CliProgress,
    err,
    out,
    render_cuts,
    render_preview,
    render_sync,
    render_verify,
    say,
)
from dmrepl.config import DEFAULT_PATH, Config, load_config
from dmrepl.errors import DmreplError, ExitCode, Interrupted, InvalidInput
from dmrepl.executor import Runner
from dmrepl.rebuild import apply_dir
from dmrepl.replication import cycle
from dmrepl.replication.backlog import drain_due
from dmrepl.replication.dryrun import preview
from dmrepl.replication.loop import parse_interval, run_cycles
from dmrepl.replication.verify import verify
from dmrepl.s3restore import apply_s3, open_remote, pull
from dmrepl.s3store import Store
from dmrepl.serve import serve
from dmrepl.sites import SiteContext, open_site
from dmrepl.sites.archive import DirSiteSpec
from dmrepl.sites.s3 import S3SiteSpec
from dmrepl.statedir import StateDir
from dmrepl.units import format_bytes


def _groups_with_sites(config: Path, group: str | None) -> tuple[Config, list[str]]:
    """The configuration and the groups a `sync` acts on: the one named, or all with sites."""
    loaded = load_config(config)
    groups = [g.name for g in loaded.select(group) if g.sites or group is not None]
    if not groups:
        raise InvalidInput(f"no group in {config} has sites", hint="add a [group.G.site.S] table")
    return loaded, groups


def _sync_once(config: Path, group: str | None, seed_sites: tuple[str, ...], zeroed: bool) -> int:
    """One cycle of each selected group that has sites; the exit code for the worst outcome."""
    loaded, groups = _groups_with_sites(config, group)
    for spec in loaded.select(group):
        for site in seed_sites:
            spec.site(site)  # an unknown site is exit 10 before the kernel is looked at
    require_device_mapper()
    try:
        return _cycles(loaded, groups, seed_sites, zeroed)
    finally:  # also after a failed cycle: its metrics say so, and the last success stays put
        publish_metrics(loaded)


def _cycles(loaded: Config, groups: list[str], seed_sites: tuple[str, ...], zeroed: bool) -> int:
    """One cycle of each of `groups`; the exit code for the worst outcome."""
    worst, failed = ExitCode.OK, None
    for name in groups:
        progress = CliProgress()
        try:
            result = cycle.sync(
                Runner(), loaded, name, seed_sites=seed_sites, target_zeroed=zeroed,
                say=say, progress=progress,
            )  # fmt: skip
        except USER_ERRORS as caught:
            # One group's failure (a lost disk, say) must not stop the other groups' cycles.
            error = as_user_error(caught)
            if error is None or len(groups) == 1 or Options.debug or isinstance(error, Interrupted):
                raise
            render_error(error)
            err.print(f"group {name}: no cut this cycle; going on with the other groups")
            failed = failed or error.exit_code
            continue
        finally:
            progress.stop()
        render_sync(result)
        if any(site.state != "in sync" for site in result.sites):
            worst = ExitCode.SITES_BEHIND
    return int(failed or worst)


DryRunOption = Annotated[
    bool,
    typer.Option(
        "--dry-run", help="Print what the cycle would do and the cut's commands; change nothing."
    ),
]


def _dry_run(config: Path, group: str | None, seed_sites: tuple[str, ...]) -> int:
    """Preview the cycle of each selected group that has sites (reads only)."""
    loaded, groups = _groups_with_sites(config, group)
    require_device_mapper()
    for name in groups:
        render_preview(preview(Runner(), loaded, name, seed_sites=seed_sites))
    return int(ExitCode.OK)


def sync(
    group: GroupArg = None, config: ConfigOption = DEFAULT_PATH, dry_run: DryRunOption = False
) -> None:
    """One replication cycle: recover, cut, capture, ship to every reachable site (for cron)."""
    require_root()
    if dry_run:
        raise typer.Exit(_dry_run(config, group, ()))
    raise typer.Exit(_sync_once(config, group, (), False))


def seed(
    group: Annotated[str, typer.Argument(help="Group name.")],
    site: Annotated[str, typer.Option("--site", help="The site to copy everything to.")],
    config: ConfigOption = DEFAULT_PATH,
    target_zeroed: Annotated[
        bool,
        typer.Option("--target-zeroed", help="The replicas are known to be all zeros."),
    ] = False,
    dry_run: DryRunOption = False,
) -> None:
    """Full copy of GROUP to SITE from a fresh cut, writing only chunks that differ."""
    require_root()
    if dry_run:
        raise typer.Exit(_dry_run(config, group, (site,)))
    raise typer.Exit(_sync_once(config, group, (site,), target_zeroed))


def run(
    group: GroupArg = None,
    config: ConfigOption = DEFAULT_PATH,
    interval: Annotated[
        str, typer.Option("--interval", help="Time between cycles: 30s, 5m, 1h.")
    ] = "30s",
    dry_run: DryRunOption = False,
) -> None:
    """Run `sync` every INTERVAL until SIGTERM or SIGINT (finishes the cycle in progress)."""
    require_root()
    seconds = parse_interval(interval)
    if dry_run:
        code = _dry_run(config, group, ())
        out.print(f"run would repeat this every {seconds:g} s (sooner for a site over its "
                  "fall-behind limit)", markup=False)  # fmt: skip
        raise typer.Exit(code)

    def one_cycle() -> int:
        """`sync` once; a full filesystem or failing state store becomes a DmreplError."""
        try:
            return _sync_once(config, group, (), False)
        except USER_ERRORS as caught:
            error = as_user_error(caught)
            if error is None or Options.debug or error is caught:
                raise
            raise error from caught

    def report(error: DmreplError) -> int:
        """Show a cycle's error; it is that cycle's exit code."""
        render_error(error)
        return int(error.exit_code)

    loaded = load_config(config)
    watched = loaded.select(group)
    code = run_cycles(
        one_cycle,
        seconds,
        on_error=None if Options.debug else report,
        due=lambda: drain_due(loaded, watched),
    )
    err.print("stopped", markup=False)
    raise typer.Exit(code)


def verify_command(
    group: Annotated[str, typer.Argument(help="Group name.")],
    site: Annotated[str, typer.Option("--site", help="The site whose replicas are checked.")],
    config: ConfigOption = DEFAULT_PATH,
    since_cut: Annotated[
        int | None,
        typer.Option("--since-cut", help="Hash only the blocks written since cut K."),
    ] = None,
    full: Annotated[bool, typer.Option("--full", help="Hash every block (the default).")] = False,
    repair: Annotated[
        bool, typer.Option("--repair", help="Send the differing ranges through the journal.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    dry_run: DryRunOption = False,
) -> None:
    """Compare SITE's replicas with a fresh cut they are brought to (never the live device).

    Exit 0 when they hold the cut (after --repair), 19 when they differ."""
    require_root()
    if full and since_cut is not None:
        raise InvalidInput("give --since-cut K or --full, not both")
    loaded = load_config(config)
    loaded.select(group)[0].site(site)
    require_device_mapper()
    if dry_run:
        render_preview(preview(Runner(), loaded, group))
        scope = "every block" if since_cut is None else f"the blocks written since cut {since_cut}"
        then = "; differing ranges would be sent through its journal" if repair else ""
        out.print(f"then: site {site}'s replicas would be hashed ({scope}) against the cut, "
                  f"held meanwhile{then}", markup=False)  # fmt: skip
        raise typer.Exit(int(ExitCode.OK))
    progress = CliProgress()
    try:
        result = verify(
            Runner(), loaded, group, site, since_cut=since_cut, repair=repair, say=say,
            progress=progress,
        )  # fmt: skip
    finally:
        progress.stop()
    render_verify(result, as_json=as_json)
    raise typer.Exit(int(ExitCode.OK if result.ok else ExitCode.MISMATCH))


RECEIVER_CONFIG = Path("/etc/dmrepl/receiver.toml")


def serve_command(
    stdio: Annotated[
        bool, typer.Option("--stdio", help="Speak dmrepl's wire protocol on stdin and stdout.")
    ] = False,
    group: Annotated[
        list[str] | None,
        typer.Option("--group", help="A group the primary may write here (repeat for more)."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help=f"The receiver's grants (default {RECEIVER_CONFIG}, else {DEFAULT_PATH}).",
        ),
    ] = None,
) -> None:
    """Receive a primary's deltas (the forced command of its key in authorized_keys)."""
    require_root()
    if not stdio:
        raise InvalidInput(
            "serve listens only on stdin and stdout so far: give --stdio",
            hint="run it as the forced command of the primary's key: command=\"dmrepl serve "
            '--stdio --group GROUP",restrict',
        )
    path = config or (RECEIVER_CONFIG if RECEIVER_CONFIG.exists() else DEFAULT_PATH)
    log_to_syslog("dmrepl-serve")
    raise typer.Exit(
        serve(sys.stdin.buffer, sys.stdout.buffer, load_config(path), tuple(group or ()))
    )


def log_to_syslog(ident: str) -> None:
    """Send a receiver's progress lines to syslog, where the DR host's journal keeps them
    (its stderr reaches only the primary's ssh)."""
    if not Path(SYSLOG_SOCKET).exists():
        return
    handler = logging.handlers.SysLogHandler(address=SYSLOG_SOCKET)
    handler.ident = f"{ident}: "
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("dmrepl.progress")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


SYSLOG_SOCKET = "/dev/log"


StoreEndpoint = Annotated[
    str | None,
    typer.Option("--endpoint", help="s3://: the store's URL (default: AWS S3 of the region)."),
]
StoreRegion = Annotated[
    str | None, typer.Option("--region", help="s3://: the region (default: AWS configuration's).")
]
StoreProfile = Annotated[
    str | None, typer.Option("--profile", help="s3://: a profile of the AWS shared files.")
]
Staging = Annotated[
    Path | None,
    typer.Option("--staging", help="s3://: where objects are checked before writing (/var/tmp)."),
]


def _targets(to: list[str]) -> dict[str, str]:
    targets: dict[str, str] = {}
    for item in to:
        name, sep, path = item.partition("=")
        if not sep or not name or not path.startswith("/"):
            raise InvalidInput(f"--to {item!r} is not DEVICE=/dev/TARGET")
        if name in targets:
            raise InvalidInput(
                f"--to gives device {name} twice ({targets[name]} and {path})",
                hint="give one target per device; nothing was written",
            )
        targets[name] = path
    return targets


def apply_deltas(
    source: Annotated[
        str, typer.Argument(help="A dir site's directory, or an s3 site as s3://BUCKET/PREFIX.")
    ],
    group: Annotated[str, typer.Option("--group", help="The group the deltas belong to.")],
    to: Annotated[
        list[str], typer.Option("--to", help="DEVICE=/dev/TARGET for every group device.")
    ],
    from_cut: Annotated[
        int | None, typer.Option("--from-cut", help="The cut the targets already hold.")
    ] = None,
    to_cut: Annotated[int | None, typer.Option("--cut", help="Stop at this cut.")] = None,
    endpoint: StoreEndpoint = None,
    region: StoreRegion = None,
    profile: StoreProfile = None,
    staging: Staging = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Check everything, say what would be applied, write nothing."
        ),
    ] = False,
) -> None:
    """Rebuild devices from a dir or s3 site's deltas (or roll them forward with --from-cut)."""
    targets = _targets(to)
    if source.startswith("s3://"):
        remote = open_remote(source, group, endpoint=endpoint, region=region, profile=profile)
        result = apply_s3(
            remote, targets, from_cut=from_cut, to_cut=to_cut, staging=staging,
            dry_run=dry_run, say=say,
        )  # fmt: skip
    else:
        if endpoint or region or profile or staging:
            raise InvalidInput(
                "--endpoint, --region, --profile and --staging are for s3:// sources",
                hint="nothing was written",
            )
        result = apply_dir(
            Path(source), group, targets, from_cut=from_cut, to_cut=to_cut, dry_run=dry_run,
            say=say,
        )  # fmt: skip
    if dry_run:
        out.print(
            f"dry run: the targets would hold cut {result.cut} of {group} "
            f"({len(result.applied)} deltas, {format_bytes(result.data_bytes)}); nothing was "
            "written",
            markup=False,
        )
        return
    out.print(
        f"targets hold cut {result.cut} of {group} ({len(result.applied)} deltas, "
        f"{format_bytes(result.data_bytes)})",
        markup=False,
    )


DEFAULT_CURSORS = Path("/var/lib/dmrepl/pull")


def pull_command(
    source: Annotated[str, typer.Argument(help="The s3 site, as s3://BUCKET/PREFIX.")],
    group: Annotated[str, typer.Option("--group", help="The group to follow.")],
    to: Annotated[
        list[str], typer.Option("--to", help="DEVICE=/dev/TARGET for every group device.")
    ],
    cursor: Annotated[
        Path | None,
        typer.Option("--cursor", help=f"This replica's cursor (default in {DEFAULT_CURSORS})."),
    ] = None,
    endpoint: StoreEndpoint = None,
    region: StoreRegion = None,
    profile: StoreProfile = None,
    staging: Staging = None,
) -> None:
    """Bring a local replica to an s3 site's newest cut (from its own cursor; run it again
    to follow the store)."""
    targets = _targets(to)
    remote = open_remote(source, group, endpoint=endpoint, region=region, profile=profile)
    if cursor is None:
        cursor = DEFAULT_CURSORS / f"{remote.store.bucket}.{remote.base.replace('/', '.')}json"
    held, result = pull(remote, source, targets, cursor, staging=staging, say=say)
    if result is None:
        out.print(f"targets hold cut {held} of {group}, the store's newest", markup=False)
        return
    out.print(
        f"targets hold cut {result.cut} of {group} (were at "
        f"{'no cut' if held is None else f'cut {held}'}; {len(result.applied)} deltas, "
        f"{format_bytes(result.data_bytes)})",
        markup=False,
    )


def cuts_command(
    group: Annotated[str, typer.Argument(help="Group name.")],
    site: Annotated[str, typer.Option("--site", help="The site whose cuts are listed.")],
    config: ConfigOption = DEFAULT_PATH,
    as_json: JsonOption = False,
) -> None:
    """The cuts SITE holds: each one a `dir` site can restore (its files), else the one cut."""
    loaded = load_config(config)
    spec = loaded.select(group)[0].site(site)
    if isinstance(spec, DirSiteSpec):
        directory = Path(spec.path)
        if not directory.is_dir():
            raise InvalidInput(
                f"site {site}: {directory} is not a directory", hint="is the site's store mounted?"
            )
        cuts = compact.held_cuts(directory, group)
        held = cuts[-1].seq if cuts else None
        keep = retention.describe(spec.keep) or None
        render_cuts(group, site, spec.transport, held=held, cuts=cuts, keep=keep, as_json=as_json)
        return
    if isinstance(spec, S3SiteSpec):
        remote = s3restore.Remote(Store(spec.location), group)
        found = [(seq, remote.manifest(seq)) for seq in remote.cuts()]
        held_cuts = [
            compact.HeldCut(
                seq,
                m.created,
                tuple(k.rsplit("/", 1)[-1] for k in (m.image_key, *(d.key for d in m.deltas))),
                m.image == seq,
            )
            for seq, m in found
        ]
        keep = retention.describe(spec.keep) or None
        held = held_cuts[-1].seq if held_cuts else None
        render_cuts(
            group, site, spec.transport, held=held, cuts=held_cuts, keep=keep, as_json=as_json
        )
        return
    receiver = open_site(spec, SiteContext({}, StateDir(loaded.state_dir)))
    try:
        held = receiver.held()
    finally:
        receiver.close()
    render_cuts(group, site, spec.transport, held=held, cuts=None, as_json=as_json)
