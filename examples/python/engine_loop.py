"""A Python engine's step loop on kvc: a small batch of DeepSeek-V4-Flash sequences
through planned steps (prefill chunks, decode tokens, a speculative verify step),
attention reading its rows straight out of kvc's page arrays through block tables
and selection indices; then the same batch with kvc as a page manager over the
engine's own memory, the engine writing every row through the plans' slots.

    PYTHONPATH=build/release/python /usr/bin/python3 examples/python/engine_loop.py

The engine owns every matrix product; seeded random projections stand in for
them here, and random compressor weights for the checkpoint's. Exit status 0 iff
every row read through page arrays and block tables is the one expected.
"""

import sys

import numpy as np

import kvc

MODEL = "v4-flash"
PROMPTS = [130, 300, 521]  # prompt tokens per sequence of the batch
DECODE_STEPS = 4


def check(condition, what):
    if not condition:
        sys.exit(f"engine_loop: {what}")


def synthetic_parameters(kinds, rng):
    """Compressor weights per layer, as an engine loads them from its checkpoint."""
    params = []
    for kind in kinds:
        if kind == kvc.LAYER_WINDOW:
            params.append(None)
            continue
        ratio, width = (4, 2) if kind == kvc.LAYER_CSA else (128, 1)
        entry = {"compressor_ape": (0.1 * rng.standard_normal((ratio, width * 512))).astype(np.float32),
                 "compressor_norm_weight": np.ones(512, np.float32)}
        if kind == kvc.LAYER_CSA:
            entry["indexer_ape"] = (0.1 * rng.standard_normal((4, 256))).astype(np.float32)
            entry["indexer_norm_weight"] = np.ones(128, np.float32)
        params.append(entry)
    return params


def layer_tokens(b, layer, kind, first, n):
    """The engine's inputs for tokens [first, first + n) of one layer of request b: KV
    rows (after norm and RoPE) and the compressor projections (seeded: both runs agree)."""
    rng = np.random.default_rng([b, layer, first, n])
    rows = rng.standard_normal((n, 512)).astype(np.float32)
    projections = {}
    if kind != kvc.LAYER_WINDOW:
        width = 1024 if kind == kvc.LAYER_CSA else 512
        projections = {"compressor_kv": rng.standard_normal((n, width)).astype(np.float32),
                       "compressor_score": rng.standard_normal((n, width)).astype(np.float32)}
    if kind == kvc.LAYER_CSA:
        projections["indexer_kv"] = rng.standard_normal((n, 256)).astype(np.float32)
        projections["indexer_score"] = rng.standard_normal((n, 256)).astype(np.float32)
    return rows, projections


def gather(pages, indices, g):
    """Rows `indices` (page_id x rows_per_page + offset) of a page array as contiguous
    584-byte rows: data at offset x 576 in the page, scales in the page's footer."""
    b, d, s = g["rows_per_page"], g["row_data_bytes"], g["row_scale_bytes"]
    page = pages[indices // b]
    offset = (indices % b)[:, None]
    data = np.take_along_axis(page, offset * d + np.arange(d), axis=1)
    scales = np.take_along_axis(page, b * d + offset * s + np.arange(s), axis=1)
    return np.concatenate([data, scales], axis=1)


def sparse_attention(q, rows):
    """softmax(q K^T / sqrt(512)) V with K = V = the selected rows (spec §3, without sinks)."""
    logits = q @ rows.T / np.sqrt(512.0)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)) @ rows


class KvcEngine:
    """kvc writes the bytes: each step is planned, every layer appended, committed."""

    def __init__(self, params):
        # draft_slots: the ring keeps 16 rows more than the window, so a verify step's
        # drafts all find their window rows in it (select_positions).
        self.cache = kvc.Cache(MODEL, params=params, state_bytes=256 << 20, history_bytes=256 << 20, draft_slots=16)
        self.kinds = self.cache.layer_kinds
        self.geometry = [self.cache.page_geometry(s) for s in range(kvc.NUM_STREAMS)]
        # Zero-copy views of the arrays attention reads, taken once: they show every later write.
        self.pages = {(layer, s): self.cache.layer_pages(layer, s)
                      for s in (kvc.STREAM_WINDOW, kvc.STREAM_CSA_ROWS, kvc.STREAM_HCA_ROWS)
                      for layer in self.geometry[s]["layers"]}
        self.rng = np.random.default_rng(1)

    def step(self, batch, new_tokens):
        plan = self.cache.plan_step(list(zip(batch, new_tokens)))  # every page reserved, all or nothing
        for layer, kind in enumerate(self.kinds):  # the model's forward pass, layer by layer
            for b, seq in enumerate(batch):
                rows, projections = layer_tokens(b, layer, kind, int(plan.first_position[b]), new_tokens[b])
                self.cache.append(seq, layer, int(plan.first_position[b]), rows, **projections)
        # The plan named the rows the step wrote (vLLM's slot_mapping): the window rows of layer 0.
        for b in range(len(batch)):
            rows, _ = layer_tokens(b, 0, self.kinds[0], int(plan.first_position[b]), new_tokens[b])
            slots = plan.request_slots(kvc.STREAM_WINDOW, b)
            keep = slots >= 0  # -1: a later token of the step took that ring slot
            written = gather(self.pages[0, kvc.STREAM_WINDOW], slots[keep], self.geometry[kvc.STREAM_WINDOW])
            check(np.array_equal(written, kvc.quantize_kv_rows(rows[keep])), "a planned slot does not hold its row")
        self.cache.commit_step(plan.epoch)
        return self.attend(batch)

    def attend(self, batch):
        """Attention from each sequence's last token, every layer, rows read through the page arrays."""
        read = 0
        for seq in batch:
            length = self.cache.length(seq)
            # One index query per token serves every CSA layer (q_raw as bf16 bits).
            q_raw = kvc.to_bf16(self.rng.standard_normal((self.cache.index_heads, 128)).astype(np.float32))
            weights = np.full(self.cache.index_heads, (128 * self.cache.index_heads) ** -0.5, np.float32)
            query = self.cache.prepare_index_query(length - 1, q_raw, weights)
            for layer, kind in enumerate(self.kinds):
                chosen = self.cache.select(seq, layer, query if kind == kvc.LAYER_CSA else None, gather=True)
                parts = [gather(self.pages[layer, kvc.STREAM_WINDOW], chosen.window_indices,
                                self.geometry[kvc.STREAM_WINDOW])]
                stream = {kvc.LAYER_CSA: kvc.STREAM_CSA_ROWS, kvc.LAYER_HCA: kvc.STREAM_HCA_ROWS}.get(kind)
                if stream is not None:
                    parts.append(gather(self.pages[layer, stream], chosen.compressed_indices, self.geometry[stream]))
                rows = kvc.dequantize_kv_rows(np.concatenate(parts))
                check(np.array_equal(rows, chosen.rows), f"sequence {seq} layer {layer}: page rows differ from kvc's")
                sparse_attention(self.rng.standard_normal((4, 512)).astype(np.float32), rows)
                read += len(rows)
        return read


def aligned_zeros(pages, page_bytes):
    """pages x page_bytes of zeroed memory at a 64-byte aligned address (kvc requires it)."""
    buffer = np.zeros(pages * page_bytes + 64, np.uint8)
    start = -buffer.ctypes.data % 64
    return buffer[start:start + pages * page_bytes].reshape(pages, page_bytes)


class PageManagerEngine:
    """kvc as a page manager: the engine allocates the arrays (here NumPy; on a GPU, its
    tensors), hands kvc their addresses, makes the page copies kvc lists and writes
    every row through the plans' slots. kvc keeps ids, tables, forks and rollback."""

    def __init__(self):
        self.kinds = kvc.Cache(MODEL).layer_kinds
        options = dict(page_manager=True, draft_slots=16)  # rollback needs draft_slots >= rollback_depth
        self.geometry = kvc.page_geometry(MODEL, **options)
        # Pages per array: this batch's rings (3 pages a sequence) and their checkpoints
        # during the prefill step, its history, one state page a sequence (and checkpoints).
        pages = {kvc.STREAM_WINDOW: 20, kvc.STREAM_CSA_ROWS: 8, kvc.STREAM_CSA_KEYS: 8, kvc.STREAM_HCA_ROWS: 8}
        self.memory = {(layer, g["stream"]): aligned_zeros(pages.get(g["stream"], 7), g["page_bytes"])
                       for g in self.geometry for layer in g["layers"]}
        addresses = {key: (array.ctypes.data, array.nbytes) for key, array in self.memory.items()}  # tensor.data_ptr()
        self.cache = kvc.Cache(MODEL, engine_arrays=addresses, **options)

    def copy(self, copies):
        for stream, src, dst in copies:  # in every layer's array of the stream
            for layer in self.geometry[stream]["layers"]:
                self.memory[layer, stream][dst] = self.memory[layer, stream][src]

    def put(self, layer, stream, slots, rows):
        g = self.geometry[stream]
        b, d, s = g["rows_per_page"], g["row_data_bytes"], g["row_scale_bytes"]
        for slot, row in zip(slots, rows):
            if slot >= 0:
                page, offset = divmod(int(slot), b)
                self.memory[layer, stream][page, offset * d:(offset + 1) * d] = row[:d]
                self.memory[layer, stream][page, b * d + offset * s:b * d + (offset + 1) * s] = row[d:]

    def step(self, batch, new_tokens):
        plan = self.cache.plan_step(list(zip(batch, new_tokens)))
        self.copy(plan.copies)  # copy-on-write and checkpoints, before any write
        for layer, kind in enumerate(self.kinds):
            for b in range(len(batch)):
                first, n = int(plan.first_position[b]), new_tokens[b]
                rows, _ = layer_tokens(b, layer, kind, first, n)
                self.put(layer, kvc.STREAM_WINDOW, plan.request_slots(kvc.STREAM_WINDOW, b), kvc.quantize_kv_rows(rows))
                # The engine's own compressor (random entries here) fills the rows and keys the step closes.
                rng = np.random.default_rng([b, layer, first, n, 7])
                for stream in (kvc.STREAM_CSA_ROWS, kvc.STREAM_HCA_ROWS):
                    slots = plan.request_slots(stream, b)
                    if layer in self.geometry[stream]["layers"] and len(slots):
                        self.put(layer, stream, slots, kvc.quantize_kv_rows(rng.standard_normal((len(slots), 512)).astype(np.float32)))
                slots = plan.request_slots(kvc.STREAM_CSA_KEYS, b)
                if layer in self.geometry[kvc.STREAM_CSA_KEYS]["layers"] and len(slots):
                    self.put(layer, kvc.STREAM_CSA_KEYS, slots,
                             kvc.quantize_index_keys(rng.standard_normal((len(slots), 128)).astype(np.float32)))
        self.cache.commit_step(plan.epoch)
        self.cache.complete_steps(plan.epoch)  # the "device" finished: freed pages may be reused

    def window_rows(self, seq, layer, positions):
        g = self.geometry[kvc.STREAM_WINDOW]
        slots = positions % g["ring_slots"]
        ids = self.cache.block_table(seq, kvc.STREAM_WINDOW)
        return gather(self.memory[layer, kvc.STREAM_WINDOW], ids[slots // 64] * 64 + slots % 64, g)


def main():
    rng = np.random.default_rng(0)
    engine = KvcEngine(synthetic_parameters(kvc.Cache(MODEL).layer_kinds, rng))
    cache = engine.cache
    batch = [cache.create_sequence() for _ in PROMPTS]
    read = engine.step(batch, PROMPTS)  # prefill: one planned step for the whole batch
    print(f"prefilled {len(batch)} sequences ({', '.join(map(str, PROMPTS))} tokens) in one planned step; "
          f"attention read {read} rows through page arrays")
    for _ in range(DECODE_STEPS):
        read = engine.step(batch, [1] * len(batch))
    print(f"decoded {DECODE_STEPS} steps: lengths {[cache.length(s) for s in batch]}; "
          f"the last step read {read} rows through block tables")

    # The batch's block tables as a paged-attention kernel takes them (FlashInfer's CSR).
    csr = cache.batch_block_tables_csr(batch, kvc.STREAM_CSA_ROWS)
    print(f"CSA rows: indptr {csr.indptr.tolist()}, {len(csr.indices)} pages, "
          f"last_page_len {csr.last_page_len.tolist()}")
    for b, seq in enumerate(batch):
        ids = csr.indices[csr.indptr[b]:csr.indptr[b + 1]]
        rows = np.arange(cache.stream_rows(seq, 2, kvc.STREAM_CSA_ROWS))
        through_pages = gather(engine.pages[2, kvc.STREAM_CSA_ROWS], ids[rows // 64] * 64 + rows % 64,
                               engine.geometry[kvc.STREAM_CSA_ROWS])
        check(np.array_equal(through_pages, cache.read_rows(seq, 2, kvc.STREAM_CSA_ROWS)), "CSR rows differ")

    # Speculative decoding: a verify step of 3 drafts, 1 accepted (a rollback); a step
    # that fails half-way is aborted as a whole; a branch shares the history.
    lengths = [cache.length(s) for s in batch]
    engine.step(batch, [3] * len(batch))
    verified = 0
    for seq, length in zip(batch, lengths):  # the target model attends from all 3 draft positions at once
        queries = [cache.prepare_index_query(length + i, kvc.to_bf16(engine.rng.standard_normal((cache.index_heads, 128)).astype(np.float32)),
                                             np.full(cache.index_heads, (128 * cache.index_heads) ** -0.5, np.float32))
                   for i in range(3)]
        for layer, kind in enumerate(engine.kinds):
            sets = cache.select_positions(seq, layer, length, 3, queries if kind == kvc.LAYER_CSA else None)
            check((sets.window_indices >= 0).all(), "a draft's window row is not in the ring")
            for i in range(3):
                window = sets.window_indices[sets.window_offsets[i]:sets.window_offsets[i + 1]]
                rows = gather(engine.pages[layer, kvc.STREAM_WINDOW], window, engine.geometry[kvc.STREAM_WINDOW])
                stream = {kvc.LAYER_CSA: kvc.STREAM_CSA_ROWS, kvc.LAYER_HCA: kvc.STREAM_HCA_ROWS}.get(kind)
                if stream is not None:
                    compressed = sets.compressed_indices[sets.compressed_offsets[i]:sets.compressed_offsets[i + 1]]
                    rows = np.concatenate([rows, gather(engine.pages[layer, stream], compressed, engine.geometry[stream])])
                rows = kvc.dequantize_kv_rows(rows)
                if i == 2:  # the last position's set is the one select() gives
                    last = cache.select(seq, layer, queries[2] if kind == kvc.LAYER_CSA else None, gather=True)
                    check(np.array_equal(rows, last.rows), f"sequence {seq} layer {layer}: verify rows differ")
                sparse_attention(engine.rng.standard_normal((4, 512)).astype(np.float32), rows)
                verified += len(rows)
        cache.truncate(seq, length + 1)  # the first draft accepted
    print(f"verify step: 3 drafts per sequence attended to {verified} rows (select_positions); 1 accepted")
    plan = cache.plan_step([(batch[0], 2)])
    rows, projections = layer_tokens(0, 0, engine.kinds[0], int(plan.first_position[0]), 2)
    cache.append(batch[0], 0, int(plan.first_position[0]), rows, **projections)  # layer 0 only: "the GPU failed"
    cache.abort_step(plan.epoch)
    check(cache.length(batch[0]) == lengths[0] + 1, "the aborted step left tokens behind")
    branch = cache.fork(batch[0])
    usage = cache.usage()
    print(f"after a rollback, an aborted step and a fork: {usage['sequences']} sequences, "
          f"{usage['used_bytes'] / 2 ** 20:.1f} MiB used; the branch shares "
          f"{cache.sequence_usage(branch)['shared_bytes'] / 2 ** 20:.1f} MiB")
    for seq in batch + [branch]:
        cache.free(seq)
    check(cache.usage()["used_bytes"] == 0, "memory left after freeing every sequence")

    # The same prefill and decode steps with kvc as the page manager of the engine's memory.
    manager = PageManagerEngine()
    batch = [manager.cache.create_sequence() for _ in PROMPTS]
    manager.step(batch, PROMPTS)
    for _ in range(DECODE_STEPS):
        manager.step(batch, [1] * len(batch))
    for b, seq in enumerate(batch):  # the last window of every layer, read through block tables
        length = manager.cache.length(seq)
        for layer, kind in enumerate(manager.kinds):
            positions = np.arange(max(0, length - 128), length)
            expected = np.concatenate([kvc.quantize_kv_rows(layer_tokens(b, layer, kind, first, n)[0])
                                       for first, n in [(0, PROMPTS[b])] + [(PROMPTS[b] + i, 1) for i in range(DECODE_STEPS)]])
            check(np.array_equal(manager.window_rows(seq, layer, positions), expected[positions]),
                  f"page manager: sequence {seq} layer {layer} window rows differ")
    print(f"page-manager mode: {len(batch)} sequences, {sum(a.nbytes for a in manager.memory.values()) / 2 ** 20:.0f} MiB "
          f"of engine memory in {len(manager.memory)} arrays; every window row where the block tables say")
    print("ok")


if __name__ == "__main__":
    main()
