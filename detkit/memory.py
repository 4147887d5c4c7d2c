"""A sanity check on size before any big allocation: a cfg with width=100000 or a batch that
cannot fit should fail at once with the figure, not build for minutes and then be killed."""

from __future__ import annotations

import logging
import os

import torch

from .errors import DetkitError

log = logging.getLogger("detkit")


def available_bytes(device: torch.device | str) -> int | None:
    """Memory free for new tensors on `device`: CUDA's free memory, or the kernel's
    MemAvailable (RAM not needed by anyone, page cache included); None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gigabytes(count: int) -> str:
    return f"{count / 2**30:,.1f} GB"


def check_fits(needed: int, device: torch.device | str, what: str) -> None:
    """Refuse `what` when its estimated `needed` bytes exceed the memory available on
    `device`; warn when it would take more than half of it."""
    available = available_bytes(device)
    if available is None:
        return
    if needed > available:
        raise DetkitError(f"{what} needs about {gigabytes(needed)} for its activations but "
                          f"{device} has {gigabytes(available)} available: use a smaller input "
                          "size (--img-size, or width/height in the cfg) or batch")
    if needed > available // 2:
        log.warning("warning: %s needs about %s for its activations, more than half of the %s "
                    "available on %s", what, gigabytes(needed), gigabytes(available), device)
