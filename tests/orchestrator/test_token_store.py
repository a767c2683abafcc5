"""The on-disk token store: fp16 shards, round trips, both readers, bounded memory."""

import pickle

import numpy as np
import pytest

from orchestrator.feature_store import FeatureStore
from orchestrator.token_store import (
    MappedTokens,
    StreamedTokens,
    TokenWriter,
    open_tokens,
    parse_token_field,
    token_field,
    token_key,
)
from trials.tokens import RaggedTokens, TokenSource

# fp16 keeps 11 significant bits: |x - fp16(x)| <= 2**-11 |x| for values in its normal range.
FP16_RTOL = 2.0 ** -11


def ragged(n=37, dim=8, num_prefix=0, max_len=13, seed=0):
    """Random samples: prefix [N, K, D] and local tokens of lengths 0..max_len (some empty)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len + 1, n)
    local = [rng.standard_normal((int(k), dim)).astype(np.float32) for k in lengths]
    return rng.standard_normal((n, num_prefix, dim)).astype(np.float32), local


def write(store, key, prefix, local, batch=5, **kwargs):
    """Store samples in batches of ``batch`` (as an extraction does)."""
    with TokenWriter(store, key, dim=prefix.shape[2], num_prefix=prefix.shape[1], **kwargs) as writer:
        for first in range(0, len(local), batch):
            writer.write(prefix[first:first + batch], local[first:first + batch])


def expected_batch(prefix, local, rows, dtype=np.float16):
    """The batch a reader must return: values rounded to the stored dtype, padded, float32."""
    resident = RaggedTokens(np.concatenate(local).astype(dtype), np.cumsum([0] + [len(x) for x in local]),
                            prefix.astype(dtype))
    return resident.gather(rows)


def assert_same(batch, expected):
    for name in ("local", "mask", "prefix"):
        got, want = getattr(batch, name), getattr(expected, name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("stream", [False, True])
def test_ragged_text_round_trip_across_shard_boundaries(tmp_path, stream):
    store = FeatureStore(tmp_path)
    prefix, local = ragged()
    write(store, "t", prefix, local, shard_bytes=7 * 8 * 2)  # 7 rows per shard: many samples straddle two
    manifest = store.manifest("t")
    assert manifest["num_tokens"] == sum(map(len, local)) and manifest["rows_per_shard"] == 7
    assert len(manifest["shards"]) == -(-manifest["num_tokens"] // 7) and store.has("t", verify=True)
    reader = open_tokens(store, "t", stream=stream)
    assert isinstance(reader, TokenSource) and len(reader) == 37 and reader.num_prefix == 0
    np.testing.assert_array_equal(reader.lengths(), [len(x) for x in local])
    rows = np.array([3, 0, 36, 3, 17, 8])  # any order, repeats
    batch = reader.gather(rows)
    assert_same(batch, expected_batch(prefix, local, rows))
    assert batch.local.dtype == np.float32 and batch.prefix.shape == (6, 0, 8)
    for i, r in enumerate(rows):  # against the float32 originals, at fp16's precision
        np.testing.assert_allclose(batch.local[i, : len(local[r])], local[r], rtol=FP16_RTOL, atol=1e-7)
        assert batch.mask[i].sum() == len(local[r])
    resident = reader.to_resident()
    assert isinstance(resident, RaggedTokens) and resident.local.dtype == np.float16
    assert_same(resident.gather(np.arange(37)), expected_batch(prefix, local, np.arange(37)))


def test_fixed_image_tokens_with_prefix_round_trip(tmp_path):
    store = FeatureStore(tmp_path)
    rng = np.random.default_rng(1)
    prefix = rng.standard_normal((20, 3, 16)).astype(np.float32)
    local = list(rng.standard_normal((20, 9, 16)).astype(np.float32))
    write(store, "img", prefix, local, batch=6, shard_bytes=40 * 16 * 2)
    reader = MappedTokens(store.path("img"))
    np.testing.assert_array_equal(reader.offsets, np.arange(21) * 9)
    rows = np.array([19, 4, 5])
    assert_same(reader.gather(rows), expected_batch(prefix, local, rows))
    np.testing.assert_allclose(reader.gather(rows).prefix, prefix[rows], rtol=FP16_RTOL)
    shard = np.load(store.path("img") / "local_000.npy")  # a plain .npy, readable by anyone
    assert shard.shape == (40, 16) and shard.dtype == np.float16
    np.testing.assert_array_equal(np.load(store.path("img") / "prefix.npy"), prefix.astype(np.float16))


def test_streamed_reader_returns_what_the_mapped_one_does(tmp_path):
    store = FeatureStore(tmp_path)
    prefix, local = ragged(n=60, num_prefix=2, seed=2)
    write(store, "k", prefix, local, shard_bytes=11 * 8 * 2)
    mapped, streamed = open_tokens(store, "k"), open_tokens(store, "k", stream=True)
    assert isinstance(streamed, StreamedTokens)
    rng = np.random.default_rng(0)
    for _ in range(5):
        rows = rng.integers(0, 60, 16)
        assert_same(streamed.gather(rows), mapped.gather(rows))
    assert_same(streamed.to_resident().gather(np.arange(60)), mapped.gather(np.arange(60)))
    again = pickle.loads(pickle.dumps(streamed))  # reopens by path, e.g. in a Ray task
    assert isinstance(again, StreamedTokens) and len(pickle.dumps(streamed)) < 1000
    assert_same(again.gather(np.arange(5)), mapped.gather(np.arange(5)))


def test_float32_is_exact_and_fp16_overflow_is_refused(tmp_path):
    store = FeatureStore(tmp_path)
    prefix, local = ragged(n=6, seed=3)
    write(store, "f32", prefix, local, dtype="float32")
    assert_same(open_tokens(store, "f32").gather(np.arange(6)),
                expected_batch(prefix, local, np.arange(6), np.float32))
    local[2][0, 0] = 1e5
    with pytest.raises(ValueError, match="float16's range.*dtype='float32'"):
        write(store, "f16", prefix, local)
    assert not store.has("f16") and not list(tmp_path.glob(".tmp-*"))  # aborted, nothing left


def test_a_truncated_shard_is_not_an_entry(tmp_path):
    store = FeatureStore(tmp_path)
    prefix, local = ragged(seed=4)
    write(store, "t", prefix, local, shard_bytes=64)
    shard = store.path("t") / "local_001.npy"
    shard.write_bytes(shard.read_bytes()[:-2])
    assert not store.has("t")


def test_token_fields_and_keys():
    assert token_field("images", -1) == "images@tokens:-1"
    assert parse_token_field("texts@tokens:11") == ("texts", 11)
    assert parse_token_field("images@tokens:-2") == ("images", -2)
    assert parse_token_field("images") is None and parse_token_field("images@tokens:x") is None
    key = token_key({"encoder": "a"}, "fp", "images", 3)
    assert key != token_key({"encoder": "a"}, "fp", "images", 2) != token_key({"encoder": "a"}, "fp", "texts", 3)
    with pytest.raises(ValueError, match="resolved"):
        token_key({"encoder": "a"}, "fp", "images", -1)


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_streaming_keeps_resident_memory_bounded_where_mapping_does_not(tmp_path):
    """64 MB of tokens read in batches: the mapped reader's touched pages stay
    resident; the streamed one holds about a batch at a time."""
    store = FeatureStore(tmp_path)
    n, length, dim, batch = 1024, 128, 256, 32
    with TokenWriter(store, "big", dim=dim, num_prefix=0, shard_bytes=16 << 20) as writer:
        for first in range(0, n, batch):
            block = np.full((batch, length, dim), first, np.float32)
            writer.write(np.zeros((batch, 0, dim)), list(block))
    growth = {}
    for stream in (True, False):
        reader, start, peak = open_tokens(store, "big", stream=stream), _rss_bytes(), 0
        for first in range(0, n, batch):
            got = reader.gather(np.arange(first, first + batch))
            assert got.local[0, 0, 0] == first
            peak = max(peak, _rss_bytes() - start)
        growth[stream] = peak
        del reader, got
    print(f"resident growth while reading 64 MB: streamed {growth[True] >> 20} MB, mapped {growth[False] >> 20} MB")
    assert growth[True] < 24 << 20, growth  # a few 4 MB float32 batches
    assert growth[False] > 32 << 20, growth  # the touched 64 MB count (unless evicted under pressure)
