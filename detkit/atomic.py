"""Writing a file whole or not at all, without harming what is at its path.

Every file detkit writes (checkpoints, .weights, COCO JSON, ONNX) goes through here: a temp file
beside the target, fsync, then rename, so a kill or a full disk never leaves half a file and
the old one stays. The rename would replace whatever sits at the path, so the target is checked
first: a symbolic link is followed (its target is written, the link kept), and anything that is
not a regular file (a FIFO, a device node, a socket, a folder) is refused. The new file keeps
the mode of the one it replaces, or gets the usual 0666 less the umask (mkstemp's 0600 would
make a result private to whoever wrote it).
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path


class NotRegularFile(OSError):
    """The path names something other than a regular file; writing would replace it."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_target(path: Path) -> tuple[Path, int]:
    """The file to replace (symlinks followed) and the mode the new one gets. Raises
    NotRegularFile for anything but a regular file or nothing."""
    target = Path(os.path.realpath(path))
    try:
        info = target.stat()
    except FileNotFoundError:
        return target, 0o666 & ~_umask()
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise NotRegularFile(errno.EEXIST, f"{kind}; refusing to replace it", str(path))
    return target, stat.S_IMODE(info.st_mode)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write `payload` to `path` atomically (see the module). OSError on failure (disk full,
    no permission, not a regular file), with the old file intact."""
    target, mode = write_target(Path(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
