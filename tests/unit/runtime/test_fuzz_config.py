"""Hostile configuration: every input gives a Config or a ConfigError, never a traceback."""
from __future__ import annotations

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rswap_ebpf.runtime import config
from rswap_ebpf.errors import RswapError

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                    st.floats(allow_nan=True, allow_infinity=True),
                    st.text(alphabet=string.printable + "\x00é/..", max_size=20))
keys = st.sampled_from(["name", "priority", "command", "cgroup", "pids", "forecaster", "cpu", "io",
                        "net", "cache", "min", "max", "total", "interval", "window", "headroom",
                        "state_dir", "device", "interface", "seasonality", "period", "x"])
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(keys, inner, max_size=5)),
                      max_leaves=12)


def _toml(v) -> str:
    """Render a value as TOML (inline), or something TOML can't parse — both are fair game."""
    if v is None:
        return '""'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v).replace("inf", "inf").replace("nan", "nan")
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return "{" + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + "}"


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(daemon=st.dictionaries(keys, values, max_size=4),
       tasks=st.lists(st.dictionaries(keys, values, max_size=6), max_size=3),
       resources=st.dictionaries(st.sampled_from(["cpu", "io", "net", "bogus", "cache"]),
                                 st.dictionaries(keys, values, max_size=2), max_size=2))
def test_structured_garbage_never_tracebacks(daemon, tasks, resources):
    doc = "[daemon]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in daemon.items())
    for name, table in resources.items():
        doc += f"[resources.{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in table.items())
    for t in tasks:
        doc += "[[task]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in t.items())
    try:
        config.parse(doc)
    except RswapError as err:
        assert str(err) and "\n" not in str(err).strip()


@settings(max_examples=1500, deadline=None)
@given(st.text(max_size=300))
def test_random_text_never_tracebacks(text):
    try:
        config.parse(text)
    except RswapError as err:
        assert str(err)
