"""The in-cluster controller: a scheduled loop of signals -> forecast -> plan -> stage -> scale.

Start here:
- `build_controller(config, settings, dry_run=...) -> Controller`; `Controller.run_cycle()`
  returns a `CycleReport` (what was decided, written, staged, and why).
- `ControllerService(controller, listen=(host, port)).start()` runs it on APScheduler with
  /metrics, /healthz and /readyz.
- `load_controller_config(path)` / `load_configmap_config(core, ns, name)` read the config.
- `plan_cycle(inputs, inventory, now_s, budget)` is the pure decision part (benchmarked).
"""

from autoscaler.controller.core import CyclePlan, WorkloadInputs, build_inventory, plan_cycle
from autoscaler.controller.loop import Controller, CycleReport, ReplayClock
from autoscaler.controller.service import ControllerService, build_controller
from autoscaler.controller.settings import (
    ControllerSettings,
    load_configmap_config,
    load_controller_config,
)

__all__ = [
    "Controller",
    "ControllerService",
    "ControllerSettings",
    "CyclePlan",
    "CycleReport",
    "ReplayClock",
    "WorkloadInputs",
    "build_controller",
    "build_inventory",
    "load_configmap_config",
    "load_controller_config",
    "plan_cycle",
]
