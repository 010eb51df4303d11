"""Transport name -> its config spec and its Receiver: the one place that knows them all.

Adding a transport is a spec class (its keys and checks), a Receiver, and one line here
(or one `register` call, as the tests do for an in-memory transport).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dmrepl.config import SiteSpec
from dmrepl.sites.archive import ArchiveSite, DirSiteSpec
from dmrepl.sites.base import Receiver, SiteContext
from dmrepl.sites.journaled import BlockdevSiteSpec, JournaledSite
from dmrepl.sites.nbd import NbdSite, NbdSiteSpec
from dmrepl.sites.remote import RemoteSite, SshSiteSpec
from dmrepl.sites.s3 import S3Site, S3SiteSpec


@dataclass(frozen=True)
class Transport:
    name: str
    spec: type[SiteSpec]
    open: Callable[[Any, SiteContext], Receiver]  # called with an instance of `spec`


TRANSPORTS: dict[str, Transport] = {
    "blockdev": Transport("blockdev", BlockdevSiteSpec, JournaledSite),
    "dir": Transport("dir", DirSiteSpec, ArchiveSite),
    "nbd": Transport("nbd", NbdSiteSpec, NbdSite),
    "s3": Transport("s3", S3SiteSpec, S3Site),
    "ssh": Transport("ssh", SshSiteSpec, RemoteSite),
}


def register(transport: Transport) -> Callable[[], None]:
    """Add a transport; returns what removes it again."""
    TRANSPORTS[transport.name] = transport

    def unregister() -> None:
        TRANSPORTS.pop(transport.name, None)

    return unregister


def open_site(spec: SiteSpec, context: SiteContext) -> Receiver:
    """The Receiver of a configured site."""
    transport = TRANSPORTS[spec.transport]
    assert isinstance(spec, transport.spec), f"{spec.key} was not parsed as {transport.name}"
    return transport.open(spec, context)
