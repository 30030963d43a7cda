"""Talking to the node agents: each GPU node's agent, found from the agent DaemonSet's pods.

The controller asks an agent what it holds (inventory), to stage an artifact (copy it from the
store to the node's disk or memory), to evict one, and to checkpoint a worker. Every call sends
the bearer token; every failure is an AgentCallError naming the node and the call, and the loop
goes on with the other nodes (one broken node must not stop scaling).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import requests

from autoscaler.controller.core import AgentHoldings
from autoscaler.errors import AutoscalerError


class AgentCallError(AutoscalerError):
    def __init__(self, node: str, call: str, message: str, status: int | None = None) -> None:
        self.node = node
        self.call = call
        self.status = status  # the agent's HTTP status when it answered with an error
        super().__init__(f"agent on node {node}: {call} failed: {message}")


@dataclass(frozen=True)
class AgentInventory:
    node: str
    holdings: AgentHoldings
    versions: Mapping[str, str]
    pinned: frozenset[str] = frozenset()  # the copies the agent will not evict to make room
    preloaders: bool = False  # the agent names weight preloaders (it can pin staged weights)


class AgentDirectory(Protocol):
    """What the loop needs from the agents (HttpAgents below talks to the real agent API)."""

    def refresh(self) -> Mapping[str, str]: ...

    def inventory(self, node: str) -> AgentInventory: ...

    def stage(self, node: str, artifact: str, tier: str, source: str) -> Mapping[str, Any]: ...

    def evict(self, node: str, artifact: str) -> Mapping[str, Any]: ...

    def pin(self, node: str, artifacts: list[str]) -> Mapping[str, Any]: ...

    def delete_from_store(self, node: str, artifact: str) -> bool: ...


# The agent's HTTP API (autoscaler.agent.server, docs/agent.md); one table so paths change in
# one place.
PATHS = {
    "health": ("GET", "/healthz"),
    "inventory": ("GET", "/v1/inventory"),
    "stage": ("POST", "/v1/stage"),
    "evict": ("POST", "/v1/evict"),
    "pins": ("POST", "/v1/pins"),
    "store_delete": ("POST", "/v1/store/delete"),
    "checkpoint": ("POST", "/v1/checkpoint"),
}


class HttpAgents:
    """Agents over HTTP with a bearer token. `endpoints()` is a callable returning
    {node: base URL} (the cluster adapter's agent_endpoints); refreshed each cycle."""

    def __init__(
        self,
        endpoints: Any,
        token: str | None,
        timeout_s: float = 5.0,
        session: requests.Session | None = None,
        pin_weights: bool = True,
    ) -> None:
        self._endpoints_fn = endpoints
        self._endpoints: dict[str, str] = {}
        self.token = token
        self.timeout_s = timeout_s
        self.session = session or requests.Session()
        self.pin_weights = pin_weights
        self._with_preloaders: set[str] = set()  # nodes whose last inventory named preloaders

    def refresh(self) -> Mapping[str, str]:
        self._endpoints = dict(self._endpoints_fn())
        return self._endpoints

    def nodes(self) -> list[str]:
        return sorted(self._endpoints)

    def _call(
        self, node: str, name: str, body: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> Any:  # fmt: skip
        base = self._endpoints.get(node)
        if base is None:
            raise AgentCallError(node, name, "no Ready agent pod on this node")
        method, path = PATHS[name]
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            resp = self.session.request(
                method, base + path, json=body, headers=headers,
                timeout=timeout_s or self.timeout_s,
            )
        except requests.RequestException as exc:
            raise AgentCallError(node, name, f"{base} unreachable: {exc}") from exc
        if resp.status_code >= 400:
            raise AgentCallError(node, name, f"HTTP {resp.status_code}: {resp.text[:300]}",
                                 resp.status_code)  # fmt: skip
        try:
            return resp.json()
        except ValueError as exc:
            raise AgentCallError(node, name, f"answer is not JSON: {resp.text[:200]}") from exc

    def inventory(self, node: str) -> AgentInventory:
        """The agent's GET /v1/inventory: artifacts by tier and each tier's free budget."""
        data = self._call(node, "inventory")
        try:
            arts: dict[str, str] = {}
            for a in data.get("artifacts", []):
                art, tier = str(a["artifact_id"]), str(a.get("tier", "disk"))
                if arts.get(art) != "memory":  # the best copy counts
                    arts[art] = tier
            free = {
                str(t["tier"]): max(0.0, float(t["budget_bytes"]) - float(t["used_bytes"])) / 1e9
                for t in data.get("tiers", [])
            }
            holdings = AgentHoldings(
                artifacts=arts,
                disk_free_gb=free.get("disk", 0.0),
                mem_free_gb=free.get("memory", 0.0),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise AgentCallError(node, "inventory", f"unexpected answer: {exc}") from exc
        versions = {"store": str(data.get("store", ""))}
        reported = data.get("versions")
        if isinstance(reported, dict):
            versions.update({str(k): str(v) for k, v in reported.items()})
        pinned = data.get("pinned") or []
        preloaders = isinstance(data.get("preloaders"), dict) and bool(data["preloaders"])
        if preloaders:
            self._with_preloaders.add(node)
        else:
            self._with_preloaders.discard(node)
        return AgentInventory(node=node, holdings=holdings, versions=versions,
                              pinned=frozenset(str(a) for a in pinned)
                              if isinstance(pinned, list) else frozenset(),
                              preloaders=preloaders)  # fmt: skip

    def stage(self, node: str, artifact: str, tier: str, source: str) -> Mapping[str, Any]:
        """POST /v1/stage: copy from the store (or warm a disk copy) into `tier`; into memory on
        a node with weight preloaders (its last inventory), with the weights pinned too."""
        body = {"artifact_id": artifact, "tier": tier, "warm": False}
        if tier == "memory" and self.pin_weights and node in self._with_preloaders:
            body["pin_weights"] = True
        return self._call(node, "stage", body)

    def evict(self, node: str, artifact: str) -> Mapping[str, Any]:
        return self._call(node, "evict", {"artifact_id": artifact})

    def pin(self, node: str, artifacts: list[str]) -> Mapping[str, Any]:
        """POST /v1/pins: the artifacts current plans keep on this node (never evicted)."""
        return self._call(node, "pins", {"artifact_ids": sorted(artifacts)})

    def delete_from_store(self, node: str, artifact: str) -> bool:
        """POST /v1/store/delete through `node`'s agent (the store is shared: any agent can);
        True when it deleted the artifact, False when the store had none (already gone)."""
        try:
            self._call(node, "store_delete", {"artifact_id": artifact})
        except AgentCallError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def checkpoint(
        self, node: str, body: Mapping[str, Any], timeout_s: float | None = None
    ) -> Mapping[str, Any]:
        """POST /v1/checkpoint (waits for the worker's handshake and the dump: long)."""
        return self._call(node, "checkpoint", body, timeout_s)
