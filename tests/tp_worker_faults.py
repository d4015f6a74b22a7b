"""Stand-ins for a tensor-parallel worker rank's main function (`tensor_parallel._worker_main`, same arguments)
that fail at a chosen point of start-up. A test puts one in place of the real one; the spawned worker finds it
here, since the worker gets the test process's sys.path, tests/ included."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from pagedserve.engine.runner.tensor_parallel import _status_key


def exit_after_start(rank: int, settings: Any, host: str, port: int, timeout_s: float) -> None:
    """Say "started" through the rendezvous store, then die before joining the group, as a worker killed there
    (by the OOM killer, say) would: no error reported, the process just gone."""
    store = dist.TCPStore(host, port, settings.runner.tp_size, is_master=False, timeout=timedelta(seconds=timeout_s))
    store.set(_status_key(rank, "started"), b"")
    os._exit(1)
