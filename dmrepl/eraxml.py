"""Parse `era_invalidate` output into era-block extents, streaming.

The tool prints `<blocks>` holding `<range begin="B" end="E"/>` (end exclusive)
and `<block block="N"/>` elements, in ascending block order. thin-provisioning-
tools 0.9.0 (C++) writes `end = "E"` with spaces, the Rust tools do not; both are
well-formed XML, so a real parser reads them alike. Elements are discarded as
soon as they are read, so millions of them parse in constant memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import cast
from xml.etree.ElementTree import Element, XMLPullParser
from xml.etree.ElementTree import ParseError as XmlError

from dmrepl.errors import ParseError
from dmrepl.ranges import Extent


def parse_era_invalidate(chunks: Iterable[str]) -> Iterator[Extent]:
    """Yield the era-block extents listed in era_invalidate output (text chunks)."""
    parser: XMLPullParser[Element] = XMLPullParser(events=("start", "end"))
    depth = 0
    seen_root = False
    for chunk in chunks:
        try:
            parser.feed(chunk)
            events = list(parser.read_events())
        except XmlError as exc:
            raise ParseError("era_invalidate output (not well-formed XML)", str(exc)) from exc
        for event, element in cast(list[tuple[str, Element]], events):
            if event == "start":
                depth += 1
                if depth == 1:
                    if element.tag != "blocks":
                        raise ParseError(
                            "era_invalidate output (root is not <blocks>)", element.tag
                        )
                    seen_root = True
                elif depth > 2:
                    raise ParseError("era_invalidate output (nested element)", element.tag)
                continue
            depth -= 1
            if depth == 1:
                yield _extent(element)
                element.clear()
    try:
        parser.close()
    except XmlError as exc:
        raise ParseError("era_invalidate output (truncated XML)", str(exc)) from exc
    if not seen_root:
        raise ParseError("era_invalidate output (no <blocks> element)", "")


def _extent(element: Element) -> Extent:
    try:
        if element.tag == "range":
            begin, end = int(element.attrib["begin"]), int(element.attrib["end"])
        elif element.tag == "block":
            begin = int(element.attrib["block"])
            end = begin + 1
        else:
            raise ParseError("era_invalidate output (unknown element)", element.tag)
        return Extent(begin, end)
    except (KeyError, ValueError) as exc:
        raise ParseError(
            "era_invalidate output (bad attributes)", f"<{element.tag} {element.attrib}>"
        ) from exc
