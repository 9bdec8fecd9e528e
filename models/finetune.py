"""Fine-tuning a pretrained model on a small task: sequence classification and supervised fine-tuning
(SFT) on prompt/response pairs, with full fine-tuning or LoRA (``peft``), and their metrics.

The task sets are small (hundreds of examples), so a plain PyTorch loop is enough and easy to read:
AdamW with linear warm-up and decay, one validation per epoch, early stopping on the validation
score, and the best epoch's weights restored at the end.  LoRA freezes the pretrained weights and
learns a low-rank update ``B·A`` beside every linear layer (``peft``); for export the update is merged
into the weights, so the saved model is a plain Hugging Face model like the full fine-tune's.

Metrics: accuracy and macro-F1 (``torchmetrics``) against a majority-class baseline and a classical
TF-IDF + logistic-regression classifier; ROUGE-1/2/L F-measure (``torchmetrics``) against the
pretrained model's zero-shot output.

SFT examples of a model whose tokenizer has a chat template (an instruct model) are conversations: the
prompt is the user's turn, the response the assistant's, formatted by ``models.generation.chat_prompt``
exactly as generation formats them.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def classification_metrics(predictions: list[int], targets: list[int], num_classes: int) -> dict[str, float]:
    """Accuracy (share of correct predictions) and macro-F1 (the mean of per-class F1, so that rare
    classes count as much as frequent ones).  A prediction of -1 (a generated answer that is no
    label) is wrong for every class."""
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

    p, t = torch.tensor(predictions), torch.tensor(targets)
    p = torch.where(p < 0, num_classes, p)  # an extra class that no target has
    per_class = multiclass_f1_score(p, t, num_classes=num_classes + 1, average=None)[:num_classes]
    return {
        "accuracy": float(multiclass_accuracy(p, t, num_classes=num_classes + 1, average="micro")),
        "macro_f1": float(per_class.mean()),
    }


def majority_baseline(train_labels: list[int], test_labels: list[int], num_classes: int) -> dict[str, float]:
    """The metrics of always predicting the train part's most frequent label."""
    majority = Counter(train_labels).most_common(1)[0][0]
    return classification_metrics([majority] * len(test_labels), test_labels, num_classes)


#: Inverse regularisation strengths of the classical baseline, tried on the val part.
CLASSICAL_C_GRID = (0.1, 1.0, 10.0, 100.0)


def classical_baseline(texts: dict[str, list[str]], targets: dict[str, list[int]], num_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 on the test part of TF-IDF (word unigrams and bigrams, sublinear term
    frequency) + logistic regression (scikit-learn), trained on the train part, and its ``c``.

    A fine-tuned language model has to beat this, not only the majority class: on small labelled
    sets a bag of words often wins (a 2 M-parameter model fine-tuned on a 4-class news task reached
    macro-F1 0.68 where this reached 0.83).  The inverse regularisation strength C is chosen from
    ``CLASSICAL_C_GRID`` by val macro-F1 (ties: the smaller, more regularised C) — the part and
    score the fine-tuning picks its epoch and method on, so neither side sees the test part.  The
    vectorizer reads whole texts (the fine-tuned model only its first ``max_length`` tokens).
    ``texts``/``targets``: train, val and test parts."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit(texts["train"])
    features = {split: vectorizer.transform(part) for split, part in texts.items()}
    fitted = {c: LogisticRegression(C=c, max_iter=1000).fit(features["train"], targets["train"]) for c in CLASSICAL_C_GRID}

    def scores(c: float, split: str) -> dict[str, float]:
        return classification_metrics(fitted[c].predict(features[split]).tolist(), targets[split], num_classes)

    best = max(CLASSICAL_C_GRID, key=lambda c: scores(c, "val")["macro_f1"])
    return {**scores(best, "test"), "c": best}


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measure (unigram, bigram and longest-common-subsequence
    overlap with the reference), in [0, 1]."""
    from torchmetrics.text.rouge import ROUGEScore

    scores = ROUGEScore(rouge_keys=("rouge1", "rouge2", "rougeL"))(predictions, references)
    return {k: float(scores[f"{k}_fmeasure"]) for k in ("rouge1", "rouge2", "rougeL")}


# --------------------------------------------------------------------------------------------------
# Examples → tensors
# --------------------------------------------------------------------------------------------------


def encode_classification(tokenizer, texts: list[str], labels: list[int], max_length: int) -> list[dict[str, Any]]:
    """Token ids of each text (its beginning, up to ``max_length``) with its label id."""
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return [{"input_ids": ids, "labels": label} for ids, label in zip(encoded, labels)]


def sft_prompt(tokenizer, prompt: str, template: str, max_prompt_tokens: int) -> str:
    """The task's prompt as the model is asked it: the template around the prompt's first tokens.
    With a chat template this is the user's message (``encode_sft`` and ``generate(chat=True)``
    put it into the conversation)."""
    ids = tokenizer(prompt, add_special_tokens=False, truncation=True, max_length=max_prompt_tokens)["input_ids"]
    return template.format(prompt=tokenizer.decode(ids))


def encode_sft(tokenizer, prompts: list[str], responses: list[str], max_length: int) -> list[dict[str, Any]]:
    """The prompt, then the response and <eos>; the loss is on the response only (prompt labels
    -100), so the model learns to answer, not to reproduce prompts.  Without a chat template the text
    is ``prompt + " " + response``; with one, the prompt is the user's turn up to the opening of the
    assistant's (``chat_prompt``, what generation feeds the model) and the response the assistant's
    answer.  Either way the response ends with <eos>, the token generation stops at."""
    from models.generation import chat_prompt, has_chat_template

    chat = has_chat_template(tokenizer)
    examples = []
    for prompt, response in zip(prompts, responses):
        p = tokenizer(chat_prompt(tokenizer, prompt) if chat else prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(("" if chat else " ") + response.strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        keep = max_length - min(len(r), max_length // 2)  # room for the prompt: at least half the response fits
        p = p[-keep:] if len(p) > keep else p  # a long prompt loses its beginning, never the assistant's opening
        ids = (p + r)[:max_length]
        labels = ([-100] * len(p) + r)[:max_length]
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; padded label positions are -100 (ignored by the loss)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, : len(e["input_ids"])] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if isinstance(examples[0]["labels"], int):
        batch["labels"] = torch.tensor([e["labels"] for e in examples])
    else:
        labels = torch.full_like(ids, -100)
        for i, e in enumerate(examples):
            labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
        batch["labels"] = labels
    return batch


def batches(examples: list[dict[str, Any]], size: int, pad_id: int, seed: int | None = None):
    """Batches in order, or shuffled by ``seed`` (one permutation per epoch seed)."""
    order = np.arange(len(examples)) if seed is None else np.random.default_rng(seed).permutation(len(examples))
    for start in range(0, len(order), size):
        yield collate([examples[i] for i in order[start : start + size]], pad_id)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def with_lora(model, lora, task_type: str):
    """Wrap ``model`` in a peft LoRA model: only the low-rank updates (and a task head) train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type=task_type, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules)
    with warnings.catch_warnings():  # peft calls a transformers property deprecated in 5.x
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass
class FitResult:
    best_epoch: int
    best_score: float
    epochs_run: int
    precision: str  # what the training steps ran in: "32" or "bf16-mixed"
    history: list[dict[str, float]] = field(default_factory=list)


def fit(model, train: list[dict[str, Any]], validate: Callable[[Any], dict[str, float]], settings, lr: float, pad_id: int,
        score_key: str, higher_is_better: bool = True, desc: str = "fine-tune", log: Callable[[str], None] | None = None,
        on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> FitResult:
    """Train for ``settings.epochs`` epochs (fewer with early stopping); ``validate(model)`` returns
    the metrics whose ``score_key`` picks the best epoch, whose weights are restored at the end.
    Training steps run in ``settings.precision`` (``models.precision``); ``validate`` in fp32.
    ``on_epoch(epoch, metrics)`` sees each epoch's metrics: a search's pruner, which stops the run by
    raising."""
    from transformers import get_linear_schedule_with_warmup

    from models.precision import autocast, resolve

    torch.manual_seed(settings.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=settings.weight_decay)
    steps = settings.epochs * math.ceil(len(train) / settings.batch_size)
    schedule = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_ratio * steps), steps)
    sign = 1.0 if higher_is_better else -1.0
    precision = resolve(settings.precision, model.device)
    best = FitResult(best_epoch=0, best_score=-sign * math.inf, epochs_run=0, precision=precision)
    best_state = None
    stale = 0
    bar = tqdm(total=steps, desc=desc, unit="step")
    for epoch in range(1, settings.epochs + 1):
        model.train()
        losses = []
        for batch in batches(train, settings.batch_size, pad_id, seed=settings.seed + epoch):
            with autocast(precision, model.device):
                loss = model(**{k: v.to(model.device) for k, v in batch.items()}).loss
            if not torch.isfinite(loss):  # NaN weights would follow: stop with the cause instead
                raise FloatingPointError(f"{desc}: loss is {loss.item()} in epoch {epoch}: lower the learning rate, "
                                         "or raise finetune.train.max_length if examples have no target tokens left")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        metrics = {"epoch": epoch, "train_loss": float(np.mean(losses)), **validate(model)}
        best.history.append(metrics)
        best.epochs_run = epoch
        if log:
            log(f"{desc}: epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "epoch"))
        if on_epoch:
            on_epoch(epoch, metrics)
        if sign * metrics[score_key] > sign * best.best_score:
            best.best_epoch, best.best_score, stale = epoch, metrics[score_key], 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if settings.patience and stale >= settings.patience:
                break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return best


@torch.no_grad()
def predict_classes(model, examples: list[dict[str, Any]], batch_size: int, pad_id: int) -> tuple[list[int], float]:
    """Predicted label ids and the mean cross-entropy loss."""
    model.eval()
    predictions, losses = [], []
    for batch in batches(examples, batch_size, pad_id):
        out = model(**{k: v.to(model.device) for k, v in batch.items()})
        predictions += out.logits.argmax(-1).tolist()
        losses.append(out.loss.item() * len(batch["labels"]))
    return predictions, float(np.sum(losses) / max(len(examples), 1))


@torch.no_grad()
def mean_loss(model, examples: list[dict[str, Any]], batch_size: int, pad_id: int) -> float:
    """Mean per-token loss over the examples' labelled tokens (SFT validation)."""
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches(examples, batch_size, pad_id):
        out = model(**{k: v.to(model.device) for k, v in batch.items()})
        n = int((batch["labels"][:, 1:] != -100).sum())  # causal heads shift labels by one
        total += out.loss.item() * n
        tokens += n
    return total / max(tokens, 1)


def first_line(text: str) -> str:
    """A one-line answer: the text up to its first line break (the same cut for every model)."""
    stripped = text.strip()
    return stripped.splitlines()[0].strip() if stripped else ""


def export(model, tokenizer, method_dir, lora: bool, root: Path | None = None) -> None:
    """Save the model in Hugging Face format under ``method_dir/hf``.  A LoRA model is also saved as
    its adapter (``method_dir/adapter``, small, loadable with peft) and exported merged into full
    weights, so every fine-tuned model loads the same way.  The adapter names its base model relative
    to ``root`` (the repository) when it lies there: the same files, and DVC hash, in every checkout."""
    if lora:
        config = model.peft_config["default"]
        base = Path(config.base_model_name_or_path or "")
        if root is not None and base.is_absolute() and base.is_relative_to(root):
            config.base_model_name_or_path = str(base.relative_to(root))  # adapter_config.json
            base_model = model.get_base_model()  # the model card (README.md) names it from these two
            base_model.config.name_or_path = base_model.name_or_path = config.base_model_name_or_path
        model.save_pretrained(str(method_dir / "adapter"))
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(str(method_dir / "hf"), safe_serialization=True)
    tokenizer.save_pretrained(str(method_dir / "hf"))
