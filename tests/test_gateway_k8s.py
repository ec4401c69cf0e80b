"""The gateway in the Helm chart (and so in the kustomize manifests rendered from it): its own Deployment,
Service, HPA, NetworkPolicy and ServiceMonitor; Triton's ports admit only gateway pods (and monitoring)."""

from __future__ import annotations

import pytest

from .test_k8s import VALUES_FILES, load_values, render


def _by_kind(docs: list[dict], component: str = "gateway") -> dict[str, dict]:
    return {d["kind"]: d for d in docs
            if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component}


@pytest.mark.parametrize("vf", VALUES_FILES)
def test_gateway_resources_reach_the_stage_serving_the_pipeline(vf: str) -> None:
    values = load_values(vf)
    docs = render(values)
    gw = _by_kind(docs)
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "NetworkPolicy", "ServiceMonitor"} <= set(gw)
    pod = gw["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = dict(a.split("=", 1) for a in container["args"])
    assert args["--host"] == "0.0.0.0" and args["--port"] == "8080"
    # --triton names a Service of this release with a gRPC port, on the stage that loads `pipeline`.
    svc_name, port = args["--triton"].removeprefix("dns:///").split(":")
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert int(port) in [p["port"] for p in services[svc_name]["spec"]["ports"] if p["name"] == "grpc"]
    stage = svc_name.removeprefix("sa2-stepaudio2-")
    models = next(s.get("models") for s in (values.get("stages") or [{"name": "server", "models": []}])
                  if s["name"] == stage)
    assert not models or "pipeline" in models
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    key_env = {e["name"]: e for e in container["env"]}["STEPAUDIO2_GATEWAY_API_KEYS"]
    assert key_env["valueFrom"]["secretKeyRef"]["key"] == "api-keys"
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert gw["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == gw["Deployment"]["metadata"]["name"]
    assert gw["Service"]["spec"]["selector"] == gw["Deployment"]["spec"]["selector"]["matchLabels"]
    assert gw["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == "http-api"
    # Triton's policy: its gRPC/HTTP ports only from gateway pods; metrics from monitoring.
    # (the release's own policy; split stages' pools have their own, admitting only the stages that call them)
    triton_np = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "sa2-stepaudio2")
    client_rule = next(r for r in triton_np["spec"]["ingress"] if {"port": "grpc", "protocol": "TCP"} in r["ports"])
    (peer,) = client_rule["from"]
    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    # Triton itself does not start a second gateway in its pod.
    triton_args = [d for d in docs if d["kind"] == "Deployment" and d is not gw["Deployment"]]
    assert all("--no-gateway" in d["spec"]["template"]["spec"]["containers"][0]["args"] for d in triton_args)


def test_gateway_off_restores_direct_clients() -> None:
    docs = render({"gateway": {"enabled": False}})
    assert not _by_kind(docs)
    (np,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    client_rule = next(r for r in np["spec"]["ingress"] if {"port": "grpc", "protocol": "TCP"} in r["ports"])
    assert client_rule["from"] == [{"podSelector": {}}]


def test_gateway_values_are_schema_checked() -> None:
    with pytest.raises(Exception, match="gateway"):
        render({"gateway": {"port": 0}})
