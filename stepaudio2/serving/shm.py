"""Python-backend shared-memory regions in /dev/shm: name ours, remove ours, and sweep stale ones at start.

Every server `serve` starts gets its own region prefix (`--backend-config=python,shm-region-prefix-name=...`),
built from a fixed root, the launcher's pid and a random tag. So the launcher can remove exactly its own regions
on every exit path, and at start it can recognise leftovers of earlier launchers: a region under the root whose
launcher pid is gone and that no live process has mapped. Regions of other programs (other roots, or Triton's
default prefix) are never touched. Why: a SIGKILLed tritonserver leaves its regions behind (1.8 GB each run),
and tmpfs pages are RAM until someone deletes the files.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from pathlib import Path

SHM_DIR = Path("/dev/shm")
PREFIX_ROOT = "stepaudio2_"
_OWNED = re.compile(re.escape(PREFIX_ROOT) + r"(\d+)_([0-9a-f]+)_")

log = logging.getLogger("stepaudio2.shm")


def new_prefix(owner_pid: int | None = None) -> str:
    """A region prefix unique to one server start of this launcher process."""
    return f"{PREFIX_ROOT}{owner_pid or os.getpid()}_{secrets.token_hex(4)}_"


def process_prefix(owner_pid: int | None = None) -> str:
    """The part of every prefix this process hands out (for 'did this process leave anything?' checks)."""
    return f"{PREFIX_ROOT}{owner_pid or os.getpid()}_"


def regions(prefix: str, shm_dir: Path = SHM_DIR) -> list[Path]:
    """Files in shm_dir whose name starts with prefix."""
    try:
        return sorted(p for p in shm_dir.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def remove_regions(prefix: str, shm_dir: Path = SHM_DIR) -> int:
    """Unlink every region under prefix; returns the bytes freed (the memory goes once the last map is gone)."""
    freed = 0
    for path in regions(prefix, shm_dir):
        size = _size(path)
        try:
            path.unlink()
            freed += size
        except FileNotFoundError:
            pass
    return freed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


MAPPERS = ("tritonserver", "triton_python_b")  # process names (comm) that map Python-backend regions


def mapped_paths() -> set[str] | None:
    """Every /dev/shm file some live process has mapped; None if a tritonserver or stub could not be read
    (then nothing can be called unmapped with certainty). Other unreadable processes (an init that hides its
    maps) are skipped: only tritonserver and its stubs map these regions."""
    found: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            text = (proc / "maps").read_text(errors="replace")
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
        except PermissionError:
            try:
                comm = (proc / "comm").read_text().strip()
            except OSError:
                continue
            if comm in MAPPERS:
                return None
            continue
        for line in text.splitlines():
            idx = line.find(str(SHM_DIR) + "/")
            if idx >= 0:
                found.add(line[idx:].split(" (deleted)")[0].strip())
    return found


def remove_stale(shm_dir: Path = SHM_DIR) -> list[str]:
    """Remove regions of earlier launchers that are dead and whose regions nobody maps any more.

    Safe under concurrency: a region is ours by its name (root + pid + tag), stale only if that launcher pid is
    not running AND no live process maps it (a tritonserver that outlived its launcher keeps its regions).
    """
    candidates = []
    for path in regions(PREFIX_ROOT, shm_dir):
        m = _OWNED.match(path.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            candidates.append(path)
    if not candidates:
        return []
    mapped = mapped_paths()
    if mapped is None:
        log.warning("not sweeping %d possibly stale shared-memory regions: some processes are unreadable",
                    len(candidates))
        return []
    removed = []
    for path in candidates:
        if str(path) in mapped:
            continue
        try:
            path.unlink()
            removed.append(path.name)
        except FileNotFoundError:
            pass
    if removed:
        log.info("removed %d stale shared-memory regions of dead launchers (%s, ...)", len(removed), removed[0])
    return removed
