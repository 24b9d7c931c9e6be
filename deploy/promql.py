"""Which series names the service exposes, and which metric names a PromQL expression reads.

Shared by the dashboard generator and the deploy tests, so a dashboard panel or an alert can only be
built on a name the service really exports. The exposed names come from a live ``ServiceMetrics``
registry (not a hand-kept list) expanded with the exposition suffix rules: counters gain ``_total``
(and ``_created``), histograms ``_bucket``/``_sum``/``_count``, info metrics ``_info``.
"""

from __future__ import annotations

import re

from kvbm_codec.core.metrics import METRIC_NAMES, ServiceMetrics

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "info": ("_info",),
    "gauge": ("",),
}

# Words that look like identifiers in PromQL but are not metric names.
_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset",
    "bool", "inf", "nan", "atan2",
}  # fmt: skip


def exposed_series() -> dict[str, str]:
    """Every series name the service can expose -> the METRIC_NAMES family it belongs to."""
    m = ServiceMetrics()
    m.watch_tiers(lambda: [])
    m.watch_quotas(lambda: [], lambda _tenant: "default")
    m.watch_split(1, lambda: (0, 0, 0))
    m.watch_processes(0, lambda: 0)
    out: dict[str, str] = {}
    for fam in m.registry.collect():
        family = fam.name + {"counter": "_total", "info": "_info"}.get(fam.type, "")
        if family not in METRIC_NAMES:
            raise AssertionError(f"{family} is exposed but not listed in METRIC_NAMES")
        for suffix in _SUFFIXES[fam.type]:
            out[fam.name + suffix] = family
    missing = set(METRIC_NAMES) - set(out.values())
    if missing:
        raise AssertionError(f"METRIC_NAMES lists {sorted(missing)}, which the registry does not expose")
    return out


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels and durations removed).

    A small lexer, not a parser: enough for the expressions this project writes, and strict in the
    safe direction (anything left that looks like a name is reported).
    """
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # range/subquery durations, $__rate_interval
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)
    s = re.sub(r"\boffset\s+\S+", "", s)
    names = set()
    for m in re.finditer(r"(?<![\w$.])([A-Za-z_:][A-Za-z0-9_:]*)\s*(\()?", s):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names
