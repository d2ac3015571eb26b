"""GGUF block types: the fold, the quantizers, and their agreement with the gguf library's dequantizers."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gguf")

from gainsurgery.formats.gguf import quants as Q  # noqa: E402

SIZES = {t: Q.block_sizes(t) for t in [*Q.CODECS, *Q.SCALE_FIELDS]}


def weights(rows: int = 8, cols: int = 512, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    x[1] = 0.0                            # an all-zero row
    x[2, :32] = 0.5                       # an outlier block
    x[3] = np.abs(x[3])                   # all positive (affine types: min > 0)
    return x


@pytest.mark.parametrize("qtype", sorted(Q.CODECS))
def test_codecs_pack_what_the_library_unpacks(qtype):
    """Our levels and scales, packed, are what gguf's dequantizer reads; our own reading agrees bit for bit."""
    x = weights()
    out, sat = Q.encode(x, qtype)
    assert not sat
    block, size = SIZES[qtype]
    assert out.shape == (x.shape[0], x.shape[1] // block * size)
    import gguf

    lib = np.asarray(gguf.quants.dequantize(out, gguf.GGMLQuantizationType[qtype])).reshape(x.shape)
    assert np.array_equal(Q.dequantize(out, qtype, x.shape[1]), lib)  # our fast path is the library's values
    codec = Q.CODECS[qtype]
    params, levels = codec.unpack(out.reshape(-1, size))
    assert np.array_equal(codec.values(params, levels).reshape(lib.shape), lib)
    assert np.array_equal(codec.pack(params, levels), out.reshape(-1, size))
    assert levels.min() >= codec.lo and levels.max() <= codec.hi
    # Every weight whose level was not clamped lies within half a step of its target.
    a = np.abs(np.repeat(params.a, codec.group, axis=1)).reshape(lib.shape)
    inside = (levels > codec.lo) & (levels < codec.hi)
    err = np.abs(lib - x)
    assert np.all(err[inside.reshape(lib.shape)] <= a[inside.reshape(lib.shape)] * 0.5001 + 1e-12)
    assert np.all(lib[1] == 0)


@pytest.mark.parametrize("qtype", sorted(Q.CODECS))
def test_our_dequantization_is_the_librarys_on_any_bytes(qtype):
    """Random bytes (with finite float16 fields) are valid blocks: our reading equals gguf's bit for bit."""
    import gguf

    block, size = SIZES[qtype]
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 256, (64, 4 * size), dtype=np.uint8)
    f16 = raw.reshape(-1, size)
    fields = [0, 2] if qtype in ("Q4_1", "Q5_1", "Q4_K", "Q5_K") else list(Q.SCALE_FIELDS[qtype])
    for off in fields:
        f16[:, off:off + 2] = rng.normal(0, 0.01, f16.shape[0]).astype("<f2").view(np.uint8).reshape(-1, 2)
    lib = np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])).reshape(64, -1)
    assert np.array_equal(Q.dequantize(raw, qtype, 4 * block), lib)


@pytest.mark.parametrize("qtype", sorted(Q.CODECS))
def test_requantizing_unchanged_weights_gives_the_same_bytes(qtype):
    x = weights(seed=1)
    out, _ = Q.encode(x, qtype)
    again, _ = Q.encode(Q.dequantize(out, qtype, x.shape[1]), qtype, old=out)
    assert np.array_equal(again, out)


@pytest.mark.parametrize("qtype", sorted(Q.CODECS))
def test_quantizers_are_as_good_as_their_bits(qtype):
    """Relative RMS error on Gaussian weights, against llama.cpp's published order of magnitude per type."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((16, 1024)) * 0.02).astype(np.float32)
    out, _ = Q.encode(x, qtype)
    rel = np.sqrt(np.mean((Q.dequantize(out, qtype, 1024) - x) ** 2)) / 0.02
    bound = {"Q2_K": 0.33, "Q3_K": 0.18, "Q4_0": 0.10, "Q4_1": 0.09, "Q4_K": 0.08, "Q5_0": 0.05, "Q5_1": 0.045,
             "Q5_K": 0.04, "Q6_K": 0.02, "Q8_0": 0.006}[qtype]
    assert rel < bound
    own, n = Q.own_error(out, qtype)
    # The uniform-rounding estimate from the steps is the measured error within a factor of 1.5.
    assert 1 / 1.5 < np.sqrt(own / n) / (rel * 0.02) < 1.5


@pytest.mark.parametrize("qtype", sorted(Q.SCALE_FIELDS))
def test_fold_scales_each_row_through_its_block_scales(qtype):
    """Every foldable type: rows scaled by s up to the f16 rounding of the scales; integers untouched."""
    block, size = SIZES[qtype]
    rng = np.random.default_rng(3)
    rows, per = 6, 2
    raw = rng.integers(0, 256, (rows, per * size), dtype=np.uint8)
    b = raw.reshape(-1, size)
    for off in Q.SCALE_FIELDS[qtype]:
        vals = rng.uniform(1e-3, 1e-2, b.shape[0]) * rng.choice([-1, 1], b.shape[0])
        b[:, off:off + 2] = vals.astype("<f2").view(np.uint8).reshape(-1, 2)
    s = rng.uniform(0.5, 2.0, rows).astype(np.float32)
    out, sat = Q.fold_rows(raw, qtype, s)
    assert not sat
    fields = np.zeros(size, bool)
    for off in Q.SCALE_FIELDS[qtype]:
        fields[off:off + 2] = True
    changed = (out.reshape(-1, size) != raw.reshape(-1, size)).any(axis=0)
    assert not changed[~fields].any(), "a quantized integer changed"
    before = Q.dequantize(raw, qtype, per * block).astype(np.float64)
    after = Q.dequantize(out, qtype, per * block).astype(np.float64)
    # Each block is a sum of terms linear in its f16 fields: the error is at most 2^-11 of each term.
    terms = np.abs(before) if len(Q.SCALE_FIELDS[qtype]) == 1 else None
    err = np.abs(after - before * s[:, None])
    if terms is not None:
        assert np.all(err <= terms * s[:, None] * 2.0 ** -10 + 1e-12)
    else:
        scale = np.abs(before).max(axis=1, keepdims=True) * s[:, None]
        assert np.all(err <= scale * 2.0 ** -9)
    assert err.max() > 0 or np.all(before == 0)


def test_fold_reports_scales_that_leave_float16():
    block, size = SIZES["Q8_0"]
    raw = np.zeros((2, size), np.uint8)
    raw[:, 0:2] = np.array([60000.0, 1e-7], "<f2").view(np.uint8).reshape(2, 2)
    raw[:, 2:] = 1
    out, sat = Q.fold_rows(raw, "Q8_0", np.array([2.0, 1e-4], np.float32))
    assert sat.became_inf == block and sat.became_zero == block


def test_promotion_ladders():
    assert Q.promotion_ladder("Q4_K", 1024) == ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16", "F32"]
    assert Q.promotion_ladder("Q5_0", 640) == ["Q5_0", "Q5_1", "Q8_0", "F16", "F32"]
    assert Q.promotion_ladder("IQ4_XS", 1024) == ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16", "F32"]
    assert Q.promotion_ladder("Q8_0", 64) == ["Q8_0", "F16", "F32"]


def test_float_types_round_to_nearest_even_once():
    # Ties (exactly half a bfloat16 step) go to the even neighbour: 1 + 2^-8 -> 1, 1 + 3*2^-8 -> 1 + 2^-6.
    x = np.array([[1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, 70000.0, 1e-9]], np.float32)
    bf, sat = Q.encode(x, "BF16")
    assert Q.dequantize(bf, "BF16", 4)[0, :2].tolist() == [1.0, 1.0 + 2.0 ** -6] and not sat
    f16, sat = Q.encode(x, "F16")
    assert sat.became_inf == 1 and sat.became_zero == 1


def test_k_quant_quantizers_match_llama_cpp(tmp_path):
    """Our K-quant quantizers against llama.cpp's own (through llama-cpp-python), on the same float weights:
    RMS errors within 3%, per type."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    import gguf

    from gguf_models import tiny_model, write_gguf

    src = write_gguf(tiny_model("llama", kv_heads=2, seed=3, intermediate_size=1024), tmp_path / "f32.gguf",
                     types=(), default="F32")
    floats = {t.name: np.asarray(t.data, np.float32) for t in gguf.GGUFReader(src).tensors}
    seen: dict[str, list[float]] = {}
    for ftype in (10, 12, 15, 17, 18):  # Q2_K, Q3_K_M, Q4_K_M, Q5_K_M, Q6_K
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = ftype, 2
        out = tmp_path / f"q{ftype}.gguf"
        assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) == 0
        for t in gguf.GGUFReader(out).tensors:
            qtype = t.tensor_type.name
            if not qtype.endswith("_K"):
                continue
            x = floats[t.name].reshape(-1, int(t.shape[0]))
            theirs = Q.dequantize(np.asarray(t.data), qtype, x.shape[1])
            ours = Q.dequantize(Q.encode(x, qtype)[0], qtype, x.shape[1])
            seen.setdefault(qtype, []).append(np.sqrt(np.mean((ours - x) ** 2) / np.mean((theirs - x) ** 2)))
    assert set(seen) == {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
    for qtype, ratios in seen.items():
        assert 0.9 < min(ratios) and max(ratios) < 1.03, (qtype, ratios)
