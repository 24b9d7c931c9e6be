"""Calibration registry on real calibration artifacts, against a local directory and a real S3 server.

The S3 backend talks HTTP to moto's standalone server on 127.0.0.1 (a separate server thread, the
same wire protocol boto3 uses against AWS), and the crash/concurrency tests publish from separate
processes, since the failure modes under test (kill -9, two writers) only exist across processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kvbm_codec.calibration.artifact import CalibrationIntegrityError, save_calibration
from kvbm_codec.calibration.calibrate import token_sequences
from kvbm_codec.calibration.registry import (
    ALLOCATIONS,
    ARTIFACT,
    MANIFEST,
    PROVENANCE,
    CalibrationNotFoundError,
    EntryManifest,
    FileDigest,
    Registry,
    StaticReferences,
)
from kvbm_codec.cli import app
from kvbm_codec.codec import frame as fr
from kvbm_codec.codec.config import CodecConfig
from kvbm_codec.codec.errors import CalibrationMismatchError, ModelMismatchError
from kvbm_codec.codec.kvtc import KVTCCodec
from kvbm_codec.codec.params import Calibration
from kvbm_codec.kv import KVCache
from kvbm_codec.models.hf import CausalLM
from kvbm_codec.texts import calibration_texts

pytestmark = pytest.mark.slow
OTHER_FP = "0" * 32

# ---- real artifacts --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cal_v1(small_calibration: Calibration) -> Calibration:
    return small_calibration


@pytest.fixture(scope="module")
def cal_v2(cal_v1: Calibration) -> Calibration:
    # A second real artifact with a distinct content id. A second calibration run costs minutes on
    # 2 shared cores; what the registry must keep apart is ids, and provenance is part of the id.
    cal = dataclasses.replace(cal_v1, provenance={**cal_v1.provenance, "recalibration": "v2"})
    save_calibration(cal, os.devnull)
    assert cal.calibration_id != cal_v1.calibration_id
    return cal


@pytest.fixture(scope="module")
def artifact_files(
    cal_v1: Calibration, cal_v2: Calibration, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    d = tmp_path_factory.mktemp("artifacts")
    save_calibration(cal_v1, d / "v1.kvtc")
    save_calibration(cal_v2, d / "v2.kvtc")
    return {"v1": d / "v1.kvtc", "v2": d / "v2.kvtc"}


# ---- backends --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env["AWS_ENDPOINT_URL"]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(params=["local", "s3"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "registry")
    request.getfixturevalue("s3_endpoint")
    import boto3

    bucket = f"kvbm-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/calibrations"


def _cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(app, ["registry", *args])
    return r.exit_code, r.output


# ---- subprocess publisher --------------------------------------------------------------------------

_CHILD = r"""
import os, signal, sys, time
from kvbm_codec.calibration.artifact import load_calibration
from kvbm_codec.calibration.registry import Registry

url, artifact, kill_at, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
cal = load_calibration(artifact)
reg = Registry.from_url(url)

def progress(name, done, total):
    if done == kill_at:  # a real SIGKILL of this process, mid-publish
        os.kill(os.getpid(), signal.SIGKILL)

print("ready", flush=True)
while go != "-" and not os.path.exists(go):
    time.sleep(0.005)
r = reg.publish(cal, promote=True, progress=progress)
print(f"published {r.version} {r.calibration_id}", flush=True)
"""


def _spawn(tmp_path: Path, url: str, artifact: Path, kill_at: int = 0, go: str = "-") -> subprocess.Popen:
    script = tmp_path / "publisher.py"
    script.write_text(_CHILD)
    p = subprocess.Popen(
        [sys.executable, str(script), url, str(artifact), str(kill_at), go],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready", p.stderr.read() if p.stderr else ""
    return p


def _assert_consistent(reg: Registry, fp: str) -> None:
    """Every version names an entry that verifies; latest (if any) names a version."""
    for rec in reg.versions(fp):
        reg.verify(fp, rec.calibration_id)
    ptr = reg.latest(fp)
    if ptr is not None:
        assert reg.record(fp, ptr.version).calibration_id == ptr.calibration_id


# ---- tests -----------------------------------------------------------------------------------------


def test_publish_list_load_verify(registry_url: str, cal_v1: Calibration, cal_v2: Calibration) -> None:
    reg = Registry.from_url(registry_url)
    fp = cal_v1.model_fingerprint
    r1 = reg.publish(cal_v1, promote=True)
    assert (r1.version, r1.created, r1.promoted) == (1, True, True)
    again = reg.publish(cal_v1)  # idempotent: same id, same version, nothing rewritten
    assert (again.version, again.created) == (1, False)
    r2 = reg.publish(cal_v2)
    assert r2.version == 2 and r2.calibration_id == cal_v2.calibration_id
    assert [(v.version, v.calibration_id) for v in reg.versions(fp)] == [
        (1, cal_v1.calibration_id),
        (2, cal_v2.calibration_id),
    ]
    assert reg.latest(fp).calibration_id == cal_v1.calibration_id  # publish alone does not promote

    fresh = Registry.from_url(registry_url)
    got = fresh.get(fp, cal_v1.calibration_id)
    assert got.calibration_id == cal_v1.calibration_id
    assert {n: a.allocation_id for n, a in got.allocations.items()} == {
        n: a.allocation_id for n, a in cal_v1.allocations.items()
    }
    assert torch.equal(got.bases["g0.k"].basis, cal_v1.bases["g0.k"].basis)
    m = fresh.verify(fp, cal_v2.calibration_id)
    assert set(m.files) == {ARTIFACT, ALLOCATIONS, PROVENANCE}
    prov = json.loads(fresh.backend.get(f"{fp}/{cal_v1.calibration_id}/{PROVENANCE}"))
    assert prov["text_sha256"] == cal_v1.provenance["text_sha256"]
    assert prov["fit_tokens"] == cal_v1.provenance["fit_tokens"] > 0

    code, out = _cli("list", "--registry", registry_url)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [(r["version"], r["latest"], r["state"]) for r in rows] == [
        (1, True, "present"),
        (2, False, "present"),
    ]
    code, out = _cli("show", fp, "2", "--registry", registry_url)
    assert code == 0 and json.loads(out)["calibration_id"] == cal_v2.calibration_id
    code, out = _cli("verify", "--registry", registry_url)
    assert code == 0 and all(json.loads(line)["ok"] for line in out.splitlines())
    code, out = _cli("promote", fp, "2", "--registry", registry_url)
    assert code == 0 and json.loads(out)["previous_version"] == 1
    assert fresh.get_latest(fp).calibration_id == cal_v2.calibration_id


def test_lru_cache_is_bounded(tmp_path: Path, cal_v1: Calibration, cal_v2: Calibration) -> None:
    reg = Registry.from_url(tmp_path, cache_entries=1)
    fp = cal_v1.model_fingerprint
    reg.publish(cal_v1)
    reg.publish(cal_v2)
    a = reg.get(fp, cal_v1.calibration_id)
    assert reg.get(fp, cal_v1.calibration_id) is a
    reg.get(fp, cal_v2.calibration_id)
    assert len(reg._cache) == 1 and reg.get(fp, cal_v1.calibration_id) is not a


def test_flipped_byte_in_any_file_is_refused(registry_url: str, cal_v1: Calibration) -> None:
    reg = Registry.from_url(registry_url)
    fp, cid = cal_v1.model_fingerprint, cal_v1.calibration_id
    reg.publish(cal_v1)
    rng = random.Random(3)
    for name in (ARTIFACT, ALLOCATIONS, PROVENANCE, MANIFEST):
        key = f"{fp}/{cid}/{name}"
        good = reg.backend.get(key)
        assert good is not None
        bad = bytearray(good)
        i = rng.randrange(len(bad))
        bad[i] ^= 0x01
        reg.backend.put(key, bytes(bad))
        with pytest.raises(CalibrationIntegrityError):
            Registry.from_url(registry_url).get(fp, cid)  # fresh: nothing cached
        code, out = _cli("verify", fp, "--registry", registry_url)
        assert code == 2 and json.loads(out.splitlines()[0])["error"] == "calibration_corrupt", name
        with pytest.raises(CalibrationIntegrityError):
            reg.promote(fp, 1)  # latest never moves to a damaged entry
        reg.backend.put(key, good)
    assert Registry.from_url(registry_url).get(fp, cid).calibration_id == cid


def test_calibration_of_another_model_is_refused(registry_url: str, cal_v1: Calibration) -> None:
    reg = Registry.from_url(registry_url)
    fp, cid = cal_v1.model_fingerprint, cal_v1.calibration_id
    reg.publish(cal_v1)
    with pytest.raises(CalibrationNotFoundError):
        reg.get(OTHER_FP, cid)  # asked for the right id under the wrong model: not there

    # The entry copied (misfiled) under another model: its manifest names the real model.
    for name in (ARTIFACT, ALLOCATIONS, PROVENANCE, MANIFEST):
        reg.backend.put(f"{OTHER_FP}/{cid}/{name}", reg.backend.get(f"{fp}/{cid}/{name}"))
    with pytest.raises(ModelMismatchError):
        reg.get(OTHER_FP, cid)

    # A self-consistent manifest claiming this model around another model's artifact.
    foreign = dataclasses.replace(cal_v1, model_fingerprint=OTHER_FP, model_name="other-model")
    r = reg.publish(foreign)
    assert reg.get(OTHER_FP, r.calibration_id).model_fingerprint == OTHER_FP
    src = Registry.from_url(registry_url).manifest(OTHER_FP, r.calibration_id)
    files = {n: reg.backend.get(f"{OTHER_FP}/{r.calibration_id}/{n}") for n in src.files}
    forged = dataclasses.replace(
        src,
        model_fingerprint=fp,
        files={n: FileDigest(f.sha256, f.size) for n, f in src.files.items()},
    )
    for n, b in files.items():
        reg.backend.put(f"{fp}/{r.calibration_id}/{n}", b)
    reg.backend.put(f"{fp}/{r.calibration_id}/{MANIFEST}", forged.to_bytes())
    assert EntryManifest.from_bytes(forged.to_bytes(), "t").model_fingerprint == fp
    with pytest.raises(ModelMismatchError):
        Registry.from_url(registry_url).get(fp, r.calibration_id)
    with pytest.raises(ModelMismatchError):
        Registry.from_url(registry_url).verify(fp, r.calibration_id)


def test_crash_mid_publish_leaves_registry_valid(
    registry_url: str, artifact_files: dict, cal_v1: Calibration, cal_v2: Calibration, tmp_path: Path
) -> None:
    reg = Registry.from_url(registry_url)
    fp = cal_v1.model_fingerprint
    reg.publish(cal_v1, promote=True)
    seed = int(time.time())
    rng = random.Random(seed)
    # 1) SIGKILL from inside at a random file of the commit (1..4; 4 = the manifest itself).
    kill_at = rng.randint(1, 4)
    p = _spawn(tmp_path, registry_url, artifact_files["v2"], kill_at=kill_at)
    assert p.wait(timeout=120) == -signal.SIGKILL, (seed, p.stderr.read() if p.stderr else "")
    # 2) kill -9 from outside at a random moment of the publish.
    p = _spawn(tmp_path, registry_url, artifact_files["v2"])
    time.sleep(rng.uniform(0.0, 0.4))
    p.kill()
    p.wait(timeout=60)

    fresh = Registry.from_url(registry_url)
    _assert_consistent(fresh, fp)
    assert fresh.latest(fp).calibration_id in {cal_v1.calibration_id, cal_v2.calibration_id}
    assert [v.version for v in fresh.versions(fp)] in ([1], [1, 2]), seed
    with contextlib.suppress(CalibrationNotFoundError):  # the killed one's entry: absent or whole
        fresh.verify(fp, cal_v2.calibration_id)
    r = fresh.publish(cal_v2)  # and the publish can simply be retried
    assert r.version == 2
    _assert_consistent(Registry.from_url(registry_url), fp)
    report = fresh.gc(StaticReferences([]), retention_days=365, orphan_grace_hours=0)
    assert not report.deleted
    _assert_consistent(Registry.from_url(registry_url), fp)


def test_two_concurrent_publishers_get_distinct_versions(
    registry_url: str, artifact_files: dict, cal_v1: Calibration, cal_v2: Calibration, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    procs = [_spawn(tmp_path, registry_url, artifact_files[v], go=str(go)) for v in ("v1", "v2")]
    go.touch()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(out.split())
    versions = {o[1] for o in outs}
    assert versions == {"1", "2"}
    reg = Registry.from_url(registry_url)
    fp = cal_v1.model_fingerprint
    _assert_consistent(reg, fp)
    assert {v.calibration_id for v in reg.versions(fp)} == {cal_v1.calibration_id, cal_v2.calibration_id}
    for o in outs:
        assert reg.record(fp, int(o[1])).calibration_id == o[2]


@pytest.fixture(scope="module")
def kv(smollm: CausalLM) -> KVCache:
    ids = token_sequences(smollm.tokenizer, calibration_texts(), 512, 12)[10]
    return smollm.prefill(ids[:, :300], return_logits=False)[0]


def test_old_frame_decodes_after_new_version_promoted(
    registry_url: str, cal_v1: Calibration, cal_v2: Calibration, kv: KVCache
) -> None:
    writer = Registry.from_url(registry_url)
    fp = cal_v1.model_fingerprint
    writer.publish(cal_v1, promote=True)
    frame = KVTCCodec(writer.get_latest(fp), 20.0).encode(kv)
    writer.publish(cal_v2, promote=True)  # latest moves on; the frame was written with v1

    reader = Registry.from_url(registry_url)  # another replica, days later
    latest = reader.get_latest(fp)
    assert latest.calibration_id == cal_v2.calibration_id
    with pytest.raises(CalibrationMismatchError):
        KVTCCodec(latest, 20.0).decode(frame)
    header = fr.read_frame(frame).header
    cal = reader.get(header.model_fingerprint, header.calibration_id)
    out = KVTCCodec(cal, 20.0).decode(frame)
    ref = KVTCCodec(cal_v1, 20.0).decode(frame)
    assert torch.equal(out.keys, ref.keys) and torch.equal(out.values, ref.values)
    rel = (out.values.float() - kv.values.float()).norm() / kv.values.float().norm()
    assert rel < 0.5


def test_gc_keeps_latest_referenced_and_young(
    tmp_path: Path, cal_v1: Calibration, cal_v2: Calibration
) -> None:
    url = str(tmp_path / "reg")
    reg = Registry.from_url(url)
    fp = cal_v1.model_fingerprint
    reg.publish(cal_v1)
    reg.publish(cal_v2, promote=True)
    assert _cli("gc", "--registry", url)[0] == 2  # no reference source: refuses
    r = reg.gc(StaticReferences([]), retention_days=1)
    assert not r.deleted  # both young
    refs = tmp_path / "refs.txt"
    refs.write_text(f"# block store dump\n{cal_v1.calibration_id}\n")
    code, out = _cli("gc", "--retention-days", "0", "--referenced-ids", str(refs), "--registry", url)
    assert code == 0 and json.loads(out)["deleted"] == []
    later = time.time() + 2 * 86400
    dry = reg.gc(StaticReferences([]), retention_days=1, dry_run=True, now=later)
    assert dry.deleted == [(fp, cal_v1.calibration_id)]
    reg.get(fp, cal_v1.calibration_id)
    reg.gc(StaticReferences([]), retention_days=1, now=later)
    with pytest.raises(CalibrationNotFoundError):
        reg.get(fp, cal_v1.calibration_id)  # also evicted from the cache
    assert reg.get_latest(fp).calibration_id == cal_v2.calibration_id
    assert [v.version for v in reg.versions(fp)] == [1, 2]  # numbers are never reused
    assert reg.publish(cal_v1).version == 1


def test_load_or_calibrate_goes_through_the_local_registry(
    smollm: CausalLM,
    cal_v1: Calibration,
    artifact_files: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shutil

    from kvbm_codec.calibration.cache import calibration_path, load_or_calibrate

    monkeypatch.setenv("KVBM_CODEC_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("KVBM_CODEC_REGISTRY", raising=False)
    legacy = calibration_path(smollm.info.fingerprint, CodecConfig(), 16, 1024, "pydoc_data.topics")
    legacy.parent.mkdir(parents=True)
    shutil.copy(artifact_files["v1"], legacy)  # a pre-registry cache file is imported, not recomputed
    cal, path, fresh = load_or_calibrate(smollm, corpus="pydoc", progress=False)
    assert (cal.calibration_id, fresh) == (cal_v1.calibration_id, False)
    assert path.is_relative_to(tmp_path / "registry") and path.is_file()
    legacy.unlink()
    again, path2, fresh2 = load_or_calibrate(smollm, corpus="pydoc", progress=False)
    assert (again.calibration_id, path2, fresh2) == (cal_v1.calibration_id, path, False)
    reg = Registry.from_url(tmp_path / "registry")
    assert reg.latest(smollm.info.fingerprint).calibration_id == cal_v1.calibration_id
    code, out = _cli("list", "--registry", str(tmp_path / "registry"))
    assert code == 0 and json.loads(out)["latest"] is True


def test_default_recipe_is_used_whatever_latest_points_at(
    smollm: CausalLM,
    cal_v1: Calibration,
    cal_v2: Calibration,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`eval`, `demo`, `bench` and a registry-less `serve` encode with the calibration of the current
    default recipe (found by its cache key), not with the local registry's `latest`: a machine whose
    first calibration was an older recipe keeps `latest` on it until someone promotes, and a user
    must still get the default."""
    from kvbm_codec.calibration.cache import (
        DEFAULT_CORPUS,
        DEFAULT_FIT_SEQUENCES,
        cache_key,
        corpus_texts,
        load_or_calibrate,
    )
    from kvbm_codec.server.app import resolve_calibration
    from kvbm_codec.service.config import ModelConfig

    monkeypatch.setenv("KVBM_CODEC_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("KVBM_CODEC_REGISTRY", raising=False)
    fp = smollm.info.fingerprint
    reg = Registry.from_url(tmp_path / "registry")
    old_key = cache_key(CodecConfig(distortion="mse"), 16, 1024, "pydoc_data.topics")
    reg.publish(cal_v2, promote=True, labels={"cache_key": old_key})  # an older recipe is latest
    _, corpus_name = corpus_texts(smollm.tokenizer, DEFAULT_CORPUS)
    key = cache_key(CodecConfig(), DEFAULT_FIT_SEQUENCES[DEFAULT_CORPUS], 1024, corpus_name)
    reg.publish(cal_v1, labels={"cache_key": key})  # stands in for the default recipe's entry
    assert reg.latest(fp).calibration_id == cal_v2.calibration_id

    cal, _, fresh = load_or_calibrate(smollm, progress=False)
    assert (cal.calibration_id, fresh) == (cal_v1.calibration_id, False)
    served = resolve_calibration(ModelConfig(name="smollm2-135m", calibration="latest"))
    assert served.calibration.calibration_id == cal_v1.calibration_id
    assert reg.latest(fp).calibration_id == cal_v2.calibration_id  # loading never moves latest


def test_entry_written_before_a_config_field_existed_still_loads(tmp_path: Path, cal_v1: Calibration) -> None:
    """An upgrade that adds a config field must not make every older registry entry look corrupt;
    a value that disagrees still does."""
    reg = Registry.from_url(tmp_path)
    fp, cid = cal_v1.model_fingerprint, cal_v1.calibration_id
    reg.publish(cal_v1)
    prefix = f"{fp}/{cid}"
    good_prov = reg.backend.get(f"{prefix}/{PROVENANCE}")
    good_manifest = reg.backend.get(f"{prefix}/{MANIFEST}")
    assert good_prov is not None and good_manifest is not None

    def rewrite(prov: dict) -> None:
        data = json.dumps(prov, indent=2, sort_keys=True).encode()
        manifest = EntryManifest.from_bytes(good_manifest, "test")
        files = {**manifest.files, PROVENANCE: FileDigest(hashlib.sha256(data).hexdigest(), len(data))}
        reg.backend.put(f"{prefix}/{PROVENANCE}", data)  # re-signed, as an older writer would have
        reg.backend.put(f"{prefix}/{MANIFEST}", dataclasses.replace(manifest, files=files).to_bytes())

    older = json.loads(good_prov)
    del older["config"]["distortion"]  # as written before the field existed
    rewrite(older)
    assert Registry.from_url(tmp_path).get(fp, cid).calibration_id == cid

    changed = json.loads(good_prov)
    changed["fit_tokens"] += 1
    rewrite(changed)
    with pytest.raises(CalibrationIntegrityError):
        Registry.from_url(tmp_path).get(fp, cid)


def test_prefill_dtype_is_part_of_the_recipe_key() -> None:
    """A bf16-prefill calibration is another recipe: a float32 machine never reuses one, and float32
    keys are the ones written before the option existed (so existing caches stay valid)."""
    from kvbm_codec.calibration.cache import cache_key

    before = cache_key(CodecConfig(), 66, 1024, "broad")
    assert cache_key(CodecConfig(), 66, 1024, "broad", "float32") == before
    assert cache_key(CodecConfig(), 66, 1024, "broad", "bfloat16") != before
