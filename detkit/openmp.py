"""The OpenMP wait policy of the process, set before torch loads libgomp and reported after.

OpenMP threads that wait by spinning steal the cores the working threads need whenever the
CPU is shared or oversubscribed: at load 4 on 2 cores yolov2-voc took 4.8 s instead of 0.22 s
per image (detkit.fast). Waiting passively costs microseconds per parallel region on an idle
machine. libgomp reads OMP_WAIT_POLICY once, when torch loads it, so the default set here works
only when detkit is imported before torch; `openmp_wait_policy()` says which policy the process
really has (`detkit benchmark` prints it). Set OMP_WAIT_POLICY yourself to choose.

This module must not import torch: `detkit/__init__.py` imports it first.
"""

from __future__ import annotations

import os
import sys

_TORCH_FIRST = "torch" in sys.modules
_POLICY_AT_TORCH_IMPORT = os.environ.get("OMP_WAIT_POLICY") if _TORCH_FIRST else None
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def openmp_wait_policy() -> str:
    """The OpenMP wait policy in effect: 'passive' (detkit's, or yours), 'active' (yours), or
    'default (torch was imported before detkit ...)' when libgomp started without a setting."""
    policy = _POLICY_AT_TORCH_IMPORT if _TORCH_FIRST else os.environ.get("OMP_WAIT_POLICY")
    if policy is None:
        return "default (torch was imported before detkit: OMP_WAIT_POLICY=PASSIVE not applied)"
    return policy.strip().lower()
