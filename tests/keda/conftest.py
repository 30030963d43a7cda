"""Fixtures for the KEDA scaler tests: a decision book on a settable clock, a real gRPC server on
a loopback port and a real client channel to it (what KEDA's operator opens)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from autoscaler.decisions import DecisionBook
from autoscaler.keda import externalscaler_pb2_grpc as pb_grpc
from autoscaler.keda.server import ScalerServer
from tests.keda.support import MAX_AGE, SettableClock


@pytest.fixture
def clock() -> SettableClock:
    return SettableClock()


@pytest.fixture
def book(clock: SettableClock) -> DecisionBook:
    return DecisionBook(max_age=MAX_AGE, clock=clock)


@pytest.fixture
def server(book: DecisionBook) -> Iterator[ScalerServer]:
    running = ScalerServer(book, "127.0.0.1:0", stream_interval=0.5).start()
    yield running
    running.stop(grace=1.0)


@pytest.fixture
def channel(server: ScalerServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as open_channel:
        grpc.channel_ready_future(open_channel).result(timeout=10)
        yield open_channel


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.ExternalScalerStub:
    return pb_grpc.ExternalScalerStub(channel)
