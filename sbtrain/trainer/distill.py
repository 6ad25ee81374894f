"""Distillation from a teacher's logits: ``KL(teacher || student)`` per target token at
temperature τ (scaled by τ², Hinton et al.), summed like the LM loss so the trainer normalises
both by the global token count.

The teacher is any sbtrain model saved as a weights directory (``sbtrain.models.weights.
save_weights`` of e.g. the Transformer the student was converted from, trained here). It is
replicated on every rank, frozen, in eval mode. Full
student and teacher logits are formed for the KL term (``[tokens, vocab]`` fp32 each): fine for
small vocabularies and micro batches; a chunked KL is the next step for 150k vocabularies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sbtrain.models.build import build_model
from sbtrain.models.weights import load_config, load_into


def load_teacher(directory: str, device: torch.device) -> torch.nn.Module:
    teacher = build_model(load_config(directory), device=device)
    load_into(teacher, directory)
    teacher.requires_grad_(False)
    return teacher.eval()


def kd_loss_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                temperature: float = 1.0) -> torch.Tensor:
    """Sum over target positions (labels != -100) of τ²·KL(softmax(t/τ) || softmax(s/τ)), fp32."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"distillation needs the same vocabulary: student logits {tuple(student_logits.shape)}, "
                         f"teacher {tuple(teacher_logits.shape)}")
    mask = (labels != -100).reshape(-1)
    s = student_logits.float().reshape(-1, student_logits.shape[-1])[mask] / temperature
    t = teacher_logits.float().reshape(-1, teacher_logits.shape[-1])[mask] / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
    return kl * temperature**2


__all__ = ["kd_loss_sum", "load_teacher"]
