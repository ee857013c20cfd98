"""Process helpers for the tests that start other processes: free ports and retries.

A port found free here can be taken by another process before the child binds it
(the machine runs other tests and other jobs): ``retry_on_port_clash`` starts the job
again on new ports when its output says the address was in use, instead of failing.
Each test ends only the processes it started, by their ids.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# what gloo/c10d (TCPStore), torchrun's rendezvous, the deepspeed launcher and Ray print
# when the port they were given is taken
CLASH = ("EADDRINUSE", "Address already in use", "address already in use",
         "is already in use", "errno 98")


def free_port() -> int:
    """A TCP port that is free now (it may be taken again before it is used)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_clash(output: str) -> bool:
    lower = output.lower()
    return any(needle.lower() in lower for needle in CLASH)


def retry_on_port_clash(launch: Callable[[list[int]], tuple[T, str]], ports: int = 1,
                        attempts: int = 4) -> T:
    """``launch(ports)`` -> (result, the output of a failed launch, "" if it succeeded);
    run again on fresh ports while that output reports a port clash (at most
    ``attempts`` times); the last result otherwise."""
    for attempt in range(attempts):
        result, output = launch([free_port() for _ in range(ports)])
        if not port_clash(output) or attempt == attempts - 1:
            return result
    raise AssertionError("unreachable")
