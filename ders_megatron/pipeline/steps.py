"""The main job's steps, in order, and where each keeps its output.

    <workdir>/
      text/{train,heldout}.jsonl        the corpus, every 50th document held out
      data/{train,heldout}.{bin,idx,json}  tools/preprocess_data.py (the model's tokenizer)
      checkpoints/dense                 tools/convert_hf.py import of the HF model
      checkpoints/upcycled/<variant>    tools/upcycle.py (vanilla, lowrank, sparse)
      checkpoints/trained/<variant>     examples/pretrain_gpt_ders.py, torchrun, 2 ranks
      checkpoints/compressed            tools/compress.py of the trained vanilla MoE
      hf/<model>-<format>               tools/convert_hf.py export
      eval/                             held-out losses, probe logits, transformers checks
      plots/                            tools/analyze.py similarity and sweep (PNG + JSON)
      train/                            per-run loss logs
      logs/<step>.log                   every process's output, its command line first
      state/<step>.json                 what each finished step recorded (runner.py)
      results.json, results.md          the final table
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ders_megatron.pipeline.config import PipelineConfig, variants
from ders_megatron.pipeline.launch import run_logged, tool_cmd
from ders_megatron.pipeline.runner import Step


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _checkpoint_complete(root: Path) -> bool:
    from ders_megatron.io.checkpoint import CheckpointError, latest_dir

    try:
        latest_dir(root)
        return True
    except CheckpointError:
        return False


def all_moe(freq) -> bool:
    """Every layer MoE (what ``--format mixtral`` can express)."""
    return freq == 1 or (isinstance(freq, (list, tuple)) and all(v == 1 for v in freq))


class Pipeline:
    """Builds the step list for a config (see the module doc for the layout)."""

    def __init__(self, cfg: PipelineConfig, hf_dir: Path, text: Path):
        self.cfg, self.hf_dir, self.text = cfg, hf_dir, text
        w = cfg.workdir
        self.logs, self.eval_dir, self.plots = w / "logs", w / "eval", w / "plots"
        self.text_dir, self.data_dir, self.train_dir = w / "text", w / "data", w / "train"
        self.ckpt = w / "checkpoints"
        self.dense = self.ckpt / "dense"
        self.variants = variants(cfg)
        self.moe = [v for v in self.variants if v != "dense"]

    # ----------------------------------------------------------------- paths
    def trained(self, variant: str) -> Path:
        return self.ckpt / "trained" / variant

    def upcycled(self, variant: str) -> Path:
        return self.dense if variant == "dense" else self.ckpt / "upcycled" / variant

    def rows(self) -> dict[str, tuple[str, Path, str]]:
        """Scored models: name -> (label, checkpoint, step that writes it)."""
        rows = {"pretrained": ("dense, before fine-tuning", self.dense, "import")}
        for name, v in self.variants.items():
            rows[name] = (v.label, self.trained(name), f"train-{name}")
        if "vanilla" in self.variants:
            rows["compressed"] = (f"compressed vanilla ({self.cfg.codec}, dense base)", self.ckpt / "compressed",
                                  "compress")
        return rows

    def exports(self) -> dict[str, str]:
        """Exported models: row -> HF format."""
        out = {"dense": "llama"}
        if "vanilla" in self.variants and all_moe(self.cfg.moe_layer_freq):
            out["vanilla"] = "mixtral"
        if "lowrank" in self.variants:
            out["lowrank"] = "ders"
        if "vanilla" in self.variants:
            out["compressed"] = "ders"
        return out

    # ----------------------------------------------------------------- steps
    def steps(self) -> list[Step]:
        steps = [self._text(), self._import(), self._preprocess()]
        steps += [self._upcycle(v) for v in self.moe]
        steps += [self._train(v) for v in self.variants]
        if "vanilla" in self.variants:
            steps += [self._compress()]
        steps += [self._evaluate(row) for row in self.rows()]
        steps += [self._export(row, fmt) for row, fmt in self.exports().items()]
        steps += [self._hf_check("pretrained", self.hf_dir, "import")]
        steps += [self._hf_check(row, self.hf_out(row, fmt), f"export-{row}") for row, fmt in self.exports().items()]
        if "vanilla" in self.variants:
            steps += [self._similarity(), self._sweep()]
        return steps

    def _tool(self, name: str, *args, threads: int | None = None) -> float:
        return run_logged(tool_cmd(*args), self.logs / f"{name}.log", name, threads=threads)

    def _text(self) -> Step:
        from ders_megatron.pipeline.text import split_heldout

        return Step(
            "text", f"held-out split of {self.text}",
            lambda: split_heldout(self.text, self.text_dir, self.cfg.heldout_fraction),
            outputs=(self.text_dir,), complete=lambda: (self.text_dir / "train.jsonl").is_file(),
            settings={"text": str(self.text), "sha256": _sha256(self.text), "fraction": self.cfg.heldout_fraction},
        )

    def _import(self) -> Step:
        weights = sorted(p.name + str(p.stat().st_size) for p in self.hf_dir.glob("*.safetensors"))
        return Step(
            "import", f"tools/convert_hf.py import {self.hf_dir}",
            # float32 as before issue 18 (import now keeps the source's bf16): upcycling initialises
            # routers and deltas in the checkpoint's dtype, and the recorded results are float32 ones.
            lambda: {"seconds": self._tool("import", "convert_hf", "import", "--hf-dir", self.hf_dir,
                                           "--output", self.dense, "--dtype", "float32")},
            outputs=(self.dense,), complete=lambda: _checkpoint_complete(self.dense),
            settings={"hf_dir": str(self.hf_dir), "config": (self.hf_dir / "config.json").read_text(),
                      "weights": weights},
        )

    def _preprocess(self) -> Step:
        def run():
            for split in ("heldout", "train"):  # train last: its JSON marks the step done
                self._tool(f"preprocess-{split}", "preprocess_data", "--input", self.text_dir / f"{split}.jsonl",
                           "--output-prefix", self.data_dir / split, "--tokenizer", self.hf_dir)
            return {s: json.loads((self.data_dir / f"{s}.json").read_text()) for s in ("train", "heldout")}

        return Step("preprocess", "tools/preprocess_data.py (train and held-out)", run,
                    outputs=(self.data_dir,), complete=lambda: (self.data_dir / "train.json").is_file(),
                    deps=("text",), settings={"tokenizer": str(self.hf_dir),
                                              "sha256": _sha256(self.hf_dir / "tokenizer.json")})

    def _upcycle(self, variant: str) -> Step:
        cfg, out = self.cfg, self.upcycled(variant)
        freq = str(list(cfg.moe_layer_freq)) if isinstance(cfg.moe_layer_freq, tuple) else str(cfg.moe_layer_freq)
        args = ["upcycle", "--load", self.dense, "--save", out, "--num-experts", cfg.num_experts,
                "--moe-router-topk", cfg.topk, "--moe-layer-freq", freq, "--moe-ders-seed", cfg.seed,
                "--target-ep", cfg.ep, *self.variants[variant].upcycle_flags]
        return Step(f"upcycle-{variant}", f"tools/upcycle.py {variant}",
                    lambda: {"seconds": self._tool(f"upcycle-{variant}", *args)},
                    outputs=(out,), complete=lambda: _checkpoint_complete(out),
                    deps=("import",), settings={"args": [str(a) for a in args[5:]]})

    def _train(self, variant: str) -> Step:
        from ders_megatron.pipeline.train import train

        cfg, load, save = self.cfg, self.upcycled(variant), self.trained(variant)
        summary_path = self.train_dir / f"{variant}.json"

        def run():
            summary = train(cfg, variant, load, save, self.data_dir / "train.json", self.train_dir,
                            self.logs / f"train-{variant}.log", moe=variant != "dense")
            from ders_megatron.io.atomic import write_text_atomic

            write_text_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
            return summary

        settings = {k: getattr(cfg, k) for k in ("iters", "seq_length", "micro_batch_size", "global_batch_size",
                                                  "lr", "aux_loss_coeff", "nproc", "ep", "seed", "extra_train_args")}
        return Step(f"train-{variant}", f"fine-tune {self.variants[variant].label}: torchrun {cfg.nproc} ranks, "
                    f"{cfg.iters} iterations", run, outputs=(save, summary_path),
                    complete=lambda: summary_path.is_file() and _checkpoint_complete(save),
                    deps=("import" if variant == "dense" else f"upcycle-{variant}", "preprocess"), settings=settings)

    def _compress(self) -> Step:
        out, report = self.ckpt / "compressed", self.eval_dir / "compress.json"
        args = ["compress", "--load", self.trained("vanilla"), "--save", out, "--moe-ders-codecs", self.cfg.codec,
                "--base", "dense", "--dense", self.dense, "--moe-ders-seed", self.cfg.seed, "--json", report]

        def run():
            self.eval_dir.mkdir(parents=True, exist_ok=True)
            self._tool("compress", *args)
            return {k: v for k, v in json.loads(report.read_text()).items() if k != "layers"}

        return Step("compress", f"tools/compress.py --moe-ders-codecs {self.cfg.codec} --base dense (trained vanilla MoE)",
                    run, outputs=(out, report), complete=lambda: report.is_file() and _checkpoint_complete(out),
                    deps=("train-vanilla", "import"), settings={"codec": self.cfg.codec})

    def probe(self, row: str) -> Path:
        return self.eval_dir / f"{row}.probe.pt"

    def _evaluate(self, row: str) -> Step:
        from ders_megatron.pipeline.evaluate import evaluate_checkpoint

        label, root, producer = self.rows()[row]
        cfg = self.cfg
        return Step(f"eval-{row}", f"held-out loss of {label}",
                    lambda: evaluate_checkpoint(root, self.data_dir / "heldout", cfg.seq_length, cfg.eval_batches,
                                                self.probe(row)),
                    outputs=(self.probe(row),), complete=self.probe(row).is_file,
                    deps=(producer, "preprocess"), settings={"batches": cfg.eval_batches, "seq": cfg.seq_length})

    def hf_out(self, row: str, fmt: str) -> Path:
        return self.cfg.workdir / "hf" / f"{row}-{fmt}"

    def _export(self, row: str, fmt: str) -> Step:
        _, root, producer = self.rows()[row]
        out = self.hf_out(row, fmt)
        args = ["convert_hf", "export", "--checkpoint", root, "--output", out, "--format", fmt,
                "--tokenizer", self.dense / "hf"]
        return Step(f"export-{row}", f"tools/convert_hf.py export {row} --format {fmt}",
                    lambda: {"seconds": self._tool(f"export-{row}", *args), "format": fmt},
                    outputs=(out,), complete=(out / "config.json").is_file, deps=(producer, "import"),
                    settings={"format": fmt})

    def prompt(self) -> str:
        """--prompt, else the first words of the first held-out document."""
        if self.cfg.prompt:
            return self.cfg.prompt
        first = json.loads((self.text_dir / "heldout.jsonl").read_text().splitlines()[0])["text"]
        return " ".join(first.split()[:8])

    def _hf_check(self, row: str, folder: Path, dep: str) -> Step:
        from ders_megatron.pipeline.evaluate import compare_export

        out = self.eval_dir / f"{row}.hf.json"
        return Step(f"hf-check-{row}", f"transformers loads {folder.name}: logits vs Megatron, greedy continuation",
                    lambda: compare_export(folder, self.probe(row), out, self.prompt(), self.cfg.new_tokens,
                                           self.logs / f"hf-check-{row}.log"),
                    outputs=(out, out.with_suffix(".pt")), complete=out.is_file, deps=(dep, f"eval-{row}"),
                    settings={"prompt": self.cfg.prompt, "new_tokens": self.cfg.new_tokens})

    def _similarity(self) -> Step:
        png, js = self.plots / "similarity.png", self.plots / "similarity.json"
        args = ["analyze", "similarity", "--load", self.trained("vanilla"), "--dense", self.dense, "--out", png,
                "--json", js]

        def run():
            self.plots.mkdir(parents=True, exist_ok=True)
            self._tool("analyze-similarity", *args)
            data = json.loads(js.read_text())
            return {"min_cosine": min(v for rows in data["matrices"].values() for r in rows for v in r),
                    "png": str(png)}

        return Step("analyze-similarity", "tools/analyze.py similarity (paper Fig. 1)", run, outputs=(png, js),
                    complete=js.is_file, deps=("train-vanilla", "import"))

    def _sweep(self) -> Step:
        png, js = self.plots / "sweep.png", self.plots / "sweep.json"
        cfg = self.cfg
        args = ["analyze", "sweep", "--load", self.trained("vanilla"), "--base", "dense", "--dense", self.dense,
                "--sweep-codecs", cfg.sweep_codecs, "--eval-data", self.data_dir / "heldout", "--moe-ders-seed", cfg.seed,
                "--seq-length", cfg.seq_length, "--eval-batches", cfg.eval_batches, "--out", png, "--json", js]

        def run():
            self.plots.mkdir(parents=True, exist_ok=True)
            self._tool("analyze-sweep", *args)
            data = json.loads(js.read_text())
            return {"baseline": data["baseline"]["loss"], "png": str(png),
                    "losses": {r["codec"]: r["loss"] for r in data["results"]}}

        return Step("analyze-sweep", f"tools/analyze.py sweep {cfg.sweep_codecs} (paper Fig. 4)", run,
                    outputs=(png, js), complete=js.is_file, deps=("train-vanilla", "import", "preprocess"),
                    settings={"codecs": cfg.sweep_codecs, "batches": cfg.eval_batches, "seq": cfg.seq_length})
