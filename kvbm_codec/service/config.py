"""Service configuration: one pydantic-settings model read from a TOML/YAML file and the environment.

Precedence, highest first: explicit overrides (CLI flags), environment, config file, defaults.
Environment names follow Dynamo's convention: ``DYN_KVBM_CODEC_<FIELD>``, nested sections joined
with ``__`` (``DYN_KVBM_CODEC_GRPC_PORT``, ``DYN_KVBM_CODEC_NIXL__STAGING_BYTES``,
``DYN_KVBM_CODEC_LOGGING__FORMAT``). Every field carries a description because the Helm chart's
values and their documentation are generated from this model; an undocumented knob is a bug.
"""

from __future__ import annotations

import contextvars
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from kvbm_codec.api.blocks import BlockSpec
from kvbm_codec.api.types import DEFAULT_MODEL
from kvbm_codec.service.sizes import ByteSize, OptionalByteSize

if TYPE_CHECKING:
    from kvbm_codec.codec.params import ModelShape

ENV_PREFIX = "DYN_KVBM_CODEC_"
DEFAULT_BUCKET = f"kvbm-{DEFAULT_MODEL}"

_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("kvbm_codec_config", default=None)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    name: str = Field(DEFAULT_MODEL, description="Name clients use for this model in requests.")
    source: str | None = Field(
        None,
        description="Model to load for its fingerprint and, if needed, local calibration: a registered "
        "name or a local path. Default: `name`. Not needed when `fingerprint` and `registry` are set.",
    )
    fingerprint: str | None = Field(
        None,
        description="Model fingerprint; with `registry` set the service starts without loading the model.",
    )
    registry: str | None = Field(
        None,
        description="Calibration registry URL (s3://bucket/prefix, file:///dir or a directory). "
        "Default: the local cache registry, calibrating once if it holds no calibration.",
    )
    calibration: str = Field(
        "latest",
        description="Calibration to encode with: `latest`, a version number or a calibration id. Frames "
        "written with older calibrations still decode: their calibration is fetched from the registry.",
    )
    target_cr: float = Field(20.0, gt=1.0, description="Target compression ratio of compressed tokens.")
    page_size: int = Field(32, gt=0, description="Tokens per KVBM block (must match the engine's).")
    dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="Element type of raw blocks on the wire."
    )

    def block_spec(self, shape: ModelShape) -> BlockSpec:
        """The block this model is served in: the calibrated model's layers and KV heads, cut into
        this config's pages of this dtype. The one place the service (and its benches) build it."""
        return BlockSpec(shape.n_layers, self.page_size, shape.n_kv_heads, shape.key_head_dim, self.dtype)


class NixlConfig(_Section):
    enabled: bool = Field(True, description="Serve the NIXL data path (when the nixl library loads).")
    agent_name: str | None = Field(None, description="Server NIXL agent name; default kvbm-codec-<pid>.")
    staging_bytes: ByteSize = Field(
        256 << 20,
        gt=0,
        description="Registered host memory for NIXL transfers, split into `slot_bytes` slots; a request "
        "holds one slot, and is refused with a retry hint when none is free.",
    )
    slot_bytes: ByteSize = Field(16 << 20, gt=0, description="Staging slot size; at least one raw block.")
    transfer_timeout_s: float = Field(30.0, gt=0, description="Timeout of one NIXL READ/WRITE batch.")


class BucketBinding(BaseModel):
    """A bucket bound to one served model and one layout, so a PUT's bytes have exactly one meaning
    (lives with the service config so both the config and the S3 front end can name it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        DEFAULT_BUCKET, pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", description="S3 bucket name."
    )
    model: str = Field(DEFAULT_MODEL, description="Served model whose blocks this bucket holds.")
    layout: Literal["FullyContiguous", "vllm-cpu"] = Field(
        "FullyContiguous",
        description="Layout of an object: KVBM's FullyContiguous block [1, n_layers, 2, page_size, "
        "n_kv_heads*head_dim], or `vllm-cpu`: one chunk of vLLM's CPU offload tier (its OBJ tier's objects; "
        "per layer, per KV head, keys [head_dim, page_size] then values [page_size, head_dim], padded to "
        "4096 bytes).",
    )
    page_size: int = Field(32, gt=0, description="Tokens per block; must equal the served model's.")
    dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="Element type of a block."
    )
    max_position: int = Field(
        32768, gt=0, description="Largest token position the RoPE position search considers for a block."
    )
    layout_energy_limit: float | None = Field(
        4.0,
        gt=1.0,
        description="Refuse a block whose keys or values, read in the bound layout, carry more than this "
        "many times the normalised energy per token of the calibration's own KV (median of the sampled "
        "tokens): real KV measures 0.65-1.2x, another layout's or K/V-swapped keys 13.6x or more with the "
        "default calibration (docs/vllm.md). "
        "None: no absolute check.",
    )
    layout_margin: float | None = Field(
        None,
        ge=1.0,
        description="Also refuse a block that another known layout (or K/V swapped) explains this many times "
        "better than the bound one, by PCA residual against the calibration (searches every other reading: "
        "costs about a third of a put's encode, and misses K/V swaps the absolute test catches; "
        "docs/vllm.md). None: no relative check.",
    )


class CredentialConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    access_key: str = Field(min_length=3, max_length=128)
    secret_key: SecretStr
    tenant: str | None = Field(None, description="Tenant of this key's objects (default: the access key).")


def _env_credentials() -> list[CredentialConfig]:
    """S3 keys come from the environment (KVBM_CODEC_S3_ACCESS_KEY / _SECRET_KEY / _TENANT; the chart
    fills them from a Secret), never from a config file in the image."""
    ak, sk = os.environ.get("KVBM_CODEC_S3_ACCESS_KEY"), os.environ.get("KVBM_CODEC_S3_SECRET_KEY")
    if not ak or not sk:
        return []
    return [
        CredentialConfig(
            access_key=ak, secret_key=SecretStr(sk), tenant=os.environ.get("KVBM_CODEC_S3_TENANT")
        )
    ]


class S3Config(_Section):
    """The S3-compatible endpoint: the service config's ``s3`` section and the front end's settings,
    one class (``frontends/s3`` takes this section as it is)."""

    enabled: bool = Field(False, description="Serve the S3-compatible endpoint.")
    host: str = Field("127.0.0.1", description="Address the S3 endpoint listens on.")
    port: int | None = Field(
        None, ge=0, le=65535, description="S3 endpoint port (0: any free port; None: disabled in `serve`)."
    )
    region: str = Field("us-east-1", description="Region clients sign for.")
    credentials: list[CredentialConfig] | None = Field(
        None,
        validate_default=True,
        description="Accepted SigV4 keys. None: KVBM_CODEC_S3_ACCESS_KEY / _SECRET_KEY / _TENANT from the "
        "environment (the chart fills them from s3.credentialsSecret); never put keys in a config file.",
    )
    buckets: list[BucketBinding] | None = Field(
        None,
        description="Bucket bindings (name, model, layout: FullyContiguous or vllm-cpu, ...). Default: one "
        "KVBM bucket `kvbm-<model>` per served model.",
    )
    max_object_bytes: int = Field(
        64 << 20, gt=0, description="Largest request body accepted (EntityTooLarge beyond)."
    )
    max_uploads: int = Field(256, gt=0, description="Multipart uploads open at once (SlowDown beyond).")
    upload_ttl_s: float = Field(
        3600.0, gt=0, description="An unfinished multipart upload is dropped after this."
    )
    max_skew_s: float = Field(
        900.0, gt=0, description="Largest accepted clock difference of a signed request."
    )
    workers: int = Field(4, gt=0, description="Threads doing encode/decode (off the event loop).")
    coalesce_window_s: float = Field(
        0.002,
        ge=0.0,
        le=0.1,
        description="Concurrent GETs (or PUTs) of one tenant's bucket are served as one batch (one batched "
        "decode or encode): the first request of an idle bucket waits this long for others to join "
        "(0: none; requests that arrive while a batch runs always join the next one).",
    )
    max_batch_blocks: int = Field(
        32, gt=0, le=4096, description="Most objects one batch serves (and at most max_blocks_per_request)."
    )
    batches_in_flight: int = Field(
        2, gt=0, le=64, description="Batches of one tenant's bucket running at once (at most `workers`)."
    )
    max_queued_per_bucket: int = Field(
        1024,
        gt=0,
        description="Requests of one tenant's bucket waiting for a batch; beyond this SlowDown at once.",
    )
    max_uploads_per_tenant: int = Field(
        32,
        gt=0,
        description="Multipart uploads one tenant may hold open (SlowDown beyond; others unaffected).",
    )
    max_index_keys_per_tenant: int = Field(
        1_000_000, gt=0, description="Listing-index entries kept per tenant (oldest dropped beyond)."
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="A request body must arrive within this (RequestTimeout, connection closed)."
    )
    idle_timeout_s: float = Field(
        60.0, gt=0, description="A keep-alive connection with no request for this long is closed."
    )
    require_signed_payload: bool = Field(
        False, description="Refuse UNSIGNED-PAYLOAD bodies: every body byte must be covered by a signature."
    )
    tls_cert: str | None = Field(None, description="PEM certificate: serve S3 over TLS (with tls_key).")
    tls_key: str | None = Field(None, description="PEM private key for tls_cert.")

    @model_validator(mode="after")
    def _tls_pair(self) -> S3Config:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if self.max_queued_per_bucket < self.max_batch_blocks:
            raise ValueError("max_queued_per_bucket must be at least max_batch_blocks")
        return self

    @field_validator("credentials")
    @classmethod
    def _from_env(cls, v: list[CredentialConfig] | None) -> list[CredentialConfig]:
        return _env_credentials() if v is None else v

    @field_validator("buckets")
    @classmethod
    def _unique(cls, v: list[BucketBinding] | None) -> list[BucketBinding] | None:
        names = [b.name for b in v or []]
        if len(set(names)) != len(names):
            raise ValueError(f"bucket names must be unique, got {names}")
        return v


class DynamoConfig(_Section):
    enabled: bool = Field(False, description="Register this instance with Dynamo discovery.")
    namespace: str = Field("dynamo", description="Dynamo namespace.")
    component: str = Field("kvbm-codec", description="Dynamo component name.")
    endpoint: str = Field("blocks", description="Dynamo endpoint name.")


class LoggingConfig(_Section):
    format: Literal["json", "text"] = Field("json", description="Log line format.")
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Minimum log level.")


class TlsConfig(_Section):
    enabled: bool = Field(False, description="Serve gRPC over TLS.")
    cert_file: Path | None = Field(None, description="Server certificate chain (PEM).")
    key_file: Path | None = Field(None, description="Server private key (PEM).")
    client_ca_file: Path | None = Field(None, description="CA bundle for client certificates (mTLS).")
    require_client_cert: bool = Field(False, description="Refuse clients without a valid certificate.")


class ProbesConfig(_Section):
    port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Plaintext HTTP port for /livez, /readyz and /prestop (kubelet probes; they work with "
        "TLS on because they go through a loopback gRPC port); 0 picks a free one. None (the default "
        "outside the image and chart, which use 9465) disables.",
    )
    stuck_after_s: float = Field(
        60.0,
        gt=0,
        description="/livez fails when requests are in flight and none has finished for this long.",
    )
    check_timeout_s: float = Field(
        2.0, gt=0, description="Deadline of the gRPC health call each probe makes through the server."
    )


class AuthConfig(_Section):
    mode: Literal["none", "token", "mtls"] = Field(
        "none", description="How a caller's tenant is established; `none` puts every caller in `tenant`."
    )
    tenant: str = Field("default", description="Tenant of unauthenticated callers when mode is `none`.")
    tokens_file: Path | None = Field(None, description="Token -> tenant table for mode `token`.")
    cert_tenants: dict[str, str] | None = Field(
        None,
        description="mTLS allow-list: certificate CN or SAN -> tenant. Set, a certificate it does not list "
        "is refused; unset, any certificate from the CA is a tenant named after its CN.",
    )
    bind_token_to_cert: bool = Field(
        False,
        description="Mode `token` over mTLS: the token's tenant must be the certificate's (cert_tenants).",
    )


class ServiceConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    host: str = Field("127.0.0.1", description="Address the gRPC server binds (0.0.0.0 in a pod).")
    grpc_port: int = Field(50151, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int | None = Field(
        9464, ge=0, le=65535, description="Prometheus /metrics port; 0 picks a free one, None disables."
    )
    metrics_host: str | None = Field(
        None,
        description="Address /metrics listens on, when it should differ from `host` (e.g. a pod-internal "
        "or loopback address apart from the client-facing one). None: `host`.",
    )
    metrics_token_file: Path | None = Field(
        None,
        description="File holding a bearer token /metrics requires (Authorization: Bearer <token>); other "
        "scrapes get 401 and count as auth failures (frontend metrics). None: /metrics is open.",
    )
    workers: int = Field(
        8,
        gt=0,
        description="Minimum gRPC handler threads; the server runs at least max_inflight_requests + 8 so "
        "that overload is refused by admission control (with a retry hint), not queued.",
    )
    codec_threads: int = Field(
        1,
        ge=0,
        description="torch intra-op threads of each encode/decode (0: torch's default, one per core). With "
        "1, concurrent requests run on every core side by side (the codec releases the GIL in its "
        "matmuls, DEFLATE and checksums); raise it when few clients send large batches.",
    )
    batch_threads: int = Field(
        0,
        ge=0,
        description="Threads one request's batch of blocks may be split across, its own included. A part "
        "goes to a helper only while this process runs fewer codec calls, and keeps one core free per other "
        "request admitted, so under load nothing is split. 0 (default): one per core this process may run "
        "on (its affinity mask, capped by a cgroup CPU limit); 1: never split. The splitter cannot see "
        "other processes' load: on cores shared with other busy jobs, 1 measured faster.",
    )
    codec_processes: int = Field(
        0,
        ge=0,
        le=256,
        description="Worker processes that encode and decode (spawned at start, one torch thread each; "
        "each loads the served calibrations, ~0.5-1 GB RSS). 0 (default): the service's own threads, "
        "which share one GIL, so a second core adds only part of a core. N: a batch is split across N "
        "workers as `batch_threads` splits it across threads, its blocks crossing a pipe. On 2 cores "
        "that measured 0.83-0.91x of threads (docs/benchmarks.md, session 31): measure with "
        "bench/codec_processes_ab.py before enabling it. A worker that dies fails its calls with "
        "UNAVAILABLE (retryable) and is replaced.",
    )
    max_message_bytes: ByteSize = Field(
        64 << 20, gt=0, description="Largest gRPC message received or sent; larger ones are refused."
    )
    max_inflight_requests: int = Field(
        64,
        gt=0,
        description="Requests admitted at once; more are refused RESOURCE_EXHAUSTED with a retry hint.",
    )
    max_blocks_per_request: int = Field(256, gt=0, description="Blocks in one put/get/contains/delete.")
    put_stream_encode_blocks: int = Field(
        16,
        gt=0,
        le=4096,
        description="A streamed put (PutBlocksStream) encodes the blocks received so far once this many "
        "have arrived (the rest at the stream's end), while the next chunks are in transit: smaller "
        "batches cost more per block (a batched encode pays a per-call cost of ~2-3 blocks' encode), "
        "larger ones overlap less.",
    )
    retry_after_s: float = Field(0.05, ge=0, description="Retry hint returned with an overload refusal.")
    request_timeout_s: float = Field(
        30.0, gt=0, description="Deadline applied to requests whose client set none."
    )
    max_deadline_s: float = Field(
        120.0,
        gt=0,
        description="Server-side cap on every request's deadline: a client deadline longer than this is "
        "cut to it, and a stream still open then is cancelled (an unread stream cannot hold a slot).",
    )
    max_inflight_per_tenant: int = Field(
        0,
        ge=0,
        description="Requests one tenant may have admitted at once (0: only max_inflight_requests). "
        "Set below max_inflight_requests so one tenant cannot take every slot.",
    )
    max_inflight_bytes_per_tenant: OptionalByteSize = Field(
        None,
        ge=0,
        description="Request bytes one tenant may have admitted at once (a put's message, a get's raw "
        "blocks); beyond it the tenant is refused RESOURCE_EXHAUSTED (reason tenant_bytes) with a retry "
        "hint. A request larger than this alone is still admitted. None: 4 x max_message_bytes; 0: no bound.",
    )
    tenant_classes: dict[str, str] | None = Field(
        None,
        description="Tenant -> class for metric labels (tenant_class on refusals and quota use); tenants "
        "not listed (all, when None) are class `default`. Metrics never carry tenant names.",
    )
    drain_timeout_s: float = Field(
        20.0, ge=0, description="On SIGTERM, how long in-flight requests may take to finish."
    )
    get_batch_size: int = Field(16, gt=0, description="Default results per streamed GetBlocks message.")
    get_prefetch: bool = Field(
        False,
        description="A streamed get (GetBlocks, gRPC or NIXL) reads and decodes its next batch while the "
        "current one is sent, so the decoder does not wait for the wire; a stream then holds two batches. "
        "Off by default: on a shared 2-core machine it measured 0.8-0.96x (gRPC) and 0.93-1.14x (NIXL) "
        "of the serial get (bench/onboard_ab.py); try it where a core is free.",
    )
    models: list[ModelConfig] = Field(
        default_factory=lambda: [ModelConfig()], description="Models served (at least one)."
    )
    memory_capacity_bytes: ByteSize = Field(
        4 << 30,
        ge=0,
        description="Host-memory tier capacity (frames, not raw blocks). 0: no memory tier, every put "
        "goes to the disk tier before it is acknowledged (durable across a crash; needs disk_path).",
    )
    memory_policy: Literal["lru", "lfu"] = Field(
        "lru", description="Eviction order of the memory tier: least recently or least frequently used."
    )
    disk_path: Path | None = Field(None, description="Disk tier directory (None: no disk tier).")
    disk_capacity_bytes: OptionalByteSize = Field(
        None,
        gt=0,
        description="Disk tier capacity. None: 90% of the filesystem holding disk_path (in a pod, the "
        "volume), so it follows the volume's size.",
    )
    tier_promotion: Literal["copy", "move"] = Field(
        "copy",
        description="A read hit on disk is copied up to memory and the disk copy kept (copy: reads never "
        "lose a durable block) or moved (move: frees disk space, a crash after a read loses the block).",
    )
    memory_quota_bytes_per_tenant: OptionalByteSize = Field(
        None,
        gt=0,
        description="Frame bytes one tenant may hold in the memory tier. A put past it evicts that tenant's "
        "own least recently used blocks from the tier (they spill to disk like any eviction), never "
        "another tenant's. None: no quota (only the tier's capacity).",
    )
    disk_quota_bytes_per_tenant: OptionalByteSize = Field(
        None,
        gt=0,
        description="Frame bytes one tenant may hold in the disk tier; past it that tenant's own least "
        "recently used blocks are dropped from the tier. None: no quota.",
    )
    disk_fsync: bool = Field(
        True,
        description="fsync each disk-tier write and its directory (off: survives a process crash, "
        "not a power cut; about 6x faster puts that spill to disk).",
    )
    when_full: Literal["evict", "refuse"] = Field(
        "evict",
        description="When every tier is full: evict the least recently used blocks (a cache) or refuse "
        "puts with RESOURCE_EXHAUSTED.",
    )
    nixl: NixlConfig = Field(default_factory=NixlConfig, description="NIXL data path.")
    s3: S3Config = Field(default_factory=S3Config, description="S3-compatible endpoint.")
    dynamo: DynamoConfig = Field(default_factory=DynamoConfig, description="Dynamo discovery.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Logging.")
    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS of the gRPC endpoint.")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="Caller authentication.")
    probes: ProbesConfig = Field(default_factory=ProbesConfig, description="Health probes.")

    @model_validator(mode="after")
    def _stuck_is_beyond_any_deadline(self) -> ServiceConfig:
        if self.probes.port is not None and self.probes.stuck_after_s <= self.request_timeout_s:
            raise ValueError(
                f"probes.stuck_after_s ({self.probes.stuck_after_s:g}) must exceed request_timeout_s "
                f"({self.request_timeout_s:g}): a request still within its deadline is not stuck"
            )
        return self

    @property
    def tenant_bytes_limit(self) -> int:
        """``max_inflight_bytes_per_tenant`` with its default resolved: four largest messages."""
        if self.max_inflight_bytes_per_tenant is None:
            return 4 * self.max_message_bytes
        return self.max_inflight_bytes_per_tenant

    @field_validator("models")
    @classmethod
    def _unique_models(cls, v: list[ModelConfig]) -> list[ModelConfig]:
        if not v:
            raise ValueError("at least one model must be served")
        names = [m.name for m in v]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _config_file.get()
        if path is None:
            return (init_settings, env_settings)
        if path.suffix == ".toml":
            file_source: PydanticBaseSettingsSource = TomlConfigSettingsSource(settings_cls, toml_file=path)
        else:
            file_source = YamlConfigSettingsSource(settings_cls, yaml_file=path)
        return (init_settings, env_settings, file_source)

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> ServiceConfig:
        """Defaults < file (TOML by .toml suffix, else YAML) < environment < overrides (None ignored)."""
        p = Path(path) if path is not None else None
        if p is not None and not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        token = _config_file.set(p)
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        finally:
            _config_file.reset(token)
