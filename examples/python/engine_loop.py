"""A Python engine's step loop on kvc: a small batch of DeepSeek-V4-Flash sequences
prefilled and decoded together, attention reading its rows straight out of kvc's
page arrays through block tables and selection indices (no copies from kvc).

    PYTHONPATH=build/release/python /usr/bin/python3 examples/python/engine_loop.py

The engine owns every matrix product; random projections stand in for them here,
and random compressor weights for the checkpoint's. Each step appends the batch's
new tokens layer by layer (kvc quantizes the window rows and runs the CSA/HCA
compressors); attention then takes, per layer, the rows kvc selects as indices
into the layer's page arrays (the window ring, and the CSA or HCA rows),
gathers them from zero-copy page views and runs a reference sparse attention.
Exit status 0 iff the rows read through the page arrays are the ones kvc selected.
"""

import sys

import numpy as np

import kvc

HEADS = 4  # attention heads of this toy attention (the indexer has the model's own)


def synthetic_parameters(cache, rng):
    """Compressor weights per layer, as an engine loads them from its checkpoint."""
    params = []
    for kind in cache.layer_kinds:
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


def layer_tokens(kind, n, rng):
    """One layer's inputs for n tokens: KV rows (after norm and RoPE) and compressor projections."""
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


def gather(pages, indices, geometry):
    """Rows `indices` (page_id x rows_per_page + offset) of a page array, as contiguous
    584-byte rows: data at offset x 576 in the page, scales in the page's footer."""
    b = geometry["rows_per_page"]
    d, s = geometry["row_data_bytes"], geometry["row_scale_bytes"]
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


def step(cache, batch, lengths, new_tokens, rng, pages, geometry):
    """One model step: every sequence of the batch gets new_tokens[i] tokens in every layer,
    then attends (per layer) from its last token. Returns the rows read."""
    for layer, kind in enumerate(cache.layer_kinds):
        for seq, at, n in zip(batch, lengths, new_tokens):
            rows, projections = layer_tokens(kind, n, rng)
            cache.append(seq, layer, at, rows, **projections)
    lengths = [at + n for at, n in zip(lengths, new_tokens)]
    read = 0
    for seq, length in zip(batch, lengths):
        # One index query per token serves every CSA layer (q_raw as bf16 bits).
        q_raw = kvc.to_bf16(rng.standard_normal((cache.index_heads, 128)).astype(np.float32))
        weights = np.full(cache.index_heads, (128 * cache.index_heads) ** -0.5, np.float32)
        query = cache.prepare_index_query(length - 1, q_raw, weights)
        for layer, kind in enumerate(cache.layer_kinds):
            chosen = cache.select(seq, layer, query if kind == kvc.LAYER_CSA else None, gather=True)
            parts = [gather(pages[layer, kvc.STREAM_WINDOW], chosen.window_indices, geometry[kvc.STREAM_WINDOW])]
            stream = {kvc.LAYER_CSA: kvc.STREAM_CSA_ROWS, kvc.LAYER_HCA: kvc.STREAM_HCA_ROWS}.get(kind)
            if stream is not None:
                parts.append(gather(pages[layer, stream], chosen.compressed_indices, geometry[stream]))
            rows = kvc.dequantize_kv_rows(np.concatenate(parts))
            if not np.array_equal(rows, chosen.rows):
                sys.exit(f"sequence {seq} layer {layer}: rows read through the page arrays differ from kvc's")
            sparse_attention(rng.standard_normal((HEADS, 512)).astype(np.float32), rows)
            read += len(rows)
    return lengths, read


def main():
    rng = np.random.default_rng(0)
    cache = kvc.Cache("v4-flash", params=synthetic_parameters(kvc.Cache("v4-flash"), rng),
                      state_bytes=256 << 20, history_bytes=256 << 20)
    geometry = [cache.page_geometry(stream) for stream in range(kvc.NUM_STREAMS)]
    # Zero-copy views of every page array, taken once: they show every later write.
    pages = {(layer, stream): cache.layer_pages(layer, stream)
             for stream in range(kvc.NUM_STREAMS) for layer in geometry[stream]["layers"]}

    prompts = [130, 300, 521]
    batch = [cache.create_sequence() for _ in prompts]
    lengths, read = step(cache, batch, [0] * len(batch), prompts, rng, pages, geometry)  # prefill
    print(f"prefilled {len(batch)} sequences ({', '.join(map(str, prompts))} tokens); attention read {read} rows")
    for _ in range(4):  # decode: one token per sequence per step
        lengths, read = step(cache, batch, lengths, [1] * len(batch), rng, pages, geometry)
    print(f"decoded 4 steps: lengths {lengths}; the last step read {read} rows through block tables")

    # The batch's block tables as a paged-attention kernel takes them (FlashInfer's CSR).
    csr = cache.batch_block_tables_csr(batch, kvc.STREAM_CSA_ROWS)
    print(f"CSA rows: indptr {csr.indptr.tolist()}, {len(csr.indices)} pages, last_page_len {csr.last_page_len.tolist()}")
    for b, seq in enumerate(batch):
        ids = csr.indices[csr.indptr[b]:csr.indptr[b + 1]]
        count = cache.stream_rows(seq, 2, kvc.STREAM_CSA_ROWS)
        rows = np.arange(count)
        through_pages = gather(pages[2, kvc.STREAM_CSA_ROWS], ids[rows // 64] * 64 + rows % 64, geometry[kvc.STREAM_CSA_ROWS])
        if not np.array_equal(through_pages, cache.read_rows(seq, 2, kvc.STREAM_CSA_ROWS)):
            sys.exit(f"sequence {seq}: CSA rows through the CSR table differ from the stored rows")

    # Speculative decoding: 3 draft tokens, 1 accepted; then a branch shares the history.
    lengths, _ = step(cache, batch, lengths, [3] * len(batch), rng, pages, geometry)
    for seq in batch:
        cache.truncate(seq, cache.length(seq) - 2)
    branch = cache.fork(batch[0])
    usage = cache.usage()
    print(f"after a rollback and a fork: {usage['sequences']} sequences, {usage['used_bytes'] / 2 ** 20:.1f} MiB used; "
          f"the branch shares {cache.sequence_usage(branch)['shared_bytes'] / 2 ** 20:.1f} MiB")
    for seq in batch + [branch]:
        cache.free(seq)
    assert cache.usage()["used_bytes"] == 0
    print("ok")


if __name__ == "__main__":
    main()
