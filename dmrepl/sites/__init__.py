"""Sites: where replicas live. The cycle sees each one as a `Receiver` (sites.base), opened
through the transport registry (sites.registry): `journaled` (blockdev), `archive` (dir),
`remote` (ssh) and `nbd`."""

from dmrepl.sites.base import (
    CompareSeeder,
    Delivery,
    Receiver,
    RecordUnreadable,
    ReplicaMismatch,
    SiteBroken,
    SiteContext,
    SiteDown,
    SiteFailure,
    SiteState,
)
from dmrepl.sites.registry import open_site

__all__ = [
    "CompareSeeder",
    "Delivery",
    "Receiver",
    "RecordUnreadable",
    "ReplicaMismatch",
    "SiteBroken",
    "SiteContext",
    "SiteDown",
    "SiteFailure",
    "SiteState",
    "open_site",
]
