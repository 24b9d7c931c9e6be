"""Calibration registry: versioned, integrity-checked calibrations shared by every codec replica.

A frame written days ago by another replica names its calibration by id; decoding it with anything
else would produce plausible garbage, so the registry's one job is to hand back exactly that
calibration or fail loudly. Rules (docs/calibration-registry.md has the why in full):

* An entry (``<fingerprint>/<calibration_id>/``) is immutable and content-addressed. Its
  ``manifest.json`` lists sha256 + size of every file and is written strictly last, so an entry
  without a valid manifest does not exist as far as readers are concerned (crash safety).
* Versions are per-model integers, claimed with create-if-absent writes of
  ``<fingerprint>/versions/<n>.json``; two publishers racing get distinct numbers.
* ``<fingerprint>/latest.json`` only moves by compare-and-swap, and only to an entry that verifies.
* Every load re-verifies manifest, file checksums, artifact content hash and model fingerprint.
  Verified entries are kept in a small LRU cache: they are immutable, so a cached copy never goes
  stale, and ``get`` by id keeps working after ``latest`` moves.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import kvbm_codec
from kvbm_codec.calibration.artifact import CalibrationIntegrityError, load_calibration, save_calibration
from kvbm_codec.calibration.backends import Backend, ProgressFn
from kvbm_codec.calibration.backends.local import LocalBackend
from kvbm_codec.codec.errors import CodecError, ModelMismatchError
from kvbm_codec.codec.params import Calibration

MANIFEST = "manifest.json"
ARTIFACT = "calibration.safetensors"
ALLOCATIONS = "allocations.json"
PROVENANCE = "provenance.json"
REQUIRED_FILES = (ARTIFACT, ALLOCATIONS, PROVENANCE)
ENTRY_FORMAT = "kvbm-codec-registry-entry"
ENTRY_FORMAT_VERSION = 1
DEFAULT_CACHE_ENTRIES = 8
_MAX_RACE_RETRIES = 200


class CalibrationNotFoundError(CodecError):
    """No (complete) entry with that id/version exists for that model: recompute, do not guess."""

    code = "calibration_not_found"


class RegistryError(CodecError):
    """The registry cannot complete an operation (e.g. a write race that never settles)."""

    code = "registry_error"


def default_root() -> Path:
    base = os.environ.get("KVBM_CODEC_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "kvbm-codec") / "registry"


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# ---- records ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileDigest:
    sha256: str
    size: int


@dataclass(frozen=True)
class EntryManifest:
    model_fingerprint: str
    model_name: str
    calibration_id: str
    created_at: str
    created_unix: float
    code_version: str
    files: dict[str, FileDigest]
    labels: dict[str, str] = field(default_factory=dict)
    allocations: dict[str, str] = field(default_factory=dict)  # name -> allocation_id

    def body(self) -> dict[str, Any]:
        return {
            "format": ENTRY_FORMAT,
            "format_version": ENTRY_FORMAT_VERSION,
            "model_fingerprint": self.model_fingerprint,
            "model_name": self.model_name,
            "calibration_id": self.calibration_id,
            "created_at": self.created_at,
            "created_unix": self.created_unix,
            "code_version": self.code_version,
            "labels": dict(sorted(self.labels.items())),
            "allocations": dict(sorted(self.allocations.items())),
            "files": {n: {"sha256": d.sha256, "size": d.size} for n, d in sorted(self.files.items())},
        }

    def to_bytes(self) -> bytes:
        # The manifest carries its own digest: a flipped byte that still parses as JSON (say, in a
        # sha256 string) is caught instead of silently redirecting the file checks.
        body = self.body()
        return json.dumps({**body, "manifest_sha256": _sha256(_canonical(body))}, indent=2).encode()

    @classmethod
    def from_bytes(cls, raw: bytes, where: str) -> EntryManifest:
        try:
            d = json.loads(raw)
            stored = d.pop("manifest_sha256")
            ok = stored == _sha256(_canonical(d))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError) as e:
            raise CalibrationIntegrityError(f"manifest is unreadable: {e}", where=where) from e
        if not ok:
            raise CalibrationIntegrityError(
                "manifest fails its own checksum: the file is corrupt", where=where
            )
        if d.get("format") != ENTRY_FORMAT or d.get("format_version") != ENTRY_FORMAT_VERSION:
            raise CalibrationIntegrityError(
                f"unsupported entry format {d.get('format')} v{d.get('format_version')}", where=where
            )
        try:
            return cls(
                model_fingerprint=d["model_fingerprint"],
                model_name=d["model_name"],
                calibration_id=d["calibration_id"],
                created_at=d["created_at"],
                created_unix=float(d["created_unix"]),
                code_version=d["code_version"],
                files={n: FileDigest(f["sha256"], int(f["size"])) for n, f in d["files"].items()},
                labels=dict(d.get("labels", {})),
                allocations=dict(d.get("allocations", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CalibrationIntegrityError(f"manifest lacks a field: {e}", where=where) from e


@dataclass(frozen=True)
class VersionRecord:
    model_fingerprint: str
    version: int
    calibration_id: str
    published_at: str

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__, indent=2, sort_keys=True).encode()


@dataclass(frozen=True)
class LatestPointer:
    version: int
    calibration_id: str
    promoted_at: str
    previous_version: int | None


@dataclass(frozen=True)
class PublishResult:
    model_fingerprint: str
    calibration_id: str
    version: int
    created: bool  # False: that calibration id was already published (idempotent re-publish)
    promoted: bool


@dataclass
class GCReport:
    deleted: list[tuple[str, str]] = field(default_factory=list)  # (fingerprint, calibration_id)
    kept: dict[str, str] = field(default_factory=dict)  # "fp/cal_id" -> reason
    orphans_deleted: list[str] = field(default_factory=list)


# ---- what gc must never delete ----------------------------------------------------------------------


@runtime_checkable
class ReferenceSource(Protocol):
    """Which calibrations stored blocks still need. The block store implements this.

    gc asks before deleting anything and deletes nothing if this raises: a calibration that is
    still referenced and gone makes those blocks undecodable forever.
    """

    def referenced_calibration_ids(self, model_fingerprint: str) -> Iterable[str]: ...


class StaticReferences:
    """A fixed set of ids (calibration ids are content hashes, so one set serves every model)."""

    def __init__(self, ids: Iterable[str]) -> None:
        self.ids = frozenset(ids)

    def referenced_calibration_ids(self, model_fingerprint: str) -> Iterable[str]:
        return self.ids


class FileReferences(StaticReferences):
    """Ids from a file: one per line (``#`` comments allowed) or a JSON list, e.g. a block-store dump."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        text = Path(path).read_text()
        stripped = text.strip()
        if stripped.startswith("["):
            ids = [str(x) for x in json.loads(stripped)]
        else:
            ids = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
        super().__init__(i for i in ids if i)


# ---- the registry ------------------------------------------------------------------------------------


def _entry_prefix(fp: str, cal_id: str) -> str:
    return f"{fp}/{cal_id}"


def _version_key(fp: str, version: int) -> str:
    return f"{fp}/versions/{version:08d}.json"


def _latest_key(fp: str) -> str:
    return f"{fp}/latest.json"


def _check_name(kind: str, value: str) -> str:
    if not value or "/" in value or value.startswith(".") or value in ("versions", "latest.json"):
        raise ValueError(f"invalid {kind} {value!r}")
    return value


class Registry:
    def __init__(self, backend: Backend, *, cache_entries: int = DEFAULT_CACHE_ENTRIES) -> None:
        self.backend = backend
        self.cache_entries = cache_entries
        self._cache: OrderedDict[tuple[str, str], Calibration] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str | os.PathLike[str] | None = None, **kwargs: Any) -> Registry:
        """``s3://bucket/prefix``, ``file:///dir``, a directory, or None: ``$KVBM_CODEC_REGISTRY``,
        else the local default under ``$KVBM_CODEC_CACHE_DIR``."""
        raw = str(url) if url is not None else os.environ.get("KVBM_CODEC_REGISTRY", "")
        if raw.startswith("s3://"):
            from kvbm_codec.calibration.backends.s3 import S3Backend

            bucket, _, prefix = raw[len("s3://") :].partition("/")
            return cls(S3Backend(bucket, prefix), **kwargs)
        if raw.startswith("file://"):
            raw = raw[len("file://") :]
        return cls(LocalBackend(raw or default_root()), **kwargs)

    def describe(self) -> str:
        return self.backend.describe()

    # ---- reading ---------------------------------------------------------------------------------

    def models(self) -> list[str]:
        return sorted({o.key.split("/", 1)[0] for o in self.backend.list("") if "/versions/" in o.key})

    def versions(self, fingerprint: str) -> list[VersionRecord]:
        fp = _check_name("model fingerprint", fingerprint)
        out = []
        for o in self.backend.list(f"{fp}/versions/"):
            raw = self.backend.get(o.key)
            if raw is None:
                continue
            try:
                d = json.loads(raw)
                rec = VersionRecord(
                    d["model_fingerprint"], int(d["version"]), d["calibration_id"], d["published_at"]
                )
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
                raise CalibrationIntegrityError(f"version record is unreadable: {e}", where=o.key) from e
            if rec.model_fingerprint != fp or o.key != _version_key(fp, rec.version):
                raise CalibrationIntegrityError("version record does not match its key", where=o.key)
            out.append(rec)
        return sorted(out, key=lambda r: r.version)

    def latest(self, fingerprint: str) -> LatestPointer | None:
        got = self.backend.get(_latest_key(_check_name("model fingerprint", fingerprint)))
        return None if got is None else self._parse_latest(got, fingerprint)

    @staticmethod
    def _parse_latest(raw: bytes, fp: str) -> LatestPointer:
        try:
            d = json.loads(raw)
            return LatestPointer(
                int(d["version"]), d["calibration_id"], d["promoted_at"], d.get("previous_version")
            )
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise CalibrationIntegrityError(
                f"latest pointer is unreadable: {e}", where=_latest_key(fp)
            ) from e

    def record(self, fingerprint: str, ref: str | int) -> VersionRecord:
        """A version record by ``latest``, version number, or calibration id."""
        recs = self.versions(fingerprint)
        if ref == "latest":
            ptr = self.latest(fingerprint)
            if ptr is None:
                raise CalibrationNotFoundError(f"model {fingerprint} has no promoted calibration")
            ref = ptr.version
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit() and len(ref) < 16):
            n = int(ref)
            match = [r for r in recs if r.version == n]
        else:
            match = [r for r in recs if r.calibration_id == ref]
        if not match:
            raise CalibrationNotFoundError(f"model {fingerprint} has no calibration version/id {ref!r}")
        return match[0]

    def manifest(self, fingerprint: str, calibration_id: str) -> EntryManifest:
        """The entry's manifest, self-checked and checked against the model and id it is filed under."""
        fp = _check_name("model fingerprint", fingerprint)
        cid = _check_name("calibration id", calibration_id)
        where = f"{self.describe()}/{_entry_prefix(fp, cid)}"
        raw = self.backend.get(f"{_entry_prefix(fp, cid)}/{MANIFEST}")
        if raw is None:
            raise CalibrationNotFoundError(f"no calibration {cid} for model {fp} in {self.describe()}")
        m = EntryManifest.from_bytes(raw, where)
        if m.model_fingerprint != fp:
            raise ModelMismatchError(
                f"entry filed under model {fp} is a calibration of model {m.model_fingerprint}", where=where
            )
        if m.calibration_id != cid:
            raise CalibrationIntegrityError(f"manifest names calibration {m.calibration_id}", where=where)
        missing = [f for f in REQUIRED_FILES if f not in m.files]
        if missing:
            raise CalibrationIntegrityError(f"manifest lists no {missing}", where=where)
        return m

    def _load_verified(self, fp: str, cid: str) -> tuple[Calibration, EntryManifest]:
        m = self.manifest(fp, cid)
        where = f"{self.describe()}/{_entry_prefix(fp, cid)}"
        blobs: dict[str, bytes] = {}
        for name, want in m.files.items():
            data = self.backend.get(f"{_entry_prefix(fp, cid)}/{name}")
            if data is None:
                raise CalibrationIntegrityError(f"{name} is missing", where=where)
            if len(data) != want.size or _sha256(data) != want.sha256:
                raise CalibrationIntegrityError(
                    f"{name} fails its checksum (size {len(data)} vs {want.size}): the file is corrupt",
                    where=where,
                )
            blobs[name] = data
        with tempfile.TemporaryDirectory(prefix="kvbm-codec-reg-") as d:
            p = Path(d) / ARTIFACT
            p.write_bytes(blobs[ARTIFACT])
            cal = load_calibration(p, expected_fingerprint=fp)  # content hash + model check
        if cal.calibration_id != cid:
            raise CalibrationIntegrityError(f"artifact is calibration {cal.calibration_id}", where=where)
        if not _written_by(json.loads(blobs[ALLOCATIONS]), _allocations_doc(cal)) or not _written_by(
            json.loads(blobs[PROVENANCE]), _provenance_doc(cal)
        ):
            raise CalibrationIntegrityError(
                "allocation table/provenance disagree with the artifact", where=where
            )
        return cal, m

    def verify(self, fingerprint: str, calibration_id: str) -> EntryManifest:
        """Re-read and check everything, ignoring the cache (for ``registry verify`` and promote)."""
        return self._load_verified(fingerprint, calibration_id)[1]

    def get(self, fingerprint: str, calibration_id: str) -> Calibration:
        """Exactly this calibration of this model, or an error; never a substitute."""
        key = (fingerprint, calibration_id)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        cal, _ = self._load_verified(fingerprint, calibration_id)
        with self._lock:
            self._cache[key] = cal
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_entries:
                self._cache.popitem(last=False)
        return cal

    def get_version(self, fingerprint: str, ref: str | int) -> Calibration:
        return self.get(fingerprint, self.record(fingerprint, ref).calibration_id)

    def get_latest(self, fingerprint: str) -> Calibration:
        return self.get_version(fingerprint, "latest")

    def find(self, fingerprint: str, **labels: str) -> list[tuple[VersionRecord, EntryManifest]]:
        """Published entries whose labels include ``labels``, newest version first (skips gc'd ones)."""
        out = []
        for rec in reversed(self.versions(fingerprint)):
            try:
                m = self.manifest(fingerprint, rec.calibration_id)
            except CalibrationNotFoundError:
                continue
            if all(m.labels.get(k) == v for k, v in labels.items()):
                out.append((rec, m))
        return out

    def artifact_path(self, fingerprint: str, calibration_id: str) -> Path | None:
        """The artifact's file on disk for a local registry (None for remote stores)."""
        if isinstance(self.backend, LocalBackend):
            return self.backend.path(f"{_entry_prefix(fingerprint, calibration_id)}/{ARTIFACT}")
        return None

    # ---- writing ---------------------------------------------------------------------------------

    def publish(
        self,
        cal: Calibration,
        *,
        promote: bool = False,
        labels: dict[str, str] | None = None,
        progress: ProgressFn | None = None,
    ) -> PublishResult:
        """Store ``cal`` as a new immutable entry + version; re-publishing an id returns its version."""
        fp = _check_name("model fingerprint", cal.model_fingerprint)
        with tempfile.TemporaryDirectory(prefix="kvbm-codec-pub-") as d:
            p = Path(d) / ARTIFACT
            cid = save_calibration(cal, p)  # also (re)computes the content-hash id
            artifact = p.read_bytes()
        files = {
            ARTIFACT: artifact,
            ALLOCATIONS: json.dumps(_allocations_doc(cal), indent=2, sort_keys=True).encode(),
            PROVENANCE: json.dumps(_provenance_doc(cal), indent=2, sort_keys=True).encode(),
        }
        now = _now()
        manifest = EntryManifest(
            model_fingerprint=fp,
            model_name=cal.model_name,
            calibration_id=cid,
            created_at=now.isoformat(timespec="seconds"),
            created_unix=now.timestamp(),
            code_version=kvbm_codec.__version__,
            files={n: FileDigest(_sha256(b), len(b)) for n, b in files.items()},
            labels=dict(labels or {}),
            allocations={n: a.allocation_id for n, a in cal.allocations.items()},
        )
        files[MANIFEST] = manifest.to_bytes()
        created = self.backend.commit_files(_entry_prefix(fp, cid), files, MANIFEST, progress)
        if not created:
            # Someone published this id before: fine if what is there is sound, refuse otherwise
            # (entries are immutable; a damaged one is repaired by an operator, not overwritten).
            self.verify(fp, cid)
        rec, new_version = self._claim_version(fp, cid)
        promoted = False
        if promote:
            self.promote(fp, rec.version)
            promoted = True
        return PublishResult(fp, cid, rec.version, created or new_version, promoted)

    def _claim_version(self, fp: str, cid: str) -> tuple[VersionRecord, bool]:
        # Create-if-absent on versions/<max+1>: a loser re-lists, and either finds its id already
        # claimed (same calibration published concurrently) or tries the next number.
        for _ in range(_MAX_RACE_RETRIES):
            recs = self.versions(fp)
            for r in recs:
                if r.calibration_id == cid:
                    return r, False
            n = recs[-1].version + 1 if recs else 1
            rec = VersionRecord(fp, n, cid, _now().isoformat(timespec="seconds"))
            if self.backend.put_if_absent(_version_key(fp, n), rec.to_bytes()):
                return rec, True
        raise RegistryError(f"could not claim a version for {cid} after {_MAX_RACE_RETRIES} races")

    def promote(self, fingerprint: str, ref: str | int, *, only_if_unset: bool = False) -> LatestPointer:
        """Point ``latest`` at a version (forward or back) after verifying its entry in full."""
        rec = self.record(fingerprint, ref)
        self.verify(fingerprint, rec.calibration_id)
        key = _latest_key(fingerprint)
        for _ in range(_MAX_RACE_RETRIES):
            cur = self.backend.get_versioned(key)
            if cur is not None and only_if_unset:
                return self._parse_latest(cur[0], fingerprint)
            prev = self._parse_latest(cur[0], fingerprint).version if cur else None
            ptr = LatestPointer(rec.version, rec.calibration_id, _now().isoformat(timespec="seconds"), prev)
            if self.backend.compare_and_swap(
                key, json.dumps(ptr.__dict__, indent=2).encode(), cur[1] if cur else None
            ):
                return ptr
            time.sleep(0.01)
        raise RegistryError(f"latest pointer of {fingerprint} kept changing under us")

    # ---- garbage collection ------------------------------------------------------------------------

    def gc(
        self,
        references: ReferenceSource,
        *,
        retention_days: float,
        fingerprint: str | None = None,
        orphan_grace_hours: float = 24.0,
        dry_run: bool = False,
        now: float | None = None,
    ) -> GCReport:
        """Delete entries nobody needs: not latest, not referenced by stored blocks, older than retention.

        Version records stay (they are tiny and keep version numbers from being reused); the manifest
        goes first so a deleted entry turns invisible atomically before its data disappears.
        """
        t = time.time() if now is None else now
        report = GCReport()
        fps = [fingerprint] if fingerprint else self.models()
        # Ask for every reference before deleting anything: a failing source must delete nothing.
        refs = {fp: set(references.referenced_calibration_ids(fp)) for fp in fps}
        plan: list[tuple[str, str, list[str]]] = []
        for fp in fps:
            latest = self.latest(fp)
            objs: dict[str, list[Any]] = {}
            for o in self.backend.list(f"{fp}/"):
                parts = o.key.split("/")
                if len(parts) == 3 and parts[1] != "versions":
                    objs.setdefault(parts[1], []).append(o)
            for cid, entry_objs in sorted(objs.items()):
                label = f"{fp}/{cid}"
                keys = [o.key for o in entry_objs]
                has_manifest = any(k.endswith(f"/{MANIFEST}") for k in keys)
                age_s = t - max(o.modified for o in entry_objs)
                if not has_manifest:
                    if age_s > orphan_grace_hours * 3600:
                        report.orphans_deleted.extend(keys)
                        plan.append((fp, cid, keys))
                    else:
                        report.kept[label] = "incomplete upload within grace period"
                    continue
                if latest is not None and latest.calibration_id == cid:
                    report.kept[label] = "latest"
                    continue
                if cid in refs[fp]:
                    report.kept[label] = "referenced by stored blocks"
                    continue
                try:
                    created = self.manifest(fp, cid).created_unix
                except CodecError:
                    created = t - age_s  # damaged manifest: age it by the store's own clock
                if t - created < retention_days * 86400:
                    report.kept[label] = f"younger than {retention_days:g} days"
                    continue
                report.deleted.append((fp, cid))
                plan.append((fp, cid, sorted(keys, key=lambda k: not k.endswith(f"/{MANIFEST}"))))
        if isinstance(self.backend, LocalBackend):
            for s in self.backend.stale_staging():
                if t - s.modified > orphan_grace_hours * 3600:
                    report.orphans_deleted.append(s.key)
                    if not dry_run:
                        self.backend.delete_staging(s.key)
        if not dry_run:
            for fp, cid, keys in plan:
                with self._lock:
                    self._cache.pop((fp, cid), None)
                for k in keys:
                    self.backend.delete(k)
        return report


def _written_by(stored: Any, current: Any) -> bool:
    """Whether a stored side document agrees with the one the artifact renders today.

    Every value the entry stored must match; keys the current code adds (a config field introduced
    since, rendered with the value the artifact's loader gives old artifacts) are not a disagreement,
    else every upgrade that grows the config would make every registry entry look corrupt.
    """
    if isinstance(stored, dict) and isinstance(current, dict):
        return all(k in current and _written_by(v, current[k]) for k, v in stored.items())
    return bool(stored == current)


def _allocations_doc(cal: Calibration) -> dict[str, Any]:
    return {
        n: {"allocation_id": a.allocation_id, **json.loads(a.to_json())}
        for n, a in sorted(cal.allocations.items())
    }


def _provenance_doc(cal: Calibration) -> dict[str, Any]:
    return {
        "model_fingerprint": cal.model_fingerprint,
        "model_name": cal.model_name,
        "calibration_id": cal.calibration_id,
        "config": json.loads(cal.config.model_dump_json()),
        **cal.provenance,
    }
