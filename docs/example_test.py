"""A scenario test of your own, with istio-iptables-lab's pytest plugin: sudo pytest -s example_test.py"""
import json

import pytest

OUTBOUND = ("Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 9 -> ISTIO_REDIRECT -> Envoy 15001 (Outbound)"
            " -> OUTPUT -> ISTIO_OUTPUT RULE 4 -> POSTROUTING -> Remote Pod")


@pytest.mark.istio_profile("istio-1.13")
def test_app_to_remote_service_goes_through_envoy(traced_request):
    result = traced_request("sidecar", "10.96.0.90", 9080, uid=1000, expect=OUTBOUND)
    assert result.passed, result.failure or result.measured_path
    assert result.rule_hits == ["OUTPUT#1", "ISTIO_OUTPUT#9", "ISTIO_REDIRECT#1", "OUTPUT#1", "ISTIO_OUTPUT#4"]
    print("agreement:", result.agreement)  # "no claim": the article says nothing about a flow of your own
    print(json.dumps(result.as_json()))  # istio-lab run --json's schema
