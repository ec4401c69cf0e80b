"""Offline checks of k8s/: Helm chart (render, strict lint, schema), Kubernetes schemas, duplicate keys,
restricted Pod Security, Prometheus rules (promtool) and the metric names they use."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import helm_python as helm
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "k8s" / "chart"
RULES = ROOT / "k8s" / "prometheus" / "rules.yaml"
RULES_TEST = ROOT / "k8s" / "prometheus" / "rules_test.yaml"
BIN = Path(sys.executable).parent
VALUES_FILES = ["values.yaml", "values-cpu.yaml", "values-gpu.yaml", "values-split.yaml"]
K8S_VERSION = "1.32.0"

# Triton's own series (https://docs.nvidia.com/deeplearning/triton-inference-server/user-guide/docs/user_guide/metrics.html)
TRITON_METRICS = {
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
    "nv_inference_exec_count", "nv_inference_pending_request_count", "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us", "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us", "nv_inference_compute_output_duration_us",
    "nv_inference_first_response_histogram_ms", "nv_gpu_utilization", "nv_gpu_memory_used_bytes",
    "nv_gpu_memory_total_bytes", "nv_gpu_power_usage", "nv_energy_consumption", "nv_cpu_utilization",
    "nv_cpu_memory_used_bytes", "nv_pinned_memory_pool_used_bytes",
}
PROMETHEUS_BUILTIN = {"up"}
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "rate", "irate", "increase", "clamp_min", "clamp_max",
    "histogram_quantile", "absent", "and", "or", "unless", "on", "ignoring", "group_left", "group_right", "vector",
}


def readme_metrics() -> set[str]:
    """The stepaudio2_* names listed in README's Serving section, with histogram series suffixes."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    para = text[text.index("Custom metrics on Triton's `/metrics`"):]
    para = para[: para.index("\n\n")]
    names: set[str] = set()
    for name, rest in re.findall(r"`(stepaudio2_\w+)(?:\{\w+\})?`(\s+\(histogram\))?", para):
        names.add(name)
        if rest:
            names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
    assert len(names) >= 10, names
    return names


def load_values(name: str) -> dict:
    return {} if name == "values.yaml" else yaml.safe_load((CHART / name).read_text(encoding="utf-8"))


def render(values: dict) -> list[dict]:
    out = helm.Chart.load(str(CHART)).render(values, name="sa2", namespace="speech")
    docs = []
    for path, text in out.items():
        if path.endswith(".txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    out = {}
    tmp = tmp_path_factory.mktemp("rendered")
    chart = helm.Chart.load(str(CHART))
    for vf in VALUES_FILES:
        texts = chart.render(load_values(vf), name="sa2", namespace="speech")
        body = "\n---\n".join(t for p, t in sorted(texts.items()) if not p.endswith(".txt"))
        f = tmp / vf
        f.write_text(body, encoding="utf-8")
        out[vf] = (f, [d for d in yaml.safe_load_all(body) if d])
    return out


@pytest.mark.parametrize("vf", VALUES_FILES)
def test_chart_lints_strictly(vf):
    report = helm.lint(str(CHART), values=load_values(vf), strict=True)
    assert report["errors"] == [], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


def test_rendered_documents_pass_kubernetes_validate(rendered):
    files = [str(f) for f, _ in rendered.values()]
    proc = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "-k", K8S_VERSION, *files],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # only the prometheus-operator CRD has no bundled schema
    skipped = re.findall(r"Couldn't find schema for kind (\w+)", proc.stdout + proc.stderr)
    assert set(skipped) <= {"ServiceMonitor"}, skipped


def test_rendered_documents_have_no_duplicate_keys(rendered):
    conf = "{extends: relaxed, rules: {key-duplicates: enable, line-length: disable}}"
    files = [str(f) for f, _ in rendered.values()]
    proc = subprocess.run([str(BIN / "yamllint"), "-f", "parsable", "-d", conf, *files],
                          capture_output=True, text=True, timeout=60)
    assert "key-duplicates" not in proc.stdout, proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_yamllint_catches_a_duplicate_key(tmp_path):
    bad = tmp_path / "dup.yaml"
    bad.write_text("resources:\n  limits:\n    cpu: 1\n  limits:\n    memory: 1Gi\n", encoding="utf-8")
    conf = "{extends: relaxed, rules: {key-duplicates: enable}}"
    proc = subprocess.run([str(BIN / "yamllint"), "-f", "parsable", "-d", conf, str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert "key-duplicates" in proc.stdout


def _pod_specs(docs: list[dict]):
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
            yield d["metadata"]["name"], d["spec"]["template"]["spec"]


@pytest.mark.parametrize("vf", VALUES_FILES)
def test_restricted_pod_security(rendered, vf):
    specs = list(_pod_specs(rendered[vf][1]))
    assert specs
    for name, spec in specs:
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), name
        psc = spec.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True and psc.get("runAsUser", 1) != 0, name
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        for vol in spec.get("volumes", []):
            assert "hostPath" not in vol, (name, vol)
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, (name, c["name"])
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], (name, c["name"])
            assert not sc.get("capabilities", {}).get("add"), (name, c["name"])
            assert sc.get("privileged") is not True, (name, c["name"])
            assert sc.get("readOnlyRootFilesystem") is True, (name, c["name"])
            assert sc.get("runAsUser", 1) != 0, (name, c["name"])
            for p in c.get("ports", []):
                assert "hostPort" not in p, (name, c["name"])


@pytest.mark.parametrize("vf", VALUES_FILES)
def test_deployment_essentials(rendered, vf):
    docs = rendered[vf][1]
    values = load_values(vf)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor"} <= kinds
    for name, spec in _pod_specs(docs):
        triton = spec["containers"][0]
        assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        assert {p["name"] for p in triton["ports"]} == {"grpc", "http", "metrics"}
        shm = [v for v in spec["volumes"] if v["name"] == "dshm"]
        assert shm and shm[0]["emptyDir"]["medium"] == "Memory"
        gpus = triton["resources"]["limits"].get("nvidia.com/gpu", 0)
        assert gpus == values.get("gpu", {}).get("count", 0), name
        if gpus:
            assert spec["nodeSelector"]["nvidia.com/gpu.product"]
            init = {c["name"]: c for c in spec.get("initContainers", [])}
            assert init["build-engines"]["resources"]["limits"]["nvidia.com/gpu"] == gpus
    if vf == "values-split.yaml":
        args = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["args"]
                for d in docs if d["kind"] == "Deployment"}
        assert set(args) == {"sa2-stepaudio2-llm", "sa2-stepaudio2-token2wav"}
        assert "--triton-arg=--load-model=llm" in args["sa2-stepaudio2-llm"]
        assert "--triton-arg=--load-model=token2wav" in args["sa2-stepaudio2-token2wav"]
        assert "--triton-arg=--load-model=llm" not in args["sa2-stepaudio2-token2wav"]
        for a in args.values():
            assert "--triton-arg=--model-control-mode=explicit" in a


def test_headless_service_option():
    docs = render({"service": {"headless": True}})
    svc = [d for d in docs if d["kind"] == "Service"]
    assert svc and all(d["spec"]["clusterIP"] == "None" for d in svc)


def test_hpa_uses_an_adapter_metric_and_adapter_rules_use_recorded_series():
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    docs = render(load_values("values-gpu.yaml"))
    hpa = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert hpa and hpa[0]["apiVersion"] == "autoscaling/v2"
    adapter_names = {r["name"]["as"] for r in values["prometheusAdapter"]["rules"]["custom"]}
    assert hpa[0]["spec"]["metrics"][0]["pods"]["metric"]["name"] in adapter_names
    recorded = {r["record"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "record" in r}
    for rule in values["prometheusAdapter"]["rules"]["custom"]:
        series = rule["seriesQuery"].split("{")[0]
        assert series in recorded, series


@pytest.mark.parametrize("bad, message", [
    ({"gpu": {"count": -1}}, "/gpu/count"),
    ({"precision": "int3"}, "/precision"),
    ({"checkpoint": {"source": "pvc"}}, "/checkpoint/pvc/claimName"),
    ({"checkpoint": {"source": "objectStore"}}, "/checkpoint/objectStore/uri"),
    ({"checkpoint": {"source": "ftp"}}, "/checkpoint/source"),
    ({"stages": [{"name": "Bad_Name", "models": []}]}, "/stages/0/name"),
])
def test_bad_values_fail_schema_validation(bad, message):
    with pytest.raises(helm.HelmValuesError) as err:
        helm.Chart.load(str(CHART)).render(bad, name="sa2", namespace="speech")
    assert message in str(err.value)


# ---- Prometheus rules --------------------------------------------------------------------------

def _promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool not installed (apt-get install -y --no-install-recommends prometheus)")
    return exe


def test_promtool_check_rules():
    proc = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_test_rules():
    proc = subprocess.run([_promtool(), "test", "rules", str(RULES_TEST)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_test_rules_fails_on_a_wrong_expectation(tmp_path):
    exe = _promtool()
    shutil.copy(RULES, tmp_path / "rules.yaml")
    text = RULES_TEST.read_text(encoding="utf-8")
    assert "value: 4.875" in text
    (tmp_path / "rules_test.yaml").write_text(text.replace("value: 4.875", "value: 4.5", 1), encoding="utf-8")
    proc = subprocess.run([exe, "test", "rules", str(tmp_path / "rules_test.yaml")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    assert "4.875" in proc.stdout + proc.stderr


def _metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    tokens = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return tokens - PROMQL_WORDS


def test_rules_use_only_exported_metrics():
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    recorded = {r["record"] for g in groups for r in g["rules"] if "record" in r}
    allowed = readme_metrics() | TRITON_METRICS | PROMETHEUS_BUILTIN | recorded
    used: set[str] = set()
    for g in groups:
        for r in g["rules"]:
            used |= _metric_names(r["expr"])
    unknown = used - allowed
    assert not unknown, f"rules watch metrics nobody exports: {sorted(unknown)}"
    assert {"nv_inference_queue_duration_us", "stepaudio2_time_to_first_token_seconds_bucket"} <= used
    alerts = {r["alert"] for g in groups for r in g["rules"] if "alert" in r}
    assert {"StepAudio2HighTimeToFirstToken", "StepAudio2HighErrorRate", "StepAudio2RequestsRejected",
            "StepAudio2NoReadyPods"} <= alerts
