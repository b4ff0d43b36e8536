"""Discovery of dataset plugins registered under the `midms.datasets` entry-point group.

A broken plugin (import error, wrong type) is reported by name and never breaks the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from midms_cli.errors import MidmsError

GROUP = "midms.datasets"


@dataclass
class Discovery:
    plugins: dict[str, Any] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)  # name -> one-line reason


# The members `midms prepare` uses (midms_cli.data.plugin.DatasetPlugin).
PLUGIN_ATTRIBUTES = ("name", "description", "version", "needs_source", "options")
PLUGIN_METHODS = ("condition_spec", "count", "samples")


def _missing_members(obj: Any) -> list[str]:
    missing = [attr for attr in PLUGIN_ATTRIBUTES if not hasattr(obj, attr)]
    missing += [attr for attr in PLUGIN_METHODS if not callable(getattr(obj, attr, None))]
    return missing


def discover() -> Discovery:
    """Load every installed plugin; collect failures instead of raising."""
    found = Discovery()
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        try:
            obj = ep.load()
            if isinstance(obj, type):
                obj = obj()
        except Exception as exc:  # any failure inside a third-party plugin is reported, not raised
            reason = str(exc).splitlines()[0] if str(exc) else ""
            found.broken[ep.name] = f"failed to load {ep.value}: {type(exc).__name__}: {reason}"
            continue
        missing = _missing_members(obj)
        if missing:
            found.broken[ep.name] = (
                f"{ep.value} is a {type(obj).__name__}, not a dataset plugin (lacks {', '.join(missing)})"
            )
            continue
        found.plugins[ep.name] = obj
    return found


def get_plugin(name: str) -> Any:
    """The installed plugin called `name`, or a user error listing what is installed."""
    found = discover()
    if name in found.plugins:
        return found.plugins[name]
    if name in found.broken:
        raise MidmsError(f"dataset plugin {name!r} is installed but broken: {found.broken[name]}")
    names = ", ".join(found.plugins) or "none"
    raise MidmsError(f"unknown dataset {name!r}; installed plugins: {names} (see `midms datasets`)")


def plugin_names() -> list[str]:
    """Names of the working plugins, for CLI choices and help."""
    return sorted(discover().plugins)
