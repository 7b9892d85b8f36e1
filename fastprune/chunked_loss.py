"""The calibration loss without the full logits: cross entropy fused with the output projection, by chunks.

A causal LM's loss needs (tokens x vocabulary) logits; with a 128k vocabulary and a few thousand
calibration tokens they, their fp32 copy and their gradient outweigh many layers.  For a model whose
logits are its output embedding applied to the decoder's last hidden state (checked on the model,
see :func:`chunked_lm_loss`), the mean next-token cross entropy is computed a chunk of tokens at a
time: the chunk's logits are formed in fp32, give the loss and the gradients of the hidden states
and of the output embedding, and are freed, as Liger-Kernel's fused linear cross entropy does.
The gradients are computed in the forward pass and handed to autograd by ``backward``.

With tied input/output embeddings the embedding's own gradient is made sparse while the loss runs
(only the rows of the calibration tokens are non-zero), so the tied weight's gradient costs one
dense buffer, not two.  The numbers differ from the one-shot loss by float rounding (the output
embedding's gradient is summed chunk by chunk), so this is an option (``score(loss_chunk=...)``);
the default loss is unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from fastprune.errors import FastpruneError


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(hidden_i @ weight^T, targets_i), ``chunk`` rows of ``hidden`` at a time."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        n = hidden.shape[0]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = (h @ weight.t()).float()
            lse = torch.logsumexp(logits, -1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if want_h or want_w:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                g[torch.arange(len(t), device=g.device), t] -= 1
                g = g.div_(n).to(weight.dtype)
                if want_h:
                    grad_h[start:start + chunk] = g @ weight
                if want_w:
                    grad_w.addmm_(g.t(), h)
            del logits
        ctx.save_for_backward(grad_h, grad_w)
        return total / n

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h.mul_(grad_out.to(grad_h.dtype)),
                None if grad_w is None else grad_w.mul_(grad_out.to(grad_w.dtype)), None, None)


@contextmanager
def _head_replaced(head: torch.nn.Module, store: list):
    """``head`` records its input and returns empty logits (the model's post-processing sees no values)."""
    def forward(hidden: torch.Tensor) -> torch.Tensor:
        store.append(hidden)
        return hidden.new_empty(*hidden.shape[:-1], 0)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward


def _hidden_states(model: torch.nn.Module, head: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    store: list[torch.Tensor] = []
    with _head_replaced(head, store):
        model(input_ids=ids, use_cache=False)
    if len(store) != 1 or store[0].shape[:-1] != ids.shape:
        raise FastpruneError("loss_chunk: the output embedding did not see one hidden state per token")
    return store[0]


def _check_logits_are_the_head(model: torch.nn.Module, head: torch.nn.Module, ids: torch.Tensor) -> None:
    probe = ids[:1, :8]
    with torch.no_grad():
        out = model(input_ids=probe, use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out[0]
        mine = head(_hidden_states(model, head, probe))
    if mine.shape != logits.shape or not torch.equal(mine, logits):
        raise FastpruneError(f"loss_chunk: {type(model).__name__}'s logits are not its output embedding applied to "
                             "the last hidden state (a logit scale or soft-capping?); use loss_chunk=None")


@contextmanager
def _sparse_tied_embedding(model: torch.nn.Module, head: torch.nn.Module):
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = isinstance(emb, torch.nn.Embedding) and emb.weight is head.weight and not emb.sparse
    if tied:
        emb.sparse = True
    try:
        yield
    finally:
        if tied:
            emb.sparse = False


def chunked_lm_loss(model: torch.nn.Module, ids: torch.Tensor, chunk: int, checked: set[int]) -> torch.Tensor:
    """Mean next-token cross entropy of ``ids`` (labels = inputs), ``chunk`` tokens of logits at a time.

    The first call for a model (its ``id`` is added to ``checked``) compares the model's own logits on
    a few tokens with its output embedding applied to the hidden states it captures, bit for bit.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise FastpruneError(f"loss_chunk needs an output embedding that is a Linear without bias; "
                             f"{type(model).__name__} has {type(head).__name__}")
    if chunk < 1:
        raise FastpruneError(f"loss_chunk must be a positive number of tokens, got {chunk}")
    if id(model) not in checked:
        _check_logits_are_the_head(model, head, ids)
        checked.add(id(model))
    with _sparse_tied_embedding(model, head):
        hidden = _hidden_states(model, head, ids)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    return _FusedLinearCrossEntropy.apply(h, head.weight, ids[:, 1:].reshape(-1), chunk)
