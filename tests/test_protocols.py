"""Pinned protocols: calibration text and evaluation text never overlap."""

from llm_prune.calibration import embedded_passages
from llm_prune.eval.perplexity import ppl_text


def test_calibration_and_perplexity_text_are_disjoint():
    calib, heldout = embedded_passages("calib"), embedded_passages("heldout")
    assert len(calib) > 8 * len(heldout) > 0
    assert set(calib).isdisjoint(heldout)
    text, protocol = ppl_text("local")
    assert text.split("\n\n")[:3] == heldout[:3] and len(text) == len("\n\n".join(heldout))
    assert "held out from calibration" in protocol["split"]
    assert not any(p in text for p in calib[:50])
