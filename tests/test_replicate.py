"""tools/replicate.py: the verdict rules on given numbers, and the machinery end to end.

The quick profile tests what the study *does* — every artifact written, every step
resumable, the report rebuilt from records — never what it *finds*: its models train
for a handful of iterations.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from ders_megatron.pipeline.replicate import stats
from ders_megatron.pipeline.replicate.report import compression_claims, upcycling_claims


# --------------------------------------------------------------------------- #
# Intervals
# --------------------------------------------------------------------------- #
def test_seed_interval_is_the_paired_t_interval():
    # differences 1, 2, 3: mean 2, sd 1, n 3 -> half width t(2) * 1 / sqrt(3) = 4.303 / 1.732
    diff = stats.seed_interval([11, 12, 13], [10, 10, 10])
    assert diff.mean == pytest.approx(2.0)
    assert diff.high - diff.mean == pytest.approx(4.303 / math.sqrt(3), rel=1e-6)
    assert not diff.excludes_zero()  # 2 ± 2.48: three noisy seeds cannot exclude 0
    assert stats.seed_interval([12, 12.1, 11.9], [10, 10, 10]).excludes_zero()  # 2 ± 0.25 can


def test_seed_interval_pairs_by_seed_not_by_pooled_spread():
    # a shared seed effect (+-1) cancels in the pairing: a constant 0.01 improvement is certain
    base = [3.0, 4.0, 5.0]
    diff = stats.seed_interval([b - 0.01 for b in base], base)
    assert diff.high < 0 and diff.high - diff.low < 1e-9


def test_paired_bootstrap_covers_a_known_shift_and_is_reproducible():
    gen = torch.Generator().manual_seed(0)
    b = torch.rand(400, generator=gen, dtype=torch.float64) * 2
    a = b + 0.05 + torch.randn(400, generator=gen, dtype=torch.float64) * 0.01
    first = stats.paired_bootstrap(a, b, resamples=500)
    assert first.low < 0.05 < first.high and first.low > 0.045 and first.high < 0.055
    assert first == stats.paired_bootstrap(a, b, resamples=500)  # seeded
    with pytest.raises(ValueError, match="paired windows differ"):
        stats.paired_bootstrap(a[:10], b, resamples=10)


@pytest.mark.parametrize("low,high,expected", [(-0.01, 0.01, "confirmed"), (0.03, 0.05, "not confirmed"),
                                               (-0.01, 0.03, "inconclusive"), (-0.05, -0.03, "not confirmed")])
def test_equivalence_rule(low, high, expected):
    assert stats.within(stats.Interval((low + high) / 2, low, high, 3, "t"), margin=0.02) == expected


def test_directional_rules():
    up, down, straddle = (stats.Interval(m, lo, hi, 3, "t") for m, lo, hi in
                          ((0.2, 0.1, 0.3), (-0.2, -0.3, -0.1), (0.0, -0.1, 0.1)))
    assert [stats.worse(i) for i in (up, down, straddle)] == ["confirmed", "not confirmed", "inconclusive"]
    assert [stats.better(i) for i in (up, down, straddle)] == ["not confirmed", "confirmed", "inconclusive"]
    assert [stats.not_worse(i, 0.05) for i in (up, down, straddle)] == ["not confirmed", "confirmed", "inconclusive"]


# --------------------------------------------------------------------------- #
# Verdicts on given numbers
# --------------------------------------------------------------------------- #
def _rows(**losses):
    return {name: {"label": name, "seeds": [1, 2, 3], "losses": values} for name, values in losses.items()}


def _verdicts(claims):
    return {c["claim"].split("] ", 1)[1]: c["verdict"] for c in claims}


def test_upcycling_verdicts_when_vanilla_gains():
    rows = _rows(dense=[3.00, 3.10, 3.05], vanilla=[2.90, 3.00, 2.95],  # gain 0.10 -> margin 0.025
                 lm4=[2.905, 3.003, 2.952],  # within 0.01 of vanilla, tight
                 **{"sm0.99": [2.99, 3.09, 3.04]},  # kept almost none of the gain
                 **{"lm4-frozen": [2.95, 3.05, 3.00]})
    verdicts = _verdicts(upcycling_claims("A", rows))
    assert verdicts["lm4 ≈ vanilla upcycling"] == "confirmed"
    assert verdicts["sm0.99 ≈ vanilla upcycling"] == "not confirmed"
    assert verdicts["freezing the base costs quality"] == "confirmed"
    # lm4 - vanilla = +0.0033 ± 0.0038 straddles 0: not shown better, not shown worse
    assert verdicts["some DeRS variant beats vanilla"] == "inconclusive"


def test_upcycling_verdicts_when_vanilla_does_not_beat_dense():
    rows = _rows(dense=[3.00, 3.10, 3.05], vanilla=[3.01, 3.08, 3.06], lm4=[3.00, 3.09, 3.05],
                 lm64=[3.01, 3.10, 3.06])  # worse than lm4 by 0.01 on every seed
    claims = upcycling_claims("A", rows)
    # r=64 worse beyond noise: "no better than small ranks" holds without any margin
    assert _verdicts(claims)["rank 64 is no better than small ranks"] == "confirmed"
    equivalence = [c for c in claims if "≈ vanilla" in c["claim"]]
    assert equivalence and all(c["verdict"] == "inconclusive" for c in equivalence)
    assert "does not beat dense-continued beyond noise" in equivalence[0]["why"]


def _codec_row(mean, low, high):
    return {"vs_none": {"mean": mean, "low": low, "high": high, "n": 100, "method": "paired bootstrap"}}


def test_compression_verdicts():
    table = {"base-only": _codec_row(0.5, 0.4, 0.6), "dare:0.9": _codec_row(0.01, 0.0, 0.02),
             "quant:2": _codec_row(0.2, 0.15, 0.25)}  # lossless margin: 10 % of 0.5 = 0.05
    verdicts = _verdicts(compression_claims("A", table))
    assert verdicts == {"dare:0.9 is lossless": "confirmed", "quant:2 is lossless": "not confirmed"}
    table["base-only"] = _codec_row(0.001, -0.002, 0.004)  # deltas carry nothing measurable
    table["dare:0.9"]["vs_base_only"] = _codec_row(0.03, 0.02, 0.04)["vs_none"]  # error of its own (rescale)
    table["quant:2"]["vs_base_only"] = _codec_row(0.001, -0.001, 0.003)["vs_none"]  # within noise of base-only
    claims = compression_claims("A", table)
    assert _verdicts(claims) == {"dare:0.9 is lossless": "not confirmed", "quant:2 is lossless": "inconclusive"}
    assert all("add nothing measurable" in c["why"] for c in claims)
    # deltas that measurably hurt (base-only better than uncompressed, as in the Coder layout):
    # lossless means keeping the uncompressed loss, margin 10 % of |0.02| = 0.002 -- not
    # "worse than base-only", which any faithful codec would be
    table["base-only"] = _codec_row(-0.02, -0.03, -0.01)
    table["dare:0.9"]["vs_none"] = _codec_row(0.0005, -0.0005, 0.0015)["vs_none"]
    table["quant:2"]["vs_none"] = _codec_row(0.01, 0.008, 0.012)["vs_none"]
    claims = compression_claims("A", table)
    assert _verdicts(claims) == {"dare:0.9 is lossless": "confirmed", "quant:2 is lossless": "not confirmed"}
    assert all("margin +0.0020" in c["why"] for c in claims)


# --------------------------------------------------------------------------- #
# The machinery, end to end
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    from ders_megatron.pipeline.launch import EXCERPT
    from ders_megatron.pipeline.replicate.main import main
    from ders_megatron.testing.hf import save_tiny_hf

    root = tmp_path_factory.mktemp("replicate")
    save_tiny_hf("llama", root / "hf")
    argv = ["--quick", "--workdir", str(root / "work"), "--report-dir", str(root / "report"), "--text", str(EXCERPT),
            "--hf-model", str(root / "hf")]
    assert main(argv) == 0
    return root, argv


def test_quick_study_writes_every_artifact(quick_study):
    root, _ = quick_study
    report = (root / "report" / "replication.md").read_text()
    for section in ("## Verdicts", "## Setting A", "## Setting B", "Compression of the trained vanilla MoE",
                    "Redundancy", "## Cost of each step"):
        assert section in report
    results = json.loads((root / "report" / "replication.json").read_text())
    for layout in ("llava", "coder"):
        rows = results["setting_a"][layout]["rows"]
        assert all(len(row["losses"]) == 2 for row in rows.values())  # every variant, both seeds
        assert rows["lm4"]["params"] < rows["vanilla"]["params"]
        assert rows["lm4-frozen"]["trainable"] < rows["lm4"]["trainable"]  # the base is frozen
    assert set(results["compression"]["A llava"]) >= {"none", "dare:0.9", "quant:4", "base-only"}
    assert results["compression"]["A llava"]["quant_group_size"] == 32  # quick model: hidden 32, FFN 64
    assert "k-bit codecs quantize in groups of 32 input features" in report
    assert results["compression"]["B"]["base-only"]["vs_none"]["n"] > 0
    assert {c["verdict"] for c in results["claims"]} <= {"confirmed", "not confirmed", "inconclusive"}
    for png in ("setting_a_losses", "setting_b_curves", "compression", "redundancy"):
        assert (root / "report" / "img" / "replication" / f"{png}.png").stat().st_size > 1000


def test_quick_study_resumes(quick_study, capsys):
    from ders_megatron.pipeline.replicate.main import main

    root, argv = quick_study
    state = root / "work" / "state"
    before = json.loads((root / "report" / "replication.json").read_text())
    # an interrupted step: its record is gone, its output half there
    (state / "a-llava-lm4-s2.json").unlink()
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "a: DeRS-LM r=4, llava, seed 2" in out  # redone
    redone = [line for line in out.splitlines() if "] " in line and "skipping" not in line and line.startswith("[replicate] [")]
    assert len(redone) == 1, redone
    after = json.loads((root / "report" / "replication.json").read_text())
    # the same seed, data and start give the same model: the rerun reproduces the loss exactly
    assert after["setting_a"]["llava"]["rows"]["lm4"]["losses"] == before["setting_a"]["llava"]["rows"]["lm4"]["losses"]


def test_budget_lines_sum_each_setting_and_say_over_or_within():
    from ders_megatron.pipeline.replicate.report import budget_lines

    steps = {"text": 0.0, "a-pretrain": 3600.0, "a-dense-s1": 1800.0, "b-dense": 5400.0}
    (line,) = budget_lines(steps)
    assert "Setting A 1.5 h, Setting B 1.5 h, 3.0 h in all: within the 3 h budget" in line
    steps["b-vanilla"] = 36.0
    assert "3.0 h in all: over the 3 h budget" in budget_lines(steps)[0]


def test_movement_note_says_whether_setting_b_reached_its_cosine_aim():
    from ders_megatron.pipeline.replicate.report import movement_note

    def summary(low):
        return {m: {"min_cos": low} for m in ("fc1", "fc2")}

    assert "**not reached**" in movement_note(summary(0.99978))[0]
    assert "min cos 0.998000, reached." in movement_note(summary(0.998))[0]
    assert movement_note(None) == []


def test_quant_group_divides_every_expert_input(monkeypatch, tmp_path):
    """Setting B's SmolLM2 (hidden 576, FFN 1536) is not divisible by the default group of 128:
    its compression step stopped with compress's error; the study now picks 64 there and keeps
    128 for Setting A (hidden 128, FFN 512)."""
    from types import SimpleNamespace

    import ders_megatron.io.checkpoint as checkpoint
    from ders_megatron.pipeline.replicate.runs import quant_group_size

    for hidden, ffn, want in ((576, 1536, 64), (128, 512, 128), (96, 256, 32)):
        args = SimpleNamespace(hidden_size=hidden, ffn_hidden_size=4 * hidden, moe_ffn_hidden_size=ffn)
        monkeypatch.setattr(checkpoint, "stored_args", lambda root, args=args: args)
        assert quant_group_size(tmp_path) == want
