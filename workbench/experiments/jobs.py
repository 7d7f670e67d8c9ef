"""The job vocabulary of tables and sweeps: one :class:`Job` per unlearning run, with a stable key.

A job names everything that decides its run's numbers: the model (name and weight
fingerprint), the split (name and a digest of its facts), the method and its settings, the
quantizer, what is measured, the circuit and the seed. Its :attr:`Job.key` is a hash of that
canonical JSON; a saved run records the key in ``config.json`` (``job_key``), so a later
invocation of the same table finds its finished jobs in the runs root and skips them.
The workbench's own version is deliberately not in the key: resuming means "the same
command on the same code", and a lab that changes the code starts a new runs root.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from workbench.data.facts import FactSplit
from workbench.interpretability.circuit import Circuit
from workbench.models.loaded import LoadedModel
from workbench.quant import QuantConfig
from workbench.unlearning.readings import LoopReadings
from workbench.unlearning.registry import MethodConfig
from workbench.unlearning.task import OptimConfig, StopRule

KEY_VERSION = 1
"""Bumped when the key's canonical JSON changes meaning, so old keys never match new jobs."""
DEFAULT_CIRCUIT = "default"
"""The circuit a job names when it uses the default top-k circuit of its model and split."""


@dataclass(frozen=True)
class Job:
    """One unlearning run of a table or sweep.

    Attributes:
        model: a name :func:`~workbench.models.loading.load_model` understands.
        model_fingerprint: the base weights' fingerprint (a retrained model is another job).
        split: the split's name; ``split_digest`` a hash of its facts (see :func:`split_digest`).
        method: a registered method name.
        method_config: the method's own config (MANSU's switches and budgets, an ablation).
        optim, stop: the gradient methods' optimiser and stopping rule (None for MANSU).
        quant: the quantizer the run is measured against.
        measure_cad: measure circuit attribution divergence (slow).
        oracle: the retrain oracle's model name, or None for no oracle comparison.
        circuit: :data:`DEFAULT_CIRCUIT` (attributed once per model and split), the digest of a
            given circuit (:func:`circuit_digest`), or None: the run gets no circuit.
        seed: the gradient methods' batch-sampling seed (MANSU is deterministic).
        readings: what the gradient loop reads for progress and history besides; not part of
            :meth:`canonical` or :attr:`key`: it changes no result, so a finished run is found
            whatever its readings were.
    """

    model: str
    model_fingerprint: str
    split: str
    split_digest: str
    method: str
    quant: QuantConfig
    method_config: MethodConfig | None = None
    optim: OptimConfig | None = None
    stop: StopRule | None = None
    measure_cad: bool = True
    oracle: str | None = None
    circuit: str | None = DEFAULT_CIRCUIT
    seed: int = 0
    readings: LoopReadings = field(default_factory=LoopReadings)

    def canonical(self) -> dict[str, Any]:
        """The job as plain JSON (config types named, so two configs with equal fields differ)."""
        return {
            "key_version": KEY_VERSION, "model": self.model, "model_fingerprint": self.model_fingerprint,
            "split": self.split, "split_digest": self.split_digest, "method": self.method,
            "method_config": _config_json(self.method_config), "optim": _config_json(self.optim),
            "stop": _config_json(self.stop), "quant": self.quant.to_dict(), "measure_cad": self.measure_cad,
            "oracle": self.oracle, "circuit": self.circuit, "seed": self.seed,
        }

    @property
    def key(self) -> str:
        """Hash of the canonical JSON: equal jobs, equal keys, across processes and machines."""
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    @property
    def label(self) -> str:
        """A short description for progress messages."""
        return f"{self.method} on {self.model} ({self.split}, {self.quant.type}, seed {self.seed})"

    def run_optim(self) -> OptimConfig | None:
        """The optimiser the run gets: the job's, carrying the job's seed."""
        return dataclasses.replace(self.optim, seed=self.seed) if self.optim is not None else None


def _config_json(config: Any) -> dict[str, Any] | None:
    if config is None:
        return None
    return {"type": type(config).__name__, **dataclasses.asdict(config)}


def split_digest(split: FactSplit) -> str:
    """A hash of the split's facts (forget, retain and paraphrases), not only its name:
    two fact files both called ``user`` are two splits."""
    text = json.dumps(dataclasses.asdict(split), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def circuit_digest(circuit: Circuit) -> str:
    """A hash of a given circuit's selection and model (what the runs read of it)."""
    text = json.dumps({"model": circuit.model_fingerprint, "selected": sorted(c.name for c in circuit.selected)})
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def job_for(model: LoadedModel, split: FactSplit, method: str, quant: QuantConfig, *,
            method_config: MethodConfig | None = None, optim: OptimConfig | None = None,
            stop: StopRule | None = None, measure_cad: bool = True, oracle: LoadedModel | None = None,
            circuit: str | None = DEFAULT_CIRCUIT, readings: LoopReadings | None = None) -> Job:
    """The job for a loaded model and split (the seed is the optimiser's); ``circuit`` and
    ``readings`` as in :class:`Job`."""
    return Job(model=model.name, model_fingerprint=model.fingerprint, split=split.name,
               split_digest=split_digest(split), method=method, quant=quant, method_config=method_config,
               optim=optim, stop=stop, measure_cad=measure_cad, oracle=oracle.name if oracle is not None else None,
               circuit=circuit, seed=optim.seed if optim is not None else 0, readings=readings or LoopReadings())
