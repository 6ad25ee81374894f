"""Decoder block and the causal LM (HF state-dict names: ``model.layers.{i}.self_attn...``).

``CausalLM.forward(input_ids, labels=None, position_ids=None, cu_seqlens=None,
return_logits=False)`` returns :class:`CausalLMOutput`. ``labels`` are aligned with
``input_ids`` (``labels[:, t]`` is the target of position t, i.e. already shifted; -100 is
ignored). The loss is a SUM over target tokens in fp32 (``ops.linear_cross_entropy`` on the
final hidden states, never full logits), so the trainer divides by the global token count.

Under tensor parallelism (:mod:`sbtrain.models.parallelize`) the final hidden states are gathered
along the sequence and the loss runs on this rank's vocabulary rows of lm_head with the TP group
(the same chunked cross-entropy, vocabulary-parallel); loss_sum, num_tokens and aux_loss are then
plain tensors identical on every TP rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from operators import ops
from parallel.context_parallel import ContextParallel
from sbtrain.config.model import ModelConfig
from sbtrain.models.cache import DecodeCache, LayerCache
from sbtrain.models.ffn import ffn_kind
from sbtrain.models.layers import RMSNorm, Rotary, default_position_ids
from sbtrain.models.mixers import mixer_kind
from sbtrain.models.mixers.base import MixerInputs


@dataclass
class CausalLMOutput:
    loss_sum: torch.Tensor | None  # fp32 sum of token losses (None without labels)
    num_tokens: torch.Tensor | None  # number of labels != -100
    aux_loss: torch.Tensor  # MoE balance + z losses summed over layers (0 for dense models)
    logits: torch.Tensor | None = None  # [B,T,V] fp32, only with return_logits=True


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, device=None, dtype=None):
        super().__init__()
        self.kind = cfg.layer_types()[index]  # the mixer kind (sbtrain/models/mixers/)
        self.ffn_kind = cfg.ffn_types()[index]  # the FFN kind (sbtrain/models/ffn/)
        kw = {"device": device, "dtype": dtype}
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = mixer_kind(self.kind).build(cfg, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = ffn_kind(self.ffn_kind).build(cfg, **kw)

    def forward(self, x: torch.Tensor, inputs: MixerInputs) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.self_attn(self.input_layernorm(x), inputs)
        y = self.mlp(self.post_attention_layernorm(x))
        y, aux = y if isinstance(y, tuple) else (y, None)  # an FFN with an auxiliary loss returns (y, aux)
        return x + y, x.new_zeros((), dtype=torch.float32) if aux is None else aux


class Decoder(nn.Module):
    """``model.*`` in the state dict: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(Block(cfg, i, device=device, dtype=dtype) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device=device, dtype=dtype)


class HeadLoss(nn.Module):
    """Σ token cross-entropy of the LM head over flattened hidden states, never forming all logits
    (``ops.linear_cross_entropy``). No parameters: a parallel plan replaces it with its own form
    (tensor parallelism: the vocabulary-parallel loss, ``sbtrain.models.parallelize``)."""

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return ops.linear_cross_entropy(hidden, weight, labels)


class CausalLM(nn.Module):
    """Knows no parallelism: context parallelism reaches the mixers through ``MixerInputs``, tensor
    parallelism is applied by its plan (hooks and DTensor layouts, ``HeadLoss`` swapped)."""

    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.model = Decoder(cfg, device=device, dtype=dtype)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device=device, dtype=dtype)
        self.head_loss = HeadLoss()
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cache: DecodeCache | None = None,
        context_parallel: ContextParallel | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Final-norm hidden states ``[B,T,d]`` and the summed aux loss.

        With ``context_parallel``, ``input_ids`` (and ``position_ids`` if given) are this rank's
        shard of the sequence and ``cu_seqlens`` holds the global document bounds."""
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if not cfg.document_masking:
            cu_seqlens = None  # packed documents then see each other, as in plain packing
        cp = context_parallel
        if cp is not None:
            if cache is not None:
                raise ValueError("context parallelism is for training and prefill-free evaluation, not cached decoding")
            if T != cp.local_len:
                raise ValueError(f"input_ids hold {T} tokens but the context-parallel shard is {cp.local_len} "
                                 f"({cp.seq_len} tokens over {cp.size} ranks)")
            if cu_seqlens is not None and (cp.cu_seqlens is None or not torch.equal(cp.cu_seqlens, cu_seqlens)):
                raise ValueError("under context parallelism pass the global cu_seqlens inside ContextParallel")
            if position_ids is None:
                position_ids = cp.shard(default_position_ids(B, cp.seq_len, cu_seqlens, input_ids.device))
            cu_seqlens = None  # the mixers read the document bounds from cp
        elif cu_seqlens is not None:
            if cache is not None:
                raise ValueError("cu_seqlens (document masking) does not apply to cached decoding")
            if B != 1 or int(cu_seqlens[-1]) != T:
                raise ValueError(f"cu_seqlens needs a packed batch (B=1) ending at T={T}; got B={B}, "
                                 f"cu_seqlens[-1]={int(cu_seqlens[-1])}")
        if position_ids is None:
            offset = cache.seq_len if cache is not None else 0
            position_ids = default_position_ids(B, T, cu_seqlens, input_ids.device, offset)
        rotary = Rotary(position_ids, cfg.resolved_head_dim, cfg.rope_base, cfg.rope_yarn)
        if cache is not None and not cache.layers:
            cache.layers = [LayerCache() for _ in range(cfg.num_layers)]
        x = self.model.embed_tokens(input_ids)
        aux = x.new_zeros((), dtype=torch.float32)
        for i, layer in enumerate(self.model.layers):
            inputs = MixerInputs(rotary, cu_seqlens, cache.layers[i] if cache is not None else None, cp)
            x, layer_aux = layer(x, inputs)
            aux = aux + layer_aux
        if cache is not None:
            cache.seq_len += T
        return self.model.norm(x), aux

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        return_logits: bool = False,
        context_parallel: ContextParallel | None = None,
    ) -> CausalLMOutput:
        hidden, aux = self.hidden_states(input_ids, position_ids, cu_seqlens, context_parallel=context_parallel)
        loss_sum = num_tokens = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
            flat_labels = labels.reshape(-1)
            flat_hidden = hidden.reshape(-1, hidden.shape[-1])
            loss_sum = self.head_loss(flat_hidden, self.lm_head.weight, flat_labels)
            num_tokens = (flat_labels != -100).sum()
        logits = _at_least_fp32(self.lm_head(hidden)) if return_logits else None
        return CausalLMOutput(loss_sum, num_tokens, aux, logits)

    def moe_layers(self) -> list[nn.Module]:
        """The FFNs with routed experts (kinds declaring ``expert_parallel``): what parallel.ep shards."""
        return [layer.mlp for layer in self.model.layers if ffn_kind(layer.ffn_kind).expert_parallel]


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 logits widened to fp32; a float64 model keeps float64 (reference runs)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
