"""Long calls release the GIL: another Python thread runs while kvc works."""

import json
import sys
import threading
import time

import numpy as np
import pytest

import kvc
from conftest import CSA_LAYER, HCA_LAYER, TINY_CONFIG, layer_inputs, tiny_params


def longest_stall(calls):
    """Runs `calls` one after another in a thread while this thread keeps stamping the
    time; returns, for the median call, the longest stretch of it without a stamp as a
    share of its duration. A call holding the GIL stalls this thread for nearly all of it
    (about 1); one releasing it hardly at all, but for the scheduler's hiccups on a busy
    machine, which the median over several calls discounts."""
    stamps, done, windows = [], threading.Event(), []

    def worker():
        for call in calls:
            start = time.perf_counter()
            call()
            windows.append((start, time.perf_counter()))
        done.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.001)
    try:
        thread = threading.Thread(target=worker)
        thread.start()
        while not done.is_set():
            stamps.append(time.perf_counter())
        thread.join()
    finally:
        sys.setswitchinterval(interval)
    stamps = np.array(stamps)
    stalls = []
    for start, end in windows:
        assert end - start > 0.005, f"a call took {end - start:.4f} s: too short to tell"
        inside = stamps[(stamps > start) & (stamps < end)]
        gaps = np.diff(np.concatenate([[start], inside, [end]]))
        stalls.append(gaps.max() / (end - start))
    return float(np.median(stalls))


@pytest.fixture
def cache(tmp_path):
    config = dict(TINY_CONFIG, max_position_embeddings=1 << 16)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return kvc.Cache.from_config(tmp_path / "config.json", params=tiny_params(seed=5))


def test_the_measure_sees_a_call_holding_the_gil():
    assert longest_stall([lambda: sum(range(3_000_000))] * 5) > 0.5  # a C loop that keeps the GIL


def test_append_releases_the_gil(cache):
    rng = np.random.default_rng(30)
    seq = cache.create_sequence()
    rows, projections = layer_inputs(cache, CSA_LAYER, 8000, rng)
    stall = longest_stall([lambda at=at: cache.append(seq, CSA_LAYER, at, rows, **projections)
                           for at in range(0, 32000, 8000)])
    assert cache.length(seq, CSA_LAYER) == 32000
    assert stall < 0.5


def test_snapshot_save_releases_the_gil(cache, tmp_path):
    rng = np.random.default_rng(31)
    seq = cache.create_sequence()
    for layer in (CSA_LAYER, HCA_LAYER):
        rows, projections = layer_inputs(cache, layer, 8000, rng)
        for at in range(0, 32000, 8000):
            cache.append(seq, layer, at, rows, **projections)
    path = tmp_path / "gil.kvcsnap"
    assert longest_stall([lambda: cache.save_snapshot(path, incremental=False)] * 5) < 0.5
