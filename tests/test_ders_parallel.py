"""DeRS experts at world size 2 against the unsharded reference, and checkpoint resharding."""

import pytest

from ders_megatron.deltas import DenseDeltaConfig, LowRankDeltaConfig, SparseDeltaConfig
from ders_megatron.experts import DeRSConfig
from ders_megatron.testing.parity import gpt_parity

DERS = {
    "lowrank": DeRSConfig(delta=LowRankDeltaConfig(rank=2)),
    "sparse": DeRSConfig(delta=SparseDeltaConfig(drop_rate=0.9)),
    "dense": DeRSConfig(delta=DenseDeltaConfig()),
}
# At world size 2, TP=2 means expert-TP 2 (base sharded, deltas sliced); TP=2 with EP=2
# needs expert-TP 1 (base whole on each TP rank, its gradient summed over TP).
LAYOUTS = [dict(tp=2), dict(ep=2), dict(tp=2, ep=2, etp=1), dict(tp=2, etp=1)]


def ders_gpt_parity(kind, dispatcher):
    """Non-zero deltas first, so the deltas' own gradients and slices are exercised."""
    return gpt_parity(LAYOUTS, dict(moe_token_dispatcher_type=dispatcher), ders=DERS[kind], perturb=0.05)


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
@pytest.mark.parametrize("kind", sorted(DERS))
def test_ders_gpt_layouts_match_single_rank(dist2, kind, dispatcher):
    dist2.run(ders_gpt_parity, kind, dispatcher)
