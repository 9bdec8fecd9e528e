"""Collation of packed blocks into training batches, one collator per objective.

- ``CausalCollator``: next-token prediction.  Labels are the inputs; ``transformers`` causal LM heads
  shift them by one internally, so position t is scored on token t + 1.  Padding is ignored (-100).
- ``MlmNspCollator``: BERT pretraining.  Each block becomes ``[CLS] A [SEP] B [SEP]`` where B follows A
  (label 0) or, half of the time, comes from another block (label 1: next-sentence prediction); then
  15% of the non-special tokens are selected for masked-LM, of which 80% become ``[MASK]``, 10% a
  random token and 10% stay (transformers' ``DataCollatorForLanguageModeling``).
- ``SpanCorruptionCollator``: T5 pretraining.  About 15% of tokens, in spans of mean length 3, are
  replaced in the input by sentinels ``<extra_id_i>``; the target lists each sentinel and its span.
"""

from __future__ import annotations

import numpy as np
import torch


class CausalCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, blocks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        input_ids = torch.stack(blocks)  # (batch, block_size)
        attention_mask = (input_ids != self.pad_id).long()
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class MlmNspCollator:
    def __init__(self, tokenizer, mlm_probability: float = 0.15, nsp_probability: float = 0.5, seed: int = 0):
        from transformers import DataCollatorForLanguageModeling

        self.tok = tokenizer
        self.masker = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability, seed=seed)
        self.nsp_probability = nsp_probability
        self.rng = np.random.default_rng(seed)

    def __call__(self, blocks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        cls, sep, pad = self.tok.cls_token_id, self.tok.sep_token_id, self.tok.pad_token_id
        size = len(blocks[0])
        len_a = (size - 3) // 2
        len_b = size - 3 - len_a
        rows, types, nsp = [], [], []
        for i, block in enumerate(blocks):
            a = block[:len_a]
            random_b = len(blocks) > 1 and self.rng.random() < self.nsp_probability
            if random_b:  # B from another block of the batch: "not the next sentence"
                j = int(self.rng.choice([k for k in range(len(blocks)) if k != i]))
                b = blocks[j][len_a : len_a + len_b]
            else:
                b = block[len_a : len_a + len_b]
            rows.append(torch.cat([torch.tensor([cls]), a, torch.tensor([sep]), b, torch.tensor([sep])]))
            types.append(torch.tensor([0] * (len_a + 2) + [1] * (len_b + 1)))
            nsp.append(int(random_b))
        input_ids = torch.stack(rows)  # (batch, block_size)
        special = (input_ids == cls) | (input_ids == sep) | (input_ids == pad)
        input_ids, labels = self.masker.torch_mask_tokens(input_ids.clone(), special_tokens_mask=special)
        return {
            "input_ids": input_ids,
            "attention_mask": (~(input_ids == pad)).long(),
            "token_type_ids": torch.stack(types),
            "labels": labels,
            "next_sentence_label": torch.tensor(nsp),
        }


def random_spans_noise_mask(length: int, noise_density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """T5's noise mask: ``round(length × density)`` noise tokens in spans of mean length ``mean_span``,
    alternating with non-noise spans, in a random segmentation (Raffel et al. 2020, t5.data)."""
    num_noise = int(np.round(length * noise_density))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = max(int(np.round(num_noise / mean_span)), 1)
    num_keep = length - num_noise

    def segment(total: int, parts: int) -> np.ndarray:
        marks = np.zeros(total - 1, dtype=bool)
        marks[rng.permutation(total - 1)[: parts - 1]] = True
        ids = np.concatenate([[0], np.cumsum(marks)])
        return np.bincount(ids, minlength=parts)

    noise_lengths, keep_lengths = segment(num_noise, num_spans), segment(num_keep, num_spans)
    interleaved = np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1)
    starts = np.cumsum(interleaved)[:-1]
    span_start = np.zeros(length, dtype=bool)
    span_start[starts] = True
    span_id = np.cumsum(span_start)
    return span_id % 2 == 1


class SpanCorruptionCollator:
    def __init__(self, sentinel_ids: list[int], eos_id: int, pad_id: int, noise_density: float = 0.15, mean_span: float = 3.0, seed: int = 0):
        self.sentinels, self.eos, self.pad = sentinel_ids, eos_id, pad_id
        self.noise_density, self.mean_span = noise_density, mean_span
        self.rng = np.random.default_rng(seed)

    def corrupt(self, tokens: np.ndarray) -> tuple[list[int], list[int]]:
        """(input ids, target ids) of one sequence."""
        if len(tokens) < 2:  # nothing to corrupt (an all-padding tail block)
            return tokens.tolist() + [self.eos], [self.eos]
        mask = random_spans_noise_mask(len(tokens), self.noise_density, self.mean_span, self.rng)
        inputs, targets, span = [], [], -1
        for k, (token, noisy) in enumerate(zip(tokens.tolist(), mask)):
            starts = noisy and (k == 0 or not mask[k - 1])
            if starts:
                span += 1
                if span >= len(self.sentinels):
                    raise ValueError(f"tokenizer.extra_ids: {len(self.sentinels)} sentinels are too few for this block size")
                inputs.append(self.sentinels[span])
                targets.append(self.sentinels[span])
            (targets if noisy else inputs).append(token)
        return inputs + [self.eos], targets + [self.eos]

    def __call__(self, blocks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        pairs = [self.corrupt(b[b != self.pad].numpy()) for b in blocks]
        width_in = max(len(i) for i, _ in pairs)
        width_out = max(len(t) for _, t in pairs)
        input_ids = torch.full((len(pairs), width_in), self.pad)
        labels = torch.full((len(pairs), width_out), -100)
        for row, (inputs, targets) in enumerate(pairs):
            input_ids[row, : len(inputs)] = torch.tensor(inputs)
            labels[row, : len(targets)] = torch.tensor(targets)
        return {"input_ids": input_ids, "attention_mask": (input_ids != self.pad).long(), "labels": labels}
