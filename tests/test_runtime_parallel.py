"""The real megatron-core MoE stack on CPU/gloo: parallel layouts equal world size 1."""

import pytest

from ders_megatron.testing.parity import gpt_parity


def test_tp2_sp_matches_single_rank(dist2):
    losses = dist2.run(gpt_parity, [dict(tp=2)])
    assert losses[0] == losses[1]  # both ranks computed the same losses


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_ep2_and_tp2_ep2_match_single_rank(dist2, dispatcher):
    layouts = [dict(ep=2), dict(tp=2, ep=2, etp=1), dict(tp=2, ep=1, etp=2)]
    dist2.run(gpt_parity, layouts, dict(moe_token_dispatcher_type=dispatcher))
