"""The module's constants, errors and row codecs, against the C header and independent references."""

import pathlib
import re

import numpy as np
import pytest

import kvc
import reference

SOURCE_DIR = pathlib.Path(__file__).resolve().parents[2]


def test_constants_are_the_c_api_numbers():
    header = (SOURCE_DIR / "include" / "kvc" / "kvc.h").read_text()
    numbers = dict(re.findall(r"\b(KVC_(?:STREAM|LAYER)_[A-Z_]+) = (\d+)", header))
    assert len(numbers) == 10
    for name, value in numbers.items():
        assert getattr(kvc, name[len("KVC_"):]) == int(value), name
    assert (kvc.HEAD_DIM, kvc.INDEX_DIM, kvc.KV_ROW_BYTES, kvc.INDEX_KEY_BYTES) == (512, 128, 584, 68)


def test_kvc_error_carries_message_and_code():
    assert issubclass(kvc.Error, Exception) and not issubclass(kvc.Error, ValueError)
    with pytest.raises(kvc.Error, match='unknown preset "v5-ultra"') as error:
        kvc.Cache("v5-ultra")
    assert error.value.code == "NOT_FOUND" and error.value.errno == 0
    with pytest.raises(kvc.Error) as error:
        kvc.Cache("v4-flash", rollback_depth=-1)
    assert error.value.code == "INVALID_ARGUMENT"


def bf16_samples(rng):
    """Several distributions: normal, wide exponents, exact ties of both parities,
    halfway-plus-one, subnormals, the overflow boundary, specials."""
    normal = rng.standard_normal(4096).astype(np.float32)
    wide = (rng.choice([-1.0, 1.0], 4096) * rng.uniform(1, 2, 4096) * np.exp2(rng.integers(-140, 128, 4096))).astype(np.float32)
    upper = rng.integers(0, 1 << 16, 4096, dtype=np.uint32) << 16
    ties = (upper | 0x8000).view(np.float32)  # exactly halfway: even and odd upper halves
    above = (upper | 0x8001).view(np.float32)
    below = (upper | 0x7FFF).view(np.float32)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 3.3895314e38, 3.4028235e38, -3.4e38,
                         1e-45, -1e-45, 1.1754942e-38], dtype=np.float32)
    return np.concatenate([normal, wide, ties, above, below, specials])


def test_to_bf16_rounds_to_nearest_even():
    values = bf16_samples(np.random.default_rng(1))
    got = kvc.to_bf16(values)
    assert got.dtype == np.uint16 and got.shape == values.shape
    np.testing.assert_array_equal(got, reference.bf16_round_nearest_even(values))
    # Any shape; from_bf16 is exact.
    grid = values[:24].reshape(2, 3, 4)
    np.testing.assert_array_equal(kvc.to_bf16(grid), reference.bf16_round_nearest_even(grid))
    np.testing.assert_array_equal(kvc.from_bf16(got).view(np.uint32), reference.bf16_to_float(got).view(np.uint32))


@pytest.mark.parametrize("scale", [1.0, 1e-3, 300.0])
def test_kv_rows_quantize_within_fp8_bounds(scale):
    rng = np.random.default_rng(2)
    values = (scale * rng.standard_normal((37, 512))).astype(np.float32)
    values[3, :64] = 0.0  # an all-zero block
    rows = kvc.quantize_kv_rows(values)
    assert rows.dtype == np.uint8 and rows.shape == (37, 584)
    assert (rows[:, 583] == 0).all()  # the padding byte
    decoded = reference.dequantize_kv_rows(rows)
    np.testing.assert_array_equal(kvc.dequantize_kv_rows(rows), decoded.astype(np.float32))
    x = reference.bf16_to_float(kvc.to_bf16(values)).astype(np.float64)
    # RoPE dims are the bf16 values verbatim; FP8 dims within half an E4M3 step of their block.
    np.testing.assert_array_equal(decoded[:, 448:], x[:, 448:])
    block_scale = np.repeat(reference.ue8m0_value(rows[:, 576:583]), 64, axis=1)
    assert (np.abs(x[:, :448]) <= 448 * block_scale).all()
    bound = 2.0 ** -4 * np.abs(x[:, :448]) + 2.0 ** -10 * block_scale
    assert (np.abs(decoded[:, :448] - x[:, :448]) <= bound).all()
    # uint16 input is taken as bf16 bits: the same rows.
    np.testing.assert_array_equal(kvc.quantize_kv_rows(kvc.to_bf16(values)), rows)


def test_index_keys_hold_the_hadamard_transform():
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((20, 128)).astype(np.float32)
    packed = kvc.quantize_index_keys(keys)
    assert packed.shape == (20, 68)
    decoded = kvc.dequantize_index_keys(packed)
    transformed = reference.bf16_to_float(kvc.to_bf16(keys)).astype(np.float64) @ reference.hadamard().T
    # E2M1 (0, 0.5, ... 4, 6) under a power-of-two block scale: within a third of the block's amax.
    for block in range(4):
        part = slice(32 * block, 32 * block + 32)
        amax = np.abs(transformed[:, part]).max(axis=1, keepdims=True)
        assert (np.abs(decoded[:, part] - transformed[:, part]) <= amax / 3 + 1e-6).all()
    assert np.corrcoef(decoded.ravel(), transformed.ravel())[0, 1] > 0.97


@pytest.mark.parametrize("bad", [
    np.zeros((4, 512), np.float64),
    np.zeros((4, 512), np.int16),
    np.zeros((4, 511), np.float32),
    np.zeros(512, np.float32),
    np.zeros((4, 1024), np.float32)[:, ::2],
    np.zeros((4, 512), ">f4"),
    [[0.0] * 512],
])
def test_codecs_refuse_malformed_arrays(bad):
    with pytest.raises(ValueError, match="rows: expected"):
        kvc.quantize_kv_rows(bad)


def test_unaligned_arrays_are_refused_not_copied():
    buffer = np.zeros(512 * 4 + 1, np.uint8)
    unaligned = buffer[1:].view(np.float32).reshape(1, 512)
    assert not unaligned.flags.aligned
    with pytest.raises(ValueError, match="unaligned"):
        kvc.quantize_kv_rows(unaligned)
    with pytest.raises(ValueError, match="values: expected"):
        kvc.to_bf16(np.zeros(3, np.float64))
