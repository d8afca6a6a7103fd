"""Helpers to check that a test leaves no process behind and listens on loopback only (Linux /proc)."""

from __future__ import annotations

import ctypes
import os
import socket
import struct
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def adopt_orphans() -> None:
    """Makes this process the subreaper of its descendants (Linux ``prctl``): one whose parent exits
    (the local SuperLink that ``flwr run`` starts detached, what it started) is re-parented to this
    process instead of init, so :func:`descendants` still sees it and a leak check cannot miss it.
    Lasts for the life of this process."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def _live_processes() -> dict[int, list[str]]:
    """Each live (not zombie) process's fields of ``/proc/<pid>/stat`` after its name: state, ppid, pgrp, ..."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            found[int(stat.parent.name)] = fields
    return found


def descendants(pid: int | None = None) -> set[int]:
    """PIDs of every live descendant of ``pid`` (default: this process)."""
    root = pid or os.getpid()
    children: dict[int, list[int]] = {}
    for child, fields in _live_processes().items():
        children.setdefault(int(fields[1]), []).append(child)
    out, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def in_groups(groups: set[int]) -> set[int]:
    """PIDs of the live processes in any of the process groups ``groups``: a killed process's children
    leave its descendants (they are re-parented) but stay in its group."""
    return {pid for pid, fields in _live_processes().items() if int(fields[2]) in groups}


def niceness(pids: set[int], *, named: str) -> dict[int, int]:
    """Scheduling niceness of each of ``pids`` whose command line starts with ``named``."""
    out = {}
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(named.encode()):
                out[pid] = os.getpriority(os.PRIO_PROCESS, pid)
        except OSError:
            continue
    return out


def wait_for_exit(before: set[int], *, timeout: float = 60.0) -> set[int]:
    """Descendants that appeared since ``before`` and are still alive after ``timeout`` s.

    Ray's processes stop asynchronously after the simulation returns; give them time.
    """
    import time

    deadline = time.monotonic() + timeout
    while (left := descendants() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _socket_inodes(pids: set[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    return inodes


def _address(hex_address: str, family: int) -> str:
    raw = bytes.fromhex(hex_address)
    if family == socket.AF_INET:
        return socket.inet_ntop(family, struct.pack("<I", struct.unpack(">I", raw)[0]))
    words = struct.unpack(">4I", raw)
    return socket.inet_ntop(family, struct.pack("<4I", *words))


def listening_addresses(pids: set[int]) -> set[str]:
    """Local addresses of TCP sockets in LISTEN state owned by ``pids``."""
    inodes = _socket_inodes(pids)
    found = set()
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state == "0A" and inode in inodes:
                host, port = local.split(":")
                found.add(f"{_address(host, family)}:{int(port, 16)}")
    return found


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].removeprefix("::ffff:")  # IPv4-mapped IPv6
    return host.startswith("127.") or host == "::1"
