"""The scaling model's arithmetic (docs/parallel.md) against hand-computed figures."""

import pytest

from deepseekmoe.model import presets
from deepseekmoe.parallel.scaling import a2a_bytes_per_token, a2a_point, expected_distinct_ranks


def test_16b_intra_node_all_to_all_by_hand():
    cfg = presets.get("deepseekmoe-16b")
    # 27 MoE layers x K=6 slots x d=2048 x 2 B x 7/8 leaving the GPU x 4 exchanges (fwd+bwd).
    assert a2a_bytes_per_token(cfg, 8) == 27 * 6 * 2048 * 2 * 7 / 8 * 4 == 2_322_432
    assert a2a_bytes_per_token(cfg, 8, recompute=True) == 2_322_432 * 1.5
    p = a2a_point("16b", cfg, ep=8, mfu=0.45)
    assert p.inter_node_bytes_per_token == 0
    assert p.comm_s_per_token == pytest.approx(2_322_432 / 350e9)
    assert p.compute_s_per_token == pytest.approx(cfg.flops_per_token(4096) / (0.45 * 989e12))
    assert p.ratio == pytest.approx(6.27, abs=0.01)


def test_145b_two_nodes_inter_node_share():
    cfg = presets.get("deepseekmoe-145b")
    p = a2a_point("145b", cfg, ep=16, gpus_per_node=8)
    # 8 of the 15 other ranks are on the other node; that traffic runs at 50 GB/s.
    assert p.inter_node_bytes_per_token == pytest.approx(p.bytes_per_token * 8 / 15)
    assert p.comm_s_per_token == pytest.approx(p.inter_node_bytes_per_token / 50e9)


def test_expected_distinct_ranks():
    cfg = presets.get("tiny")  # 16 experts, K=3
    assert expected_distinct_ranks(cfg, 1) == 1
    assert expected_distinct_ranks(cfg, 16) == pytest.approx(3)  # one expert per rank
    # ep=2: a token misses a rank only if all 3 experts sit on the other: 2 * (1 - C(8,3)/C(16,3)).
    assert expected_distinct_ranks(cfg, 2) == pytest.approx(2 * (1 - 56 / 560))
