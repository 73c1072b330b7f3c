"""kvc: the DeepSeek-V4 KV cache, from Python.

    import kvc
    cache = kvc.Cache("v4-flash")
    seq = cache.create_sequence()
    cache.append(seq, 0, 0, rows)                   # rows: float32 or uint16 (bf16) (n, 512)
    pages = cache.layer_pages(0, kvc.STREAM_WINDOW)  # zero-copy uint8 (num_pages, page_bytes)
    ids = cache.block_table(seq, kvc.STREAM_WINDOW)  # int32

Malformed NumPy arguments raise ValueError (nothing is copied or converted to
make them fit, except float32 KV rows rounded to bf16); anything kvc refuses
raises kvc.Error with kvc's message and its status `code`. Guide:
docs/python.md.
"""

import numpy as _numpy

from ._kvc import (  # noqa: F401  (the public names)
    HEAD_DIM,
    INDEX_DIM,
    INDEX_KEY_BYTES,
    KV_ROW_BYTES,
    LAYER_CSA,
    LAYER_HCA,
    LAYER_WINDOW,
    MAX_DRAFT_SLOTS,
    NUM_STREAMS,
    SNAPSHOT_FORMAT_VERSION,
    STREAM_CSA_INDEXER_STATE,
    STREAM_CSA_KEYS,
    STREAM_CSA_ROWS,
    STREAM_CSA_STATE,
    STREAM_HCA_ROWS,
    STREAM_HCA_STATE,
    STREAM_WINDOW,
    AttentionSet,
    Cache,
    CsrBlockTables,
    DenseBlockTables,
    Error,
    IndexQuery,
    PositionSets,
    PrefixMatch,
    StepPlan,
    StepSlots,
    dequantize_index_keys,
    dequantize_kv_rows,
    footprint,
    from_bf16,
    page_geometry,
    quantize_index_keys,
    quantize_kv_rows,
    snapshot_info,
    to_bf16,
    verify_snapshot,
)

Error.__doc__ = (
    "What kvc refused: str(error) is kvc's message; error.code the absl status code name "
    "(INVALID_ARGUMENT, NOT_FOUND, OUT_OF_RANGE, FAILED_PRECONDITION, RESOURCE_EXHAUSTED, DATA_LOSS, ...); "
    "error.errno the errno of a failing file-system call, else 0. The call changed nothing."
)


class PageView(_numpy.ndarray):
    """A read-only, zero-copy view of one (layer, stream) page array (Cache.layer_pages).

    An ordinary numpy.ndarray over the cache's memory: page b is view[b], row i of a page
    at view[b, i * row_data_bytes:], its scales at view[b, rows_per_page * row_data_bytes
    + i * row_scale_bytes:]. It shows every later write of the cache and keeps the cache
    alive (its base is the Cache). It is read-only because kvc writes these pages.

    DLPack (numpy.from_dlpack, torch.from_dlpack) exports the same memory. DLPack has no
    read-only flag, so the exported tensor is writable: do not write through it.
    """

    def __dlpack__(self, **kwargs):
        # NumPy refuses to export read-only arrays; export a writable alias of the
        # same memory (its base chain keeps the cache alive). The keywords (stream,
        # and in newer protocols max_version, dl_device, copy) go to NumPy's exporter.
        alias = self.view(_numpy.ndarray)
        alias.flags.writeable = True
        return alias.__dlpack__(**kwargs)


__all__ = [name for name in dir() if not name.startswith("_")]
