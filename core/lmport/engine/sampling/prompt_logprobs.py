"""Log-probabilities of the prompt's own tokens (TGI's ``decoder_input_details``)."""

from __future__ import annotations

import torch


def compute_prompt_logprobs(
    logits: torch.Tensor, target_ids: torch.Tensor, top_n: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Row ``i`` of ``logits`` predicts ``target_ids[i]`` (the prompt token after position ``i``).

    Returns ``(logprobs [n], top_ids [n, top_n] | None, top_logprobs [n, top_n] | None)`` under
    the raw model distribution (no sampling parameters apply to the prompt).
    """
    log_probs = torch.log_softmax(logits.to(torch.float32), dim=-1)
    chosen = log_probs.gather(1, target_ids.to(torch.int64)[:, None]).squeeze(1)
    if top_n <= 0:
        return chosen, None, None
    top_logprobs, top_ids = torch.topk(log_probs, min(top_n, log_probs.shape[-1]), dim=-1)
    return chosen, top_ids, top_logprobs
