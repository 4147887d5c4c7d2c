"""A JSON cache of parsed, validated labels, so a data set is checked once, not every run.

Reading a darknet image list means opening every label file and every image header; for a
large set that costs more than the first training iterations. The result (items and problems)
is written next to the list (``train.txt`` -> ``train.txt.cache``; a YOLO label folder ->
``labels.cache`` in it) under a key: a SHA-256 over the reader's settings and, for every entry,
the resolved image path with its size and modification time, and the label path with a digest
of its bytes (labels are small: a tool that rewrites one within the same second and at the same
size, or restores its old mtime, must still invalidate the cache). Any change to the list, a
label file, an image or the settings gives another key, and the cache is rebuilt.

The cache is plain JSON (never pickle: a file from elsewhere must not run code). A cache that
cannot be read, parsed or matched is ignored; one that cannot be written (read-only folder) is
skipped with a debug message. Both only cost the time the cache would have saved.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

log = logging.getLogger("detkit")

CACHE_VERSION = 1  # the key holds label digests now, so keys of older caches never match


def file_state(path: Path | None) -> list | None:
    """What the key knows about one file: path, size and mtime (None parts when absent)."""
    if path is None:
        return None
    try:
        stat = path.stat()
    except OSError:
        return [str(path), None, None]
    return [str(path), stat.st_size, stat.st_mtime_ns]


def label_state(path: Path | None) -> list | None:
    """What the key knows about one label file: path and a digest of its bytes (None when
    absent or unreadable)."""
    if path is None:
        return None
    try:
        return [str(path), hashlib.sha256(path.read_bytes()).hexdigest()]
    except OSError:
        return [str(path), None]


def cache_key(parts: Any) -> str:
    """A digest of JSON-able `parts` (settings and file states)."""
    text = json.dumps([CACHE_VERSION, parts], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def read_cache(path: Path, key: str) -> Any | None:
    """The payload stored under `key`, or None when the file is absent, damaged or stale."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        if path.exists():
            log.debug("%s: label cache ignored (%s)", path, exc)
        return None
    if not isinstance(data, dict) or data.get("key") != key:
        log.debug("%s: label cache is stale; rebuilding it", path)
        return None
    return data.get("payload")


def write_cache(path: Path, key: str, payload: Any) -> None:
    """Store `payload` atomically (temp file + rename, so parallel readers such as DDP ranks
    never see half a file); a folder that cannot be written is skipped quietly."""
    text = json.dumps({"key": key, "version": CACHE_VERSION, "payload": payload},
                      separators=(",", ":"))
    # A unique name in the same folder (os.replace is atomic only there); open(..., "x") keeps
    # the usual permissions, where mkstemp would make the cache private to its writer.
    temp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp, "x", encoding="utf-8") as out:
            out.write(text)
        os.replace(temp, path)
    except OSError as exc:
        log.debug("%s: label cache not written (%s)", path, exc)
        with contextlib.suppress(OSError):
            os.unlink(temp)
