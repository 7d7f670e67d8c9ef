"""Unlearning methods: each maps a model and a forget/retain split to an update.

Every method is registered once in :mod:`workbench.unlearning.registry` (name → run
function + config type) and called through :func:`workbench.unlearning.registry.unlearn`;
the base model is never modified. The shared optimisation loop lives in
:mod:`.loop`, the losses in :mod:`.losses`, one method per module in :mod:`.methods`, and
MANSU, with its steps, in the :mod:`.mansu` package.
"""
