"""The kaggle package, imported lazily and authenticated without ever printing a credential.

`kaggle_api()` is the only place `import kaggle` happens:

    api = kaggle_api()
    with kaggle_errors("kernels push"):  # client errors become one UsageError line
        api.kernels_push(folder)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kaggle_utils.core.errors import UsageError

MISSING_CREDENTIALS = (
    "no Kaggle credentials: set KAGGLE_API_TOKEN (or save the token to ~/.kaggle/access_token), or set "
    "KAGGLE_USERNAME and KAGGLE_KEY (or save them to ~/.kaggle/kaggle.json as "
    '{"username": ..., "key": ...}); create a token at https://www.kaggle.com/settings/api'
)


def kaggle_config_dir() -> Path:
    """Where the kaggle CLI looks for kaggle.json now (KAGGLE_CONFIG_DIR, ~/.kaggle, or the XDG fallback)."""
    configured = os.environ.get("KAGGLE_CONFIG_DIR")
    if configured:
        return Path(configured)
    home = Path.home() / ".kaggle"
    if home.exists():
        return home
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "kaggle"


def _token_file_has_content(path: Path) -> bool:
    return path.is_file() and bool(path.read_text(encoding="utf-8", errors="replace").strip())


def credential_source() -> str | None:
    """Which credential the kaggle client will use, by name only (never the value); None when there is none.

    Same order as the client: an access token (env or file), then a legacy username/key (env or kaggle.json),
    then the OAuth credentials left by `kaggle auth login`."""
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    for name in ("access_token", "access_token.txt"):
        if _token_file_has_content(Path.home() / ".kaggle" / name):
            return f"~/.kaggle/{name}"
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    config = kaggle_config_dir() / "kaggle.json"
    if config.is_file():
        try:
            values = json.loads(config.read_text(encoding="utf-8") or "{}")
        except json.JSONDecodeError:
            raise UsageError(f"{config}: invalid JSON; expected {{'username': ..., 'key': ...}}") from None
        if isinstance(values, dict) and values.get("username") and values.get("key"):
            return str(config)
        # A username in the environment with the key in the file is what the client accepts too.
        if isinstance(values, dict) and (values.get("key") and os.environ.get("KAGGLE_USERNAME")):
            return str(config)
    if (Path.home() / ".kaggle" / "credentials.json").is_file():
        return "~/.kaggle/credentials.json (kaggle auth login)"
    return None


def kaggle_api() -> Any:
    """An authenticated `KaggleApi`, or one clear UsageError line saying where to put a credential."""
    source = credential_source()
    if source is None:
        raise UsageError(MISSING_CREDENTIALS)
    swallowed = io.StringIO()
    try:
        # kaggle/__init__ authenticates (and may print help) on import: keep that off the terminal.
        with contextlib.redirect_stdout(swallowed), contextlib.redirect_stderr(swallowed):
            from kaggle.api.kaggle_api_extended import KaggleApi
    except SystemExit:
        raise UsageError(MISSING_CREDENTIALS) from None
    except ImportError as error:
        raise UsageError(
            f"the kaggle package is not installed ({error}); pip install 'kaggle-utils[kaggle]'"
        ) from None

    api = KaggleApi()
    # The class computes its config path when first imported; follow the environment as it is now.
    api.config_dir = str(kaggle_config_dir())
    api.config = os.path.join(api.config_dir, api.config_file)
    # Verbose mode prints request headers, i.e. the Authorization header: never.
    api.args = [arg for arg in api.args if arg not in ("--verbose", "-v")]
    try:
        with contextlib.redirect_stdout(io.StringIO()), kaggle_errors("authentication"):
            api.authenticate()
    except SystemExit:
        raise UsageError(
            f"the Kaggle credential from {source} was not accepted. {MISSING_CREDENTIALS}"
        ) from None
    return api


def authenticated_user(api: Any) -> str:
    """The Kaggle user name the client authenticated as."""
    user = (getattr(api, "config_values", {}) or {}).get("username")
    if not user:
        raise UsageError("the Kaggle client authenticated without a user name; pass --owner")
    return str(user)


@contextlib.contextmanager
def kaggle_errors(action: str) -> Iterator[None]:
    """Turn the client's HTTP, network (timeouts, connection) and validation errors into one UsageError line
    naming `action` (no headers, no credentials)."""
    import requests

    try:
        yield
    except requests.HTTPError as error:
        response = error.response
        status = (
            f"HTTP {response.status_code} {response.reason or ''}".strip()
            if response is not None
            else "HTTP error"
        )
        detail = str(error.args[0]) if error.args else ""
        raise UsageError(f"Kaggle refused {action}: {status}: {detail}") from None
    except requests.RequestException as error:  # ReadTimeout, ConnectionError, ChunkedEncodingError, ...
        raise UsageError(
            f"{action} failed talking to the Kaggle API: {type(error).__name__}; check the network and retry"
        ) from None
    except ValueError as error:  # the client's own checks of folders and metadata
        raise UsageError(f"{action}: {error}") from None
