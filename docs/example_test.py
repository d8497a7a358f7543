"""A scenario test of your own, with istio-iptables-lab's pytest plugin: sudo pytest example_test.py"""
import pytest

OUTBOUND = ("Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 9 -> ISTIO_REDIRECT -> Envoy 15001 (Outbound)"
            " -> OUTPUT -> ISTIO_OUTPUT RULE 4 -> POSTROUTING -> Remote Pod")


@pytest.mark.istio_profile("istio-1.13")
def test_app_to_remote_service_goes_through_envoy(traced_request):
    result = traced_request("sidecar", "10.96.0.90", 9080, uid=1000, expect=OUTBOUND)
    assert result.verdict == "pass", result.failure or result.measured_path
    assert result.rule_hits == ["OUTPUT#1", "ISTIO_OUTPUT#9", "ISTIO_REDIRECT#1", "OUTPUT#1", "ISTIO_OUTPUT#4"]
