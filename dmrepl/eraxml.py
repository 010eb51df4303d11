"""Parse `era_invalidate` output into era-block extents, as it streams in.

The tool prints `<blocks>` holding `<range begin="B" end="E"/>` (end exclusive)
and `<block block="N"/>` elements, in ascending block order. thin-provisioning-
tools 0.9.0 (C++) writes `end = "E"` with spaces, the Rust tools do not; both are
well-formed XML, so a real parser reads them alike.

`EraInvalidateParser` is push-style: text is fed as the tool prints it and each
`feed` returns the extents it completed. It sits directly on expat, so no element
tree is built (an ElementTree pull parser keeps every child of `<blocks>`, about
200 bytes per element); with coalescing, the only state is one pending extent, and
what the caller keeps is proportional to the number of coalesced ranges.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from xml.parsers import expat

from dmrepl.errors import ParseError
from dmrepl.ranges import Extent


class EraInvalidateParser:
    """Feed era_invalidate output in pieces of any size; get extents back as they complete.

    With `coalesce` (the default) touching or overlapping extents are merged on
    the fly: an extent is returned once a later one cannot extend it, or by
    `close`, and extents out of order are an error. Without it, every listed
    extent is returned as it is read.
    """

    def __init__(self, *, coalesce: bool = True) -> None:
        self._coalesce = coalesce
        self._expat = expat.ParserCreate()
        self._expat.StartElementHandler = self._start
        self._expat.EndElementHandler = self._end
        self._depth = 0
        self._seen_root = False
        self._pending: Extent | None = None
        self._ready: list[Extent] = []
        self._finished = False

    def feed(self, text: str) -> list[Extent]:
        """Parse the next piece of output; return the extents it completed, in order."""
        if self._finished:
            raise ValueError("era_invalidate parser fed after close or an error")
        try:
            self._expat.Parse(text, False)
        except expat.ExpatError as exc:
            self._finished = True
            raise ParseError("era_invalidate output (not well-formed XML)", str(exc)) from exc
        except ParseError:
            self._finished = True
            raise
        return self._take()

    def close(self) -> list[Extent]:
        """End of output: check it was complete; return the extents still pending."""
        if self._finished:
            raise ValueError("era_invalidate parser closed twice or after an error")
        self._finished = True
        try:
            self._expat.Parse("", True)
        except expat.ExpatError as exc:
            raise ParseError("era_invalidate output (truncated XML)", str(exc)) from exc
        if not self._seen_root:  # expat refuses a document without an element; be explicit
            raise ParseError("era_invalidate output (no <blocks> element)", "")
        if self._pending is not None:
            self._ready.append(self._pending)
            self._pending = None
        return self._take()

    def _take(self) -> list[Extent]:
        ready, self._ready = self._ready, []
        return ready

    def _start(self, tag: str, attrib: dict[str, str]) -> None:
        self._depth += 1
        if self._depth == 1:
            if tag != "blocks":
                raise ParseError("era_invalidate output (root is not <blocks>)", tag)
            self._seen_root = True
        elif self._depth == 2:
            self._add(_extent(tag, attrib))
        else:
            raise ParseError("era_invalidate output (nested element)", tag)

    def _end(self, tag: str) -> None:
        self._depth -= 1

    def _add(self, extent: Extent) -> None:
        if not self._coalesce:
            self._ready.append(extent)
            return
        pending = self._pending
        if pending is None:
            self._pending = extent
        elif extent.begin < pending.begin:
            raise ParseError(
                "era_invalidate output (extents out of order)", f"{extent} after {pending}"
            )
        elif extent.begin <= pending.end:
            self._pending = Extent(pending.begin, max(pending.end, extent.end))
        else:
            self._ready.append(pending)
            self._pending = extent


def parse_era_invalidate(chunks: Iterable[str], *, coalesce: bool = False) -> Iterator[Extent]:
    """Yield the era-block extents listed in era_invalidate output (text chunks).

    As listed by default; merged as they stream with `coalesce`.
    """
    parser = EraInvalidateParser(coalesce=coalesce)
    for chunk in chunks:
        yield from parser.feed(chunk)
    yield from parser.close()


def _extent(tag: str, attrib: dict[str, str]) -> Extent:
    try:
        if tag == "range":
            begin, end = int(attrib["begin"]), int(attrib["end"])
        elif tag == "block":
            begin = int(attrib["block"])
            end = begin + 1
        else:
            raise ParseError("era_invalidate output (unknown element)", tag)
        return Extent(begin, end)
    except (KeyError, ValueError) as exc:
        raise ParseError("era_invalidate output (bad attributes)", f"<{tag} {attrib}>") from exc
