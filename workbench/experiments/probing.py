"""Every robustness probe on a saved run, with the run's own model, split and quantizer."""

from __future__ import annotations

from typing import Any

from workbench.core.progress import Progress, scaled, silent
from workbench.data.facts import FactSplit
from workbench.experiments.flow import model_and_split_for_run, oracle_for
from workbench.experiments.store import Run
from workbench.measurement.probes import membership_inference, paraphrase_probe, relearning_attack
from workbench.models.loaded import LoadedModel


def probe_run(
    run: Run,
    *,
    relearn_steps: int = 10,
    relearn_lr: float | None = None,
    oracle: LoadedModel | None = None,
    split: FactSplit | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Every probe on a saved run, with the run's model, split and quantizer. Membership
    inference is skipped (``None``, with the reason) when the model has no retrain oracle."""

    report = progress or silent
    model, split = model_and_split_for_run(run, split=split)
    update = run.update()
    update.check_fits(model)
    quant = run.metrics.quant
    out: dict[str, Any] = {"run_id": run.id, "method": run.metrics.method, "model": model.name,
                           "split": split.name, "quant": quant.label}
    report(0.05, "paraphrase probe")
    out["paraphrase"] = paraphrase_probe(model, split, update, quant) if split.forget_paraphrase else None
    report(0.3, "relearning attack")
    out["relearning"] = relearning_attack(model, split, update, quant=quant, steps=relearn_steps, lr=relearn_lr,
                                          progress=scaled(report, 0.3, 0.7))
    report(0.75, "membership inference")
    oracle = oracle or oracle_for(model, split)
    if oracle is None:
        out["membership"] = None
        out["membership_skipped"] = f"model {model.name!r} has no retrain oracle"
    else:
        out["membership"] = membership_inference(model, update, split, oracle, quant=quant)
    report(1.0, "done")
    return out


def probe_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The probe results as table rows: probe, measure, full precision, quantized."""
    rows: list[dict[str, Any]] = []
    for key, vals in (result.get("paraphrase") or {}).items():
        for variant in ("base", "after"):
            rows.append({"probe": "paraphrase", "measure": f"{key} top-1 ({variant})",
                         "full precision": vals[f"{variant}_fp"], "quantized": vals[f"{variant}_q"]})
    rl = result.get("relearning")
    if rl:
        for k in ("base", "unlearned", "relearned", "recovery"):
            measure = f"held-out half top-1: {k}" if k != "recovery" else "recovery (relearned − unlearned)"
            rows.append({"probe": f"relearning ({rl['steps']} steps on {rl['n_train']} facts)", "measure": measure,
                         "full precision": rl["fp"][k], "quantized": rl["quantized"][k]})
    mi = result.get("membership")
    if mi:
        for k, label in (("auc_base", "MIA AUC base"), ("auc", "MIA AUC unlearned"), ("auc_oracle", "MIA AUC oracle"),
                         ("privleak", "PrivLeak %")):
            rows.append({"probe": "membership inference", "measure": label,
                         "full precision": mi["fp"][k], "quantized": mi["quantized"][k]})
    return rows
