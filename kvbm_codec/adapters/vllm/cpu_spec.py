"""vLLM's tiering offload spec for CPU-only engines: the CPU primary tier copied host to host.

vLLM 0.32's ``TieringOffloadingSpec`` refuses to build its worker unless the platform is CUDA-alike
or XPU ("CPU Offloading is currently only supported on CUDA-alike and XPU GPUs"): its worker copies
device pages to host pages on CUDA streams. On a CPU engine the "device" KV cache already lives in
host memory, so the same page copies are plain ``memmove``s, done synchronously when the connector
submits them (the CPU forward pass that wrote the KV has finished by then). Everything else (the
scheduler-side manager, the shared offload region, secondary tiers) is vLLM's own.

Load it with ``"spec_name": "CpuTieringOffloadingSpec", "spec_module_path":
"kvbm_codec.adapters.vllm.cpu_spec"`` in ``kv_connector_extra_config`` (docs/vllm.md).
"""

from __future__ import annotations

import ctypes
import time
from typing import Any

import numpy as np
import torch
from vllm.utils.math_utils import cdiv
from vllm.v1.kv_offload.base import (
    BlockIDsLoadStoreSpec,
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    OffloadingWorker,
    TransferResult,
)
from vllm.v1.kv_offload.cpu.gpu_worker import compute_sub_block_ptrs
from vllm.v1.kv_offload.cpu.shared_offload_region import SharedOffloadRegion
from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec


class _HostCopyDirection:
    """Page copies between the engine's KV tensors and the offload region, one direction.

    The same pointer arithmetic as vLLM's ``SingleDirectionOffloadingHandler`` (direct layout: one
    whole-page copy per (block, layer tensor)), executed with memmove instead of a CUDA kernel."""

    def __init__(
        self,
        engine: list[torch.Tensor],
        host: list[torch.Tensor],
        blocks_per_chunk: int,
        layer_refs_per_group: list[list[Any]],
        to_host: bool,
    ) -> None:
        for e, h in zip(engine, host, strict=True):
            if e.device.type != "cpu" or e.dtype != torch.int8 or h.dtype != torch.int8:
                raise ValueError("host copies need int8 views of CPU tensors on both sides")
            if h.shape[1] != e.shape[1] * blocks_per_chunk:
                raise ValueError(
                    f"host page {h.shape[1]} B is not {blocks_per_chunk} engine pages of {e.shape[1]} B"
                )
        self.src, self.dst = (engine, host) if to_host else (host, engine)
        self.refs = layer_refs_per_group
        self.src_per_chunk = 1 if to_host else blocks_per_chunk
        self.dst_per_chunk = blocks_per_chunk if to_host else 1
        self.to_host = to_host

    def copy(self, src_spec: LoadStoreSpec, dst_spec: LoadStoreSpec) -> int:
        assert isinstance(src_spec, BlockIDsLoadStoreSpec) and isinstance(dst_spec, BlockIDsLoadStoreSpec)
        engine_spec = src_spec if self.to_host else dst_spec
        assert isinstance(engine_spec, GPULoadStoreSpec)
        src_blocks, dst_blocks = src_spec.block_ids, dst_spec.block_ids
        src_off = dst_off = 0
        nbytes = 0
        for g, (size, first) in enumerate(
            zip(engine_spec.group_sizes, engine_spec.block_indices, strict=True)
        ):
            if size == 0:
                continue
            src_skip, dst_skip = first % self.src_per_chunk, first % self.dst_per_chunk
            src_n = cdiv(size + src_skip, self.src_per_chunk)
            dst_n = cdiv(size + dst_skip, self.dst_per_chunk)
            for ref in self.refs[g]:
                src_ptrs = np.empty(size, dtype=np.uint64)
                dst_ptrs = np.empty(size, dtype=np.uint64)
                t = ref.tensor_idx
                compute_sub_block_ptrs(
                    src_blocks[src_off : src_off + src_n], self.src_per_chunk, src_ptrs, self.src[t], src_skip
                )
                compute_sub_block_ptrs(
                    dst_blocks[dst_off : dst_off + dst_n], self.dst_per_chunk, dst_ptrs, self.dst[t], dst_skip
                )
                for s, d in zip(src_ptrs.tolist(), dst_ptrs.tolist(), strict=True):
                    ctypes.memmove(d, s, ref.page_size_bytes)
                nbytes += size * ref.page_size_bytes
            src_off += src_n
            dst_off += dst_n
        if (src_off, dst_off) != (len(src_blocks), len(dst_blocks)):
            raise ValueError(
                f"transfer covered {src_off}/{len(src_blocks)} -> {dst_off}/{len(dst_blocks)} blocks"
            )
        return nbytes


class HostOffloadingWorker(OffloadingWorker):
    """The CPU primary tier's worker on a CPU engine: synchronous host-to-host page copies."""

    def __init__(
        self,
        kv_caches: CanonicalKVCaches,
        blocks_per_chunk: int,
        mmap_region: SharedOffloadRegion,
    ) -> None:
        self._region = mmap_region
        engine, host = [], []
        for t in kv_caches.tensors:
            engine.append(t.tensor.view(torch.int8).view(-1, t.page_size_bytes))
            host.append(mmap_region.create_next_worker_view(t.page_size_bytes * blocks_per_chunk))
        refs = kv_caches.group_data_refs
        self._store = _HostCopyDirection(engine, host, blocks_per_chunk, refs, to_host=True)
        self._load = _HostCopyDirection(engine, host, blocks_per_chunk, refs, to_host=False)
        self._done: list[TransferResult] = []

    def _run(
        self, job_id: int, direction: _HostCopyDirection, src: LoadStoreSpec, dst: LoadStoreSpec
    ) -> bool:
        t0 = time.perf_counter()
        nbytes = direction.copy(src, dst)
        self._done.append(TransferResult(job_id, True, nbytes, time.perf_counter() - t0))
        return True

    def submit_store(self, job_id: int, src_spec: GPULoadStoreSpec, dst_spec: LoadStoreSpec) -> bool:
        return self._run(job_id, self._store, src_spec, dst_spec)

    def submit_load(self, job_id: int, src_spec: LoadStoreSpec, dst_spec: GPULoadStoreSpec) -> bool:
        return self._run(job_id, self._load, src_spec, dst_spec)

    def get_finished(self) -> list[TransferResult]:
        done, self._done = self._done, []
        return done

    def wait(self, job_ids: set[int]) -> None:
        return  # copies complete inside submit_*

    def shutdown(self) -> None:
        self._region.cleanup()


class CpuTieringOffloadingSpec(TieringOffloadingSpec):
    """``TieringOffloadingSpec`` whose worker runs on a CPU engine (see the module docstring)."""

    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        if self._worker is None:
            if self.config.canonical_layout:
                raise ValueError("canonical_layout is not supported by the CPU host-copy worker")
            rank = 0 if self.replicated_layout else self.config.parallel.rank
            region = SharedOffloadRegion(
                engine_id=self._engine_id,
                num_chunks=self.num_chunks,
                rank=rank,
                kv_bytes_per_chunk=self.kv_bytes_per_chunk,
                cpu_page_size=self.cpu_page_size_per_worker,
            )
            try:
                self._worker = HostOffloadingWorker(kv_caches, self.blocks_per_chunk, region)
            except Exception:
                region.cleanup()
                raise
        return self._worker
