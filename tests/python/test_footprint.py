"""kvc.footprint returns what `kvc-footprint --json` prints."""

import json
import os
import subprocess

import pytest

import kvc

TOOL = os.environ.get("KVC_FOOTPRINT_EXE")
MODELS = ["v4-pro", "v4-flash", "deepseek-v3.2", "deepseek-v3", "llama3-70b", "gqa:61:8:128", "mha:32:32:128:1"]
TOKENS = [1, 127, 4096, 1 << 20, 1 << 40]


def tool_rows(*args):
    if not TOOL:
        pytest.skip("KVC_FOOTPRINT_EXE is not set (ctest sets it to the built kvc-footprint)")
    out = subprocess.run([TOOL, "--json", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


@pytest.mark.parametrize("model", MODELS)
def test_same_dict_as_the_tool(model):
    expected = tool_rows("--model", model, "--tokens", ",".join(map(str, TOKENS)), "--baseline", "deepseek-v3")
    got = kvc.footprint(model, tokens=TOKENS, baseline="deepseek-v3")
    assert got == expected
    assert [list(row) for row in got] == [list(row) for row in expected]  # keys in the same order
    assert kvc.footprint(model, tokens=4096, baseline="deepseek-v3") == expected[2]


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
def test_formats_and_no_baseline(fmt):
    expected = tool_rows("--model", "v4-flash", "--tokens", "65536", "--format", fmt)
    assert kvc.footprint("v4-flash", tokens=65536, format=fmt) == expected[0]
    assert "baseline" not in expected[0]


def test_v4_pro_at_1m_tokens_is_under_a_tenth_of_v3():
    # Spec §6's headline, as a sanity check of the numbers the dict carries.
    row = kvc.footprint("v4-pro", tokens=1 << 20, baseline="deepseek-v3")
    assert row["ratio_to_baseline"] < 0.1
    assert row["total_bytes"] == sum(row["components"].values())


def test_refusals():
    with pytest.raises(kvc.Error, match='unknown model "v9"') as error:
        kvc.footprint("v9")
    assert error.value.code == "NOT_FOUND"
    for tokens in (0, -5, (1 << 40) + 1, 2.5, "10", True):
        with pytest.raises(ValueError, match="tokens"):
            kvc.footprint("v4-pro", tokens=tokens)
    with pytest.raises(ValueError, match="format"):
        kvc.footprint("v4-pro", format="fp4")
