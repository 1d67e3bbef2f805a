"""Each figure function writes one PNG that opens; without matplotlib, one clear line."""

import sys

import pytest

from llm_prune.study.knee import Metric, find_knee
from llm_prune.study.plots import MissingExtra, Series

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200


def test_missing_matplotlib_is_one_line(monkeypatch, tmp_path):
    from llm_prune.errors import UserError
    from llm_prune.study import plots

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` fail
    with pytest.raises(MissingExtra) as e:
        plots.per_block_lines(tmp_path / "x.png", [0, 1], {"a": [1, 2]}, "y", "t")
    assert str(e.value) == "plots need matplotlib: pip install 'llm-prune[plot]'"
    assert isinstance(e.value, ImportError) and isinstance(e.value, UserError)
    assert not (tmp_path / "x.png").exists()


@pytest.fixture
def mpl():
    return pytest.importorskip("matplotlib", reason="plots need matplotlib (pip install 'llm-prune[plot]')")


LEVELS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]


def test_knee_plot(mpl, tmp_path):
    from llm_prune.study.plots import knee_plot

    values = [0.80, 0.799, 0.795, 0.785, 0.74, 0.60]
    knee = find_knee(LEVELS, values, 0.80, Metric.accuracy(), stderr=[0.004] * 6, dense_stderr=0.004)
    other = [0.80, 0.80, 0.797, 0.792, 0.788, 0.70]
    extra = {"wanda": Series(LEVELS, other, None, find_knee(LEVELS, other, 0.80, Metric.accuracy())),
             "sparsegpt": (LEVELS, [0.8, 0.8, 0.8, 0.79, 0.78, 0.75])}  # a plain tuple works too
    path = tmp_path / "sub" / "knee.png"
    assert knee_plot(path, "MMLU accuracy", LEVELS, values, 0.80, knee, stderr=[0.004] * 6,
                     series_label="OMP global", extra_series=extra) == path
    check_png(path)


def test_knee_plot_perplexity_and_edge_knees(mpl, tmp_path):
    from llm_prune.study.plots import knee_plot

    ppl = [10.1, 10.2, 10.4, 11.0, 14.0, 30.0]
    knee_plot(tmp_path / "ppl.png", "perplexity", LEVELS, ppl, 10.0, find_knee(LEVELS, ppl, 10.0, Metric.perplexity()))
    first = [0.7] * 6  # every level fails: the knee is at the first level, nothing to mark
    knee_plot(tmp_path / "first.png", "acc", LEVELS, first, 0.8, find_knee(LEVELS, first, 0.8, Metric.accuracy()))
    check_png(tmp_path / "ppl.png")
    check_png(tmp_path / "first.png")


def test_heatmap(mpl, tmp_path):
    from llm_prune.study.plots import heatmap

    rows = [f"block {i}" for i in range(4)]
    cols = ["q_proj", "k_proj", "v_proj", "o_proj", "mlp"]
    values = [[(r + c) / 10 for c in range(5)] for r in range(4)]
    check_png(heatmap(tmp_path / "h.png", rows, cols, values, "pruned fraction", "fraction pruned"))
    with pytest.raises(ValueError, match="4 rows × 5 columns"):
        heatmap(tmp_path / "bad.png", rows, cols, values[:3], "t", "c")


def test_per_block_lines(mpl, tmp_path):
    from llm_prune.study.plots import per_block_lines

    blocks = list(range(30))
    series = {"OMP vs Wanda": [0.9 - i / 100 for i in blocks], "OMP vs SparseGPT": [0.8] * 30}
    check_png(per_block_lines(tmp_path / "b.png", blocks, series, "mask cosine", "mask similarity per block"))


def test_histograms(mpl, tmp_path):
    from llm_prune.study.plots import histograms

    edges = [i / 10 for i in range(11)]
    panels = [("q_proj", edges, [100, 80, 60, 40, 20, 10, 5, 2, 1, 1]),
              ("mlp", edges, {"dense": [90, 70, 50, 30, 20, 10, 5, 3, 1, 1],
                              "kept": [0, 0, 0, 30, 20, 10, 5, 3, 1, 1]}),
              ("empty bins", edges, [0] * 10),
              ("o_proj", edges, [5] * 10)]
    check_png(histograms(tmp_path / "hist.png", panels, "|w|"))


def test_lines_over_steps(mpl, tmp_path):
    from llm_prune.study.plots import lines_over_steps

    steps = [0, 100, 200, 300, 400]
    series = {"sparsity": [0.5, 0.5, 0.45, 0.3, 0.3]}
    path = lines_over_steps(tmp_path / "s.png", steps, series, "sparsity", "over training", marks=[(300, "jump"), 200])
    check_png(path)
    banded = lines_over_steps(tmp_path / "b.png", steps, series, "sparsity", "with a band",
                              spread={"sparsity": [0.01, 0.02, 0.0, 0.05, 0.01]})
    check_png(banded)
    assert banded.read_bytes() != path.read_bytes()
