"""DeRS-LM deltas as a PEFT LoRA adapter over the upcycled base.

A DeRS-LM expert is ``W_e = W_base + s·B_e A_e`` per projection (gate, up, down):
exactly a per-expert LoRA over a MoE whose every expert is the base, i.e. the dense
FFN it was upcycled from. :func:`export_peft` writes

* ``<output>/base/``: that MoE as a plain transformers folder (``mixtral``,
  ``qwen2_moe``, ``qwen3_moe`` or ``olmoe``, :func:`~ders_megatron.convert.hf.exporter.export_hf`
  with every delta read as zero: each expert is ``W_base``), with everything else
  (attention, norms, router, embeddings, shared expert) as trained;
* ``<output>/adapter/``: ``adapter_config.json`` + ``adapter_model.safetensors``
  for ``PeftModel.from_pretrained(base_model, "<output>/adapter")``.

How PEFT expresses it (peft >= 0.17, ``LoraConfig.target_parameters``;
``tuners/lora/layer.py`` ``ParamWrapper``): transformers 5 keeps a MoE layer's
experts as fused 3-D parameters, ``mlp.experts.gate_up_proj [E, 2F, H]`` and
``mlp.experts.down_proj [E, H, F]``. A LoRA of rank ``r`` on such a parameter
holds ``lora_A [r·E, in]`` (expert ``e``'s A is rows ``e·r .. e·r + r``) and
``lora_B [out, r·E]`` (expert ``e``'s B is columns ``j·E + e``), and adds
``lora_alpha / r · B_e A_e`` to expert ``e`` (``ParamWrapper.get_delta_weight``).
The fused gate/up projection gets rank ``r = 2R``: ``A_e = [A_gate; A_up]``,
``B_e = diag(B_gate, B_up)``, which is exactly the two separate rank-R deltas;
down gets the same rank with zero rows in ``A_e`` (exact). ``lora_alpha = r`` makes
PEFT's scale 1, and DeRS' ``s = alpha / rank`` is folded into ``B``. An extended DeRS
shared expert (base + its own delta) is a plain LoRA on ``mlp.shared_expert.*_proj``
(``target_modules``). Two nested wrappers on one module are keyed
``experts.base_layer.lora_*`` (the first target parameter, gate_up) and
``experts.lora_*`` (the second, down).

Only low-rank deltas are adapters: sparse, dense, quantized or magnitude deltas
are refused (they are the ``ders`` format's business).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ders_megatron.convert.hf.dims import ConversionError, ModelDims
from ders_megatron.convert.hf.exporter import DTYPES, export_hf
from ders_megatron.convert.hf.keymap import DELTA_MATRICES, delta_config_of, matrix_config
from ders_megatron.io.checkpoint import CheckpointError, atomic_output_dir
from ders_megatron.io.reader import CheckpointReader

ADAPTER_FORMATS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
TARGET_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]  # order = nesting (module doc)
SHARED_TARGETS = [f"shared_expert.{proj}" for proj in DELTA_MATRICES.values()]
PREFIX = "base_model.model."  # PeftModelForCausalLM -> LoraModel -> the transformers model


def default_format(dims: ModelDims) -> str:
    """The transformers MoE family that holds ``dims``: OLMoE for QK-norm over all heads,
    Qwen3-MoE for per-head QK-norm, Qwen2-MoE with a shared expert, else Mixtral."""
    if dims.qk_layernorm:
        return "olmoe" if dims.qk_layernorm_width == "full" else "qwen3_moe"
    return "qwen2_moe" if dims.shared_expert_size else "mixtral"


def check_adapter(dims: ModelDims, fmt: str) -> None:
    """Refuse, naming the reason, what a LoRA adapter cannot hold."""
    def _check(ok, message: str) -> None:
        if not ok:
            raise ConversionError(message)

    _check(fmt in ADAPTER_FORMATS, f"--format {fmt!r}: a PEFT adapter needs a transformers MoE base, one of "
           f"{', '.join(ADAPTER_FORMATS)}")
    dims.check_format(fmt)
    _check(dims.is_ders, "a PEFT adapter holds DeRS deltas; this checkpoint has megatron's own experts "
           "(export it with --format mixtral/qwen2_moe/qwen3_moe/olmoe)")
    config = delta_config_of(dims)
    kinds = {matrix: matrix_config(config, matrix).kind for matrix in DELTA_MATRICES}
    _check(set(kinds.values()) == {"lowrank"}, f"a PEFT LoRA adapter holds low-rank deltas only; this checkpoint "
           f"has {kinds} (use --format ders, which keeps every delta kind)")


def lora_rank(dims: ModelDims) -> int:
    """PEFT's ``r``: twice the DeRS rank (gate and up share one fused parameter)."""
    ranks = {matrix_config(delta_config_of(dims), m).rank for m in DELTA_MATRICES}
    return 2 * max(ranks)


def _pad_rows(a_RI: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([a_RI, a_RI.new_zeros(rows - a_RI.shape[0], a_RI.shape[1])])


def _pad_cols(b_OR: torch.Tensor, cols: int) -> torch.Tensor:
    return torch.cat([b_OR, b_OR.new_zeros(b_OR.shape[0], cols - b_OR.shape[1])], dim=1)


def per_expert_lora(deltas: dict[str, torch.Tensor], scale: float, r: int, down_scale: float = 1.0):
    """One MoE layer's DeRS deltas (``{matrix}.lora_A [E, R, in]``, ``{matrix}.lora_B [E, out, R]``)
    -> ((gate_up A_e [E, r, H], B_e [E, 2F, r]), (down A_e [E, r, F], B_e [E, H, r]))."""
    a_gate, b_gate = deltas["fc1_gate.lora_A"].float(), deltas["fc1_gate.lora_B"].float() * scale
    a_up, b_up = deltas["fc1_up.lora_A"].float(), deltas["fc1_up.lora_B"].float() * scale
    a_down, b_down = deltas["fc2.lora_A"].float(), deltas["fc2.lora_B"].float() * scale * down_scale
    E, F, Rg = b_gate.shape
    Ru = b_up.shape[2]
    a_gu = torch.cat([a_gate, a_up], dim=1)  # [E, Rg + Ru, H]
    b_gu = torch.zeros(E, 2 * F, Rg + Ru)
    b_gu[:, :F, :Rg], b_gu[:, F:, Rg:] = b_gate, b_up  # block diagonal: gate rows see A_gate only
    a_gu = torch.stack([_pad_rows(a, r) for a in a_gu])
    b_gu = torch.stack([_pad_cols(b, r) for b in b_gu])
    a_dn = torch.stack([_pad_rows(a, r) for a in a_down])
    b_dn = torch.stack([_pad_cols(b, r) for b in b_down])
    return (a_gu, b_gu), (a_dn, b_dn)


def fuse_for_peft(a_ERI: torch.Tensor, b_EOR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert A [E, r, in], B [E, out, r] -> PEFT's ``lora_A [r·E, in]``, ``lora_B [out, r·E]``
    (``ParamWrapper.get_delta_weight``: A reshaped (E, r, in), B reshaped (out, r, E))."""
    E, r, _ = a_ERI.shape
    lora_A = a_ERI.reshape(E * r, -1)
    lora_B = b_EOR.permute(1, 2, 0).reshape(b_EOR.shape[1], r * E)  # column j·E + e = B_e[:, j]
    return lora_A.contiguous(), lora_B.contiguous()


def _layer_tensors(dims: ModelDims, reader: CheckpointReader, i: int, r: int, fmt: str) -> dict[str, torch.Tensor]:
    m, h = f"decoder.layers.{i}.mlp.", f"{PREFIX}model.layers.{i}.mlp."
    names = [f"{m}experts.deltas.{matrix}.lora_{x}" for matrix in DELTA_MATRICES for x in "AB"]
    shared = dims.shared_expert_kind == "ders"
    if shared:
        names += [f"{m}shared_experts.deltas.{matrix}.lora_{x}" for matrix in DELTA_MATRICES for x in "AB"]
    read = reader.read(names)
    experts = {n.removeprefix(f"{m}experts.deltas."): t for n, t in read.items() if ".experts.deltas." in n}
    (a_gu, b_gu), (a_dn, b_dn) = per_expert_lora(experts, dims.ders_scale, r)
    out = {}
    for key, (a, b) in (("experts.base_layer.", (a_gu, b_gu)), ("experts.", (a_dn, b_dn))):
        out[f"{h}{key}lora_A.weight"], out[f"{h}{key}lora_B.weight"] = fuse_for_peft(a, b)
    if shared:
        # Qwen2-MoE without megatron's gate: zero gate (0.5) and doubled down_proj (keymap).
        doubled = 2.0 if fmt == "qwen2_moe" and not dims.shared_expert_gate else 1.0
        deltas = {n.removeprefix(f"{m}shared_experts.deltas."): t for n, t in read.items() if ".shared_experts." in n}
        (sa_gu, sb_gu), (sa_dn, sb_dn) = per_expert_lora(deltas, dims.ders_scale, r, down_scale=doubled)
        F = dims.moe_ffn_hidden_size
        for proj, a, b in (("gate_proj", sa_gu[0], sb_gu[0, :F]), ("up_proj", sa_gu[0], sb_gu[0, F:]),
                           ("down_proj", sa_dn[0], sb_dn[0])):
            out[f"{h}shared_expert.{proj}.lora_A.weight"] = a.clone()  # gate and up share A: own storage each
            out[f"{h}shared_expert.{proj}.lora_B.weight"] = b.clone()
    return out


def adapter_config(dims: ModelDims, r: int, base: str) -> dict:
    """peft's LoraConfig fields (the rest keep peft's defaults)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": r,  # scale 1: DeRS' alpha / rank is in lora_B
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "target_modules": SHARED_TARGETS if dims.shared_expert_kind == "ders" else [],
        "target_parameters": TARGET_PARAMETERS,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def export_peft(checkpoint, output, *, fmt: str | None = None, dtype: str | None = None, force: bool = False,
                progress: bool = True) -> Path:
    """Write ``<output>/base`` (the upcycled base as ``fmt``) and ``<output>/adapter`` (the deltas)."""
    reader = CheckpointReader(checkpoint)
    dims = ModelDims.from_args(reader.args)
    fmt = fmt or default_format(dims)
    check_adapter(dims, fmt)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if Path(output).exists() and not force:
        raise CheckpointError(f"{output} exists; pass --force to overwrite it")
    out_dtype = DTYPES[dtype] if dtype else reader.metadata["embedding.word_embeddings.weight"].properties.dtype
    r = lora_rank(dims)
    with atomic_output_dir(output, force=force) as tmp:
        export_hf(checkpoint, Path(tmp) / "base", fmt=fmt, dtype=dtype, progress=progress, zero_deltas=True)
        tensors = {}
        for i in dims.moe_layers:
            tensors.update(_layer_tensors(dims, reader, i, r, fmt))
        adapter = Path(tmp) / "adapter"
        adapter.mkdir()
        save_file({k: v.to(out_dtype) for k, v in tensors.items()}, str(adapter / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        config = adapter_config(dims, r, str(Path(output).resolve() / "base"))
        (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(output)
