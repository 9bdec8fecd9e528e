"""Knowledge distillation: a smaller causal student learns from the teacher's next-token distribution.

The loss mixes the usual cross-entropy on the data with the KL divergence from the teacher's
temperature-softened distribution to the student's (Hinton et al., 2015):

    loss = alpha · T² · KL(softmax(teacher / T) ‖ softmax(student / T)) + (1 − alpha) · CE(student, data)

T² keeps the soft term's gradients on the scale of the hard term's.  With ``alpha = 0`` and no teacher
the same loop trains the student from scratch: the baseline a distilled student must beat, on the
same blocks in the same order for the same number of steps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from models.lightning_module import StreamSampler
from models.objectives import CausalCollator
from models.precision import autocast
from models.train_config import DistilSettings


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
                      temperature: float, alpha: float) -> torch.Tensor:
    """The mixed loss over the positions that predict a real token (causal shift applied here)."""
    s, y = student_logits[:, :-1], labels[:, 1:]
    mask = y != -100
    ce = F.cross_entropy(s[mask].float(), y[mask])
    if teacher_logits is None or alpha == 0:
        return ce
    t = teacher_logits[:, :-1][mask].float() / temperature
    kl = F.kl_div(F.log_softmax(s[mask].float() / temperature, dim=-1), F.log_softmax(t, dim=-1), log_target=True, reduction="batchmean")
    return alpha * temperature**2 * kl + (1 - alpha) * ce


def train_student(student, blocks, pad_id: int, settings: DistilSettings, teacher=None, desc: str = "student") -> list[float]:
    """Train ``student`` on ``blocks`` (``models.data.PackedBlocks``); returns the loss of every step."""
    torch.manual_seed(settings.seed)
    collate = CausalCollator(pad_id)
    order = iter(StreamSampler(len(blocks), settings.seed))
    optimizer = torch.optim.AdamW(student.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.1)

    def factor(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if teacher is not None:
        teacher.eval()
    student.train()
    losses = []
    for _ in tqdm(range(settings.steps), desc=desc, unit="step"):
        batch = collate([blocks[next(order)] for _ in range(settings.batch_size)])
        batch = {k: v.to(student.device) for k, v in batch.items()}
        teacher_logits = None
        if teacher is not None and settings.alpha > 0:
            with torch.no_grad(), autocast(settings.teacher_precision, student.device):
                teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = distillation_loss(logits, teacher_logits, batch["labels"], settings.temperature, settings.alpha)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    student.eval()
    return losses
