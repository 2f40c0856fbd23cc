"""The config file every command starts from: read, validated (config.load_config), and a
warning when others can read it. Its own module so that cli and store_commands share it."""

from __future__ import annotations

import os
from pathlib import Path

from puller import errors, logs
from puller.config import PullerConfig, load_config


def read_config(path: Path) -> PullerConfig:
    """Read and validate a config file; a missing file is a config error."""
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except OSError as exc:
        raise errors.ConfigError(
            path=str(path), problem=f"cannot read the file ({exc.strerror})",
            hint="check the --config path",
        ) from None
    if mode & 0o007:
        # The file names tenants, URLs and which variables hold their secrets.
        logs.get_logger().warning(
            "config_readable_by_others", path=str(path), mode=oct(mode & 0o777),
            hint=f"chmod o-rwx {path} (e.g. 640, owned by the puller user)")
    return load_config(text, os.environ, source=str(path))
