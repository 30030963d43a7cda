"""One workload whose forecaster raises does not stop the others: on a real apiserver, with a
real Prometheus answering the demand queries, the `kalman` model of one workload raises
FloatingPointError on a series of 1e300 req/s (a model bug, not a typed error). That workload
holds its replicas as on missing data, with the reason and a counter; the healthy one is scaled
to its demand in the same cycle. `--once` exits 1 on such an error, 0 on a plain hold."""

from __future__ import annotations

import contextlib
import logging
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml
from kubernetes import client

from autoscaler.cli import main
from autoscaler.cluster.adapter import Cluster
from autoscaler.controller import loop
from autoscaler.controller.cli import print_once
from autoscaler.controller.http import serve
from autoscaler.controller.loop import Controller, CycleReport, WorkloadOutcome
from autoscaler.controller.service import build_controller
from autoscaler.controller.settings import parse_controller_config
from autoscaler.decisions import DecisionBook, WithdrawnDecision
from autoscaler.forecast.registry import make_forecaster
from autoscaler.plan.replicas import BINDING_HOLD
from tests.k8s.objects import gpu_deployment
from tests.replay_doubles import StepClock

pytestmark = pytest.mark.integration

NOW = pd.Timestamp("2024-05-01T12:00:00Z")
HEALTHY = ("good", "vector(55)")  # 55 req/s at 10 per replica: 6 or more replicas
FAILING = ("bad", "vector(1e300)")  # finite and positive, so it passes the demand checks
MISSING = ("quiet", "vector(1) < 0")  # no samples at all: a hold on missing data


def _config(namespace: str, prom_url: str, workloads, forecaster: str = "last", **kw) -> dict:
    return {
        "interval_s": 60, "forecaster": forecaster, "forecast_step": "1min",
        "workloads": [{"name": name, "namespace": namespace, "query": query, "min_replicas": 1,
                       "max_replicas": 20, "capacity": {"throughput_per_replica": 10.0},
                       # no floor from the measured rate while the first fit runs: the
                       # first cycle holds, the second plans on the forecast
                       "plan": {"scale_down_window_s": 60, "stabilisation_s": 0,
                                "reactive_floor": False}}
                      for name, query in workloads],
        "controller": {"kubernetes": {"namespace": namespace, **kw},
                       "leader": {"enabled": False}, "agents": {"enabled": False},
                       "prometheus": {"url": prom_url, "history": "30min", "retries": 0}},
    }  # fmt: skip


def _replicas(cluster: Cluster, namespace: str, name: str) -> int:
    return cluster.apps.read_namespaced_deployment(name, namespace).spec.replicas


def test_a_failing_forecaster_holds_its_workload_and_the_others_are_scaled(
    cluster: Cluster, namespace: str, prometheus, caplog
):
    for name, replicas in (("good", 2), ("bad", 3)):
        cluster.apps.create_namespaced_deployment(
            namespace, gpu_deployment(name, replicas, workload=name))
    config, settings = parse_controller_config(
        _config(namespace, prometheus.url, [HEALTHY, FAILING]))

    def factory(workload: str):  # `kalman` for the failing workload only, as a config could
        return make_forecaster("kalman" if workload == "bad" else "last", "1min", 12)

    controller = build_controller(config, settings, cluster=cluster, clock=StepClock(NOW),
                                  factory=factory)  # fmt: skip
    http = serve(("127.0.0.1", 0), controller.metrics.registry, lambda: (True, {}),
                 lambda: (True, {}))  # fmt: skip
    try:
        first = controller.run_cycle()  # both hold while the first fits run
        assert {o.written for o in first.outcomes.values()} == {None}
        controller.fits.wait_idle()
        with caplog.at_level(logging.ERROR, logger="autoscaler.controller"):
            report = controller.run_cycle()
            first_cycle_records = len(caplog.records)
            again = controller.run_cycle()  # the same failure: one line, no second traceback
        port = http.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            exported = resp.read().decode()
    finally:
        http.shutdown()
        http.server_close()
        controller.fits.shutdown()

    assert report.error is None, report.error
    good, bad = report.outcomes["good"], report.outcomes["bad"]
    # The healthy workload: planned on its demand and written, in the same cycle.
    assert good.internal_error is None and good.error is None, good.summary
    assert good.desired >= 6 and good.written == good.desired, good.summary
    assert _replicas(cluster, namespace, "good") == good.desired
    # The failing one: held at its count, nothing written, the reason names the exception.
    reason = "internal error in forecast: FloatingPointError: kalman: the fitted model " \
             "forecasts non-finite values"  # fmt: skip
    assert bad.internal_error == reason, bad.summary
    assert reason in bad.summary and "hold 3" in bad.summary, bad.summary
    assert bad.written is None and bad.desired == 3 and not bad.signal_ok
    assert _replicas(cluster, namespace, "bad") == 3
    assert report.failures() == [f"{namespace}/bad: {reason}"]
    # Logged at ERROR with the traceback, naming the workload; counted, and on /metrics.
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and "bad" in r.getMessage()]
    assert logged and logged[0].exc_info and logged[0].exc_info[0] is FloatingPointError
    assert again.outcomes["bad"].internal_error == reason
    repeated = [r for r in caplog.records[first_cycle_records:]
                if r.levelno == logging.ERROR and "bad" in r.getMessage()]  # fmt: skip
    assert repeated and not any(r.exc_info for r in repeated)
    assert "again: 2 times since its traceback" in repeated[0].getMessage()
    registry = controller.metrics.registry
    labels = {"workload": "bad", "stage": "forecast"}
    assert registry.get_sample_value("autoscaler_workload_errors_total", labels) == 2
    assert registry.get_sample_value("autoscaler_workload_errors_total",
                                     {"workload": "good", "stage": "forecast"}) is None  # fmt: skip
    assert 'autoscaler_workload_errors_total{stage="forecast",workload="bad"} 2.0' in exported
    assert controller.metrics.cycles.labels("ok")._value.get() == 3


def test_once_exits_1_on_an_internal_error_and_0_on_a_hold(
    control_plane, cluster: Cluster, namespace: str, prometheus, tmp_path, capsys
):
    for name in ("good", "bad", "quiet"):
        cluster.apps.create_namespaced_deployment(
            namespace, gpu_deployment(name, 2, workload=name))
    kubeconfig = str(control_plane.kubeconfig)
    held = tmp_path / "held.yaml"
    held.write_text(yaml.safe_dump(_config(namespace, prometheus.url, [HEALTHY, MISSING],
                                           kubeconfig=kubeconfig)))  # fmt: skip
    assert main(["controller", "run", "--config", str(held), "--dry-run", "--once"]) == 0
    out = capsys.readouterr().out
    assert f"{namespace}/quiet: quiet: hold 2" in out and "error:" not in out, out

    # `kalman` for both (the config names one forecaster): it forecasts 55 req/s fine and
    # raises on 1e300.
    failing = tmp_path / "failing.yaml"
    failing.write_text(yaml.safe_dump(_config(namespace, prometheus.url, [HEALTHY, FAILING],
                                              forecaster="kalman",
                                              kubeconfig=kubeconfig)))  # fmt: skip
    assert main(["controller", "run", "--config", str(failing), "--dry-run", "--once"]) == 1
    out = capsys.readouterr().out
    assert f"error: {namespace}/bad: internal error in forecast: FloatingPointError" in out, out
    assert f"{namespace}/good: good: 2->" in out, out  # the healthy one still decided


def test_once_exits_1_when_a_scale_write_failed(capsys):
    # A refused scale write is only in the log during a cycle; `--once` must say it and fail.
    report = CycleReport(at_s=0.0, leader=True, dry_run=False)
    report.outcomes["chat"] = WorkloadOutcome(
        workload="chat", deployment="inference/chat", current=2, desired=5, written=None,
        binding="forecast", summary="chat: 2->5", signal_ok=True, start_path="cold", lead_s=1.0,
        error="scale of inference/chat refused: HTTP 403",
    )  # fmt: skip
    assert print_once(report) == 1
    assert "error: inference/chat: scale not written: scale of inference/chat refused: HTTP 403" \
        in capsys.readouterr().out  # fmt: skip
    report.outcomes["chat"].error = None
    assert print_once(report) == 0


# -- a failure of the whole cycle's plan, attributed by planning each workload alone --------------

LOW = 5.0  # req/s at 10 per replica: 1 replica wanted


def _two_cycles(cluster: Cluster, namespace: str, prom_url: str, workloads, replicas,
                fault) -> tuple[Controller, CycleReport, DecisionBook]:  # fmt: skip
    """Deployments `replicas` (name -> count) and a controller publishing to a book; its first
    cycle holds while the first fits run, `fault(controller)` is then installed and the second
    cycle, ten minutes later (past the scale-down window), is returned with the controller."""
    for name, count in replicas.items():
        cluster.apps.create_namespaced_deployment(
            namespace, gpu_deployment(name, count, workload=name))
    config, settings = parse_controller_config(_config(namespace, prom_url, workloads))
    clock = StepClock(NOW)
    book = DecisionBook(clock=lambda: clock.now.to_pydatetime())
    controller = build_controller(config, settings, cluster=cluster, clock=clock, book=book)
    try:
        first = controller.run_cycle()
        assert {o.written for o in first.outcomes.values()} == {None}
        controller.fits.wait_idle()
        clock.now = NOW + pd.Timedelta("10min")
        fault(controller)
        return controller, controller.run_cycle(), book
    finally:
        controller.fits.shutdown()


def _withdrawn_reason(book: DecisionBook, workload: str) -> str:
    with pytest.raises(WithdrawnDecision) as withdrawn:
        book.latest(workload)
    return withdrawn.value.reason


def _errors(controller: Controller, workload: str, stage: str) -> float | None:
    return controller.metrics.registry.get_sample_value(
        "autoscaler_workload_errors_total", {"workload": workload, "stage": stage})


def test_a_plan_failure_is_held_on_the_workload_that_makes_it(
    cluster: Cluster, namespace: str, prometheus, monkeypatch
):
    # plan_cycle plans all workloads together; a planner bug set off by one workload's forecast
    # fails it for everyone. Planning each alone finds `bad`: it holds on missing-data inputs
    # (its own demand wants 1 replica, it keeps 3), the others are planned and scaled.
    real_plan_cycle = loop.plan_cycle

    def plan_cycle(inputs, *args, **kwargs):
        if any(i.spec.name == "bad" and i.forecast is not None for i in inputs):
            raise RuntimeError("planner bug on bad's forecast")
        return real_plan_cycle(inputs, *args, **kwargs)

    workloads = [HEALTHY, ("bad", f"vector({LOW})"), ("low", f"vector({LOW})")]
    controller, report, book = _two_cycles(
        cluster, namespace, prometheus.url, workloads, {"good": 2, "bad": 3, "low": 3},
        lambda c: monkeypatch.setattr(loop, "plan_cycle", plan_cycle))  # fmt: skip

    assert report.error is None, report.error
    good, bad, low = (report.outcomes[n] for n in ("good", "bad", "low"))
    assert good.internal_error is None and good.desired >= 6 and good.written == good.desired
    assert _replicas(cluster, namespace, "good") == good.desired
    # The same low demand scales a healthy workload down: the hold below is the fault's.
    assert low.internal_error is None and low.written == 1, low.summary
    assert _replicas(cluster, namespace, "low") == 1
    reason = "internal error in plan: RuntimeError: planner bug on bad's forecast"
    assert bad.internal_error == reason and reason in bad.summary, bad.summary
    assert bad.written is None and bad.desired == 3 and not bad.signal_ok, bad.summary
    assert _replicas(cluster, namespace, "bad") == 3
    assert set(report.plan.plans) == {"good", "bad", "low"}  # it kept its place in the plan
    assert report.failures() == [f"{namespace}/bad: {reason}"]
    assert _errors(controller, "bad", "plan") == 1
    assert _errors(controller, "good", "plan") is None
    assert _errors(controller, "low", "plan") is None
    assert reason in _withdrawn_reason(book, "bad")
    assert book.latest("good").desired_replicas == good.desired


def test_a_workload_that_cannot_even_be_held_is_left_out_and_the_others_scaled(
    cluster: Cluster, namespace: str, prometheus, monkeypatch
):
    # The planner fails on `bad` whatever its inputs: even its missing-data hold cannot be
    # planned, so it is left out of the plan and nothing is written to it.
    real_plan_cycle = loop.plan_cycle

    def plan_cycle(inputs, *args, **kwargs):
        if any(i.spec.name == "bad" for i in inputs):
            raise RuntimeError("planner bug on bad")
        return real_plan_cycle(inputs, *args, **kwargs)

    controller, report, _book = _two_cycles(
        cluster, namespace, prometheus.url, [HEALTHY, ("bad", "vector(95)")],
        {"good": 2, "bad": 3}, lambda c: monkeypatch.setattr(loop, "plan_cycle", plan_cycle))

    good, bad = report.outcomes["good"], report.outcomes["bad"]
    assert good.desired >= 6 and good.written == good.desired, good.summary
    assert _replicas(cluster, namespace, "good") == good.desired
    reason = "internal error in plan: RuntimeError: planner bug on bad"
    assert bad.internal_error == reason and bad.written is None and bad.desired == 3
    assert f"hold 3 ({BINDING_HOLD}: {reason})" in bad.summary, bad.summary
    assert _replicas(cluster, namespace, "bad") == 3
    assert set(report.plan.plans) == {"good"}
    assert _errors(controller, "bad", "plan") == 1


def test_a_plan_failure_no_single_workload_explains_stops_the_cycle(
    cluster: Cluster, namespace: str, prometheus, monkeypatch
):
    # A planner bug only when workloads are planned together (e.g. in the shared budget): each
    # alone plans fine, so no workload is to blame and the cycle stops with nothing written,
    # as any cycle-wide failure does (the service logs it and counts a crashed cycle).
    real_plan_cycle = loop.plan_cycle

    def plan_cycle(inputs, *args, **kwargs):
        if len(inputs) > 1:
            raise RuntimeError("planner bug across workloads")
        return real_plan_cycle(inputs, *args, **kwargs)

    faulted: list[Controller] = []

    def fault(controller: Controller) -> None:
        faulted.append(controller)
        monkeypatch.setattr(loop, "plan_cycle", plan_cycle)

    with pytest.raises(RuntimeError, match="planner bug across workloads"):
        _two_cycles(cluster, namespace, prometheus.url, [HEALTHY, ("other", "vector(95)")],
                    {"good": 2, "other": 3}, fault)  # fmt: skip
    assert faulted, "the first cycle did not get as far as the fault"
    assert _replicas(cluster, namespace, "good") == 2
    assert _replicas(cluster, namespace, "other") == 3
    for name in ("good", "other"):  # no workload blamed
        assert _errors(faulted[0], name, "plan") is None


# -- an unexpected error while one workload's plan is applied -------------------------------------


def test_an_error_applying_one_workload_is_its_own_before_or_after_the_write(
    cluster: Cluster, namespace: str, prometheus, monkeypatch
):
    # Both want 10 replicas (95 req/s). `early` fails before its scale is written: it holds at
    # 3 as an unplanned workload. `late` fails after its write (reporting it): the write
    # stands, the outcome says so, with the error. Both plans are withdrawn from the book, as
    # on missing data; the healthy workload is scaled in the same cycle.
    def fault(controller: Controller) -> None:
        real_scale, real_report_model = controller._scale, controller._report_model

        def scale(d, *args, **kwargs):
            if d.workload == "early":
                raise RuntimeError("bug before the write")
            return real_scale(d, *args, **kwargs)

        def report_model(d, outcome):
            if d.workload == "late":
                raise RuntimeError("bug after the write")
            return real_report_model(d, outcome)

        monkeypatch.setattr(controller, "_scale", scale)
        monkeypatch.setattr(controller, "_report_model", report_model)

    controller, report, book = _two_cycles(
        cluster, namespace, prometheus.url,
        [HEALTHY, ("early", "vector(95)"), ("late", "vector(95)")],
        {"good": 2, "early": 3, "late": 3}, fault)  # fmt: skip

    assert report.error is None, report.error
    good, early, late = (report.outcomes[n] for n in ("good", "early", "late"))
    assert good.internal_error is None and good.desired >= 6 and good.written == good.desired
    assert _replicas(cluster, namespace, "good") == good.desired
    assert book.latest("good").desired_replicas == good.desired

    before = "internal error in scale: RuntimeError: bug before the write"
    assert early.internal_error == before and early.written is None, early.summary
    assert early.desired == 3 and early.binding == BINDING_HOLD, early.summary
    assert _replicas(cluster, namespace, "early") == 3

    after = "internal error in scale: RuntimeError: bug after the write"
    assert late.internal_error == after and after in late.summary, late.summary
    assert late.desired >= 10 and late.written == late.desired, late.summary
    assert _replicas(cluster, namespace, "late") == late.written

    assert report.failures() == [f"{namespace}/early: {before}", f"{namespace}/late: {after}"]
    for name, reason in (("early", before), ("late", after)):
        assert _errors(controller, name, "scale") == 1
        assert reason in _withdrawn_reason(book, name)
    assert _errors(controller, "good", "scale") is None


# -- `--once` on a scale write the cluster really refuses ----------------------------------------


def _kubeconfig_of(control_plane, kube_api, namespace: str, name: str, path: Path) -> Path:
    """A kubeconfig of a service account that may read everything the controller reads and the
    scale of a Deployment, but not write that scale (no deployments/scale: update): a token
    from the apiserver's TokenRequest API, on a ClusterRole bound to it (`name`: the caller
    deletes both; the service account goes with the namespace)."""
    core, rbac = client.CoreV1Api(kube_api), client.RbacAuthorizationV1Api(kube_api)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="controller")))
    rule = client.V1PolicyRule
    rbac.create_cluster_role(client.V1ClusterRole(
        metadata=client.V1ObjectMeta(name=name),
        rules=[rule(api_groups=["apps"], resources=["deployments"], verbs=["get", "list"]),
               rule(api_groups=["apps"], resources=["deployments/scale"], verbs=["get"]),
               rule(api_groups=[""], resources=["nodes", "pods"], verbs=["get", "list"]),
               rule(api_groups=[""], resources=["events"], verbs=["create"])],
    ))  # fmt: skip
    rbac.create_cluster_role_binding(client.V1ClusterRoleBinding(
        metadata=client.V1ObjectMeta(name=name),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="ClusterRole",
                                  name=name),
        subjects=[client.RbacV1Subject(kind="ServiceAccount", name="controller",
                                       namespace=namespace)],
    ))  # fmt: skip
    token = core.create_namespaced_service_account_token("controller", namespace,
        client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
            audiences=["https://kubernetes.default.svc"], expiration_seconds=3600))
    ).status.token  # fmt: skip
    admin = yaml.safe_load(Path(control_plane.kubeconfig).read_text())
    admin["users"] = [{"name": "admin", "user": {"token": token}}]
    path.write_text(yaml.safe_dump(admin))
    return path


def test_once_exits_1_when_the_cluster_refuses_a_scale_write(
    control_plane, kube_api, cluster: Cluster, namespace: str, prometheus, tmp_path, capsys
):
    # The controller runs from the CLI as an identity whose RBAC lacks deployments/scale:
    # update. Its decision (6 or more replicas for 55 req/s) is refused by the apiserver:
    # `--once` prints the refusal and exits 1, and the Deployment keeps its count.
    cluster.apps.create_namespaced_deployment(namespace, gpu_deployment("good", 2,
                                                                        workload="good"))
    rbac, name = client.RbacAuthorizationV1Api(kube_api), f"no-scale-update-{namespace}"
    try:
        kubeconfig = _kubeconfig_of(control_plane, kube_api, namespace, name,
                                    tmp_path / "kubeconfig")  # fmt: skip
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump(_config(namespace, prometheus.url, [HEALTHY],
                                                 kubeconfig=str(kubeconfig))))  # fmt: skip
        assert main(["controller", "run", "--config", str(config), "--once"]) == 1
    finally:
        for delete in (rbac.delete_cluster_role_binding, rbac.delete_cluster_role):
            with contextlib.suppress(client.ApiException):  # not created if setup failed
                delete(name)
    out = capsys.readouterr().out
    refused = [line for line in out.splitlines()
               if line.startswith(f"error: {namespace}/good: scale not written: ")]  # fmt: skip
    assert refused and "403" in refused[0], out
    assert f"{namespace}/good: good: 2->" in out, out  # it decided a new count
    assert _replicas(cluster, namespace, "good") == 2
