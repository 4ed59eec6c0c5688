"""One table of limit defaults for every front end (CLI, app, Docker), each with its variable.

The CLI and the app used to disagree (a 50 MiB file limit in one, 20 MiB in the other); now both
read :data:`LIMITS`. Each limit can be changed by its environment variable, and in the app by the
flag named here too (``docs/limits.md`` lists the same table).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["LIMITS", "Limit", "limit_default", "parse_size"]

_SIZE_UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def parse_size(text: str | int) -> int:
    """Bytes in ``20mb``, ``512KB``, ``1.5gb`` or ``1048576`` (units are powers of 1024, as in Gradio)."""
    if isinstance(text, int):
        return text
    cleaned = str(text).replace(" ", "").upper()
    digits = len(cleaned) - len(cleaned.lstrip("0123456789."))
    number, unit = cleaned[:digits], cleaned[digits:] or "B"
    if not number or unit not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 20mb, 512kb, 1048576)")
    return int(float(number) * _SIZE_UNITS[unit])


@dataclass(frozen=True)
class Limit:
    default: str  # as a person would type it (sizes in MiB, "20mb")
    env: str
    flag: str | None  # the app's flag; None where only the variable changes it
    help: str
    parse: type | object = int  # int, float or parse_size

    def value(self) -> int | float:
        """The limit in force: the environment variable if set, else the default."""
        return self.parse(os.environ.get(self.env) or self.default)  # type: ignore[operator]


LIMITS: dict[str, Limit] = {
    "max_file_size": Limit("20mb", "SANET_VIZ_MAX_FILE_SIZE", "--max-file-size",
                           "largest upload or input file, e.g. 20mb, 512kb, or bytes", parse_size),
    "max_pixels": Limit("50000000", "SANET_VIZ_MAX_PIXELS", "--max-pixels",
                        "largest decoded image in pixels (checked on the header, before decoding)"),
    "queue_size": Limit("32", "SANET_VIZ_QUEUE_SIZE", "--queue-size",
                        "requests that may wait before new ones are refused"),
    "concurrency": Limit("2", "SANET_VIZ_CONCURRENCY", "--concurrency",
                         "analyses that run at once; the rest wait in the queue"),
    "cache_ttl": Limit("3600", "SANET_VIZ_CACHE_TTL", "--cache-ttl",
                       "seconds before uploads and outputs are deleted from the server"),
    "shutdown_grace": Limit("30", "SANET_VIZ_SHUTDOWN_GRACE", "--shutdown-grace",
                            "on SIGTERM, seconds that running and queued requests get to finish", float),
    "max_aspect": Limit("100", "SANET_VIZ_MAX_ASPECT", None,
                        "widest width:height (or height:width) ratio; a centre crop of more shows nothing", float),
    "max_correlation_images": Limit("48", "SANET_VIZ_MAX_CORRELATION_IMAGES", None,
                                    "images per class-correlation request"),
    "max_loaded_models": Limit("3", "SANET_VIZ_MAX_LOADED_MODELS", "--max-loaded-models",
                               "models the app keeps loaded at once (about 0.2 GB each); picking another "
                               "unloads the least recently used"),
}


def limit_default(name: str) -> int | float:
    """``LIMITS[name]`` as now in force (environment variable, else the table's default)."""
    return LIMITS[name].value()
