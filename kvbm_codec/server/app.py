"""Build the service core (models, calibrations, store) from a ServiceConfig.

Kept apart from the gRPC server so every front end (gRPC, S3, the KVBM adapter) and the tests build
the same BlockService the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvbm_codec.codec.errors import CodecError
from kvbm_codec.codec.params import Calibration
from kvbm_codec.core.metrics import ServiceMetrics
from kvbm_codec.core.service import BlockService, Limits, ServedModel
from kvbm_codec.service.config import ModelConfig, ServiceConfig
from kvbm_codec.service.logging import fields, get_logger
from kvbm_codec.store.base import Tier
from kvbm_codec.store.memory import MemoryTier
from kvbm_codec.store.tiered import TieredStore

log = get_logger(__name__)


@dataclass
class _Resolved:
    calibration: Calibration
    lookup: Callable[[str], Calibration | None]


def _registry_lookup(registry, fingerprint: str) -> Callable[[str], Calibration | None]:
    """Old frames name their calibration; fetch it from the registry (verified) or report None."""

    def lookup(calibration_id: str) -> Calibration | None:
        try:
            return registry.get(fingerprint, calibration_id)
        except (CodecError, ValueError, OSError) as e:
            log.warning(
                "calibration lookup failed",
                extra=fields(model=fingerprint, calibration_id=calibration_id, error=type(e).__name__),
            )
            return None

    return lookup


def resolve_calibration(mc: ModelConfig) -> _Resolved:
    from kvbm_codec.calibration.registry import Registry

    if mc.registry is not None and mc.fingerprint is not None:
        reg = Registry.from_url(mc.registry)  # no model load: the registry has all we need
        return _Resolved(
            reg.get_version(mc.fingerprint, mc.calibration), _registry_lookup(reg, mc.fingerprint)
        )

    from kvbm_codec.models.hf import CausalLM

    lm = CausalLM.load(mc.source or mc.name)
    fp = lm.info.fingerprint
    if mc.registry is not None:
        reg = Registry.from_url(mc.registry)
        cal = reg.get_version(fp, mc.calibration)
    else:
        from kvbm_codec.calibration.cache import load_or_calibrate, local_registry

        reg = local_registry()
        if mc.calibration == "latest":
            from kvbm_codec.service.logging import heartbeat

            # a first start without a registry calibrates here: minutes, so say so while it runs
            with heartbeat(log, "loading or computing the local calibration", model=mc.name):
                cal, path, fresh = load_or_calibrate(lm, progress=False)
            log.info(
                "calibration ready",
                extra=fields(
                    model=mc.name, calibration_id=cal.calibration_id, computed=fresh, path=str(path)
                ),
            )
        else:
            cal = reg.get_version(fp, mc.calibration)
    return _Resolved(cal, _registry_lookup(reg, fp))


def served_model(mc: ModelConfig, resolved: _Resolved) -> ServedModel:
    spec = mc.block_spec(resolved.calibration.shape)
    return ServedModel(mc.name, resolved.calibration, spec, mc.target_cr, lookup=resolved.lookup)


def build_store(cfg: ServiceConfig, metrics: ServiceMetrics) -> TieredStore:
    tiers: list[Tier] = []
    if cfg.memory_capacity_bytes > 0:
        tiers.append(
            MemoryTier(
                cfg.memory_capacity_bytes,
                policy=cfg.memory_policy,
                quota_bytes=cfg.memory_quota_bytes_per_tenant,
            )
        )
    elif cfg.disk_path is None:
        raise ValueError("memory_capacity_bytes = 0 (durable mode) needs a disk tier: set disk_path")
    if cfg.disk_path is not None:
        from kvbm_codec.service.sizes import derived_disk_capacity
        from kvbm_codec.store.disk import DiskTier

        capacity = cfg.disk_capacity_bytes or derived_disk_capacity(cfg.disk_path)
        tiers.append(
            DiskTier(
                cfg.disk_path,
                capacity,
                name="disk",
                fsync=cfg.disk_fsync,
                quota_bytes=cfg.disk_quota_bytes_per_tenant,
            )
        )
    return TieredStore(
        tiers,
        when_full=cfg.when_full,
        promote=cfg.tier_promotion,
        on_drop=lambda _key, _n: metrics.blocks_dropped.inc(),
        # a tier's own checksum caught damage on read: served as a miss, counted for the alert
        on_corrupt=lambda _key, tier: metrics.checksum_failures.labels(source=f"tier_{tier}").inc(),
    )


def apply_codec_threads(cfg: ServiceConfig) -> None:
    """Set the process's torch intra-op threads to ``cfg.codec_threads`` (0 keeps torch's default).

    Process-wide, so only a server's entry point calls it, never a library embedding a service."""
    if cfg.codec_threads > 0:
        import torch

        torch.set_num_threads(cfg.codec_threads)


def build_service(cfg: ServiceConfig, models: list[ServedModel] | None = None) -> BlockService:
    """The BlockService for ``cfg``; ``models`` replaces loading cfg.models (tests, embedders)."""
    metrics = ServiceMetrics()
    if models is None:
        models = [served_model(mc, resolve_calibration(mc)) for mc in cfg.models]
    store = build_store(cfg, metrics)
    from kvbm_codec import __version__
    from kvbm_codec.core.matmul import fp32_matmul_mode

    # which float32 matmul path this process runs: pods on CPUs with and without native bf16 differ
    metrics.build_info.info({"version": __version__, "fp32_matmul": fp32_matmul_mode()})
    return BlockService(
        models,
        store,
        limits=Limits.of(
            cfg,
            max_inflight_bytes_per_tenant=cfg.tenant_bytes_limit,
            tenant_classes=dict(cfg.tenant_classes or {}),
        ),
        metrics=metrics,
    )
