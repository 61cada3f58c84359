"""Next-token cross-entropy, summed in total and per modality of the target token."""

from typing import Tuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def per_modality_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, target_modalities: torch.Tensor, num_modalities: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum the cross-entropy of every target token, in total and per modality.

    Sums rather than means, so that gradient accumulation can divide by the number of target
    tokens of the whole optimizer step.

    Args:
        logits (torch.Tensor): ``[b, s, vocab]``.
        labels (torch.Tensor): target ids ``[b, s]``, already shifted; ``-100`` is ignored.
        target_modalities (torch.Tensor): modality id of each label ``[b, s]``.
        num_modalities (int): number of modalities, text included.

    Returns:
        Tuple[torch.Tensor, torch.Tensor, torch.Tensor]: the summed loss (scalar, with grad), the
        detached loss sum per modality ``[num_modalities]`` and the target count per modality.
    """
    token_loss = F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    valid = labels.flatten() != IGNORE_INDEX
    modality = target_modalities.flatten().masked_fill(~valid, 0)
    sums = torch.zeros(num_modalities, device=logits.device).index_add_(0, modality, token_loss.detach() * valid)
    counts = torch.zeros(num_modalities, device=logits.device, dtype=torch.long).index_add_(0, modality, valid.long())
    return token_loss.sum(), sums, counts
