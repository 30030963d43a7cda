"""The committed gRPC stubs match externalscaler.proto and import as package modules."""

from __future__ import annotations

import importlib

import pytest

from autoscaler.keda import codegen


def test_committed_stubs_are_up_to_date_with_the_proto() -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) regenerates the stubs")
    assert codegen.stale_files() == [], "run: python -m autoscaler.keda.codegen"


def test_stub_imports_the_message_module_through_the_package() -> None:
    grpc_stub = importlib.import_module("autoscaler.keda.externalscaler_pb2_grpc")
    source = (codegen.KEDA_DIR / "externalscaler_pb2_grpc.py").read_text()
    assert "from autoscaler.keda import externalscaler_pb2" in source
    assert "\nimport externalscaler_pb2" not in source
    assert hasattr(grpc_stub, "ExternalScalerStub")


def test_wire_names_match_kedas_protocol() -> None:
    from autoscaler.keda import externalscaler_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["ExternalScaler"]
    assert service.full_name == "externalscaler.ExternalScaler"
    methods = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    assert methods == {
        "IsActive": ("ScaledObjectRef", "IsActiveResponse"),
        "StreamIsActive": ("ScaledObjectRef", "IsActiveResponse"),
        "GetMetricSpec": ("ScaledObjectRef", "GetMetricSpecResponse"),
        "GetMetrics": ("GetMetricsRequest", "GetMetricsResponse"),
    }
    fields = {
        (message.name, f.name): f.number
        for message in pb.DESCRIPTOR.message_types_by_name.values()
        for f in message.fields
    }
    assert fields == {
        ("ScaledObjectRef", "name"): 1,
        ("ScaledObjectRef", "namespace"): 2,
        ("ScaledObjectRef", "scalerMetadata"): 3,
        ("IsActiveResponse", "result"): 1,
        ("GetMetricSpecResponse", "metricSpecs"): 1,
        ("MetricSpec", "metricName"): 1,
        ("MetricSpec", "targetSize"): 2,
        ("MetricSpec", "targetSizeFloat"): 3,
        ("GetMetricsRequest", "scaledObjectRef"): 1,
        ("GetMetricsRequest", "metricName"): 2,
        ("GetMetricsResponse", "metricValues"): 1,
        ("MetricValue", "metricName"): 1,
        ("MetricValue", "metricValue"): 2,
        ("MetricValue", "metricValueFloat"): 3,
    }
    streaming = service.methods_by_name["StreamIsActive"]
    assert streaming.server_streaming and not streaming.client_streaming
