"""Samplers by name: one registry that the API, the CLI choices and the UI dropdown all read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from studio.errors import UnknownSchedulerError
from studio.registry import Registry


@dataclass(frozen=True, kw_only=True)
class SchedulerSpec:
    name: str
    cls: str  # diffusers scheduler class
    kind: Literal["discrete", "flow"]  # noise-prediction (DDPM-trained) or flow-matching backbones
    a1111: str  # the sampler name A1111 writes in `parameters`
    options: dict[str, Any] = field(default_factory=dict)
    doc: str = ""


SCHEDULERS: Registry[SchedulerSpec] = Registry("scheduler", UnknownSchedulerError)


for _spec in (
    SchedulerSpec(name="ddim", cls="DDIMScheduler", kind="discrete", a1111="DDIM",
                  doc="DDIM, Song et al. 2020 (arXiv:2010.02502)"),
    SchedulerSpec(name="euler", cls="EulerDiscreteScheduler", kind="discrete", a1111="Euler",
                  options={"use_karras_sigmas": False},
                  doc="Euler on the Karras ODE, Karras et al. 2022 (arXiv:2206.00364)"),
    SchedulerSpec(name="euler_a", cls="EulerAncestralDiscreteScheduler", kind="discrete", a1111="Euler a",
                  doc="Euler ancestral (k-diffusion), stochastic"),
    SchedulerSpec(name="dpmpp_2m", cls="DPMSolverMultistepScheduler", kind="discrete", a1111="DPM++ 2M",
                  options={"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
                  doc="DPM-Solver++(2M), Lu et al. 2022 (arXiv:2211.01095)"),
    SchedulerSpec(name="dpmpp_2m_karras", cls="DPMSolverMultistepScheduler", kind="discrete",
                  a1111="DPM++ 2M Karras",
                  options={"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
                  doc="DPM-Solver++(2M) on Karras sigmas (arXiv:2211.01095, arXiv:2206.00364)"),
    SchedulerSpec(name="flow_euler", cls="FlowMatchEulerDiscreteScheduler", kind="flow", a1111="Euler",
                  doc="Euler on the rectified-flow ODE, Esser et al. 2024 (arXiv:2403.03206)"),
):
    SCHEDULERS.add(_spec.name, _spec)


def scheduler_kind(config: dict[str, Any]) -> Literal["discrete", "flow"]:
    """Whether a backbone's own scheduler config is a flow-matching one."""
    return "flow" if "FlowMatch" in str(config.get("_class_name", "")) else "discrete"


def get_scheduler_spec(name: str, *, kind: str | None = None) -> SchedulerSpec:
    """The spec named `name`, checked against the backbone's kind of scheduler when given."""
    usable = [s.name for s in SCHEDULERS.values() if kind is None or s.kind == kind]
    if name not in SCHEDULERS:
        raise UnknownSchedulerError(f"scheduler={name!r} is not known; choose one of {', '.join(usable)}.")
    spec = SCHEDULERS[name]
    if kind is not None and spec.kind != kind:
        raise UnknownSchedulerError(
            f"scheduler={name!r} is a {spec.kind} sampler but this backbone is trained for {kind} sampling; "
            f"choose one of {', '.join(usable)}."
        )
    return spec


def build_scheduler(name: str, base_config: dict[str, Any]):
    """A fresh scheduler `name` built from the backbone's own scheduler config (betas, shift, prediction)."""
    import diffusers

    spec = get_scheduler_spec(name, kind=scheduler_kind(base_config))
    return getattr(diffusers, spec.cls).from_config(base_config, **spec.options)
