"""The continuation-training recipe of ``scaler-wizard train``.

The schema (:class:`TrainRecipe`, validation, coercion) lives in ``compiler/recipe.py`` (torch-free,
so the type checker validates ``train { }`` blocks against it); this module re-exports it and builds
the recipe of a plan from the compiler's resolution of its ``train`` statement.
"""

from __future__ import annotations

from pathlib import Path

from scaler_wizard.compiler.recipe import (  # noqa: F401  (re-exported)
    LORA_ROLES,
    TRACKERS,
    RecipeError,
    TrainRecipe,
    parse_curriculum,
)


def recipe_from_plan(path: str | Path) -> TrainRecipe:
    """The recipe of a plan file's ``train`` statement (inline block or referenced file), as the
    compiler's front end resolves it (:func:`scaler_wizard.compiler.frontend.plan_train`).

    A plan without a ``train`` statement yields the defaults. An unreadable plan raises
    UsageError, a malformed one PlanError (the CLI renders its diagnostics, exit 1), a bad recipe
    value RecipeError naming the key (exit 2).
    """
    from scaler_wizard.compiler.frontend import plan_train

    options, where = plan_train(str(path))
    return TrainRecipe.from_options(options, where=where)
