"""Every RPC of the public contracts has an edge role policy: a new RPC without one would be
refused by Envoy for everybody (or, worse, be forgotten), so adding one fails here first."""

from __future__ import annotations

from copilot.v1 import audit_pb2, generation_pb2, metering_pb2, retrieval_pb2, tenant_pb2
from servers.edge.roles import allowed_roles


def test_every_contract_rpc_has_a_policy() -> None:
    missing = []
    for module in (audit_pb2, generation_pb2, metering_pb2, retrieval_pb2, tenant_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                if not allowed_roles(path):
                    missing.append(path)
    assert missing == []
