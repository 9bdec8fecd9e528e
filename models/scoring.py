"""Log-likelihoods of continuations that share a context, the context computed once.

A multiple-choice benchmark asks "how likely is each answer after this question?": 2 to 13 requests
with one context.  Scoring each (context + answer) on its own, as lm-eval's ``hf`` model does,
runs the context through the network once per answer, although the context is most of the tokens
(a BoolQ passage, TruthfulQA's six-question preamble).  Here the context and all its answers are
packed into one sequence, each answer attending to the context and to itself only (a block mask,
the answers' positions restarting after the context), so the context runs once and nothing is
padded inside a group.
The vocabulary projection (28 M of SmolLM2-135M's 135 M parameters) is applied only at the
positions that are scored, not at every position of the padded batch.

The numbers are lm-eval's: the sum of log-softmax(logits) over the continuation's tokens and
whether greedy decoding would have produced it; ``check_equivalent`` compares one group against the
plain forward pass, so a model whose logits are not ``head(decoder(x))`` (a logit scale, a soft cap)
is found before it is scored.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: (context token ids, [continuation token ids, ...]): the requests that share one context.
Group = tuple[list[int], list[list[int]]]


def _parts(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The decoder (embeddings, blocks and final norm) and the vocabulary projection of a causal LM."""
    return model.base_model, model.get_output_embeddings()


def pack(group: Group) -> tuple[list[int], list[int], list[int], list[list[int]]]:
    """One sequence for a group: the context, then each continuation but its last token (a last token
    is predicted, never fed).  Returns its tokens, their positions (each continuation starts right after
    the context), their segments (0: the context, i: the i-th continuation) and, per continuation, the
    indices of the hidden states that predict its tokens (the context's last one, then its own)."""
    context, conts = group
    tokens, positions, segments = list(context), list(range(len(context))), [0] * len(context)
    predictors = []
    for i, cont in enumerate(conts, start=1):
        start = len(tokens)
        tokens += cont[:-1]
        positions += range(len(context), len(context) + len(cont) - 1)
        segments += [i] * (len(cont) - 1)
        predictors.append([len(context) - 1] + list(range(start, start + len(cont) - 1)))
    return tokens, positions, segments, predictors


def batches(groups: list[Group], max_requests: int, max_tokens: int) -> list[list[int]]:
    """Indices of ``groups`` per forward pass: longest packed sequence first, so that a batch's groups
    have similar lengths; a batch holds at most ``max_requests`` continuations and ``max_tokens``
    tokens with its padding (at least one group)."""
    length = [len(g[0]) + sum(len(c) - 1 for c in g[1]) for g in groups]
    out: list[list[int]] = []
    for i in sorted(range(len(groups)), key=lambda i: -length[i]):
        batch = out[-1] if out else None
        if (batch and sum(len(groups[j][1]) for j in batch) + len(groups[i][1]) <= max_requests
                and (len(batch) + 1) * length[batch[0]] <= max_tokens):
            batch.append(i)
        else:
            out.append([i])
    return out


@torch.inference_mode()
def continuation_logprobs(model, groups: list[Group], pad_id: int = 0) -> list[list[tuple[float, bool]]]:
    """For each group, per continuation: (its summed log-probability after the context, whether each of
    its tokens is the argmax).  Each group runs as one packed sequence (``pack``) whose attention mask
    lets a continuation see the context and itself only, so it computes what separate sequences
    would; every context and continuation must fit the model's positions together."""
    decoder, head = _parts(model)
    packed = [pack(g) for g in groups]
    width = max(len(p[0]) for p in packed)
    ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(groups), width), dtype=torch.long)
    allowed = torch.zeros((len(groups), 1, width, width), dtype=torch.bool)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    for g, (tokens, pos, seg, _) in enumerate(packed):
        n = len(tokens)
        ids[g, :n], positions[g, :n] = torch.tensor(tokens), torch.tensor(pos)
        seg_t = torch.tensor(seg)
        allowed[g, 0, :n, :n] = causal[:n, :n] & ((seg_t[None, :] == 0) | (seg_t[None, :] == seg_t[:, None]))
        allowed[g, 0, n:, n:] = torch.eye(width - n, dtype=torch.bool)  # padding sees itself: finite, and seen by no one
    weight = next(model.parameters())
    dtype = weight.dtype if weight.is_floating_point() else torch.float32
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)  # additive: any attention backend
    hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state

    # The hidden states that predict each continuation token, all groups together: one projection.
    picked, targets, lengths = [], [], []
    for g, (_, conts) in enumerate(groups):
        for cont, rows in zip(conts, packed[g][3]):
            picked.append(hidden[g, rows])
            targets.extend(cont)
            lengths.append(len(cont))
    logprobs = F.log_softmax(head(torch.cat(picked)).float(), dim=-1)
    targets_t = torch.tensor(targets)
    token_lp = logprobs.gather(1, targets_t[:, None])[:, 0]
    greedy = logprobs.argmax(dim=-1) == targets_t
    flat, start = [], 0
    for length in lengths:
        flat.append((float(token_lp[start : start + length].sum()), bool(greedy[start : start + length].all())))
        start += length
    out, k = [], 0
    for _, conts in groups:
        out.append(flat[k : k + len(conts)])
        k += len(conts)
    return out


@torch.inference_mode()
def check_equivalent(model, group: Group) -> float:
    """The largest difference between ``continuation_logprobs`` and the plain forward pass (lm-eval's
    way: context + continuation in one sequence, log-softmax of the model's logits) on ``group``;
    infinite for a model that cannot take a packed sequence at all (BLOOM builds its ALiBi biases from
    a 2-D attention mask and has no position ids)."""
    try:
        shared = continuation_logprobs(model, [group])[0]
    except (TypeError, ValueError, RuntimeError):
        return math.inf
    worst = 0.0
    for cont, (lp, _) in zip(group[1], shared):
        seq = torch.tensor([group[0] + cont[:-1]])
        logprobs = F.log_softmax(model(input_ids=seq).logits[0, -len(cont):].float(), dim=-1)
        plain = float(logprobs.gather(1, torch.tensor(cont)[:, None]).sum())
        worst = max(worst, abs(plain - lp))
    return worst
