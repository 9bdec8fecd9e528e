"""Preference tuning: DPO (Rafailov et al., 2023) on chosen/rejected answer pairs with TRL's
``DPOTrainer``, and the held-out preference accuracy that judges it.

Why TRL and not a DPO loss in lmforge's own fine-tuning loop (``models.finetune.fit``): DPO's
details are where implementations go wrong, and TRL keeps them: the reference model's log-probs
(with LoRA, the same weights with the adapter switched off, so no second copy in memory), the
tokenization of a prompt and an answer under a chat template (the answer's tokens, and only they,
carry the loss), truncation that keeps the prompt's start, and a dozen published variants of the
loss behind one ``loss_type`` (IPO, hinge, robust, APO, ...).  Measured here (SmolLM2-135M, CPU):
TRL's defaults for DPO (bf16 autocast and gradient checkpointing) made a step ~10× slower than
fp32 without checkpointing, so ``dpo`` sets both from lmforge's own precision rule.

The gate's metric is lmforge's own, the same for every model: for each held-out pair, the sum of the
answer's token log-probabilities given the prompt (what DPO's implicit reward is built from), and
the share of pairs whose chosen answer scores above the rejected one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from models.finetune import batches, encode_sft


@dataclass
class DpoSettings:
    beta: float
    loss_type: str
    epochs: int
    lr: float
    batch_size: int
    max_length: int
    seed: int
    warmup_ratio: float = 0.1  # of the steps (transformers reads a warmup_steps below 1 as a ratio)
    precision: str = "32"  # "32" or "bf16-mixed" (models.precision.resolve)


@torch.no_grad()
def answer_logps(model, tokenizer, prompts: list[str], answers: list[str], max_length: int, batch_size: int = 8) -> list[float]:
    """Sum of the answer's token log-probabilities given the prompt, per pair (prompt and answer
    formatted as ``encode_sft`` formats them for training: the chat template when the model has one)."""
    model.eval()
    examples = encode_sft(tokenizer, prompts, answers, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores: list[float] = []
    for batch in batches(examples, batch_size, pad):
        logits = model(input_ids=batch["input_ids"].to(model.device), attention_mask=batch["attention_mask"].to(model.device)).logits.float()
        labels = batch["labels"][:, 1:].to(model.device)
        logps = torch.log_softmax(logits[:, :-1], dim=-1)
        mask = labels != -100
        picked = logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        scores += picked.sum(-1).tolist()
    return scores


def preference_accuracy(model, tokenizer, pairs: list[dict[str, str]], max_length: int, batch_size: int = 8) -> dict[str, float]:
    """The share of pairs whose chosen answer the model finds likelier than the rejected one (a tie
    counts half), and the mean log-probability margin."""
    prompts = [p["prompt"] for p in pairs]
    chosen = answer_logps(model, tokenizer, prompts, [p["chosen"] for p in pairs], max_length, batch_size)
    rejected = answer_logps(model, tokenizer, prompts, [p["rejected"] for p in pairs], max_length, batch_size)
    margins = [c - r for c, r in zip(chosen, rejected)]
    wins = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins)
    return {"accuracy": wins / len(pairs) if pairs else math.nan, "mean_margin": sum(margins) / len(pairs) if pairs else math.nan}


def trl_rows(tokenizer, pairs: list[dict[str, str]]) -> list[dict[str, Any]]:
    """The pairs in TRL's format: conversations for a model with a chat template (TRL applies it, as
    generation does), plain text otherwise (the answer after a space, as ``encode_sft`` joins them)."""
    from models.generation import has_chat_template

    if has_chat_template(tokenizer):
        return [{"prompt": [{"role": "user", "content": p["prompt"]}], "chosen": [{"role": "assistant", "content": p["chosen"]}],
                 "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]
    return [{"prompt": p["prompt"], "chosen": " " + p["chosen"].strip(), "rejected": " " + p["rejected"].strip()} for p in pairs]


def dpo(model, tokenizer, pairs: list[dict[str, str]], settings: DpoSettings, out_dir, lora=None, ref_model=None,
        log=None) -> tuple[Any, list[dict[str, float]]]:
    """Tune ``model`` on ``pairs`` with TRL's DPOTrainer; return the tuned model (a peft model with
    LoRA) and its log (one row per step: loss, rewards/margins, rewards/accuracies, ...).  ``lora`` (models.finetune's LoRA settings):
    train an adapter, the reference being the same weights without it; else every weight trains and
    the reference is ``ref_model`` or a frozen copy TRL makes.  A reference given with LoRA is used as is."""
    import warnings

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Report(TrainerCallback):  # each logged step reaches the caller (Dagster's log, the terminal)
        def on_log(self, args, state, control, logs=None, **kwargs):
            if log and logs and "loss" in logs:
                log(f"DPO step {state.global_step}/{state.max_steps}: loss {logs['loss']:.4f}, "
                    f"reward margin {logs.get('rewards/margins', float('nan')):.3f}, reward accuracy {logs.get('rewards/accuracies', float('nan')):.2f}")

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = DPOConfig(
        output_dir=str(out_dir), beta=settings.beta, loss_type=[settings.loss_type], num_train_epochs=settings.epochs,
        learning_rate=settings.lr, per_device_train_batch_size=settings.batch_size, max_length=settings.max_length,
        warmup_steps=settings.warmup_ratio, lr_scheduler_type="linear", seed=settings.seed, data_seed=settings.seed,
        bf16=settings.precision == "bf16-mixed", gradient_checkpointing=False, use_cpu=model.device.type == "cpu",
        report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=False, dataloader_num_workers=0,
    )
    peft_config = None
    if lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=Dataset.from_list(trl_rows(tokenizer, pairs)),
                             processing_class=tokenizer, peft_config=peft_config, callbacks=[Report()])
        trainer.train()
    trainer.model.eval()
    return trainer.model, [row for row in trainer.state.log_history if "loss" in row]
