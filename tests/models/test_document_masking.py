"""A packed batch with cu_seqlens gives each document the logits it gets when run alone
(linear-attention state reset, attention masked, positions restarted)."""

from __future__ import annotations

import pytest
import torch

from tests.models.helpers import tiny_model

COMMON = ["model.document_masking=true", "model.sliding_window=6", "model.vocab_size=1024", "model.num_layers=4"]
CASES = {
    "sb7b_tiny": ("sb7b_tiny", []),
    "sb76b_tiny": ("sb76b_tiny", ["model.layer_pattern=[hybrid_swa,hybrid_full]", "model.moe.dense_layers=[0]"]),
    "qwen2_tiny": ("qwen2_tiny", []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_packed_documents_match_documents_alone(case):
    name, overrides = CASES[case]
    model = tiny_model(name, COMMON + overrides)
    lengths = [9, 4, 12]
    docs = [torch.randint(0, 1024, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    cu = torch.tensor([0, 9, 13, 25], dtype=torch.int32)
    with torch.no_grad():
        got = model(packed, cu_seqlens=cu, return_logits=True).logits
        alone = torch.cat([model(d, return_logits=True).logits for d in docs], dim=1)
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
        # Without masking the later documents see the earlier ones, so the check has teeth.
        model.config.document_masking = False
        leaky = model(packed, cu_seqlens=cu, return_logits=True).logits
    assert (leaky[:, 9:] - alone[:, 9:]).abs().max() > 1e-4


def test_cu_seqlens_must_cover_the_batch():
    model = tiny_model("qwen2_tiny", COMMON)
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(torch.randint(0, 1024, (1, 10)), cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32))
