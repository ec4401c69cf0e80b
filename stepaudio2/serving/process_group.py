"""How the launcher starts its long-lived children (tritonserver, the OpenAI gateway): each leads a process group
of its own, so one `killpg` stops the whole tree (Python-backend stubs, vLLM's engine core), but stays in the
caller's session.

Why not a session of their own (`setsid`, `start_new_session=True`): where the kernel schedules by autogroup
(`CONFIG_SCHED_AUTOGROUP`, on in many distributions' kernels and on our VMs; `/proc/sys/kernel/sched_autogroup_enabled`),
every session is one scheduling group, and the groups share the CPU equally whatever each one holds. A split
deployment on one machine (front, pool, and the client in three sessions) then stalled whole servers for 0.3 to
1.5 s while another group had its turn: first audio of one stream in three arrived a synthesis round late. In one
session every thread competes on its own, as it would without autogroup. Containers are unaffected either way:
autogroup only applies to processes in the root cgroup, and a pod has its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any


def own_group_kwargs() -> dict[str, Any]:
    """`subprocess.Popen` keyword arguments: a process group of its own in this session, stdin closed (a process
    in a background group that reads the terminal is stopped)."""
    if sys.version_info >= (3, 11):
        return {"process_group": 0, "stdin": subprocess.DEVNULL}
    return {"preexec_fn": os.setpgrp, "stdin": subprocess.DEVNULL}  # 3.10: no process_group argument yet
