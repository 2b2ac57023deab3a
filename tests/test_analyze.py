"""tools/analyze.py: the paper's Fig. 1 heat map and Figs. 4-6 sweeps as PNG files."""

import json

from test_compress import trained  # noqa: F401  (the trained tiny MoE fixture)

PNG = b"\x89PNG\r\n\x1a\n"


def cli(argv):
    import contextlib
    import io

    from ders_megatron.cli.analyze import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def test_similarity_heat_map_of_upcycled_experts(dist1, trained, tmp_path):  # noqa: F811
    png, data = tmp_path / "cos.png", tmp_path / "cos.json"
    code, stdout, stderr = dist1.run(cli, ["similarity", "--load", str(trained / "moe"), "--dense",
                                           str(trained / "dense"), "--out", str(png), "--json", str(data)])[0]
    assert code == 0, stderr
    assert png.read_bytes()[:8] == PNG
    result = json.loads(data.read_text())
    assert set(result["matrices"]) == {"fc1_gate", "fc1_up", "fc2"} and result["layers"] == [0, 1]
    values = [v for rows in result["matrices"].values() for row in rows for v in row]
    assert len(values) == 3 * 2 * 4
    # Upcycled copies fine-tuned briefly stay very close to the dense FFN (paper Fig. 1: > 0.999).
    assert min(values) > 0.99 and max(values) < 1.0


def test_drop_rate_and_bit_width_sweeps(dist1, trained, tmp_path):  # noqa: F811
    for codecs, base in (("dare:0.5,dare:0.9,dare:0.99", "dense"), ("quant:1,quant:2,quant:4,quant:8", "mean")):
        png, data = tmp_path / f"{base}.png", tmp_path / f"{base}.json"
        argv = ["sweep", "--load", str(trained / "moe"), "--sweep-codecs", codecs,
                "--eval-data", str(trained / "heldout.npy"), "--eval-batches", "8", "--out", str(png),
                "--json", str(data)]
        if base == "dense":  # the default base when --dense is given
            argv += ["--dense", str(trained / "dense")]
        else:
            argv += ["--base", base]
        code, stdout, stderr = dist1.run(cli, argv)[0]
        assert code == 0, stderr
        assert png.read_bytes()[:8] == PNG
        result = json.loads(data.read_text())
        assert result["base"] == base
        losses = {row["codec"]: row["loss"] for row in result["results"]}
        print(f"\n{base} base: vanilla {result['baseline']['loss']:.4f}, {losses}")
        baseline = result["baseline"]["loss"]
        if base == "mean":
            # 8 bits is near lossless; 1 bit costs the most.
            assert abs(losses["quant:8"] - baseline) < 1e-3 * baseline
            assert losses["quant:1"] >= losses["quant:8"] - 1e-4
        else:
            assert abs(losses["dare:0.5"] - baseline) < 0.02 * baseline


def test_sweep_rejects_bad_settings(dist1, trained, tmp_path):  # noqa: F811
    code, _, stderr = dist1.run(cli, ["sweep", "--load", str(trained / "moe"), "--sweep-codecs", "quant:7", "--base", "mean",
                                      "--eval-data", str(trained / "heldout.npy"), "--out", str(tmp_path / "x.png")])[0]
    assert code == 2 and "bit width" in stderr
    assert not (tmp_path / "x.png").exists()


def test_cli_flags_are_frozen():
    from ders_megatron.cli.analyze import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    flags = {name: sorted(o for a in p._actions for o in a.option_strings) for name, p in sub.choices.items()}
    assert flags == {
        "similarity": sorted(["-h", "--help", "--load", "--dense", "--out", "--json", "--trust-checkpoint",
                              "--debug"]),
        "sweep": sorted(["-h", "--help", "--load", "--sweep-codecs", "--base", "--dense", "--eval-data", "--calib-data",
                         "--moe-ders-seed", "--moe-ders-quant-group-size", "--seq-length", "--eval-batches", "--out", "--json",
                         "--trust-checkpoint", "--debug"]),
    }
