"""The BERT layout on the real packaged MiniLM-L6 (an encoder: AutoModel, not a causal LM)."""

import torch
from transformers import AutoModel

from llm_prune.cli import main
from llm_prune.models import resolve_model
from tests.test_masks import reference_keep


def test_minilm_prunes_like_inmemory(tmp_path):
    out = tmp_path / "minilm-0.5"
    assert main(["minilm-l6", "--sparsity", "0.5", "--out", str(out), "--quiet"]) == 0
    pruned = AutoModel.from_pretrained(out).eval()
    reference = AutoModel.from_pretrained(resolve_model("minilm-l6")).eval()
    with torch.no_grad():
        for m in reference.encoder.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(reference_keep(m.weight, int(round(0.5 * m.weight.numel()))))
    ids = torch.randint(1000, 2000, (2, 12))
    with torch.no_grad():
        assert torch.equal(pruned(ids).last_hidden_state, reference(ids).last_hidden_state)
    assert torch.equal(pruned.embeddings.word_embeddings.weight, reference.embeddings.word_embeddings.weight)
