"""Ulysses sequence parallelism on real gloo ranks: SP on slices equals one rank on the whole row."""

from __future__ import annotations

import pytest
from attn_workers import ulysses_checks
from distributed_helper import run_ranks

from sft.demo.assets import build_model_config
from sft.parallel.ulysses import check_sp_heads


@pytest.fixture(scope="module")
def model_config(demo_tokenizer):
    return build_model_config(demo_tokenizer)  # 4 query heads, 2 KV heads, head_dim 16


def test_sp2_attention_and_model_match_single_rank(model_config):
    # (sp, heads, kv_heads): KV heads split over ranks; a whole-model forward/backward at sp=2.
    run_ranks(ulysses_checks, 2, model_config, [(2, 4, 2), (2, 4, 4), (2, 8, 1)], [2])


def test_sp4_attention_and_model_match_single_rank(model_config):
    # sp=4 with 2 KV heads replicates them; (2, ...) runs two SP groups of 2 in one world of 4,
    # so slices follow the group rank, not the global rank.
    cases = [(4, 4, 2), (4, 4, 4), (4, 8, 2), (2, 4, 2)]
    run_ranks(ulysses_checks, 4, model_config, cases, [4])


@pytest.mark.parametrize(
    ("heads", "kv_heads", "sp"), [(4, 2, 1), (4, 2, 2), (4, 2, 4), (4, 4, 4), (8, 1, 8), (12, 4, 2)]
)
def test_check_sp_heads_accepts(heads, kv_heads, sp):
    check_sp_heads(heads, kv_heads, sp)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "sp", "valid"),
    [(4, 2, 3, "[1, 2, 4]"), (4, 2, 8, "[1, 2, 4]"), (12, 6, 4, "[1, 2, 3, 6, 12]"), (12, 4, 6, "[1, 2, 4, 12]")],
)
def test_check_sp_heads_rejects_with_fix(heads, kv_heads, sp, valid):
    with pytest.raises(ValueError) as err:
        check_sp_heads(heads, kv_heads, sp)
    msg = str(err.value)
    assert f"ulysses_sequence_parallel_size={sp}" in msg
    assert f"num_attention_heads={heads}" in msg and f"num_key_value_heads={kv_heads}" in msg
    assert f"one of {valid}" in msg


def test_check_sp_heads_rejects_non_positive():
    with pytest.raises(ValueError, match="ulysses_sequence_parallel_size=0"):
        check_sp_heads(4, 2, 0)
