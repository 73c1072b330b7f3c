"""kvc.Cache from Python: sequences, appends, refusals, and the page contract
(page arrays, block tables, selection indices) checked through the layout
formulas of docs/layout.md and independent references."""

import errno
import gc
import os
import weakref

import numpy as np
import pytest

import kvc
import reference
from conftest import (CSA_LAYER, HCA_LAYER, WINDOW_LAYER, append_tokens, layer_inputs, read_stream_through_pages,
                      rows_through_pages)


def test_presets_and_config():
    flash, pro = kvc.Cache("v4-flash"), kvc.Cache("v4-pro")
    assert (flash.num_layers, pro.num_layers) == (43, 61)
    # Spec §1: Flash [0, 0] + [4, 128] x 20 + [4]; Pro [128, 128] + [4, 128] x 29 + [4].
    W, C, H = kvc.LAYER_WINDOW, kvc.LAYER_CSA, kvc.LAYER_HCA
    assert flash.layer_kinds == [W, W] + [C, H] * 20 + [C]
    assert pro.layer_kinds == [H, H] + [C, H] * 29 + [C]
    assert [flash.compress_ratio(layer) for layer in (0, 2, 3)] == [0, 4, 128]
    assert (flash.window, flash.index_topk, pro.index_topk) == (128, 512, 1024)


def test_from_config(tiny_config):
    cache = kvc.Cache.from_config(tiny_config)
    assert cache.layer_kinds == [kvc.LAYER_WINDOW, kvc.LAYER_CSA, kvc.LAYER_HCA]
    assert (cache.index_topk, cache.max_context, cache.index_heads) == (8, 8192, 8)
    assert kvc.Cache.from_config(str(tiny_config)).num_layers == 3
    with pytest.raises(kvc.Error) as error:
        kvc.Cache.from_config(tiny_config.parent / "missing.json")
    assert "missing.json" in str(error.value)


def test_sequence_lifecycle(tiny):
    rng = np.random.default_rng(10)
    seq = tiny.create_sequence()
    for layer in range(tiny.num_layers):
        append_tokens(tiny, seq, layer, 300, rng)
    assert tiny.length(seq) == 300 and tiny.length(seq, 1) == 300
    assert tiny.rollback_floor(seq) == 300 - tiny.rollback_depth
    assert tiny.stream_rows(seq, CSA_LAYER, kvc.STREAM_CSA_ROWS) == 75
    assert tiny.stream_rows(seq, HCA_LAYER, kvc.STREAM_HCA_ROWS) == 2
    assert tiny.stream_rows(seq, WINDOW_LAYER, kvc.STREAM_WINDOW) == 128

    branch = tiny.fork(seq)
    assert branch != seq and tiny.length(branch) == 300
    # History is shared (the same page ids), state is copied (new ids, same bytes).
    np.testing.assert_array_equal(tiny.block_table(branch, kvc.STREAM_CSA_ROWS), tiny.block_table(seq, kvc.STREAM_CSA_ROWS))
    assert set(tiny.block_table(branch, kvc.STREAM_WINDOW)).isdisjoint(tiny.block_table(seq, kvc.STREAM_WINDOW))
    for stream, layer in [(kvc.STREAM_WINDOW, 0), (kvc.STREAM_CSA_ROWS, 1), (kvc.STREAM_CSA_KEYS, 1), (kvc.STREAM_HCA_ROWS, 2)]:
        np.testing.assert_array_equal(read_stream_through_pages(tiny, branch, layer, stream),
                                      read_stream_through_pages(tiny, seq, layer, stream))

    tiny.truncate(branch, 290)
    assert tiny.length(branch) == 290 and tiny.length(seq) == 300
    assert tiny.stream_rows(branch, CSA_LAYER, kvc.STREAM_CSA_ROWS) == 72
    with pytest.raises(kvc.Error) as error:
        tiny.truncate(branch, 100)  # below the rollback floor
    assert error.value.code == "FAILED_PRECONDITION"

    tiny.free(branch)
    with pytest.raises(kvc.Error) as error:
        tiny.length(branch)
    assert error.value.code == "NOT_FOUND"
    assert tiny.create_sequence() not in (seq, branch)  # ids are never reused


def test_length_of_a_sequence_mid_step(tiny):
    seq = tiny.create_sequence()
    append_tokens(tiny, seq, 0, 5, np.random.default_rng(0))
    with pytest.raises(kvc.Error, match="different lengths") as error:
        tiny.length(seq)
    assert error.value.code == "FAILED_PRECONDITION"
    assert (tiny.length(seq, 0), tiny.length(seq, 1)) == (5, 0)


def state_of(cache, seqs):
    """Everything a refused call must leave as it was."""
    state = [cache.usage()]
    for seq in seqs:
        for layer in range(cache.num_layers):
            state.append(cache.length(seq, layer))
            for stream in range(kvc.NUM_STREAMS):
                if layer not in cache.page_geometry(stream)["layers"]:
                    continue
                if stream >= kvc.STREAM_CSA_STATE:  # compressor state: the sequence's page
                    state.append(cache.layer_pages(layer, stream)[cache.block_table(seq, stream)].tobytes())
                else:
                    state.append(cache.read_rows(seq, layer, stream).tobytes())
    return state


def test_refused_calls_change_nothing(tiny):
    rng = np.random.default_rng(11)
    seq = tiny.create_sequence()
    for layer in range(tiny.num_layers):
        append_tokens(tiny, seq, layer, 140, rng)
    before = state_of(tiny, [seq])
    rows, projections = layer_inputs(tiny, CSA_LAYER, 9, rng)
    nan_rows = rows.copy()
    nan_rows[4, 7] = np.nan
    kvc_refusals = [
        lambda: tiny.append(seq, CSA_LAYER, 141, rows, **projections),           # a gap
        lambda: tiny.append(seq, CSA_LAYER, 139, rows, **projections),           # a repeat
        lambda: tiny.append(seq, CSA_LAYER, 140, nan_rows, **projections),       # a NaN in the 5th row
        lambda: tiny.append(seq, CSA_LAYER, 140, rows),                          # projections missing
        lambda: tiny.append(seq, WINDOW_LAYER, 140, rows, **projections),        # projections on a window layer
        lambda: tiny.append(seq, 3, 140, rows),                                  # no such layer
        lambda: tiny.append(seq + 100, CSA_LAYER, 0, rows, **projections),       # no such sequence
        lambda: tiny.truncate(seq, 3),
        lambda: tiny.truncate(seq, 141),
        lambda: tiny.append_rows(seq, CSA_LAYER, kvc.STREAM_CSA_ROWS, 35, np.zeros((1, 584), np.uint8)),
        lambda: tiny.block_table(seq, 7),
        lambda: tiny.layer_pages(WINDOW_LAYER, kvc.STREAM_CSA_ROWS),
    ]
    for call in kvc_refusals:
        with pytest.raises(kvc.Error):
            call()
    value_errors = [
        lambda: tiny.append(seq, CSA_LAYER, 140, rows.astype(np.float64), **projections),
        lambda: tiny.append(seq, CSA_LAYER, 140, rows, **{**projections, "compressor_kv": projections["compressor_kv"][:, :1000]}),
        lambda: tiny.append(seq, CSA_LAYER, 140, rows, **{**projections, "indexer_kv": projections["indexer_kv"][:8]}),
    ]
    for call in value_errors:
        with pytest.raises(ValueError):
            call()
    assert state_of(tiny, [seq]) == before
    # And the same call, well-formed, goes through.
    tiny.append(seq, CSA_LAYER, 140, rows, **projections)
    assert tiny.length(seq, CSA_LAYER) == 149


MALFORMED_ROWS = [
    (np.zeros((2, 512), np.float64), "float64"),
    (np.zeros((2, 512), np.float16), "float16"),
    (np.zeros((2, 512), np.int16), "int16"),
    (np.zeros((2, 513), np.float32), r"\(2, 513\)"),
    (np.zeros(512, np.float32), r"\(512,\)"),
    (np.zeros((2, 1, 512), np.float32), r"\(2, 1, 512\)"),
    (np.zeros((2, 1024), np.float32)[:, ::2], "non-contiguous"),
    (np.asfortranarray(np.zeros((3, 512), np.float32)), "non-contiguous"),
    (np.zeros((2, 512), ">f4"), ">f4"),
    (np.zeros((2, 512), ">u2"), ">u2"),
    ([[0.0] * 512] * 2, "a list"),
    (None, "a NoneType"),
]


@pytest.mark.parametrize("rows, given", MALFORMED_ROWS)
def test_malformed_rows_are_refused_naming_them(tiny, rows, given):
    seq = tiny.create_sequence()
    with pytest.raises(ValueError, match=r"rows: expected .*float32.*uint16.*\(n, 512\); got .*" + given):
        tiny.append(seq, WINDOW_LAYER, 0, rows)
    with pytest.raises(ValueError, match="rows: expected"):
        tiny.append_compressed_rows(seq, CSA_LAYER, 0, rows)
    assert tiny.length(seq, WINDOW_LAYER) == 0


@pytest.mark.parametrize("rows", [np.zeros((1, 583), np.uint8), np.zeros((1, 584), np.uint16), np.zeros((1, 68), np.uint8),
                                  np.zeros(584, np.uint8), np.zeros((2, 1168), np.uint8)[:, ::2]])
def test_malformed_ready_made_rows_are_refused(tiny_byo, rows):
    seq = tiny_byo.create_sequence()
    with pytest.raises(ValueError, match=r"rows: expected a C-contiguous numpy.uint8 array of shape \(n, 584\)"):
        tiny_byo.append_rows(seq, CSA_LAYER, kvc.STREAM_CSA_ROWS, 0, rows)


def test_float32_rows_round_to_nearest_even_and_uint16_rows_are_bits(tiny):
    rng = np.random.default_rng(12)
    rows = rng.standard_normal((130, 512)).astype(np.float32)
    # RoPE dims (stored as bf16 verbatim) at exact ties, both parities, and just past them.
    upper = (rng.integers(0, 0x7F00, (130, 64), dtype=np.uint32) | (rng.integers(0, 2, (130, 64), dtype=np.uint32) << 15)) << 16
    rows[:, 448:] = (upper | np.where(rng.random((130, 64)) < 0.5, 0x8000, 0x8001).astype(np.uint32)).view(np.float32)
    a, b, c = tiny.create_sequence(), tiny.create_sequence(), tiny.create_sequence()
    tiny.append(a, WINDOW_LAYER, 0, rows)
    tiny.append(b, WINDOW_LAYER, 0, reference.bf16_round_nearest_even(rows))
    truncated = (rows.view(np.uint32) >> 16).astype(np.uint16)
    tiny.append(c, WINDOW_LAYER, 0, truncated)
    stored_a = tiny.read_rows(a, WINDOW_LAYER, kvc.STREAM_WINDOW)
    # Ring slot s = position mod 128 holds the latest position with that slot.
    latest = np.array([p if p >= 2 else p + 128 for p in range(128)])
    np.testing.assert_array_equal(stored_a[:, 448:576].copy().view("<u2"),
                                  reference.bf16_round_nearest_even(rows[latest, 448:]))
    np.testing.assert_array_equal(stored_a, tiny.read_rows(b, WINDOW_LAYER, kvc.STREAM_WINDOW))
    assert (stored_a != tiny.read_rows(c, WINDOW_LAYER, kvc.STREAM_WINDOW)).any()  # truncation would differ


def test_layer_pages_are_zero_copy_and_show_later_writes(tiny):
    rng = np.random.default_rng(13)
    pages = tiny.layer_pages(CSA_LAYER, kvc.STREAM_CSA_ROWS)  # taken before anything is written
    info = tiny.page_array(CSA_LAYER, kvc.STREAM_CSA_ROWS)
    assert isinstance(pages, kvc.PageView) and isinstance(pages, np.ndarray)
    assert pages.dtype == np.uint8 and pages.shape == (info["num_pages"], info["page_bytes"]) == (pages.shape[0], 37440)
    assert pages.__array_interface__["data"][0] == info["base"]
    assert not pages.flags.writeable
    with pytest.raises(ValueError):
        pages[0, 0] = 1
    again = tiny.layer_pages(CSA_LAYER, kvc.STREAM_CSA_ROWS)
    assert np.shares_memory(pages, again)

    seq = tiny.create_sequence()
    append_tokens(tiny, seq, CSA_LAYER, 400, rng)  # 100 CSA entries: two pages
    stored = tiny.read_rows(seq, CSA_LAYER, kvc.STREAM_CSA_ROWS)
    assert stored.shape == (100, 584) and stored.any()
    ids = tiny.block_table(seq, kvc.STREAM_CSA_ROWS)
    assert ids.dtype == np.int32 and len(ids) == 2
    np.testing.assert_array_equal(rows_through_pages(pages, ids, np.arange(100), 64, 576, 8), stored)


def test_a_page_view_keeps_its_cache_alive(tiny_config):
    cache = kvc.Cache.from_config(tiny_config)
    seq = cache.create_sequence()
    cache.append(seq, 0, 0, np.ones((3, 512), np.float32))
    view = cache.layer_pages(0, kvc.STREAM_WINDOW)
    alive = weakref.ref(cache)
    ids = cache.block_table(seq, kvc.STREAM_WINDOW)
    del cache
    gc.collect()
    assert alive() is not None
    row = rows_through_pages(view, ids, [2], 64, 576, 8)
    np.testing.assert_array_equal(reference.dequantize_kv_rows(row), np.ones((1, 512)))
    del view
    gc.collect()
    assert alive() is None


def test_page_views_export_dlpack(tiny):
    seq = tiny.create_sequence()
    view = tiny.layer_pages(WINDOW_LAYER, kvc.STREAM_WINDOW)
    exported = np.from_dlpack(view)
    assert exported.__array_interface__["data"][0] == view.__array_interface__["data"][0]
    assert exported.shape == view.shape and exported.dtype == np.uint8
    part = np.from_dlpack(view[1:3, 576:1152])
    assert part.__array_interface__["data"][0] == view[1:3, 576:1152].__array_interface__["data"][0]
    tiny.append(seq, WINDOW_LAYER, 0, np.full((1, 512), 2.0, np.float32))
    ids = tiny.block_table(seq, kvc.STREAM_WINDOW)
    row = rows_through_pages(exported, ids, [0], 64, 576, 8)  # the export shows the write
    np.testing.assert_array_equal(reference.dequantize_kv_rows(row), np.full((1, 512), 2.0))
    assert not view.flags.writeable  # exporting did not make the view writable


def test_page_views_to_torch():
    torch = pytest.importorskip("torch")
    cache = kvc.Cache("v4-flash")
    view = cache.layer_pages(0, kvc.STREAM_WINDOW)
    tensor = torch.from_dlpack(view)
    assert tensor.data_ptr() == view.__array_interface__["data"][0] and tuple(tensor.shape) == view.shape


def test_block_tables_of_a_batch(tiny):
    rng = np.random.default_rng(14)
    seqs = []
    for tokens in (0, 100, 300, 700):
        seq = tiny.create_sequence()
        for layer in range(tiny.num_layers):
            append_tokens(tiny, seq, layer, tokens, rng)
        seqs.append(seq)
    seqs.append(tiny.fork(seqs[2]))  # shares seqs[2]'s pages
    dense = tiny.batch_block_tables(seqs, kvc.STREAM_CSA_ROWS)
    tables = [tiny.block_table(s, kvc.STREAM_CSA_ROWS) for s in seqs]
    rows = [tiny.stream_rows(s, CSA_LAYER, kvc.STREAM_CSA_ROWS) for s in seqs]
    assert rows == [0, 25, 75, 175, 75]
    assert [len(t) for t in tables] == [0, 1, 2, 3, 2]  # ceil(rows / 64)
    assert dense.ids.dtype == np.int32 and dense.ids.shape == (5, 3) and dense.max_blocks == 3
    for b, table in enumerate(tables):
        np.testing.assert_array_equal(dense.ids[b, :len(table)], table)
        assert (dense.ids[b, len(table):] == -1).all()
    np.testing.assert_array_equal(dense.blocks, [len(t) for t in tables])
    np.testing.assert_array_equal(dense.rows, rows)

    csr = tiny.batch_block_tables_csr(seqs, kvc.STREAM_CSA_ROWS)
    np.testing.assert_array_equal(csr.indptr, np.concatenate([[0], np.cumsum([len(t) for t in tables])]))
    np.testing.assert_array_equal(csr.indices, np.concatenate(tables))
    np.testing.assert_array_equal(csr.last_page_len, [0, 25, 11, 47, 11])
    with pytest.raises(kvc.Error) as error:
        tiny.batch_block_tables_csr(seqs, kvc.STREAM_WINDOW)
    assert error.value.code == "INVALID_ARGUMENT"


def test_rows_and_keys_through_pages_equal_the_stored_ones(tiny):
    rng = np.random.default_rng(15)
    seq = tiny.create_sequence()
    for layer in range(tiny.num_layers):
        append_tokens(tiny, seq, layer, 1000, rng)
    for layer, stream, count in [(CSA_LAYER, kvc.STREAM_CSA_ROWS, 250), (CSA_LAYER, kvc.STREAM_CSA_KEYS, 250),
                                 (HCA_LAYER, kvc.STREAM_HCA_ROWS, 7), (WINDOW_LAYER, kvc.STREAM_WINDOW, 128)]:
        through_pages = read_stream_through_pages(tiny, seq, layer, stream)
        assert through_pages.shape[0] == count
        np.testing.assert_array_equal(through_pages, tiny.read_rows(seq, layer, stream))
    # The window ring, dequantized, is read_window's (bf16) content.
    ring = read_stream_through_pages(tiny, seq, WINDOW_LAYER, kvc.STREAM_WINDOW)
    np.testing.assert_array_equal(kvc.from_bf16(tiny.read_window(seq, WINDOW_LAYER)), kvc.dequantize_kv_rows(ring))


def test_engine_brings_rows_and_keys(tiny_byo):
    rng = np.random.default_rng(16)
    seq = tiny_byo.create_sequence()
    for layer in range(3):
        tiny_byo.append(seq, layer, 0, rng.standard_normal((260, 512)).astype(np.float32))  # 65 CSA windows closed
    ready = kvc.quantize_kv_rows(rng.standard_normal((40, 512)).astype(np.float32))
    tiny_byo.append_rows(seq, CSA_LAYER, kvc.STREAM_CSA_ROWS, 0, ready)
    entries = (3 * rng.standard_normal((25, 512))).astype(np.float32)
    tiny_byo.append_compressed_rows(seq, CSA_LAYER, 40, entries)
    keys = kvc.quantize_index_keys(rng.standard_normal((65, 128)).astype(np.float32))
    tiny_byo.append_rows(seq, CSA_LAYER, kvc.STREAM_CSA_KEYS, 0, keys)
    with pytest.raises(kvc.Error) as error:
        tiny_byo.append_rows(seq, CSA_LAYER, kvc.STREAM_CSA_ROWS, 65, ready[:1])  # no 66th window yet
    assert error.value.code == "OUT_OF_RANGE"
    with pytest.raises(kvc.Error) as error:
        tiny_byo.append_compressed_rows(seq, HCA_LAYER, 0, entries[:3])  # 260 tokens close 2 HCA windows
    assert error.value.code == "OUT_OF_RANGE"
    rows = read_stream_through_pages(tiny_byo, seq, CSA_LAYER, kvc.STREAM_CSA_ROWS)
    np.testing.assert_array_equal(rows[:40], ready)  # byte for byte
    decoded = reference.dequantize_kv_rows(rows[40:])
    x = reference.bf16_to_float(reference.bf16_round_nearest_even(entries)).astype(np.float64)
    block_scale = np.repeat(reference.ue8m0_value(rows[40:, 576:583]), 64, axis=1)
    assert (np.abs(decoded[:, :448] - x[:, :448]) <= 2.0 ** -4 * np.abs(x[:, :448]) + 2.0 ** -10 * block_scale).all()
    np.testing.assert_array_equal(decoded[:, 448:], x[:, 448:])
    np.testing.assert_array_equal(read_stream_through_pages(tiny_byo, seq, CSA_LAYER, kvc.STREAM_CSA_KEYS), keys)


def test_append_rows_refuses_a_row_kvc_could_not_have_written(tiny_byo):
    seq = tiny_byo.create_sequence()
    tiny_byo.append(seq, CSA_LAYER, 0, np.ones((8, 512), np.float32))
    rows = kvc.quantize_kv_rows(np.ones((2, 512), np.float32))
    rows[1, 10] = 0x7F  # a NaN E4M3 code
    with pytest.raises(kvc.Error, match="row 1") as error:
        tiny_byo.append_rows(seq, CSA_LAYER, kvc.STREAM_CSA_ROWS, 0, rows)
    assert error.value.code == "INVALID_ARGUMENT"
    assert tiny_byo.stream_rows(seq, CSA_LAYER, kvc.STREAM_CSA_ROWS) == 0


def index_query(cache, position, rng):
    heads = cache.index_heads
    q_raw = kvc.to_bf16(rng.standard_normal((heads, 128)).astype(np.float32))
    weights = np.full(heads, 128 ** -0.5 * heads ** -0.5, np.float32) * rng.uniform(0.5, 1.5, heads).astype(np.float32)
    return cache.prepare_index_query(position, q_raw, weights)


@pytest.mark.parametrize("tokens", [1, 200, 1000, 1001])
def test_selection_as_indices_into_page_arrays(tiny, tokens):
    rng = np.random.default_rng(17 + tokens)
    seq = tiny.create_sequence()
    for layer in range(tiny.num_layers):
        append_tokens(tiny, seq, layer, tokens, rng)
    t = tokens - 1
    window_positions = np.arange(max(0, t - 127), t + 1)
    ring_ids = tiny.block_table(seq, kvc.STREAM_WINDOW)
    slots = window_positions % 128
    expected_window = ring_ids[slots // 64] * 64 + slots % 64
    query = index_query(tiny, t, rng)

    for layer, stream in [(WINDOW_LAYER, None), (HCA_LAYER, kvc.STREAM_HCA_ROWS), (CSA_LAYER, kvc.STREAM_CSA_ROWS)]:
        chosen = tiny.select(seq, layer, query if layer == CSA_LAYER else None, gather=True)
        assert chosen.position == t
        assert chosen.window_indices.dtype == np.int32 and chosen.compressed_indices.dtype == np.int32
        np.testing.assert_array_equal(chosen.window_indices, expected_window)
        if stream is None:
            entries = np.array([], np.int64)
        elif stream == kvc.STREAM_HCA_ROWS:
            entries = np.arange((t + 1) // 128)  # every visible entry
        else:
            scores = tiny.index_scores(seq, layer, query)
            assert scores.dtype == np.float32 and len(scores) == (t + 1) // 4
            order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))  # ties to the lower entry
            entries = np.sort(np.array(order[:min(tiny.index_topk, len(scores))], np.int64))
        if stream is not None:
            ids = tiny.block_table(seq, stream)
            np.testing.assert_array_equal(chosen.compressed_indices, ids[entries // 64] * 64 + entries % 64)
        np.testing.assert_array_equal(chosen.indices, np.concatenate([slots, 128 + entries]))
        # The gathered rows are the page arrays' rows at those indices.
        window_rows = rows_through_pages(tiny.layer_pages(layer, kvc.STREAM_WINDOW), np.arange(1 << 20),
                                         chosen.window_indices, 64, 576, 8)
        parts = [window_rows]
        if stream is not None:
            parts.append(rows_through_pages(tiny.layer_pages(layer, stream), np.arange(1 << 20),
                                            chosen.compressed_indices, 64, 576, 8))
        np.testing.assert_array_equal(chosen.rows, reference.dequantize_kv_rows(np.concatenate(parts)).astype(np.float32))
    with pytest.raises(kvc.Error):
        tiny.select(seq, CSA_LAYER)  # a CSA layer needs a query


def test_index_query_arguments_are_checked(tiny):
    with pytest.raises(ValueError, match="q_raw: expected a C-contiguous numpy.uint16"):
        tiny.prepare_index_query(0, np.zeros((8, 128), np.float32), np.ones(8, np.float32))
    with pytest.raises(ValueError, match=r"weights: expected .*\(8,\)"):
        tiny.prepare_index_query(0, np.zeros((8, 128), np.uint16), np.ones(7, np.float32))
    with pytest.raises(kvc.Error) as error:
        tiny.prepare_index_query(1 << 20, np.zeros((8, 128), np.uint16), np.ones(8, np.float32))
    assert error.value.code == "OUT_OF_RANGE"
    assert tiny.prepare_index_query(5, np.zeros((8, 128), np.uint16), np.ones(8, np.float32)).heads == 8


def test_snapshots_round_trip(tiny, tiny_config, tmp_path):
    rng = np.random.default_rng(18)
    seqs = [tiny.create_sequence() for _ in range(2)]
    for seq, tokens in zip(seqs, (300, 520)):
        for layer in range(tiny.num_layers):
            append_tokens(tiny, seq, layer, tokens, rng)
    path = tmp_path / "s.kvcsnap"
    stats = tiny.save_snapshot(path)
    assert stats["rewrote"] and stats["file_bytes"] == path.stat().st_size and stats["directory_sync"] is None
    for layer in range(tiny.num_layers):
        append_tokens(tiny, seqs[1], layer, 8, rng)
    again = tiny.save_snapshot(path, [seqs[1], seqs[0]])
    assert not again["rewrote"] and again["rows_reused"] > 0
    info = kvc.verify_snapshot(path)
    assert info["saves"] == 2 and info["layer_kinds"] == "WCH"
    assert [s["layers"][1]["compressed_rows"] for s in info["sequences"]] == [132, 75]

    other = kvc.Cache.from_config(tiny_config, params=__import__("conftest").tiny_params(seed=3))
    restored = other.restore_snapshot(path)
    assert len(restored) == 2
    for old, new in zip([seqs[1], seqs[0]], restored):
        assert other.length(new) == tiny.length(old)
        for layer, stream in [(0, kvc.STREAM_WINDOW), (1, kvc.STREAM_CSA_ROWS), (1, kvc.STREAM_CSA_KEYS),
                              (2, kvc.STREAM_HCA_ROWS)]:
            np.testing.assert_array_equal(read_stream_through_pages(other, new, layer, stream),
                                          read_stream_through_pages(tiny, old, layer, stream))

    different = kvc.Cache.from_config(tiny_config)  # no compressor parameters: another model
    with pytest.raises(kvc.Error) as error:
        different.restore_snapshot(path)
    assert error.value.code == "FAILED_PRECONDITION"
    with pytest.raises(kvc.Error) as error:
        other.restore_snapshot(tmp_path / "absent.kvcsnap")
    assert error.value.errno == errno.ENOENT and "absent.kvcsnap" in str(error.value)
    odd_name = os.fsdecode(bytes(tmp_path / "absent") + b"-\xff.kvcsnap")  # not UTF-8: surrogate-escaped
    with pytest.raises(kvc.Error) as error:
        other.restore_snapshot(odd_name)
    assert error.value.errno == errno.ENOENT and "absent-\ufffd.kvcsnap" in str(error.value)
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0x40
    (tmp_path / "damaged.kvcsnap").write_bytes(bytes(damaged))
    usage = other.usage()
    with pytest.raises(kvc.Error) as error:
        other.restore_snapshot(tmp_path / "damaged.kvcsnap")
    assert error.value.code == "DATA_LOSS"
    assert other.usage() == usage


def test_usage(tiny):
    assert tiny.usage()["used_bytes"] == 0
    rng = np.random.default_rng(19)
    seq = tiny.create_sequence()
    append_tokens(tiny, seq, CSA_LAYER, 256, rng)
    for layer in (0, 2):
        append_tokens(tiny, seq, layer, 256, rng)
    usage = tiny.usage()
    assert usage["sequences"] == 1
    # 64 CSA entries fill one 37,440-byte page; their 64 keys one 4,352-byte page.
    assert usage["components"]["compressed rows"]["used_bytes"] == 37440 + 37440  # CSA page + HCA page
    assert usage["components"]["index keys"]["used_bytes"] == 4352
    branch = tiny.fork(seq)
    mine = tiny.sequence_usage(branch)
    assert mine["components"]["index keys"] == 4352 and mine["shared_bytes"] >= 4352 + 2 * 37440
    tiny.free(seq)
    tiny.free(branch)
    assert tiny.usage()["used_bytes"] == 0


def aligned_zeros(pages, page_bytes):
    buffer = np.zeros(pages * page_bytes + 64, np.uint8)
    start = -buffer.ctypes.data % 64
    return buffer[start:start + pages * page_bytes].reshape(pages, page_bytes)


def test_engine_arrays(tiny_config):
    geometry = kvc.page_geometry(tiny_config)
    window = geometry[kvc.STREAM_WINDOW]
    assert (window["page_bytes"], window["rows_per_page"], window["layers"]) == (37440, 64, [0, 1, 2])
    arrays = {(layer, kvc.STREAM_WINDOW): aligned_zeros(6, window["page_bytes"]) for layer in window["layers"]}
    cache = kvc.Cache.from_config(tiny_config, engine_arrays=arrays)
    seq = cache.create_sequence()
    rows = np.random.default_rng(20).standard_normal((70, 512)).astype(np.float32)
    cache.append(seq, 1, 0, rows)
    view = cache.layer_pages(1, kvc.STREAM_WINDOW)
    mine = arrays[(1, kvc.STREAM_WINDOW)]
    assert view.__array_interface__["data"][0] == mine.ctypes.data and view.shape == mine.shape
    ids = cache.block_table(seq, kvc.STREAM_WINDOW)
    np.testing.assert_array_equal(rows_through_pages(mine, ids, np.arange(70), 64, 576, 8), kvc.quantize_kv_rows(rows))
    del arrays  # the cache keeps the engine's arrays alive
    gc.collect()
    assert cache.read_rows(seq, 1, kvc.STREAM_WINDOW)[:70].tobytes() == kvc.quantize_kv_rows(rows).tobytes()

    with pytest.raises(ValueError, match="writable"):
        read_only = aligned_zeros(6, 37440)
        read_only.flags.writeable = False
        kvc.Cache.from_config(tiny_config, engine_arrays={(0, 0): read_only, (1, 0): aligned_zeros(6, 37440),
                                                          (2, 0): aligned_zeros(6, 37440)})
    with pytest.raises(kvc.Error) as error:  # one layer's array missing
        kvc.Cache.from_config(tiny_config, engine_arrays={(0, 0): aligned_zeros(6, 37440)})
    assert error.value.code == "INVALID_ARGUMENT"


def test_compressor_parameters_are_checked_and_copied(tiny_config):
    from conftest import tiny_params
    params = tiny_params(seed=3)
    malformed = [
        (params[:2], "params: 2 entries; the model has 3 layers"),
        ([{"compressor_ape": params[1]["compressor_ape"]}] + params[1:], r"params\[0\]\[\"compressor_ape\"\]: layer 0 is a window"),
        ([None, dict(params[1], bias=np.zeros(3, np.float32)), params[2]], "unknown key"),
        ([None, dict(params[1], compressor_ape=params[1]["compressor_ape"].T.copy()), params[2]], r"shape \(4, 1024\)"),
        ([None, dict(params[1], indexer_norm_weight=params[1]["indexer_norm_weight"].astype(np.float64)), params[2]], "float64"),
        ([None, params[1], dict(params[2], indexer_ape=params[1]["indexer_ape"])], "hca layer, which has no indexer"),
        ([None, {k: v for k, v in params[1].items() if k != "indexer_norm_weight"}, params[2]], "go together"),
        ("abc", "expected a sequence"),
    ]
    for bad, message in malformed:
        with pytest.raises(ValueError, match=message):
            kvc.Cache.from_config(tiny_config, params=bad)
    with pytest.raises(kvc.Error) as error:  # a CSA layer with a compressor but no indexer: kvc refuses
        kvc.Cache.from_config(tiny_config, params=[None, {k: v for k, v in params[1].items() if k.startswith("compressor")}, params[2]])
    assert error.value.code == "INVALID_ARGUMENT"

    # Copied: changing the arrays afterwards changes nothing in the cache.
    a = kvc.Cache.from_config(tiny_config, params=params)
    b = kvc.Cache.from_config(tiny_config, params=tiny_params(seed=3))
    for array in params[1].values():
        array[...] = 0.5
    stored = []
    for cache in (a, b):
        seq = cache.create_sequence()
        append_tokens(cache, seq, CSA_LAYER, 64, np.random.default_rng(22))
        stored.append(cache.read_rows(seq, CSA_LAYER, kvc.STREAM_CSA_ROWS))
    assert stored[0].shape == (16, 584) and stored[0].any()
    np.testing.assert_array_equal(stored[0], stored[1])


def test_engine_arrays_are_checked(tiny_config):
    good = {(layer, kvc.STREAM_WINDOW): aligned_zeros(4, 37440) for layer in range(3)}
    for bad, message in [({"0": good[0, 0]}, r"keys are \(layer, stream\) pairs"),
                         ({(0, 0): good[0, 0].astype(np.int8)}, "uint8"),
                         ({(0, 0): good[0, 0][:, ::2]}, "non-contiguous"),
                         ([good[0, 0]], "expected a dict")]:
        with pytest.raises(ValueError, match=message):
            kvc.Cache.from_config(tiny_config, engine_arrays=bad)


@pytest.mark.parametrize("first_tokens, chunk", [(0, 9), (200, 6), (1000, 12)])
def test_select_positions_of_a_chunk(tiny_config, first_tokens, chunk):
    from conftest import tiny_params
    cache = kvc.Cache.from_config(tiny_config, params=tiny_params(seed=3), draft_slots=8)
    rng = np.random.default_rng(23 + first_tokens)
    seq = cache.create_sequence()
    for layer in range(cache.num_layers):
        if first_tokens:
            append_tokens(cache, seq, layer, first_tokens, rng)
        append_tokens(cache, seq, layer, chunk, rng)  # the chunk (or verify step) just appended
    length, ring = first_tokens + chunk, 128 + 8
    first = length - chunk
    ids = cache.block_table(seq, kvc.STREAM_WINDOW)
    queries = [index_query(cache, first + i, rng) for i in range(chunk)]
    for layer, stream in [(WINDOW_LAYER, None), (HCA_LAYER, kvc.STREAM_HCA_ROWS), (CSA_LAYER, kvc.STREAM_CSA_ROWS)]:
        sets = cache.select_positions(seq, layer, first, chunk, queries if layer == CSA_LAYER else None)
        assert (sets.first, sets.count) == (first, chunk)
        assert sets.window_offsets.dtype == np.int64 and sets.window_indices.dtype == np.int32
        for i in range(chunk):
            t = first + i
            window = slice(sets.window_offsets[i], sets.window_offsets[i + 1])
            positions = np.arange(max(0, t - 127), t + 1)
            np.testing.assert_array_equal(sets.window_positions[window], positions)
            slots = positions % ring
            expected = np.where(positions >= length - ring, ids[slots // 64] * 64 + slots % 64, -1)
            np.testing.assert_array_equal(sets.window_indices[window], expected)
            compressed = slice(sets.compressed_offsets[i], sets.compressed_offsets[i + 1])
            if stream is None:
                entries = np.array([], np.int64)
            elif stream == kvc.STREAM_HCA_ROWS:
                entries = np.arange((t + 1) // 128)
            else:
                scores = cache.index_scores(seq, layer, queries[i])[:(t + 1) // 4]  # the entries visible at t
                order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
                entries = np.sort(np.array(order[:min(cache.index_topk, len(scores))], np.int64))
            np.testing.assert_array_equal(sets.entries[compressed], entries)
            if stream is not None:
                rows_ids = cache.block_table(seq, stream)
                np.testing.assert_array_equal(sets.compressed_indices[compressed], rows_ids[entries // 64] * 64 + entries % 64)
        # The last position's set is select()'s.
        last = cache.select(seq, layer, queries[-1] if layer == CSA_LAYER else None)
        np.testing.assert_array_equal(sets.window_indices[sets.window_offsets[-2]:], last.window_indices)
        np.testing.assert_array_equal(sets.compressed_indices[sets.compressed_offsets[-2]:], last.compressed_indices)
    with pytest.raises(kvc.Error) as error:
        cache.select_positions(seq, CSA_LAYER, first, chunk)  # CSA needs the queries
    assert error.value.code == "INVALID_ARGUMENT"
    with pytest.raises(kvc.Error) as error:
        cache.select_positions(seq, WINDOW_LAYER, first, chunk + 1)  # past the layer's tokens
    assert error.value.code == "OUT_OF_RANGE"


def all_rows(cache, seq):
    """Every stored row of every (layer, stream) of seq, through page arrays and block tables."""
    return {(layer, stream): read_stream_through_pages(cache, seq, layer, stream)
            for layer, stream in [(0, kvc.STREAM_WINDOW), (1, kvc.STREAM_WINDOW), (2, kvc.STREAM_WINDOW),
                                  (1, kvc.STREAM_CSA_ROWS), (1, kvc.STREAM_CSA_KEYS), (2, kvc.STREAM_HCA_ROWS)]}


def test_prefix_caching(tiny_config):
    from conftest import tiny_params
    cache = kvc.Cache.from_config(tiny_config, params=tiny_params(seed=3), prefix_block_tokens=128)
    assert cache.prefix_block_tokens == 128
    rng = np.random.default_rng(24)
    inputs = [layer_inputs(cache, layer, 256, rng) for layer in range(3)]  # the shared prompt
    more = [layer_inputs(cache, layer, 70, rng) for layer in range(3)]      # what follows it
    a = cache.create_sequence()
    for layer, (rows, projections) in enumerate(inputs):
        cache.append(a, layer, 0, rows, **projections)
    hashes = np.array([0x1111, 0x2222], np.uint64)
    assert cache.publish_prefix(a, hashes) is None
    assert cache.lookup_prefix([0x1111, 0x2222, 0x3333]).tokens == 256
    assert cache.lookup_prefix([0x9999]).tokens == 0
    cache.free(a)  # the prefix outlives its publisher

    match = cache.create_sequence_from_prefix([0x1111, 0x2222, 0x3333])
    assert isinstance(match, kvc.PrefixMatch) and match.tokens == 256 and match.shared_tokens >= 256
    b = match.seq
    assert cache.length(b) == 256 and cache.rollback_floor(b) == 256
    # b continues byte for byte like a sequence that appended everything itself.
    c = cache.create_sequence()
    for layer in range(3):
        cache.append(c, layer, 0, inputs[layer][0], **inputs[layer][1])
    for seq in (b, c):
        for layer in range(3):
            cache.append(seq, layer, 256, more[layer][0], **more[layer][1])
    mine, theirs = all_rows(cache, b), all_rows(cache, c)
    for key in mine:
        np.testing.assert_array_equal(mine[key], theirs[key], err_msg=str(key))
    assert mine[1, kvc.STREAM_CSA_ROWS].shape[0] == 81

    miss = cache.create_sequence_from_prefix([0x7777])
    assert miss.tokens == 0 and cache.length(miss.seq) == 0
    usage = cache.usage()["prefix"]
    assert (usage["published"], usage["hits"], usage["misses"], usage["tokens_reused"], usage["prefixes"]) == (1, 1, 1, 256, 1)
    with pytest.raises(kvc.Error) as error:
        cache.publish_prefix(c, [0x1111, 0x2222, 0x3333])  # 326 tokens: fewer than 3 x 128
    assert error.value.code == "FAILED_PRECONDITION"
    with pytest.raises(TypeError):
        cache.lookup_prefix([-1])  # hashes are unsigned 64-bit
