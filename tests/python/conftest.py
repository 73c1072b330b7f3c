"""Shared helpers of the kvc Python tests (run by ctest as `python.pytest`, with
PYTHONPATH=<build>/python; or by hand: PYTHONPATH=build/release/python /usr/bin/python3 -m pytest tests/python)."""

import numpy as np
import pytest

import kvc

CSA_WIDTH = 2  # compressor projections per token, in units of 512 (CSA); 1 on HCA


def synthetic_params(model, seed):
    """One parameter dict per compressed layer of `model` (None for window layers):
    random ape (scores' position bias) and RMSNorm weights near 1."""
    kinds = kvc.Cache(model).layer_kinds
    rng = np.random.default_rng(seed)
    params = []
    for kind in kinds:
        if kind == kvc.LAYER_WINDOW:
            params.append(None)
            continue
        ratio, width = (4, CSA_WIDTH) if kind == kvc.LAYER_CSA else (128, 1)
        entry = {
            "compressor_ape": (0.1 * rng.standard_normal((ratio, width * 512))).astype(np.float32),
            "compressor_norm_weight": (1 + 0.1 * rng.standard_normal(512)).astype(np.float32),
        }
        if kind == kvc.LAYER_CSA:
            entry["indexer_ape"] = (0.1 * rng.standard_normal((4, 256))).astype(np.float32)
            entry["indexer_norm_weight"] = (1 + 0.1 * rng.standard_normal(128)).astype(np.float32)
        params.append(entry)
    return params


def layer_inputs(cache, layer, n, rng, scale=1.0):
    """(rows, projections) for n tokens of `layer`: what an engine hands kvc."""
    rows = (scale * rng.standard_normal((n, 512))).astype(np.float32)
    kind = cache.layer_kinds[layer]
    projections = {}
    if kind != kvc.LAYER_WINDOW:
        width = 512 * (CSA_WIDTH if kind == kvc.LAYER_CSA else 1)
        projections["compressor_kv"] = rng.standard_normal((n, width)).astype(np.float32)
        projections["compressor_score"] = rng.standard_normal((n, width)).astype(np.float32)
    if kind == kvc.LAYER_CSA:
        projections["indexer_kv"] = rng.standard_normal((n, 256)).astype(np.float32)
        projections["indexer_score"] = rng.standard_normal((n, 256)).astype(np.float32)
    return rows, projections


def append_tokens(cache, seq, layer, n, rng, scale=1.0):
    """Appends n tokens at the layer's end (with projections where kvc runs the compressor); returns the rows."""
    rows, projections = layer_inputs(cache, layer, n, rng, scale)
    cache.append(seq, layer, cache.length(seq, layer), rows, **projections)
    return rows


def rows_through_pages(pages, ids, rows, rows_per_page, data_bytes, scale_bytes):
    """Rows `rows` (an index array) of a stream read through its page array and block
    table with the layout formulas alone (docs/layout.md), as contiguous rows."""
    rows = np.asarray(rows, dtype=np.int64)
    page = pages[ids[rows // rows_per_page]]  # (n, page_bytes)
    offset = rows % rows_per_page
    data_at = offset[:, None] * data_bytes + np.arange(data_bytes)
    scale_at = rows_per_page * data_bytes + offset[:, None] * scale_bytes + np.arange(scale_bytes)
    return np.concatenate([np.take_along_axis(page, data_at, 1), np.take_along_axis(page, scale_at, 1)], axis=1)


def read_stream_through_pages(cache, seq, layer, stream, rows=None):
    """Every stored row of (layer, stream) of `seq`, read through pages alone."""
    geometry = cache.page_geometry(stream)
    if rows is None:
        rows = np.arange(cache.stream_rows(seq, layer, stream))
    return rows_through_pages(cache.layer_pages(layer, stream), cache.block_table(seq, stream), rows,
                              geometry["rows_per_page"], geometry["row_data_bytes"], geometry["row_scale_bytes"])


@pytest.fixture(scope="session")
def flash_params():
    return synthetic_params("v4-flash", seed=7)


TINY_CONFIG = {
    "model_type": "deepseek_v4", "num_hidden_layers": 3, "compress_ratios": [0, 4, 128], "sliding_window": 128,
    "head_dim": 512, "qk_rope_head_dim": 64, "index_n_heads": 8, "index_head_dim": 128, "index_topk": 8,
    "max_position_embeddings": 8192, "rope_theta": 10000, "compress_rope_theta": 160000, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 16, "original_max_position_embeddings": 65536,
                     "type": "yarn"},
}
WINDOW_LAYER, CSA_LAYER, HCA_LAYER = 0, 1, 2  # the tiny model's layers


@pytest.fixture
def tiny_config(tmp_path):
    """A config.json of a 3-layer V4 model (window, CSA, HCA) with top-k 8 and 8192 tokens of context."""
    import json
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


def tiny_params(seed):
    """Compressor parameters of the tiny model (layer kinds window, CSA, HCA)."""
    rng = np.random.default_rng(seed)
    return [
        None,
        {"compressor_ape": (0.1 * rng.standard_normal((4, 1024))).astype(np.float32),
         "compressor_norm_weight": (1 + 0.1 * rng.standard_normal(512)).astype(np.float32),
         "indexer_ape": (0.1 * rng.standard_normal((4, 256))).astype(np.float32),
         "indexer_norm_weight": (1 + 0.1 * rng.standard_normal(128)).astype(np.float32)},
        {"compressor_ape": (0.1 * rng.standard_normal((128, 512))).astype(np.float32),
         "compressor_norm_weight": (1 + 0.1 * rng.standard_normal(512)).astype(np.float32)},
    ]


@pytest.fixture
def tiny(tiny_config):
    """A cache of the tiny model whose compressors kvc runs (synthetic parameters)."""
    return kvc.Cache.from_config(tiny_config, params=tiny_params(seed=3))


@pytest.fixture
def tiny_byo(tiny_config):
    """A cache of the tiny model without compressor parameters: the engine brings compressed rows and keys."""
    return kvc.Cache.from_config(tiny_config)
