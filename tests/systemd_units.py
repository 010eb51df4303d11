"""The systemd units of contrib/systemd, read as systemd reads the parts the tests use.

A unit's ExecStart= becomes an argv the way systemd builds it: `%i` is the instance, `%%` a
percent sign, `${VAR}` inside a word is the variable's value and a word `$VAR` is its value
split at whitespace, with the variables of the unit's Environment= lines.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

UNITS = Path(__file__).resolve().parent.parent / "contrib/systemd"
# What systemd's manager puts on a service's PATH (systemd.exec(5), "Environment Variables").
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Unit:
    """One unit file: each (section, key) with its values in file order."""

    path: Path
    settings: dict[tuple[str, str], list[str]]

    def values(self, section: str, key: str) -> list[str]:
        return self.settings.get((section, key), [])

    def environment(self) -> dict[str, str]:
        """The variables the unit's Environment= lines set (later ones win)."""
        found: dict[str, str] = {}
        for line in self.values("Service", "Environment"):
            for assignment in shlex.split(line):
                name, _, value = assignment.partition("=")
                found[name] = value
        return found

    def exec_start(self, instance: str, environment: dict[str, str]) -> list[str]:
        """The argv of the unit's one ExecStart= for `instance`, with `environment`."""
        (line,) = self.values("Service", "ExecStart")
        line = line.replace("%%", "\0").replace("%i", instance).replace("\0", "%")
        argv: list[str] = []
        for word in shlex.split(line):
            if re.fullmatch(r"\$[A-Za-z_][A-Za-z0-9_]*", word):
                argv += environment.get(word[1:], "").split()
            else:
                argv.append(_VARIABLE.sub(lambda m: environment.get(m.group(1), ""), word))
        return argv


def read_unit(path: Path) -> Unit:
    """Parse a unit file: sections, `key=value` lines, comments (`#`, `;`), continuations."""
    settings: dict[tuple[str, str], list[str]] = {}
    section = ""
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        settings.setdefault((section, key.strip()), []).append(value.strip())
    return Unit(path, settings)


def unit_files() -> list[Path]:
    """Every unit file shipped in contrib/systemd."""
    return sorted(p for p in UNITS.iterdir() if p.suffix in {".service", ".timer", ".socket"})
