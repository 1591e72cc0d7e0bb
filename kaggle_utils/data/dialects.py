"""Competition dialects by name: what differs between the Chatbot Arena competitions (files, labels, metric,
submission), one `Dialect` each (`data/dialect_base.py`); everything else asks `get_dialect(name)`.

A new competition format: one module with a `Dialect` subclass (like `data/wsdm.py`) plus one
`register_dialect(...)` line at the bottom of this file.
"""

from __future__ import annotations

from kaggle_utils.core.errors import UsageError
from kaggle_utils.core.registry import Registry
from kaggle_utils.data.dialect_base import Dialect
from kaggle_utils.data.lmsys import LmsysDialect
from kaggle_utils.data.wsdm import WsdmDialect

DEFAULT_DIALECT = "lmsys"  # manifests written before dialects existed are LMSYS artifacts
DIALECTS: Registry[Dialect] = Registry("competition dialect")


def register_dialect(dialect: Dialect, replace: bool = False) -> Dialect:
    """Make `dialect` known by its name (`DataConfig.format`, `--format`/`--dialect`, the manifest)."""
    return DIALECTS.register(dialect, replace=replace)


def dialect_names() -> tuple[str, ...]:
    return DIALECTS.names()


def get_dialect(name: str | Dialect) -> Dialect:
    """The registered dialect called `name` (or whose competition slug it is); UsageError listing the known
    ones otherwise."""
    if isinstance(name, Dialect):
        return name
    if name not in DIALECTS:
        for dialect in DIALECTS.values():
            if name in dialect.slugs:
                return dialect
    return DIALECTS.get(name)


def dialect_of_manifest(manifest: dict | None) -> Dialect:
    """The dialect an artifact was trained for: its manifest's `dialect`, else LMSYS (artifacts written before
    the field existed were all LMSYS). An unknown name is a UsageError (a newer package wrote it)."""
    name = (manifest or {}).get("dialect", DEFAULT_DIALECT)
    if not isinstance(name, str):
        raise UsageError(f"manifest field 'dialect' must be a string, got {name!r}")
    return get_dialect(name)


register_dialect(LmsysDialect())
register_dialect(WsdmDialect())
