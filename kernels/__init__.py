"""Triton kernels, each beside its plain-torch reference (docs/design.md, "Kernels").

logprobs:       fused LM-head scoring (log-probs / entropies of targets without an [N, V] tensor)
token_compress: EVS-style temporal pruning of merged video tokens

Triton runs on CUDA tensors, or on CPU when TRITON_INTERPRET=1 is set before this package is imported.
"""
from kernels.logprobs import logits_logprobs, naive_logits_logprobs, naive_logprobs, token_logprobs
from kernels.token_compress import frame_similarity, keep_indices, prune_video_tokens, video_keep_mask

__all__ = ["token_logprobs", "logits_logprobs", "naive_logprobs", "naive_logits_logprobs", "prune_video_tokens",
           "video_keep_mask", "frame_similarity", "keep_indices"]
