"""MMLU's subject -> category table and the size-weighted category aggregation.

The table is the standard one (Hendrycks et al.; lm-eval's ``tasks/mmlu/_generate_configs.py``):
57 subjects in four categories. lm-eval aggregates a group as the mean of its subjects'
accuracies weighted by the number of questions evaluated in each (``weight_by_size: True``), so
the overall score equals the plain accuracy over all questions; we do the same.
"""

from __future__ import annotations

CATEGORIES = ("stem", "humanities", "social_sciences", "other")

SUBJECTS = {
    "abstract_algebra": "stem", "anatomy": "stem", "astronomy": "stem", "business_ethics": "other",
    "clinical_knowledge": "other", "college_biology": "stem", "college_chemistry": "stem",
    "college_computer_science": "stem", "college_mathematics": "stem", "college_medicine": "other",
    "college_physics": "stem", "computer_security": "stem", "conceptual_physics": "stem",
    "econometrics": "social_sciences", "electrical_engineering": "stem", "elementary_mathematics": "stem",
    "formal_logic": "humanities", "global_facts": "other", "high_school_biology": "stem",
    "high_school_chemistry": "stem", "high_school_computer_science": "stem",
    "high_school_european_history": "humanities", "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences", "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem", "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem", "high_school_psychology": "social_sciences", "high_school_statistics": "stem",
    "high_school_us_history": "humanities", "high_school_world_history": "humanities", "human_aging": "other",
    "human_sexuality": "social_sciences", "international_law": "humanities", "jurisprudence": "humanities",
    "logical_fallacies": "humanities", "machine_learning": "stem", "management": "other", "marketing": "other",
    "medical_genetics": "other", "miscellaneous": "other", "moral_disputes": "humanities",
    "moral_scenarios": "humanities", "nutrition": "other", "philosophy": "humanities", "prehistory": "humanities",
    "professional_accounting": "other", "professional_law": "humanities", "professional_medicine": "other",
    "professional_psychology": "social_sciences", "public_relations": "social_sciences",
    "security_studies": "social_sciences", "sociology": "social_sciences", "us_foreign_policy": "social_sciences",
    "virology": "other", "world_religions": "humanities",
}


def aggregate_categories(per_subject: dict[str, tuple[float, int]]) -> dict[str, dict]:
    """``{subject: (accuracy, n_questions)}`` -> ``{category|"overall": {"acc", "n"}}``.

    Size-weighted, as lm-eval's mmlu groups: a category's accuracy is the fraction of its
    evaluated questions answered correctly. Categories with no evaluated subject are left out.
    """
    sums: dict[str, list[float]] = {}
    for subject, (acc, n) in per_subject.items():
        if subject not in SUBJECTS:
            raise KeyError(f"{subject!r} is not an MMLU subject")
        for key in (SUBJECTS[subject], "overall"):
            acc_sum = sums.setdefault(key, [0.0, 0])
            acc_sum[0] += acc * n
            acc_sum[1] += n
    return {key: {"acc": s / n, "n": n} for key in (*CATEGORIES, "overall")
            if key in sums and (n := sums[key][1]) > 0 for s in [sums[key][0]]}
