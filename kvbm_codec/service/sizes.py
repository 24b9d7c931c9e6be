"""Byte sizes an operator can read: ``8GiB``, ``500Mi`` (a Kubernetes quantity), ``64MB`` or a plain count.

Config files and Helm values are written by people, and ``96636764160`` is how a 90 GiB disk tier gets
mistyped by a digit. Every ``*_bytes`` field of ``ServiceConfig`` accepts either form and is stored as an
int, so the rest of the service still sees byte counts. Binary suffixes (``Ki``/``KiB`` ... ``Ei``/``EiB``)
are powers of 1024, decimal ones (``k``/``kB``/``K`` ... ``E``/``EB``) powers of 1000, as Kubernetes reads
them; ``B`` or no suffix is bytes. The Helm chart parses the same grammar (templates/_sizes.tpl) so a guard
there compares the same numbers the service will use.
"""

from __future__ import annotations

import os
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, WithJsonSchema

_BINARY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60}
_DECIMAL = {"k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
UNITS: dict[str, int] = {"": 1, "B": 1}
for _u, _f in _BINARY.items():
    UNITS[_u] = UNITS[_u + "B"] = _f
for _u, _f in _DECIMAL.items():
    UNITS[_u] = UNITS[_u + "B"] = _f
UNITS["kB"] = 10**3

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")
PATTERN = r"^\s*[0-9]+(\.[0-9]+)?\s*(B|[kKMGTPE]B?|[KMGTPE]iB?|kB)?\s*$"
"""The same grammar as a JSON-schema pattern (values.schema.json uses it)."""

DISK_HEADROOM = 0.9
"""Share of a volume the disk tier may fill when its capacity is derived: files, directories and the
checksummed frame headers need the rest."""


def parse_size(value: object) -> int:
    """A size as an int number of bytes; raises ValueError naming the accepted forms."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string like 8GiB, not a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size {value} is negative")
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m and m.group(2) in UNITS:
            try:
                n = Decimal(m.group(1)) * UNITS[m.group(2)]
            except InvalidOperation:
                n = Decimal(-1)
            if n >= 0 and n == n.to_integral_value():
                return int(n)
            if n >= 0:
                raise ValueError(f"size {value!r} is not a whole number of bytes")
    raise ValueError(
        f"size {value!r} is not a byte count or a size like 8GiB, 500Mi, 64MB (binary Ki..Ei, decimal k..E)"
    )


def _or_none(value: object) -> object:
    return None if value is None else parse_size(value)


_SCHEMA = {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": PATTERN}]}

ByteSize = Annotated[int, BeforeValidator(parse_size), WithJsonSchema(_SCHEMA)]
"""An int field that also accepts ``"8GiB"`` / ``"500Mi"``."""

OptionalByteSize = Annotated[
    int | None,
    BeforeValidator(_or_none),
    WithJsonSchema({"anyOf": [*_SCHEMA["anyOf"], {"type": "null"}]}),
]


def human(n: int) -> str:
    """``96636764160`` -> ``90GiB``: how sizes appear in messages and logs."""
    for unit in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        f = _BINARY[unit]
        if n >= f:
            v = n / f
            return f"{v:.0f}{unit}B" if v == int(v) else f"{v:.1f}{unit}B"
    return f"{n}B"


def derived_disk_capacity(path: str | os.PathLike[str]) -> int:
    """Capacity of a disk tier whose size was not set: ``DISK_HEADROOM`` of the filesystem holding it.

    In a pod that filesystem is the PersistentVolume, so the tier follows ``persistence.size`` (and a
    resized volume) without anyone copying the number into the config.
    """
    p = Path(path)
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    st = os.statvfs(probe)
    return int(st.f_blocks * st.f_frsize * DISK_HEADROOM)
