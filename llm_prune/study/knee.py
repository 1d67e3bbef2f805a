"""Essential sparsity: where the quality-vs-sparsity curve breaks.

Definition (Jaiswal et al. 2023, "The Emergence of Essential Sparsity in Large Pre-trained
Models"): the essential sparsity is the largest sparsity level tested *before the first level*
whose drop from the dense model exceeds ε. The first failure decides even when a later level
recovers; a recovery is reported, never used.

Units. A drop is signed so that positive = worse, and is expressed in ε's units, so that one
comparison (drop > ε) serves every metric:

| ε kind   | typical metric           | drop at a level                         | default ε              |
|----------|--------------------------|-----------------------------------------|------------------------|
| absolute | accuracy, as a fraction  | dense − value (higher is better)        | 0.01 = 1 point         |
|          |                          | value − dense (lower is better)         |                        |
| relative | perplexity               | (value − dense) / dense (lower better)  | 0.05 = +5 % over dense |
|          |                          | (dense − value) / dense (higher better) |                        |

Accuracies are fractions in [0, 1], never percentages (0.47, not 47.0), so "1 point" is 0.01.
``Metric.accuracy`` declares those bounds and ``find_knee`` checks them, so a percentage cannot
slip through and turn ε = 1 point into ε = 0.01 points. A drop equal to ε passes (up to float
rounding: 0.50 − 0.49 is 0.010000000000000009 in binary floats and must not count as a failure).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation
from typing import Sequence

# Drops within this of ε count as equal to ε: far below any real metric's resolution (an
# accuracy over 14,042 MMLU questions moves in steps of 7e-5) and far above float rounding.
_TOL = 1e-9

KNEE = "knee"
KNEE_AT_FIRST_LEVEL = "knee_at_first_level"
NO_KNEE = "no_knee"


@dataclass(frozen=True)
class Metric:
    """What is measured, which direction is better, and how far from dense still counts as dense.

    ``epsilon_kind`` is "absolute" (ε in the metric's own units) or "relative" (ε a fraction of
    the dense value). ``bounds``, when set, is the closed range every value must lie in.
    """

    name: str
    higher_is_better: bool
    epsilon: float
    epsilon_kind: str
    bounds: tuple[float, float] | None = None

    def __post_init__(self):
        if self.epsilon_kind not in ("absolute", "relative"):
            raise ValueError(f"epsilon_kind must be 'absolute' or 'relative', not {self.epsilon_kind!r}")
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise ValueError(f"epsilon must be a finite number >= 0, not {self.epsilon!r}")

    @classmethod
    def accuracy(cls, name: str = "accuracy", points: float = 1.0) -> "Metric":
        """Accuracy as a fraction in [0, 1]; ε = ``points`` percentage points (1.0 → 0.01)."""
        return cls(name, True, points / 100, "absolute", (0.0, 1.0))

    @classmethod
    def perplexity(cls, name: str = "perplexity", relative: float = 0.05) -> "Metric":
        """Perplexity (lower is better); ε = ``relative`` × dense (0.05 → fails above dense × 1.05)."""
        return cls(name, False, relative, "relative")

    def describe_epsilon(self) -> str:
        """ε in words, unambiguous about its units: 'ε = 1 point (0.01 absolute)'."""
        if self.epsilon_kind == "relative":
            sign = "+" if not self.higher_is_better else "-"
            return f"ε = {sign}{self.epsilon * 100:g}% of dense (relative, {self.epsilon:g})"
        if self.bounds == (0.0, 1.0):
            points = round(self.epsilon * 100, 9)
            unit = "point" if points == 1 else "points"
            return f"ε = {points:g} {unit} ({self.epsilon:g} absolute, accuracy as a fraction)"
        return f"ε = {self.epsilon:g} (absolute)"


@dataclass(frozen=True)
class Knee:
    """The essential sparsity of one curve, with everything needed to print or re-check it.

    ``status`` is one of
      "knee"                 some level fails; ``essential_sparsity`` is the last level before it;
      "knee_at_first_level"  even the first level tested fails; ``essential_sparsity`` is None
                             (it is below every level tested: only dense is known to pass);
      "no_knee"              no level fails; ``essential_sparsity`` is the largest level tested
                             and ``lower_bound`` is True (the knee lies beyond the sweep).
    ``drops[i]`` is the drop at ``levels[i]`` in ε's units (positive = worse, see module doc).
    ``drop_stderr`` is None without standard errors; ``in_noise`` is then None too.
    """

    metric: str
    higher_is_better: bool
    epsilon: float
    epsilon_kind: str
    epsilon_text: str
    dense: float
    levels: tuple[float, ...]
    values: tuple[float, ...]
    drops: tuple[float, ...]
    status: str
    essential_sparsity: float | None
    lower_bound: bool
    first_failing: float | None
    recovered: tuple[float, ...]
    drop_stderr: tuple[float, ...] | None
    z: float
    ambiguous: tuple[float, ...]
    in_noise: bool | None
    rule: str
    notes: tuple[str, ...]

    @property
    def threshold(self) -> float:
        """The metric value at which a level stops counting as dense (dense ∓ ε in its units)."""
        return epsilon_threshold(self.dense, self.epsilon, self.epsilon_kind, self.higher_is_better)

    def summary(self) -> str:
        """One line: the knee, ε with its units, and the noise verdict."""
        if self.status == KNEE:
            i = self.levels.index(self.first_failing)
            head = (f"essential sparsity {_pct(self.essential_sparsity)} (first failing level "
                    f"{_pct(self.first_failing)}, drop {self.drops[i]:.4g} > ε)")
        elif self.status == KNEE_AT_FIRST_LEVEL:
            head = f"knee at the first level: {_pct(self.first_failing)} already fails (drop {self.drops[0]:.4g} > ε)"
        else:
            head = f"no knee within the sweep: essential sparsity >= {_pct(self.essential_sparsity)}"
        noise = {None: "no standard errors given", False: "knee outside the noise",
                 True: "knee inside the noise (ambiguous levels " + ", ".join(map(_pct, self.ambiguous)) + ")"}
        return f"{self.metric}: {head}; {self.epsilon_text}; {noise[self.in_noise]}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["drop_units"] = ("fraction of dense (0.05 = 5% worse)" if self.epsilon_kind == "relative"
                           else "the values' own units (accuracy fractions: 0.01 = 1 point)")
        d["summary"] = self.summary()
        return d

    def to_json(self, indent: int | None = 2) -> str:
        """JSON with sorted keys; ε, its kind, its text and the noise rule always included."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True, ensure_ascii=False)


def epsilon_threshold(dense: float, epsilon: float, kind: str, higher_is_better: bool) -> float:
    """The metric value exactly ε away from dense on the worse side."""
    margin = epsilon * abs(dense) if kind == "relative" else epsilon
    return dense - margin if higher_is_better else dense + margin


def find_knee(levels: Sequence[float], values: Sequence[float], dense: float, metric: Metric,
              stderr: Sequence[float] | None = None, dense_stderr: float | None = None,
              *, z: float = 1.96) -> Knee:
    """Essential sparsity of the curve ``values`` over ascending sparsity ``levels``.

    Noise rule (when ``stderr`` or ``dense_stderr`` is given; a missing one counts as 0):
    the standard error of a drop is SE = sqrt(SE_level² + SE_dense²) for absolute ε and, by the
    delta method for value/dense, sqrt(SE_level² + (value/dense)² SE_dense²) / |dense| for
    relative ε. A level is *ambiguous* when |drop − ε| ≤ z·SE: its pass/fail could flip within
    z standard errors. The knee is *inside the noise* when any level up to and including the
    first failing one (every level, when none fails) is ambiguous, since flipping any of them
    moves the knee. Errors are combined as if independent; levels scored on the same examples as
    dense are positively correlated, so this SE is an over-estimate and the verdict errs towards
    "inside the noise".
    """
    levels, values = _check_curve(levels, values, dense, metric)
    if not (math.isfinite(z) and z >= 0):
        raise ValueError(f"z must be a finite number >= 0, not {z!r}")
    drops = tuple(_drop(v, dense, metric) for v in values)
    fails = [d > metric.epsilon + _TOL for d in drops]
    first = fails.index(True) if any(fails) else None
    if first is None:
        status, essential, first_failing = NO_KNEE, levels[-1], None
    else:
        status = KNEE if first > 0 else KNEE_AT_FIRST_LEVEL
        essential = levels[first - 1] if first > 0 else None
        first_failing = levels[first]
    after = range(first + 1, len(levels)) if first is not None else ()
    recovered = tuple(levels[i] for i in after if not fails[i])
    drop_se = _drop_stderr(values, dense, metric, stderr, dense_stderr)
    ambiguous, in_noise = _noise(levels, drops, drop_se, metric.epsilon, z, first)
    return Knee(metric=metric.name, higher_is_better=metric.higher_is_better, epsilon=metric.epsilon,
                epsilon_kind=metric.epsilon_kind, epsilon_text=metric.describe_epsilon(), dense=float(dense),
                levels=levels, values=values, drops=drops, status=status, essential_sparsity=essential,
                lower_bound=status == NO_KNEE, first_failing=first_failing, recovered=recovered,
                drop_stderr=drop_se, z=z, ambiguous=ambiguous, in_noise=in_noise, rule=_rule(metric, z),
                notes=_notes(status, levels, first_failing, recovered))


def _rule(metric: Metric, z: float) -> str:
    """The definition and the noise rule in one printable line."""
    se = ("sqrt(SE_level² + (value/dense)²·SE_dense²) / dense" if metric.epsilon_kind == "relative"
          else "sqrt(SE_level² + SE_dense²)")
    return (f"a level fails when its drop from dense exceeds ε ({metric.describe_epsilon()}); essential sparsity = "
            f"the last level before the first failure; the knee is inside the noise when |drop − ε| <= {z:g}·SE at "
            f"any level up to the first failure, SE = {se} (a missing SE counts as 0)")


def _check_curve(levels, values, dense, metric):
    levels = tuple(float(x) for x in levels)
    values = tuple(float(x) for x in values)
    if not levels:
        raise ValueError("no sparsity levels given")
    if len(levels) != len(values):
        raise ValueError(f"{len(levels)} levels but {len(values)} values: they must pair up")
    check_levels(levels)
    if not all(math.isfinite(v) for v in values + (float(dense),)):
        raise ValueError(f"{metric.name} values must be finite numbers")
    if metric.bounds is not None:
        lo, hi = metric.bounds
        bad = [v for v in values + (float(dense),) if not lo <= v <= hi]
        if bad:
            raise ValueError(f"{metric.name} values must lie in [{lo:g}, {hi:g}] (accuracies are fractions, "
                             f"not percentages); got {bad[0]:g}")
    if metric.epsilon_kind == "relative" and not float(dense) > 0:
        raise ValueError(f"a relative ε needs a positive dense {metric.name}, got {dense!r}")
    return levels, values


def check_levels(levels: Sequence[float]) -> None:
    """Raise ValueError unless ``levels`` is non-empty, strictly ascending and inside [0, 1)."""
    if not levels:
        raise ValueError("no sparsity levels given")
    out = [x for x in levels if not (0.0 <= x < 1.0)]
    if out:
        raise ValueError(f"sparsity levels must lie in [0, 1); got {out[0]!r}")
    for a, b in zip(levels, levels[1:]):
        if b == a:
            raise ValueError(f"sparsity level {a!r} appears twice")
        if b < a:
            raise ValueError(f"sparsity levels must be ascending; {b!r} comes after {a!r}")


def _drop(value: float, dense: float, metric: Metric) -> float:
    worse = dense - value if metric.higher_is_better else value - dense
    return worse / dense if metric.epsilon_kind == "relative" else worse


def _drop_stderr(values, dense, metric, stderr, dense_stderr):
    if stderr is None and dense_stderr is None:
        return None
    se = tuple(float(s) for s in stderr) if stderr is not None else (0.0,) * len(values)
    se_dense = float(dense_stderr or 0.0)
    if len(se) != len(values):
        raise ValueError(f"{len(se)} standard errors for {len(values)} values: they must pair up")
    if not all(math.isfinite(s) and s >= 0 for s in se + (se_dense,)):
        raise ValueError("standard errors must be finite numbers >= 0")
    if metric.epsilon_kind == "absolute":
        return tuple(math.hypot(s, se_dense) for s in se)
    return tuple(math.hypot(s, v / dense * se_dense) / abs(dense) for s, v in zip(se, values))


def _noise(levels, drops, drop_se, epsilon, z, first):
    if drop_se is None:
        return (), None
    decisive = len(levels) if first is None else first + 1
    ambiguous = tuple(lv for lv, d, se in zip(levels[:decisive], drops, drop_se)
                      if abs(d - epsilon) <= z * se + _TOL)
    return ambiguous, bool(ambiguous)


def _notes(status, levels, first_failing, recovered):
    notes = []
    if status == NO_KNEE:
        notes.append(f"no level fails: essential sparsity >= {_pct(levels[-1])}, the end of the sweep (a lower bound)")
    if status == KNEE_AT_FIRST_LEVEL:
        notes.append(f"even the first level {_pct(levels[0])} fails: essential sparsity is below it")
    if recovered:
        notes.append(f"non-monotone: {', '.join(map(_pct, recovered))} recover to within ε after the first failure at "
                     f"{_pct(first_failing)}; the definition uses the first failure")
    return tuple(notes)


def _pct(x: float) -> str:
    return f"{round(x * 100, 6):g}%"


def parse_levels(text: str) -> list[float]:
    """Sparsity levels from "start:stop:step" (stop included), "a,b,c" or one value.

    Ranges are computed in decimal, so "0.1:0.7:0.05" gives exactly the floats 0.1, 0.15, ...,
    0.7 that the literals would (no 0.15000000000000002). Every level must lie in [0, 1) and a
    list must be strictly ascending.
    """
    text = text.strip()
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise ValueError(f"a range of levels is start:stop:step, not {text!r}")
        start, stop, step = (_decimal(p, text) for p in parts)
        if step <= 0:
            raise ValueError(f"the step of {text!r} must be positive")
        if stop < start:
            raise ValueError(f"the range {text!r} is empty (stop < start)")
        count = int((stop - start) // step) + 1
        levels = [float(start + i * step) for i in range(count)]
    else:
        levels = [float(_decimal(p, text)) for p in text.split(",")]
    check_levels(levels)
    return levels


def _decimal(part: str, text: str) -> Decimal:
    try:
        d = Decimal(part.strip())
    except InvalidOperation:
        raise ValueError(f"{part.strip()!r} in {text!r} is not a number") from None
    if not d.is_finite():
        raise ValueError(f"{part.strip()!r} in {text!r} is not a finite number")
    return d
