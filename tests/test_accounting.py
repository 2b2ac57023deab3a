"""DeRS paper parameter accounting: the paper's printed counts, validation, and the CLI.

Tolerance: the paper prints counts to 2-3 significant digits ("1.24B",
"0.26M"), so a row passes when our exact count rounds to the printed number,
i.e. lies within half a unit of its last printed digit. A few rows print a
value one unit low (e.g. 1,245,806,592 as "1.24B", while Table S11 prints the
very same count, 3 x 415M, as "1.25B"); those carry a one-unit allowance and
their exact count in a comment. Two printed numbers match no accounting and
are recorded as such below.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ders_megatron.core.accounting import (
    PAPER_MODELS,
    DeltaSpec,
    QuantSpec,
    MoEShape,
    added_parameters,
    ffn_matrices,
    sparse_nnz,
)
from ders_megatron.cli.flags import parse_moe_layer_freq
from ders_megatron.cli.param_report import build_param_report_parser, param_report_main

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 0.5  # printed = our count rounded to its last digit
ONE_LOW = 1.0  # printed one unit off in the last digit (exact count in the row's comment)

V = DeltaSpec(kind="vanilla")


def LM(rank):  # noqa: N802 - the paper's DeRS-LM
    return DeltaSpec(kind="lowrank", rank=rank)


def SM(p):  # noqa: N802 - the paper's DeRS-SM (and DeRS-Sparsification: same storage)
    return DeltaSpec(kind="sparse", drop_rate=p)


def Q(bits):  # noqa: N802 - the paper's DeRS-Quantization, counted as it counts (no scales)
    return QuantSpec(bits=bits)


def _row(table, model, delta, printed, *, shared=None, slack=ROUNDS, marks=()):
    ext = "-ext" if shared == "ders" else ""
    return pytest.param(model, shared, delta, printed, slack, marks=marks,
                        id=f"{table}-{model}{ext}-{delta.label.replace(' ', '')}")


def _quant_sweep(table, model, printed_by_bits, *, univ="", shared=None, one_low=()):
    """A DeRS-Quantization table: one row per bit width (16 prints the uncompressed model)."""
    return [_row(table, model, Q(k), univ + printed, shared=shared, slack=ONE_LOW if k in one_low else ROUNDS)
            for k, printed in printed_by_bits.items()]


def _sweep(table, model, printed_by_p, *, univ="", shared=None, one_low=()):
    """A compression table: one row per drop rate (p=0.0 rows print the uncompressed model)."""
    return [_row(table, model, SM(p), univ + printed, shared=shared,
                 slack=ONE_LOW if p in one_low else ROUNDS) for p, printed in printed_by_p.items()]


PAPER_ROWS = [
    # Table 1: MoE-LLaVA, every other layer -> 4 experts, top-2.
    _row("T1", "moe-llava-stablelm", V, "1.24B", slack=ONE_LOW),  # 1,245,806,592
    _row("T1", "moe-llava-stablelm", SM(0.9999), "0.26M"),
    _row("T1", "moe-llava-stablelm", LM(1), "1.20M"),
    _row("T1", "moe-llava-qwen", V, "1.22B"),
    _row("T1", "moe-llava-qwen", SM(0.9999), "0.26M"),
    _row("T1", "moe-llava-qwen", LM(1), "1.19M"),
    _row("T1", "moe-llava-phi", V, "2.52B"),
    _row("T1", "moe-llava-phi", SM(0.9999), "1.11M"),
    _row("T1", "moe-llava-phi", LM(1), "2.42M"),
    # Table 2: Med-MoE, universal FFN + 4 experts, top-1; "universal + rest".
    _row("T2", "med-moe-stablelm", V, "0.42B+1.24B", slack=ONE_LOW),  # rest 1,245,806,592
    # Unexplained: same dims, delta and router as Table 1's 0.26M row, and its
    # DeRS-LM twin (1.20M) matches, so no router or bias change can give 0.29M.
    _row("T2", "med-moe-stablelm", SM(0.9999), "0.42B+0.29M",
         marks=pytest.mark.xfail(strict=True, reason="paper prints 0.29M; the count is 0.26M")),
    _row("T2", "med-moe-stablelm", LM(1), "0.42B+1.20M"),
    _row("T2", "med-moe-phi", V, "0.84B+2.52B"),
    _row("T2", "med-moe-phi", SM(0.9999), "0.84B+1.11M"),
    _row("T2", "med-moe-phi", LM(1), "0.84B+2.42M"),
    # Table 3: Coder-MoE, every layer, universal FFN + 4 experts, top-1, noisy gate.
    _row("T3", "coder-moe", V, "0.81B+2.43B", slack=ONE_LOW),  # rest 2,435,186,688
    _row("T3", "coder-moe", SM(0.9), "0.81B+325M"),
    _row("T3", "coder-moe", LM(4), "0.81B+9.09M"),
    # Table 4: Coder-MoE sparse-rate and rank ablations.
    _row("T4a", "coder-moe", SM(0.9999), "0.81B+0.72M"),
    _row("T4a", "coder-moe", SM(0.999), "0.81B+3.64M"),
    _row("T4a", "coder-moe", SM(0.99), "0.81B+32.9M"),
    _row("T4a", "coder-moe", SM(0.9), "0.81B+325M"),
    _row("T4b", "coder-moe", LM(1), "0.81B+2.57M"),
    _row("T4b", "coder-moe", LM(4), "0.81B+9.09M"),
    _row("T4b", "coder-moe", LM(16), "0.81B+35.2M"),
    _row("T4b", "coder-moe", LM(64), "0.81B+140M"),
    # Table S7 / S8: extended DeRS, the universal FFN joins the base (N+1 deltas).
    _row("S7", "med-moe-stablelm", V, "1.66B", shared="ders"),
    _row("S7", "med-moe-stablelm", SM(0.999), "2.17M", shared="ders"),
    _row("S7", "med-moe-stablelm", LM(4), "5.63M", shared="ders"),
    _row("S7", "med-moe-phi", V, "3.36B", shared="ders"),
    _row("S7", "med-moe-phi", SM(0.999), "5.18M", shared="ders"),
    _row("S7", "med-moe-phi", LM(4), "9.18M", shared="ders"),
    _row("S8", "coder-moe", V, "3.24B", shared="ders", slack=ONE_LOW),  # 3,246,784,512
    _row("S8", "coder-moe", SM(0.9), "406M", shared="ders"),
    _row("S8", "coder-moe", LM(4), "11.3M", shared="ders"),
    # DeRS compression by sparsification stores what DeRS-SM stores: base + values.
    # S9/S11: extended (universal FFN compressed too).
    *_sweep("S9", "coder-moe", {0.2: "3.24B", 0.4: "2.43B", 0.6: "1.62B", 0.8: "0.81B",
                                0.9: "0.41B", 0.99: "0.04B"},
            shared="ders", one_low=(0.2, 0.4)),  # 3,246,784,656 and 2,435,186,616
    *_sweep("S11", "med-moe-stablelm", {0.2: "1.66B", 0.4: "1.25B", 0.6: "0.83B", 0.8: "0.42B",
                                        0.9: "0.21B", 0.99: "0.02B"}, shared="ders"),
    # p=0.99 prints 0.21B, a typo: the count is 42.9M, and 0.9 -> 0.42B implies 0.04B.
    *_sweep("S11", "med-moe-phi", {0.2: "3.36B", 0.4: "2.52B", 0.6: "1.68B", 0.8: "0.84B",
                                   0.9: "0.42B"}, shared="ders"),
    # S13/S15/S17: experts only.
    *_sweep("S13", "moe-llava-stablelm", {0.2: "1.33B", 0.4: "1.00B", 0.6: "0.66B", 0.8: "0.33B",
                                          0.9: "0.17B", 0.99: "0.02B"}),
    *_sweep("S13", "moe-llava-qwen", {0.2: "1.30B", 0.4: "0.97B", 0.6: "0.65B", 0.8: "0.32B",
                                      0.9: "0.16B", 0.99: "0.02B"}),
    *_sweep("S13", "moe-llava-phi", {0.2: "2.68B", 0.4: "2.01B", 0.6: "1.34B", 0.8: "0.67B",
                                     0.9: "0.34B", 0.99: "0.03B"}, one_low=(0.2,)),  # 2,685,132,800
    *_sweep("S15", "med-moe-stablelm", {0.2: "1.33B", 0.4: "1.00B", 0.6: "0.66B", 0.8: "0.33B",
                                        0.9: "0.17B", 0.99: "0.02B"}, univ="0.42B+"),
    *_sweep("S15", "med-moe-phi", {0.2: "2.68B", 0.4: "2.01B", 0.6: "1.34B", 0.8: "0.67B",
                                   0.9: "0.34B", 0.99: "0.03B"}, univ="0.84B+", one_low=(0.2,)),
    *_sweep("S17", "coder-moe", {0.2: "2.60B", 0.4: "1.95B", 0.6: "1.30B", 0.8: "0.65B",
                                 0.9: "0.32B", 0.99: "0.03B"}, univ="0.81B+",
            one_low=(0.9,)),  # 325,032,288
    # DeRS-Quantization (S12 extended, S14/S16/S18 experts only): N k-bit deltas counted as
    # N * W * k / 16 sixteen-bit parameters, plus the router; the per-group scales are not
    # in the paper's counts (QuantSpec(scale_overhead=True) adds them).
    *_quant_sweep("S12", "med-moe-stablelm", {8: "1.04B", 4: "0.52B", 2: "0.26B", 1: "0.13B"}, shared="ders"),
    *_quant_sweep("S12", "med-moe-phi", {8: "2.10B", 4: "1.05B", 2: "0.52B", 1: "0.26B"}, shared="ders",
                  one_low=(2,)),  # 525,271,040
    *_quant_sweep("S14", "moe-llava-stablelm", {8: "0.83B", 4: "0.42B", 2: "0.21B", 1: "0.10B"}),
    *_quant_sweep("S14", "moe-llava-qwen", {8: "0.81B", 4: "0.41B", 2: "0.20B", 1: "0.10B"}),
    *_quant_sweep("S14", "moe-llava-phi", {8: "1.68B", 4: "0.84B", 2: "0.42B", 1: "0.21B"}),
    *_quant_sweep("S16", "med-moe-stablelm", {8: "0.83B", 4: "0.42B", 2: "0.21B", 1: "0.10B"}, univ="0.42B+"),
    *_quant_sweep("S16", "med-moe-phi", {8: "1.68B", 4: "0.84B", 2: "0.42B", 1: "0.21B"}, univ="0.84B+"),
    *_quant_sweep("S18", "coder-moe", {8: "1.62B", 4: "0.81B", 2: "0.41B", 1: "0.20B"}, univ="0.81B+"),
]


def _printed(text: str) -> tuple[float, float]:
    """A count as the paper prints it -> (value, one unit of its last printed digit)."""
    whole, frac, unit = re.fullmatch(r"(\d+)(?:\.(\d+))?([MB])", text).groups()
    scale = {"M": 1e6, "B": 1e9}[unit]
    return float(f"{whole}.{frac or 0}") * scale, 10.0 ** -len(frac or "") * scale


def _assert_printed(actual: int, printed: str, slack: float) -> None:
    value, unit = _printed(printed)
    assert abs(actual - value) <= slack * unit, f"{actual:,} does not print as {printed}"


def _report(model, shared, delta):
    shape = PAPER_MODELS[model]
    if shared is not None:
        shape = dataclasses.replace(shape, shared_expert=shared)
    return added_parameters(shape, delta)


@pytest.mark.parametrize("model, shared, delta, printed, slack", PAPER_ROWS)
def test_paper_added_params(model, shared, delta, printed, slack):
    report = _report(model, shared, delta)
    univ, _, rest = printed.rpartition("+")
    _assert_printed(report.routed_added_params, rest, slack)
    if univ:
        _assert_printed(report.universal_ffn_params, univ, ROUNDS)
    else:
        assert report.universal_ffn_params == 0


def test_paper_reduction_factors():
    """Sec. 4.1: DeRS-SM / DeRS-LM cut MoE-LLaVA-Phi's added params "2270x and 1041x".

    The paper divides its rounded numbers (2.52B / 1.11M, 2.52B / 2.42M); exact counts give
    2260x and 1042x, so allow the rounding of the 3-digit divisor (0.5%).
    """
    vanilla = _report("moe-llava-phi", None, V).added_params
    sm = _report("moe-llava-phi", None, SM(0.9999)).added_params
    lm = _report("moe-llava-phi", None, LM(1)).added_params
    assert vanilla / sm == pytest.approx(2270, rel=5e-3)
    assert vanilla / lm == pytest.approx(1041, rel=5e-3)


def _deepseek_coder_1_3b_params() -> int:
    """Dense DeepSeek-Coder-1.3B (HF config): vocab 32256 untied, 24 Llama layers, MHA, no bias."""
    hidden, layers, vocab = 2048, 24, 32256
    per_layer = 4 * hidden * hidden + PAPER_MODELS["coder-moe"].dense_ffn_params + 2 * hidden
    return 2 * vocab * hidden + layers * per_layer + hidden


@pytest.mark.parametrize("delta, printed", [(V, "4.59B"), (SM(0.9), "2.48B"), (SM(0.99), "2.19B"),
                                            (LM(4), "2.17B")])
def test_paper_table6_model_size(delta, printed):
    """Table 6 "Model Size" = dense Coder model + added params (universal FFN included)."""
    total = _deepseek_coder_1_3b_params() + _report("coder-moe", None, delta).added_params
    _assert_printed(total, printed, ROUNDS)


def test_gate_and_up_are_separate_matrices():
    """Table 1's 1.20M needs a rank-r delta on gate and up each; one [2*ffn, hidden] gives 1.11M."""
    assert ffn_matrices(2048, 5632, gated=True) == ((5632, 2048), (5632, 2048), (2048, 5632))
    fused = 48 * (2048 + 2 * 5632 + 5632 + 2048) + 12 * 2048 * 4  # 4 experts x 12 layers, + router
    _assert_printed(fused, "1.11M", ROUNDS)  # what Table 1 would print had the paper fused them


TINY = MoEShape(hidden_size=4, ffn_hidden_size=8, num_layers=2, num_experts=2, topk=1,
                gated=True, bias=True)


def test_tiny_shape_by_hand():
    """Every field on a shape small enough to count by hand (rank 1, both layers MoE).

    Per layer: matrices [8,4], [8,4], [4,8] = 96 weights; biases 2*8 + 4 = 20; router 4*2 = 8.
    A rank-1 delta: 3 * (4 + 8) = 36 per expert.
    """
    r = added_parameters(TINY, LM(1))
    assert (r.num_moe_layers, r.dense_ffn_params_per_layer, r.dense_ffn_params) == (2, 116, 232)
    pl = r.per_layer
    assert (pl.router, pl.expert_weights, pl.expert_biases, pl.universal_ffn) == (8, 72, 20, 0)
    assert (r.added_params_per_layer, r.added_params, r.added_bytes) == (100, 200, 400)
    assert r.active_params_per_token == 2 * (8 + 96 + 36 + 20)  # router + base + 1 delta + bias
    assert (r.sparse_seed_bytes, r.sparse_index_bytes) == (0, 0)


def test_tiny_shape_variants_by_hand():
    assert added_parameters(TINY, V).per_layer.total == 8 + 96 + 20  # one extra full copy
    assert added_parameters(TINY, DeltaSpec(kind="dense")).per_layer.total == 8 + 2 * 96 + 20
    sparse = added_parameters(TINY, SM(0.5))  # 16 of 32 values per matrix
    assert sparse.per_layer.expert_weights == 2 * 48
    assert sparse.sparse_seed_bytes == 2 * (2 * 3 * 8)  # layers x experts x matrices x 8
    assert sparse.sparse_index_bytes == 2 * (2 * 48 * 4)  # int32 per kept value
    full = added_parameters(dataclasses.replace(TINY, shared_expert="full"), LM(1))
    assert full.per_layer.universal_ffn == 116 and full.universal_ffn_params == 232
    ext = added_parameters(dataclasses.replace(TINY, shared_expert="ders"), LM(1)).per_layer
    assert (ext.expert_weights, ext.expert_biases, ext.universal_ffn) == (3 * 36, 2 * 20, 0)


def test_index_bytes_widen_past_int32():
    """A matrix with more than 2**31 positions needs int64 indices (8 bytes each)."""
    big = MoEShape(hidden_size=65536, ffn_hidden_size=65536, num_layers=1, num_experts=2)
    r = added_parameters(big, SM(0.9999))
    assert r.sparse_index_bytes == 2 * 2 * sparse_nnz(65536**2, 0.9999) * 8


def test_layer_freq_like_megatron():
    assert PAPER_MODELS["moe-llava-stablelm"].num_moe_layers == 12  # layers 0, 2, ..., 22
    shape = MoEShape(hidden_size=8, ffn_hidden_size=16, num_layers=4, num_experts=2,
                     moe_layer_freq=[0, 1, 1, 0])
    assert shape.moe_layer_freq == (0, 1, 1, 0) and shape.num_moe_layers == 2
    assert parse_moe_layer_freq("([1]*3+[0])*2") == [1, 1, 1, 0, 1, 1, 1, 0]
    assert parse_moe_layer_freq("2") == 2


@pytest.mark.parametrize("text", ["__import__('os')", "[1]*10**9", "[1.5, 0]", "[1]*[2]"])
def test_layer_freq_parser_rejects(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        parse_moe_layer_freq(text)


def _shape(**kw):
    base = dict(hidden_size=64, ffn_hidden_size=128, num_layers=4, num_experts=4)
    return MoEShape(**{**base, **kw})


@pytest.mark.parametrize("build, flag", [
    (lambda: _shape(num_experts=1), "--num-experts must be >= 2"),
    (lambda: _shape(topk=0), "--moe-router-topk must be in [1, num_experts=4]"),
    (lambda: _shape(topk=5), "--moe-router-topk must be in [1, num_experts=4]"),
    (lambda: _shape(hidden_size=0), "--hidden-size"),
    (lambda: _shape(ffn_hidden_size=-1), "--ffn-hidden-size"),
    (lambda: _shape(num_layers=0), "--num-layers"),
    (lambda: _shape(moe_ffn_hidden_size=0), "--moe-ffn-hidden-size"),
    (lambda: _shape(moe_layer_freq=0), "--moe-layer-freq"),
    (lambda: _shape(moe_layer_freq=[1, 0]),
     "--moe-layer-freq lists 2 layers but --num-layers is 4"),
    (lambda: _shape(moe_layer_freq=[1, 0, 2, 0]), "--moe-layer-freq entries must be 0 or 1"),
    (lambda: _shape(moe_layer_freq=[0, 0, 0, 0]), "--moe-layer-freq selects no MoE layer"),
    (lambda: _shape(shared_expert="half"), "--moe-ders-shared-expert"),
    (lambda: DeltaSpec(kind="lora"), "--moe-ders must be one of"),
    (lambda: DeltaSpec(kind="lowrank"), "--moe-ders-rank"),
    (lambda: DeltaSpec(kind="lowrank", rank=0), "--moe-ders-rank"),
    (lambda: DeltaSpec(kind="lowrank", rank=True), "--moe-ders-rank"),
    (lambda: DeltaSpec(kind="sparse"), "--moe-ders-drop-rate"),
    (lambda: DeltaSpec(kind="sparse", drop_rate=1.0), "--moe-ders-drop-rate must be in [0, 1)"),
    (lambda: DeltaSpec(kind="sparse", drop_rate=-0.1), "--moe-ders-drop-rate"),
    (lambda: DeltaSpec(kind="sparse", drop_rate=0.9, rank=4), "--moe-ders-rank applies only"),
    (lambda: DeltaSpec(kind="lowrank", rank=4, drop_rate=0.9), "--moe-ders-drop-rate applies only"),
    (lambda: added_parameters(_shape(), LM(65)), "--moe-ders-rank 65 exceeds min(in, out) = 64"),
    (lambda: added_parameters(TINY, SM(0.99)), "--moe-ders-drop-rate 0.99 keeps no element"),
    (lambda: added_parameters(_shape(moe_ffn_hidden_size=32), LM(1)), "--moe-ffn-hidden-size"),
])
def test_validation_names_the_flag(build, flag):
    with pytest.raises(ValueError, match=re.escape(flag)):
        build()


def test_vanilla_allows_fine_grained_experts():
    """Vanilla may split the FFN (--moe-ffn-hidden-size); only DeRS needs base == dense."""
    r = added_parameters(_shape(moe_ffn_hidden_size=32), V)  # 4 experts x 32 = the dense 128
    assert r.per_layer.expert_weights == 0 and r.added_params == 4 * 64 * 4  # router only


# The param_report flags are a public surface: scripts and docs use them.
PARAM_REPORT_FLAGS = {
    "-h", "--help", "--preset", "--hidden-size", "--ffn-hidden-size", "--moe-ffn-hidden-size",
    "--num-layers", "--moe-layer-freq", "--num-experts", "--moe-router-topk", "--swiglu",
    "--add-bias-linear", "--disable-bias-linear", "--moe-ders-shared-expert", "--moe-router-noisy-gate",
    "--moe-ders", "--moe-ders-rank", "--moe-ders-drop-rate", "--compare", "--dtype", "--json", "--debug",
    "--moe-ders-quant-group-size",
}


def test_param_report_flags_frozen():
    parser = build_param_report_parser()
    assert {s for a in parser._actions for s in a.option_strings} == PARAM_REPORT_FLAGS


def test_param_report_compare_writes_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    argv = ["--preset", "moe-llava-stablelm", "--compare", "--json", str(out)]
    assert param_report_main(argv) == 0
    table = capsys.readouterr().out
    for label in ("vanilla", "lowrank r=1", "lowrank r=16", "sparse p=0.9 ", "sparse p=0.9999"):
        assert label in table
    assert "1.20M" in table and "MoE layers: 12 of 24" in table
    payload = json.loads(out.read_text())
    quant = [f"quant {k}-bit{scales}" for k in (8, 4, 2, 1) for scales in ("", " +scales/128")]
    assert [v["label"] for v in payload["variants"]] == [
        "vanilla", "lowrank r=1", "lowrank r=4", "lowrank r=16",
        "sparse p=0.9", "sparse p=0.99", "sparse p=0.9999", *quant]
    assert payload["variants"][1]["added_params"] == 1_204_224
    by_label = {v["label"]: v for v in payload["variants"]}
    assert by_label["quant 4-bit"]["added_params"] == 4 * 415_236_096 / 4 + 12 * 4 * 2048
    # groups of 128: an fp32 scale and offset each, 0.5 bit per value on top of 4
    assert by_label["quant 4-bit +scales/128"]["added_params"] == 4 * 415_236_096 * 4.5 / 16 + 12 * 4 * 2048
    assert payload["shape"]["moe_layer_freq"] == 2


def test_param_report_flags_override_preset(capsys):
    param_report_main(["--preset", "moe-llava-phi", "--num-experts", "8", "--moe-ders", "lowrank",
                       "--moe-ders-rank", "1"])
    assert "experts: 8, top-2" in capsys.readouterr().out


def test_param_report_error_names_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        param_report_main(["--hidden-size", "64", "--ffn-hidden-size", "128", "--num-layers", "2",
                           "--num-experts", "1"])
    assert exc.value.code == 2
    assert "--num-experts must be >= 2" in capsys.readouterr().err


def test_param_report_script_and_torch_free_import(tmp_path):
    """The tool runs from a checkout (any cwd); importing ders_megatron.cli.param_report never loads torch."""
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(REPO / "tools" / "param_report.py"), "--hidden-size", "2560",
           "--ffn-hidden-size", "10240", "--num-layers", "32", "--moe-layer-freq", "2",
           "--num-experts", "4", "--add-bias-linear", "--moe-ders", "sparse",
           "--moe-ders-drop-rate", "0.9999", "--json", str(out)]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "sparse p=0.9999" in run.stdout and "1.11M" in run.stdout
    assert json.loads(out.read_text())["variants"][0]["added_params"] == 1_113_728
    probe = "import sys, ders_megatron.cli.param_report; assert 'torch' not in sys.modules, 'torch imported'"
    run = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("rows, cols, group", [(5632, 2048, 128), (2048, 5632, 128), (64, 96, 32), (7, 24, 8)])
def test_quant_scale_overhead_is_what_the_compressor_stores(rows, cols, group, bits):
    """QuantSpec(scale_overhead=True) counts the bits core/codecs.py's storage_bits gives for the
    codec tools/compress.py writes (packed code rows, fp32 scale and offset per group); without
    the overhead, exactly k bits per value."""
    from ders_megatron.core.codecs import storage_bits
    from ders_megatron.core.config import parse_codec

    stored = storage_bits(parse_codec(f"quant:{bits}", group), rows, cols)
    assert QuantSpec(bits=bits, group_size=group, scale_overhead=True).matrix_bits(rows, cols) == stored
    assert QuantSpec(bits=bits, group_size=group).matrix_bits(rows, cols) == rows * cols * bits


def test_quant_rows_reject_a_group_that_does_not_divide_the_rows():
    shape = dataclasses.replace(PAPER_MODELS["moe-llava-stablelm"], hidden_size=2000)
    with pytest.raises(ValueError, match="--moe-ders-quant-group-size 128 must divide"):
        added_parameters(shape, QuantSpec(bits=4, scale_overhead=True))
