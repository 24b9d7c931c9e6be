"""Encode and decode batches in worker processes: no GIL shared between a second core and the first.

Threads get only part of a second core (``core/parallel.py``). The codec releases the GIL in its
matmuls, DEFLATE and checksums, but between those it runs a few hundred small torch ops per batch,
and two threads convoy on the GIL there. On the session-23 VM two threads' halves of an 8-block batch
gained 1.12-1.20x on encode; one 1-core ``serve`` per core moved 1.31-1.41x what one 2-core
``serve`` did (docs/benchmarks.md). Worker processes give the codec that second core inside one
service: one store, one admission, one endpoint.

Each worker is spawned (never forked: the parent runs gRPC, UCX and torch threads) with its own
torch on one thread, and builds each served model's current encoder from the calibration it is
handed at start. A part of a batch goes to a worker as raw block bytes (encode) or stored frames
(decode) and comes back as frames or raw blocks. The worker verifies a frame again before it
decodes it, so a frame is never decoded unchecked. Frames of other calibrations (written before an
upgrade) decode in the service's own process, as before.

Lifetimes are explicit. The workers start with the service (``start()``), and every call has a
deadline. A worker that dies fails only the calls in flight: they get a ``CodecUnavailableError``
(UNAVAILABLE on gRPC, 503 on S3: retryable), and the next call starts a fresh pool. ``close()``
ends the workers.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from kvbm_codec.api.blocks import BlockSpec, InvalidBlockError
from kvbm_codec.api.errors import CodecUnavailableError
from kvbm_codec.codec import errors as codec_errors
from kvbm_codec.codec.params import Calibration


@dataclass(frozen=True)
class WorkerModel:
    """What a worker needs to build one served model's current codec."""

    name: str
    codec: str
    calibration: Calibration
    spec: BlockSpec
    target_cr: float


log = logging.getLogger(__name__)

# ---- inside a worker -----------------------------------------------------------------------------

_CODECS: dict[str, Any] = {}  # model name -> its BlockCodec, in this worker
_SPECS: dict[str, BlockSpec] = {}

Failure = tuple[str, str, str]  # (error class, message, where): rebuilt in the service's process


def _init_worker(models: Sequence[WorkerModel], fp32_precision: str) -> None:
    import torch

    from kvbm_codec.api.codecs import get_codec
    from kvbm_codec.codec import block as _builtin_codecs  # noqa: F401  (registers "kvtc")

    torch.set_num_threads(1)  # one worker per core: intra-op threads would only oversubscribe it
    # the service's float32 matmul path (core/matmul.py: oneDNN's bf16 math where that is exact), as
    # the service chose it: a spawned worker would otherwise run plain float32, 1.5-2x slower there
    torch.backends.mkldnn.matmul.fp32_precision = fp32_precision
    for m in models:
        _CODECS[m.name] = get_codec(m.codec)(m.calibration, m.spec, m.target_cr)
        _SPECS[m.name] = m.spec


def _failure(e: BaseException) -> Failure:
    if isinstance(e, codec_errors.CodecError):
        return (type(e).__name__, e.message, e.where)
    if isinstance(e, InvalidBlockError):
        return ("InvalidBlockError", str(e), "")
    return ("RuntimeError", f"{type(e).__name__}: {e}", "")


def _encode_part(
    model: str, blocks: Sequence[bytes], positions: Sequence[Any], compress: Sequence[bool]
) -> list[bytes] | Failure:
    spec, codec = _SPECS[model], _CODECS[model]
    try:
        tensors = [spec.from_bytes(b) for b in blocks]
        return [frame for frame, _ in codec.encode_many(tensors, list(positions), list(compress))]
    except Exception as e:  # the batch's own failure (a refused block): rebuilt by the caller
        return _failure(e)


def _decode_part(model: str, frames: Sequence[bytes]) -> list[tuple[bytes, tuple[int, ...]] | Failure]:
    spec, codec = _SPECS[model], _CODECS[model]
    return [
        _failure(r) if isinstance(r, Exception) else (spec.to_bytes(r[0]), tuple(r[1].tolist()))
        for r in codec.decode_many(frames)
    ]


def _settings() -> tuple[int, str, int]:
    """(codecs built, float32 matmul path, torch threads) of this worker: what start() checks."""
    import torch

    return len(_CODECS), torch.backends.mkldnn.matmul.fp32_precision, torch.get_num_threads()


# ---- in the service ------------------------------------------------------------------------------


def rebuild(f: Failure) -> Exception:
    """The worker's error as the class the service's own codec would have raised."""
    name, message, where = f
    if name == "InvalidBlockError":
        return InvalidBlockError(message)
    cls = getattr(codec_errors, name, None)
    if isinstance(cls, type) and issubclass(cls, codec_errors.CodecError):
        return cls(message, where=where)
    return RuntimeError(message)


def is_failure(x: object) -> bool:
    return isinstance(x, tuple) and len(x) == 3 and all(isinstance(s, str) for s in x)


class CodecProcesses:
    """``processes`` spawned workers for the served models' current codecs."""

    def __init__(self, models: Sequence[WorkerModel], processes: int, *, timeout_s: float = 120.0) -> None:
        if processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.models = {m.name: m for m in models}
        self.processes = processes
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False
        self.restarts = 0  # pools started after a worker died (for the metrics and a test)

    def serves(self, model: str, codec: str, calibration_id: str) -> bool:
        """Whether a frame of (codec, calibration) of ``model`` can be decoded by the workers."""
        m = self.models.get(model)
        return m is not None and m.codec == codec and m.calibration.calibration_id == calibration_id

    def _new_pool(self) -> ProcessPoolExecutor:
        import torch

        return ProcessPoolExecutor(
            self.processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(list(self.models.values()), torch.backends.mkldnn.matmul.fp32_precision),
        )

    def _current(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise CodecUnavailableError("the codec worker processes are shut down")
            if self._pool is None:
                self._pool = self._new_pool()
            return self._pool

    def start(self) -> None:
        """Spawn the workers and wait until they have built their codecs (seconds: torch's import);
        a worker whose float32 matmul path differs from the service's would write other frames."""
        import torch

        pool = self._current()
        want = (len(self.models), torch.backends.mkldnn.matmul.fp32_precision, 1)
        for fut in [pool.submit(_settings) for _ in range(self.processes)]:
            got = fut.result(timeout=self.timeout_s)
            if tuple(got) != want:
                raise RuntimeError(
                    f"a codec worker started with (codecs, matmul path, threads) {got}, not {want}"
                )

    def _call(self, fn: Any, *args: Any) -> Any:
        pool = self._current()
        try:
            return pool.submit(fn, *args).result(timeout=self.timeout_s)
        except BrokenProcessPool as e:
            with self._lock:  # the next call starts a fresh pool; this one's calls all fail
                if self._pool is pool:
                    self._pool = None
                    self.restarts += 1
            pool.shutdown(wait=False, cancel_futures=True)
            log.warning(
                "a codec worker process died: its calls in flight fail; the next call starts new workers"
            )
            raise CodecUnavailableError(
                "a codec worker process died; retry the request", retry_after_s=1.0
            ) from e
        except FutureTimeout as e:
            raise CodecUnavailableError(
                f"a codec worker did not answer within {self.timeout_s:.0f} s", retry_after_s=1.0
            ) from e

    def encode(
        self, model: str, blocks: Sequence[bytes], positions: Sequence[Any], compress: Sequence[bool]
    ) -> list[bytes]:
        """Frames of ``blocks`` (raw block bytes), encoded by one worker in one batched call."""
        out = self._call(_encode_part, model, list(blocks), list(positions), list(compress))
        if is_failure(out):
            raise rebuild(out)
        return list(out)

    def decode(self, model: str, frames: Sequence[bytes]) -> list[tuple[bytes, tuple[int, ...]] | Exception]:
        """Raw block bytes and positions per stored frame, or the error of a frame that failed."""
        out = self._call(_decode_part, model, [bytes(f) for f in frames])
        return [rebuild(r) if is_failure(r) else r for r in out]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
