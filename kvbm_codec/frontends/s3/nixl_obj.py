"""Drive NIXL's OBJ backend (the S3 client inside KVBM's object tier) against an S3 endpoint.

Used by the end-to-end test and the S3-vs-UCX benchmark, and the reference for how KVBM's object
tier talks to this service: backend parameters (``create_backend("OBJ", params)``), one OBJ
descriptor per object whose device id is the object key (NIXL writes ``std::to_string(devId)`` when
the descriptor's metaInfo is empty; KVBM uses the block's sequence hash), and host-memory buffers.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np


def obj_params(
    endpoint_url: str,
    bucket: str,
    access_key: str,
    secret_key: str,
    *,
    region: str = "us-east-1",
    mode: str = "default",
) -> dict[str, str]:
    """mode: "default" (aws-chunked body, CRC64NVME trailer), "required" (req_checksum=required:
    plain body signed with its SHA-256) or "crt" (CRT client: multipart upload, ranged GETs)."""
    scheme = endpoint_url.split("://", 1)[0]
    p = {
        "access_key": access_key,
        "secret_key": secret_key,
        "bucket": bucket,
        "endpoint_override": endpoint_url,
        "scheme": scheme,
        "region": region,
        "use_virtual_addressing": "false",
    }
    if mode == "required":
        p["req_checksum"] = "required"
    elif mode == "crt":
        p["crtMinLimit"] = "1024"
    elif mode != "default":
        raise ValueError(f"unknown OBJ client mode {mode!r}")
    return p


class ObjClient:
    """One NIXL agent with the OBJ backend; moves whole objects between numpy buffers and keys."""

    def __init__(self, params: dict[str, str], name: str | None = None) -> None:
        from nixl._api import nixl_agent, nixl_agent_config

        self.agent: Any = nixl_agent(
            name or f"kvbm-s3-{uuid.uuid4().hex[:8]}", nixl_agent_config(backends=[])
        )
        self.agent.create_backend("OBJ", params)
        self._registered: list[Any] = []

    def _xfer(self, op: str, buffers: Sequence[np.ndarray], keys: Sequence[int], timeout_s: float) -> None:
        if len(buffers) != len(keys):
            raise ValueError("one buffer per key")
        a = self.agent
        dram = [(b.ctypes.data, b.nbytes, 0, "") for b in buffers]
        objs = [(0, b.nbytes, int(k), "") for b, k in zip(buffers, keys, strict=True)]
        regs = [a.register_memory(dram, "DRAM"), a.register_memory(objs, "OBJ")]
        try:
            local = a.get_xfer_descs([d[:3] for d in dram], "DRAM")
            remote = a.get_xfer_descs([o[:3] for o in objs], "OBJ")
            handle = a.initialize_xfer(op, local, remote, a.name)
            try:
                state = a.transfer(handle)
                deadline = time.monotonic() + timeout_s
                while state not in ("DONE", "ERR"):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"NIXL OBJ {op} of {len(keys)} objects timed out")
                    time.sleep(0.002)
                    state = a.check_xfer_state(handle)
                if state != "DONE":
                    raise RuntimeError(f"NIXL OBJ {op} failed")
            finally:
                a.release_xfer_handle(handle)
        finally:
            for r in regs:
                a.deregister_memory(r)

    def write(self, buffers: Sequence[np.ndarray], keys: Sequence[int], timeout_s: float = 120.0) -> None:
        self._xfer("WRITE", buffers, keys, timeout_s)

    def read(self, buffers: Sequence[np.ndarray], keys: Sequence[int], timeout_s: float = 120.0) -> None:
        self._xfer("READ", buffers, keys, timeout_s)
