"""Every claim's rule must be able to say "not reproduced": each recipe's test module gives,
per claim, synthetic runs where the paper is right and runs where it is wrong
(`falsification_cases()`), and `problems` checks that the verdict follows the data."""

import dataclasses

from normlab.lab.experiments import Recipe, Verdict, decide


def problems(recipe: Recipe, cases: dict) -> list[str]:
    """What is wrong with `recipe`'s rules on `cases` (claim name -> a function returning
    (settings, runs where the paper is right, runs where it is wrong)); empty when every
    claim reads "reproduced" on the first and "not reproduced" on the second."""
    found = []
    for claim in recipe.claims:
        if claim.name not in cases:
            found.append(f"{claim.name}: no falsification case")
            continue
        settings, right, wrong = cases[claim.name]()
        verdicts = (decide(claim, right, settings).verdict,
                    decide(claim, wrong, settings).verdict)
        if verdicts != ("reproduced", "not reproduced"):
            found.append(f"{claim.name}: paper right -> {verdicts[0]!r}, paper wrong -> "
                         f"{verdicts[1]!r}")
    return found


def always_passing(recipe: Recipe) -> Recipe:
    """`recipe` with every rule replaced by one that says "reproduced" whatever the runs."""
    def planted(results, settings):
        return Verdict("-", "reproduced", "planted: always passes", seeds=99)

    return dataclasses.replace(recipe, claims=[dataclasses.replace(c, check=planted)
                                               for c in recipe.claims])


def check_recipe(recipe: Recipe, cases: dict) -> None:
    """The assertions every recipe's test module makes on its falsification cases."""
    assert problems(recipe, cases) == []
    planted = always_passing(recipe)
    assert len(problems(planted, cases)) == len(recipe.claims), \
        "an always-pass rule went unnoticed"
