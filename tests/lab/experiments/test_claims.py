"""Every claim of every recipe has a falsification test: synthetic runs where the paper is
right and where it is wrong, in its recipe's test module (see recipes/falsification.py)."""

import importlib.util
import sys
from pathlib import Path

import pytest

from normlab.lab.experiments import RECIPES, Settings, Verdict, decide
from normlab.lab.experiments.recipe import Results

TESTS = Path(__file__).parent / "recipes"


def _test_module(recipe_name: str):
    path = TESTS / f"test_recipe_{recipe_name}.py"
    spec = importlib.util.spec_from_file_location(f"_claims_{recipe_name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(TESTS))  # its helpers (falsification.py) live beside it
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(TESTS))
    return module


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_claim_of_every_recipe_has_a_falsification_case(name):
    cases = _test_module(name).falsification_cases()
    assert sorted(cases) == sorted(c.name for c in RECIPES[name].claims)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_claim_has_a_rule_in_words_and_the_date_it_was_fixed(name):
    for claim in RECIPES[name].claims:
        assert len(claim.rule.words) > 20 and "2026" in claim.rule.fixed
        assert set(claim.rule.seen) <= set(RECIPES[name].modes())


def _claim(check, deterministic=False):
    from normlab.lab.experiments import Claim, Rule

    return Claim("c", "s", "p", check, Rule("a rule in words", "today"), deterministic)


@pytest.mark.parametrize("seeds, mode_seeds, expected", [
    (3, 3, "reproduced"), (5, 5, "reproduced"),
    (2, 2, "indicative"),  # the mode runs too few seeds for a verdict
    (2, 3, "inconclusive"),  # runs of the mode are missing
])
def test_a_verdict_needs_three_seeds_per_compared_arm(seeds, mode_seeds, expected):
    settings = Settings("x", quick=True, seeds=mode_seeds)
    verdict = decide(_claim(lambda r, s: Verdict("-", "reproduced", "why", seeds)),
                     Results([]), settings)
    assert verdict.verdict == expected
    if expected != "reproduced":
        assert f"leans 'reproduced' on {seeds} seed(s)" in verdict.why


def test_a_deterministic_claim_is_decided_without_seeds_and_others_must_count_them():
    settings = Settings("x", quick=True, seeds=1)
    exact = _claim(lambda r, s: Verdict("-", "reproduced", "exact"), deterministic=True)
    assert decide(exact, Results([]), settings).verdict == "reproduced"
    uncounted = _claim(lambda r, s: Verdict("-", "reproduced", "why"))
    with pytest.raises(RuntimeError, match="must say how many seeds"):
        decide(uncounted, Results([]), settings)
