"""Calibration statistics and held-out loss from a small forward/backward on token ids.

The model is the trained vanilla MoE (megatron ``SequentialMLP`` experts) at world
size 1. Hooks record, per MoE layer and expert:

* routed tokens (the rows reaching the expert's fc1) -> frequency ``f_e``;
* ``X^T X`` of each expert matrix's input (fc1: the routed hidden states; fc2: the
  activations times the routing probability, as ``transformer/mlp.py:339`` feeds
  fc2) -> whitening for ``wsvd``;
* after each batch's backward, ``(∂L/∂W_e)²`` -> the Fisher weights of ``fisher``.

Token files: ``.npy`` / ``.pt`` (1-D integer ids), ``.txt`` (UTF-8 bytes as ids),
or a Megatron indexed dataset prefix (``PREFIX.bin`` + ``PREFIX.idx``, as
``tools/preprocess_data.py`` writes).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ders_megatron.core.decomposition import MatrixCalibration, split_fc1


class DataError(ValueError):
    """Unreadable token data, or ids outside the model's vocabulary."""


def load_tokens(path, vocab_size: int | None = None) -> torch.Tensor:
    """1-D int64 token ids from a file (see module doc)."""
    path = Path(path)
    if path.suffix == ".npy":
        import numpy as np

        tokens = torch.from_numpy(np.load(path)).long().reshape(-1)
    elif path.suffix == ".pt":
        tokens = torch.load(path, weights_only=True).long().reshape(-1)
    elif path.suffix == ".txt":
        tokens = torch.tensor(list(path.read_bytes()), dtype=torch.long)
    elif Path(f"{path}.bin").is_file() and Path(f"{path}.idx").is_file():
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        dataset = IndexedDataset(str(path))
        tokens = torch.cat([torch.from_numpy(dataset[i].astype("int64")) for i in range(len(dataset))])
    else:
        raise DataError(f"{path}: not a .npy/.pt/.txt token file or an indexed dataset prefix")
    if tokens.numel() < 2:
        raise DataError(f"{path} holds fewer than 2 tokens")
    if vocab_size is not None and int(tokens.max()) >= vocab_size:
        raise DataError(f"{path} has token id {int(tokens.max())} >= the model's vocabulary {vocab_size}")
    return tokens


def token_batches(tokens: torch.Tensor, seq_length: int, batch_size: int = 4, max_batches: int | None = None):
    """Non-overlapping windows of ``seq_length + 1`` tokens as megatron batches."""
    window = seq_length + 1
    count = tokens.numel() // window
    if count == 0:
        raise DataError(f"{tokens.numel()} tokens are fewer than one sequence of {window}")
    rows = tokens[: count * window].view(count, window)
    batches = []
    for start in range(0, count, batch_size):
        chunk = rows[start : start + batch_size]
        batches.append({
            "tokens": chunk[:, :-1].contiguous(),
            "labels": chunk[:, 1:].contiguous(),
            "position_ids": torch.arange(seq_length).expand(chunk.shape[0], seq_length).contiguous(),
        })
        if max_batches is not None and len(batches) >= max_batches:
            break
    return batches


def lm_loss(model, batch) -> tuple[torch.Tensor, int]:
    """Summed token loss and token count of a GPTModel on one batch."""
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return per_token.float().sum(), per_token.numel()


@torch.no_grad()
def evaluate(model, batches) -> dict:
    """Mean token loss and perplexity."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        loss, n = lm_loss(model, batch)
        total += loss.item()
        count += n
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(min(mean, 80.0)), "tokens": count}


def _moe_layers(model):
    """(1-based global layer number, SequentialMLP experts) of each MoE layer."""
    layers = []
    for layer in model.decoder.layers:
        experts = getattr(getattr(layer.mlp, "experts", None), "local_experts", None)
        if experts is not None:
            layers.append((layer.layer_number, list(experts)))
    if not layers:
        raise DataError("calibration needs a model with megatron (SequentialMLP) experts")
    return layers


class _Recorder:
    """Forward hooks accumulating routed-token counts and input Gram matrices."""

    def __init__(self, layers, gram: bool):
        self.counts = {n: torch.zeros(len(e)) for n, e in layers}
        self.grams = {}
        self.handles = []
        for number, experts in layers:
            for e, mlp in enumerate(experts):
                self.handles.append(mlp.linear_fc1.register_forward_pre_hook(self._hook(number, e, "fc1", gram)))
                if gram:
                    self.handles.append(mlp.linear_fc2.register_forward_pre_hook(self._hook(number, e, "fc2", gram)))

    def _hook(self, number, expert, which, gram):
        def hook(module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            if which == "fc1":
                self.counts[number][expert] += x.shape[0]
            if gram:
                key = (number, which)
                if key not in self.grams:
                    n_experts = self.counts[number].numel()
                    self.grams[key] = torch.zeros(n_experts, x.shape[1], x.shape[1], dtype=torch.float64)
                self.grams[key][expert] += x.t() @ x

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def calibrate(model, batches, *, fisher: bool = True, gram: bool = True) -> dict[int, dict[str, MatrixCalibration]]:
    """Per MoE layer (1-based number) and matrix: routing frequency, Fisher and Gram stats."""
    layers = _moe_layers(model)
    gated = model.config.gated_linear_unit
    recorder = _Recorder(layers, gram)
    squares = {}
    model.eval()  # no dropout; backward still works for the Fisher gradients
    try:
        for batch in batches:
            if fisher:
                model.zero_grad(set_to_none=True)
                loss, n = lm_loss(model, batch)
                (loss / n).backward()
                for number, experts in layers:
                    _accumulate_squares(squares, number, experts)
            else:
                with torch.no_grad():
                    lm_loss(model, batch)
    finally:
        recorder.remove()
        model.zero_grad(set_to_none=True)
    result = {}
    for number, experts in layers:
        counts = recorder.counts[number]
        frequency = counts / counts.sum().clamp_min(1)
        per_matrix = {}
        for which in ("fc1", "fc2"):
            fisher_t = squares.get((number, which))
            fisher_t = None if fisher_t is None else fisher_t / len(batches)
            gram_t = recorder.grams.get((number, which))
            if which == "fc1":
                names = ("fc1_gate", "fc1_up") if gated else ("fc1",)
                fisher_parts = split_fc1(fisher_t, gated) if fisher_t is not None else {}
            else:
                names, fisher_parts = ("fc2",), {"fc2": fisher_t}
            for name in names:
                per_matrix[name] = MatrixCalibration(fisher=fisher_parts.get(name), frequency=frequency, gram=gram_t)
        result[number] = per_matrix
    return result


def _accumulate_squares(squares, number, experts) -> None:
    for which in ("fc1", "fc2"):
        grads = []
        for mlp in experts:
            grad = getattr(mlp, f"linear_{which}").weight.grad
            weight = getattr(mlp, f"linear_{which}").weight
            grads.append(torch.zeros_like(weight, dtype=torch.float64) if grad is None else grad.double() ** 2)
        stacked = torch.stack(grads)
        key = (number, which)
        squares[key] = stacked if key not in squares else squares[key] + stacked
