"""Planned batch steps and page-manager mode from Python: the plan's slots and
copies checked by running one engine loop twice -- kvc writing the bytes
(append inside planned steps) and a NumPy "engine" writing them through the
plans' slots into its own arrays, kvc in page-manager mode -- and comparing
every byte (cf. tests/step_test.cc)."""

import numpy as np
import pytest

import kvc
from conftest import CSA_LAYER, HCA_LAYER, WINDOW_LAYER, layer_inputs, read_stream_through_pages, rows_through_pages

OPTIONS = dict(rollback_depth=4, draft_slots=4, rows_per_page=8, keys_per_page=8, prefix_block_tokens=128)
RATIO = {CSA_LAYER: 4, HCA_LAYER: 128}
ROWS_STREAM = {CSA_LAYER: kvc.STREAM_CSA_ROWS, HCA_LAYER: kvc.STREAM_HCA_ROWS}


def aligned_zeros(pages, page_bytes):
    buffer = np.zeros(pages * page_bytes + 64, np.uint8)
    start = -buffer.ctypes.data % 64
    return buffer[start:start + pages * page_bytes].reshape(pages, page_bytes)


def engine_memory(config, pages=128):
    """Zeroed engine arrays for every (layer, stream) of the model."""
    return {(layer, g["stream"]): aligned_zeros(pages, g["page_bytes"])
            for g in kvc.page_geometry(config, **OPTIONS) for layer in g["layers"]}


def inputs(seq, layer, first, n):
    """The engine's rows for tokens [first, first + n) of a layer, and its own compressor's
    entries and keys for the windows they close (deterministic per sequence and position)."""
    rng = np.random.default_rng([seq, layer, first, n])
    rows = rng.standard_normal((n, 512)).astype(np.float32)
    closed = (first + n) // RATIO[layer] - first // RATIO[layer] if layer in RATIO else 0
    entries = kvc.quantize_kv_rows(rng.standard_normal((closed, 512)).astype(np.float32))
    keys = kvc.quantize_index_keys(rng.standard_normal((closed, 128)).astype(np.float32))
    return rows, kvc.quantize_kv_rows(rows), entries, keys


class Engine:
    """Page-manager mode: the engine owns the arrays and writes every byte."""

    def __init__(self, config, pointers):
        self.memory = engine_memory(config)
        arrays = {key: (a.ctypes.data, a.nbytes) for key, a in self.memory.items()} if pointers else self.memory
        self.cache = kvc.Cache.from_config(config, page_manager=True, engine_arrays=arrays, **OPTIONS)
        self.geometry = [self.cache.page_geometry(s) for s in range(kvc.NUM_STREAMS)]

    def copy(self, copies):
        assert copies.dtype == np.int32 and copies.shape[1:] == (3,)
        for stream, src, dst in copies:
            for layer in self.geometry[stream]["layers"]:
                self.memory[layer, stream][dst] = self.memory[layer, stream][src]

    def put(self, layer, stream, slots, rows):
        g = self.geometry[stream]
        b, d, s = g["rows_per_page"], g["row_data_bytes"], g["row_scale_bytes"]
        pages = self.memory[layer, stream]
        assert len(slots) == len(rows)
        for slot, row in zip(slots, rows):
            if slot < 0:
                continue
            page, offset = divmod(int(slot), b)
            pages[page, offset * d:(offset + 1) * d] = row[:d]
            pages[page, b * d + offset * s:b * d + (offset + 1) * s] = row[d:]

    def write(self, plan, b, layers):
        seq, first, n = int(plan.seqs[b]), int(plan.first_position[b]), int(plan.new_tokens[b])
        for layer in layers:
            _, window, entries, keys = inputs(seq, layer, first, n)
            self.put(layer, kvc.STREAM_WINDOW, plan.request_slots(kvc.STREAM_WINDOW, b), window)
            if layer in ROWS_STREAM:
                self.put(layer, ROWS_STREAM[layer], plan.request_slots(ROWS_STREAM[layer], b), entries)
            if layer == CSA_LAYER:
                self.put(layer, kvc.STREAM_CSA_KEYS, plan.request_slots(kvc.STREAM_CSA_KEYS, b), keys)


class KvcWrites:
    """kvc's own mode, over engine arrays too (so both can be compared byte for byte)."""

    def __init__(self, config):
        self.memory = engine_memory(config)
        self.cache = kvc.Cache.from_config(config, engine_arrays=self.memory, **OPTIONS)

    def write(self, plan, b, layers):
        seq, first, n = int(plan.seqs[b]), int(plan.first_position[b]), int(plan.new_tokens[b])
        for layer in layers:
            rows, _, entries, keys = inputs(seq, layer, first, n)
            self.cache.append(seq, layer, first, rows)
            if layer in ROWS_STREAM:
                stream = ROWS_STREAM[layer]
                self.cache.append_rows(seq, layer, stream, self.cache.stream_rows(seq, layer, stream), entries)
            if layer == CSA_LAYER:
                stored = self.cache.stream_rows(seq, layer, kvc.STREAM_CSA_KEYS)
                self.cache.append_rows(seq, layer, kvc.STREAM_CSA_KEYS, stored, keys)


def plan_both(kvc_side, engine, requests):
    a, b = kvc_side.cache.plan_step(requests), engine.cache.plan_step(requests)
    assert a.epoch == b.epoch
    for stream in range(kvc.NUM_STREAMS):
        np.testing.assert_array_equal(a.slots[stream].indptr, b.slots[stream].indptr)
        np.testing.assert_array_equal(a.slots[stream].slots, b.slots[stream].slots)
    assert a.copies.shape == (0, 3)  # kvc copies itself
    engine.copy(b.copies)
    return a, b


def step(kvc_side, engine, requests):
    a, b = plan_both(kvc_side, engine, requests)
    for i in range(len(requests)):
        kvc_side.write(a, i, range(3))
        engine.write(b, i, range(3))
    kvc_side.cache.commit_step(a.epoch)
    engine.cache.commit_step(b.epoch)
    engine.cache.complete_steps(b.epoch)
    return b


def same_arrays(kvc_side, engine):
    for key, mine in kvc_side.memory.items():
        np.testing.assert_array_equal(mine, engine.memory[key], err_msg=f"layer {key[0]} stream {key[1]}")


@pytest.mark.parametrize("pointers", [False, True], ids=["numpy arrays", "addresses"])
def test_an_engine_writing_through_slots_gets_kvcs_bytes(tiny_config, pointers):
    kvc_side, engine = KvcWrites(tiny_config), Engine(tiny_config, pointers)
    a = kvc_side.cache.create_sequence()
    assert engine.cache.create_sequence() == a
    plan = step(kvc_side, engine, [(a, 40)])  # a prefill chunk, longer than the rollback depth
    assert plan.new_tokens.tolist() == [40] and plan.first_position.tolist() == [0]
    # The plan's rows are the block tables' rows: window position p at ring slot p mod (128 + 4).
    ring_ids = engine.cache.block_table(a, kvc.STREAM_WINDOW)
    slots = np.arange(40) % 132
    np.testing.assert_array_equal(plan.request_slots(kvc.STREAM_WINDOW, 0), ring_ids[slots // 8] * 8 + slots % 8)
    csa_ids = engine.cache.block_table(a, kvc.STREAM_CSA_ROWS)
    np.testing.assert_array_equal(plan.request_slots(kvc.STREAM_CSA_ROWS, 0), csa_ids[np.arange(10) // 8] * 8 + np.arange(10) % 8)
    assert len(plan.request_slots(kvc.STREAM_HCA_ROWS, 0)) == 0  # no HCA window closes in 40 tokens

    b = kvc_side.cache.create_sequence()
    assert engine.cache.create_sequence() == b
    step(kvc_side, engine, [(a, 1), (b, 21)])
    same_arrays(kvc_side, engine)

    # A fork: the engine makes the copies kvc lists.
    with pytest.raises(kvc.Error) as error:
        engine.cache.fork(a)  # the copies would be lost
    assert error.value.code == "FAILED_PRECONDITION"
    fork = kvc_side.cache.fork(a)
    child, copies = engine.cache.fork(a, return_copies=True)
    assert child == fork and len(copies) > 0
    assert set(copies[:, 0]) <= {kvc.STREAM_WINDOW, kvc.STREAM_CSA_STATE, kvc.STREAM_CSA_INDEXER_STATE, kvc.STREAM_HCA_STATE}
    engine.copy(copies)

    # A verify step on the parent and the fork, which share a partly filled CSA page.
    plan = step(kvc_side, engine, [(a, 4), (fork, 4), (b, 1)])
    assert kvc.STREAM_CSA_ROWS in plan.copies[:, 0]  # copy-on-write of the shared page
    same_arrays(kvc_side, engine)

    # A step aborted after two of three layers were written.
    before = {s: engine.cache.length(s) for s in (a, fork)}
    pa, pb = plan_both(kvc_side, engine, [(a, 2), (fork, 3)])
    assert engine.cache.usage()["open_steps"] == 1
    for i in range(2):
        kvc_side.write(pa, i, range(2))
        engine.write(pb, i, range(2))
    with pytest.raises(kvc.Error) as error:
        kvc_side.cache.commit_step(pa.epoch)  # layer 2 was not appended
    assert error.value.code == "FAILED_PRECONDITION"
    kvc_side.cache.abort_step(pa.epoch)
    engine.copy(pb.abort_copies)
    engine.cache.abort_step(pb.epoch)
    engine.cache.complete_steps(pb.epoch)
    assert {s: engine.cache.length(s) for s in (a, fork)} == before == {s: kvc_side.cache.length(s) for s in (a, fork)}
    assert engine.cache.usage()["open_steps"] == 0

    # Go on past an HCA window; then every row a query reads is the same in both.
    step(kvc_side, engine, [(a, 30), (b, 30)])
    for _ in range(3):
        step(kvc_side, engine, [(a, 40), (b, 40), (fork, 40)])
    for seq in (a, b, fork):
        assert engine.cache.length(seq) == kvc_side.cache.length(seq)
        length = engine.cache.length(seq)
        assert length > 128
        for layer, stream in [(CSA_LAYER, kvc.STREAM_CSA_ROWS), (CSA_LAYER, kvc.STREAM_CSA_KEYS), (HCA_LAYER, kvc.STREAM_HCA_ROWS)]:
            ids = engine.cache.block_table(seq, stream)
            np.testing.assert_array_equal(ids, kvc_side.cache.block_table(seq, stream))
            g = engine.geometry[stream]
            rows = np.arange(engine.cache.stream_rows(seq, layer, stream))
            np.testing.assert_array_equal(
                rows_through_pages(engine.memory[layer, stream], ids, rows, 8, g["row_data_bytes"], g["row_scale_bytes"]),
                read_stream_through_pages(kvc_side.cache, seq, layer, stream))
        for layer in range(3):  # the window rows of the last 128 positions (what a query reads)
            ring_ids = engine.cache.block_table(seq, kvc.STREAM_WINDOW)
            slots = np.arange(length - 128, length) % 132
            indices = ring_ids[slots // 8] * 8 + slots % 8
            if layer != CSA_LAYER:
                np.testing.assert_array_equal(kvc_side.cache.select(seq, layer).window_indices, indices)
            np.testing.assert_array_equal(
                rows_through_pages(engine.memory[layer, kvc.STREAM_WINDOW], np.arange(128), indices, 8, 576, 8),
                rows_through_pages(kvc_side.memory[layer, kvc.STREAM_WINDOW], np.arange(128), indices, 8, 576, 8))
        # Multi-position selection gives page-manager mode the same indices (window and HCA layers).
        for layer in (WINDOW_LAYER, HCA_LAYER):
            mine, kvcs = (side.cache.select_positions(seq, layer, length - 5, 5) for side in (engine, kvc_side))
            for name in ("window_offsets", "window_positions", "window_indices", "compressed_offsets", "entries",
                         "compressed_indices"):
                np.testing.assert_array_equal(getattr(mine, name), getattr(kvcs, name), err_msg=name)
            assert (mine.window_indices >= 0).all()  # 5 <= draft_slots + 1: the ring holds every row
            assert len(mine.entries) == (0 if layer == WINDOW_LAYER else sum((t + 1) // 128 for t in range(length - 5, length)))
        with pytest.raises(kvc.Error) as error:  # CSA selection reads index keys
            engine.cache.select_positions(seq, CSA_LAYER, length - 1, 1, [None])
        assert error.value.code == "FAILED_PRECONDITION"

    # Prefix caching: publish a 128-token prompt, restore it into a new sequence, go on.
    c = kvc_side.cache.create_sequence()
    assert engine.cache.create_sequence() == c
    step(kvc_side, engine, [(c, 128)])
    kvc_side.cache.publish_prefix(c, [42])
    with pytest.raises(kvc.Error) as error:
        engine.cache.publish_prefix(c, [42])  # the checkpoint's copies would be lost
    assert error.value.code == "FAILED_PRECONDITION"
    engine.copy(engine.cache.publish_prefix(c, [42], return_copies=True))
    restored = kvc_side.cache.create_sequence_from_prefix([42, 43])
    match, copies = engine.cache.create_sequence_from_prefix([42, 43], return_copies=True)
    assert (match.seq, match.tokens) == (restored.seq, restored.tokens) and match.tokens == 128
    assert len(copies) > 0
    engine.copy(copies)
    d = match.seq
    # d's next tokens (kvc writes them in one run, the engine in the other); then d's rows
    # agree: the history it shares with c, and its ring, restored from the checkpoint.
    step(kvc_side, engine, [(d, 10)])
    for layer, stream in [(CSA_LAYER, kvc.STREAM_CSA_ROWS), (CSA_LAYER, kvc.STREAM_CSA_KEYS)]:
        ids = engine.cache.block_table(d, stream)
        np.testing.assert_array_equal(ids, kvc_side.cache.block_table(d, stream))
        np.testing.assert_array_equal(ids[:4], engine.cache.block_table(c, stream)[:4])  # shared with the publisher
        g = engine.geometry[stream]
        rows = np.arange(engine.cache.stream_rows(d, layer, stream))
        assert len(rows) == 34
        np.testing.assert_array_equal(
            rows_through_pages(engine.memory[layer, stream], ids, rows, 8, g["row_data_bytes"], g["row_scale_bytes"]),
            read_stream_through_pages(kvc_side.cache, d, layer, stream))
    ring_ids = engine.cache.block_table(d, kvc.STREAM_WINDOW)
    slots = np.arange(138 - 128, 138) % 132
    indices = ring_ids[slots // 8] * 8 + slots % 8
    for layer in range(3):
        np.testing.assert_array_equal(
            rows_through_pages(engine.memory[layer, kvc.STREAM_WINDOW], np.arange(128), indices, 8, 576, 8),
            rows_through_pages(kvc_side.memory[layer, kvc.STREAM_WINDOW], np.arange(128), indices, 8, 576, 8))


def test_page_manager_refusals_and_deferred_frees(tiny_config):
    engine = Engine(tiny_config, pointers=True)
    cache = engine.cache
    assert cache.page_manager and cache.draft_slots == 4
    with pytest.raises(kvc.Error) as error:
        cache.layer_pages(WINDOW_LAYER, kvc.STREAM_WINDOW)  # maybe device memory: no view
    assert error.value.code == "FAILED_PRECONDITION"
    info = cache.page_array(WINDOW_LAYER, kvc.STREAM_WINDOW)
    assert info["base"] == engine.memory[WINDOW_LAYER, kvc.STREAM_WINDOW].ctypes.data
    seq = cache.create_sequence()
    plan = cache.plan_step([(seq, 9)])
    with pytest.raises(kvc.Error) as error:
        cache.append(seq, 0, 0, np.zeros((9, 512), np.float32))  # kvc touches no byte
    assert error.value.code == "FAILED_PRECONDITION"
    with pytest.raises(kvc.Error):
        cache.free(seq)  # in an open step
    cache.commit_step(plan.epoch)
    cache.free(seq)
    usage = cache.usage()
    assert usage["deferred_pages"] > 0 and usage["epoch"] == plan.epoch
    assert cache.complete_steps(plan.epoch) > 0
    assert cache.usage()["deferred_pages"] == 0 and cache.usage()["completed_epoch"] == plan.epoch

    with pytest.raises(ValueError, match="page-manager mode"):
        memory = engine_memory(tiny_config)
        kvc.Cache.from_config(tiny_config, engine_arrays={k: (a.ctypes.data, a.nbytes) for k, a in memory.items()},
                              **OPTIONS)
    with pytest.raises(kvc.Error, match="draft_slots"):
        kvc.Cache.from_config(tiny_config, page_manager=True, rollback_depth=8, draft_slots=4)
    bare = kvc.Cache.from_config(tiny_config, page_manager=True, **OPTIONS)  # ids only, no memory
    assert bare.page_array(0, kvc.STREAM_WINDOW)["base"] == 0
    with pytest.raises(kvc.Error, match="no memory"):
        bare.layer_pages(0, kvc.STREAM_WINDOW)


def test_steps_in_kvcs_mode(tiny):
    rng = np.random.default_rng(40)
    a, b = tiny.create_sequence(), tiny.create_sequence()
    plan = tiny.plan_step([(a, 5), (b, 3)])
    assert plan.seqs.tolist() == [a, b] and plan.copies.shape == (0, 3)
    assert plan.slots[kvc.STREAM_WINDOW].indptr.tolist() == [0, 5, 8]
    with pytest.raises(kvc.Error):
        tiny.plan_step([(a, 1)])  # already in an open step
    for seq, n in ((a, 5), (b, 3)):
        for layer in range(tiny.num_layers):
            rows, projections = layer_inputs(tiny, layer, n, rng)
            tiny.append(seq, layer, 0, rows, **projections)
    tiny.commit_step(plan.epoch)
    assert (tiny.length(a), tiny.length(b)) == (5, 3)
    with pytest.raises(kvc.Error) as error:
        tiny.commit_step(plan.epoch + 5)
    assert error.value.code in ("NOT_FOUND", "INVALID_ARGUMENT")
    with pytest.raises(kvc.Error, match="request 2 is out of range"):
        plan.request_slots(kvc.STREAM_WINDOW, 2)
    # Abort puts every sequence back, bytes included.
    before = [tiny.read_rows(a, layer, kvc.STREAM_WINDOW).tobytes() for layer in range(3)]
    plan = tiny.plan_step([(a, 2)])
    for layer in range(tiny.num_layers):
        rows, projections = layer_inputs(tiny, layer, 2, rng)
        tiny.append(a, layer, 5, rows, **projections)
    tiny.abort_step(plan.epoch)
    assert tiny.length(a) == 5
    assert [tiny.read_rows(a, layer, kvc.STREAM_WINDOW).tobytes() for layer in range(3)] == before
