"""The Helm chart: linted and rendered by Helm's own Go code (helm-python-sdk bundles it as a
shared library, no helm binary), every rendered manifest validated against the Kubernetes
OpenAPI schemas of a current release (kubernetes-validate), and its security fields asserted."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, latest_version
from packaging.version import Version

from broker.config import Settings
from broker.errors import ConfigError
from broker.identity.keys import KeyRing, rotate
from broker.plugins import installed_settings_models
from broker.policy import load_policy

CHART = Path(__file__).resolve().parents[2] / "helm" / "jit-broker"
PRODUCTION = yaml.safe_load((CHART / "values-production.yaml").read_text())
VALUES_FILES = {"default": {}, "production": PRODUCTION}
# The newest Kubernetes whose schemas kubernetes-validate ships: a current release, not a pinned old one.
KUBE_VERSION = latest_version()
RELEASE, NAMESPACE = "jb", "jit-broker"

# Variables that carry a secret (or a hash standing in for one): only ever from a Secret.
SECRET_ENV = {"BROKER_DATABASE_URL", "BROKER_ENCRYPTION_KEY", "BROKER_ORCHESTRATOR_API_KEYS",
              "BROKER_ADMIN_TOKEN_SHA256", "BROKER_WEBHOOK_SECRETS", "BROKER_VAULT_TOKEN", "BROKER_VAULT_ROLE_ID",
              "BROKER_VAULT_SECRET_ID", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "BROKER_HUMAN_TOKENS",
              "BROKER_APPROVAL_WEBHOOK_SECRET", "BROKER_CONSOLE_OIDC_CLIENT_SECRET",
              "BROKER_SECURITY_EVENT_RECEIVER_TOKENS"}


@pytest.fixture(scope="module")
def chart() -> Any:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: Any, values: dict[str, Any], *, upgrade: bool = False) -> list[dict[str, Any]]:
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=not upgrade, is_upgrade=upgrade)
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def one(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind
             and (component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component)]
    assert len(found) == 1, f"expected one {kind} ({component}), got {len(found)}"
    return found[0]


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def test_kubernetes_version_is_current() -> None:
    assert Version(KUBE_VERSION) >= Version("1.34")


@pytest.mark.parametrize("values_name", VALUES_FILES)
def test_chart_lints_clean(values_name: str) -> None:
    report = helm.lint(CHART, VALUES_FILES[values_name], strict=True, namespace=NAMESPACE,
                       kube_version=f"v{KUBE_VERSION}")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    # severity 2 = warning, 3 = error; only informational notes (e.g. "icon is recommended") may remain
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values_name", VALUES_FILES)
@pytest.mark.parametrize("upgrade", [False, True], ids=["install", "upgrade"])
def test_every_manifest_validates_against_kubernetes(chart: Any, values_name: str, upgrade: bool) -> None:
    docs = render(chart, VALUES_FILES[values_name], upgrade=upgrade)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "Job", "PodDisruptionBudget", "ServiceAccount"} <= kinds
    for doc in docs:
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            # A CRD of the Prometheus Operator: not in Kubernetes' own schemas (checked below).
            with pytest.raises(SchemaNotFoundError):
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            continue
        # strict: unknown fields (a typo in a template) fail too
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_defaults_are_secure(chart: Any) -> None:
    assert_secure(render(chart, {}), expect_replicas=True)


def test_production_values_are_secure(chart: Any) -> None:
    docs = render(chart, PRODUCTION)
    assert_secure(docs, expect_replicas=False)
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]


def assert_secure(docs: list[dict[str, Any]], *, expect_replicas: bool) -> None:
    deployment = one(docs, "Deployment")
    if expect_replicas:
        assert deployment["spec"]["replicas"] >= 2
    else:  # the HPA owns the count
        assert "replicas" not in deployment["spec"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    job = one(docs, "Job", "migration")
    for pod in (deployment["spec"]["template"]["spec"], job["spec"]["template"]["spec"]):
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] > 0 and ctx["runAsGroup"] > 0
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        tmp_volumes = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for c in containers(pod):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["privileged"] is False, c["name"]
            assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
            assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"], c["name"]
            assert c["resources"]["limits"]["memory"], c["name"]
            writable = [m for m in c["volumeMounts"] if not m.get("readOnly")]
            assert writable and all(m["name"] in tmp_volumes for m in writable), c["name"]
        main = pod["containers"][0]
        assert any(m["mountPath"] == "/tmp" for m in main["volumeMounts"])
    broker = deployment["spec"]["template"]["spec"]["containers"][0]
    assert broker["command"] == ["broker-cli", "serve"]
    assert broker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert broker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert broker["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == ["broker-cli", "migrate"]
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    assert_secrets_referenced(docs)


def assert_secrets_referenced(docs: list[dict[str, Any]]) -> None:
    assert not [d for d in docs if d["kind"] == "Secret"], "the chart must never render a Secret"
    seen = set()
    for doc in docs:
        spec = doc.get("spec", {})
        pod = spec.get("template", {}).get("spec") or (spec if doc["kind"] == "Pod" else None)
        if pod is None:
            continue
        for c in containers(pod):
            for env in c.get("env", []):
                if env["name"] in SECRET_ENV:
                    seen.add(env["name"])
                    assert "value" not in env, f"{env['name']} is inlined in {doc['kind']}"
                    assert env["valueFrom"]["secretKeyRef"]["name"] and env["valueFrom"]["secretKeyRef"]["key"]
    assert {"BROKER_DATABASE_URL", "BROKER_ENCRYPTION_KEY", "BROKER_ORCHESTRATOR_API_KEYS"} <= seen
    deployment = one(docs, "Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["signing-keys-secret"]["secret"]["secretName"]
    assert volumes["signing-keys"]["emptyDir"]["medium"] == "Memory"


def test_production_references_every_provider_secret(chart: Any) -> None:
    docs = render(chart, PRODUCTION)
    env = {e["name"]: e for e in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["BROKER_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "jit-broker-database", "key": "url"}
    assert env["BROKER_VAULT_SECRET_ID"]["valueFrom"]["secretKeyRef"]["name"] == "jit-broker-vault"
    assert "BROKER_VAULT_TOKEN" not in env  # tokenKey "" means AppRole only
    assert "AWS_SECRET_ACCESS_KEY" not in env  # IRSA, from the ServiceAccount's annotation
    assert env["BROKER_GITHUB_PRIVATE_KEY_FILE"]["value"] == "/var/run/jit-broker/github/private-key.pem"
    volumes = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["github-private-key"]["secret"]["secretName"] == "jit-broker-github-app"


def test_static_aws_keys_come_from_a_secret(chart: Any) -> None:
    docs = render(chart, {"providers": {"aws": {"enabled": True, "credentials": {"secretName": "aws-keys"}}}})
    env = {e["name"]: e for e in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "aws-keys", "key": "aws-secret-access-key"}
    assert_secrets_referenced(docs)


@pytest.mark.parametrize("upgrade", [False, True], ids=["install", "upgrade"])
def test_migration_is_a_pre_install_and_pre_upgrade_hook(chart: Any, upgrade: bool) -> None:
    job = one(render(chart, {}, upgrade=upgrade), "Job", "migration")
    annotations = job["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    # the chart's own ServiceAccount does not exist yet when a pre-install hook runs
    assert "serviceAccountName" not in pod
    (env,) = [e for e in pod["containers"][0]["env"] if e["name"] == "BROKER_DATABASE_URL"]
    assert env["valueFrom"]["secretKeyRef"]["key"] == "database-url"
    assert all(d["kind"] != "Job" for d in render(chart, {"migration": {"enabled": False}}))


def test_policy_change_rolls_the_pods(chart: Any) -> None:
    def checksum(values: dict[str, Any]) -> str:
        return one(render(chart, values), "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/policy"]

    base = chart.values["policy"]["content"]
    changed = base.replace("max_ttl: 1h", "max_ttl: 30m")
    assert changed != base
    assert checksum({}) == checksum({"policy": {"content": base}})
    assert checksum({"policy": {"content": changed}}) != checksum({})
    assert checksum({"policy": {"shadowContent": changed}}) != checksum({})
    existing = {"policy": {"existingConfigMap": "mine", "rolloutChecksum": "v1"}}
    assert checksum(existing) != checksum({"policy": {"existingConfigMap": "mine", "rolloutChecksum": "v2"}})
    docs = render(chart, existing)
    assert not [d for d in docs if d["kind"] == "ConfigMap"]
    volumes = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["policy"]["configMap"]["name"] == "mine"


def test_default_policy_is_a_valid_policy(chart: Any, tmp_path: Path) -> None:
    docs = render(chart, {"policy": {"shadowContent": chart.values["policy"]["content"]}})
    data = one(docs, "ConfigMap")["data"]
    for name in ("policy.yaml", "shadow-policy.yaml"):
        (tmp_path / name).write_text(data[name])
        assert load_policy(tmp_path / name).version.startswith("sha256:")
    env = {e["name"]: e.get("value") for e in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["BROKER_POLICY_FILE"] == "/etc/jit-broker/policy/policy.yaml"
    assert env["BROKER_SHADOW_POLICY_FILE"] == "/etc/jit-broker/policy/shadow-policy.yaml"


def test_optional_resources_only_when_asked(chart: Any) -> None:
    kinds = {d["kind"] for d in render(chart, {})}
    assert not kinds & {"HorizontalPodAutoscaler", "NetworkPolicy", "ServiceMonitor"}
    docs = render(chart, PRODUCTION)
    assert {"HorizontalPodAutoscaler", "NetworkPolicy", "ServiceMonitor"} <= {d["kind"] for d in docs}
    netpol = one(docs, "NetworkPolicy")
    assert netpol["spec"]["podSelector"] == one(docs, "Deployment")["spec"]["selector"]
    assert set(netpol["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert {"port": 53, "protocol": "UDP"} in netpol["spec"]["egress"][0]["ports"]
    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["spec"]["selector"]["matchLabels"] == one(docs, "Service")["spec"]["selector"]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"


@pytest.mark.parametrize("bad, where", [
    ({"broker": {"logFormat": "xml"}}, "/broker/logFormat"),
    ({"secrets": {"databaseUrlValue": "postgresql://u:p@db/x"}}, "/secrets"),  # no way to inline a secret
    ({"replicaCount": 0}, "/replicaCount"),
    ({"image": {"digest": "latest"}}, "/image/digest"),
    ({"securityEvents": {"receivers": [{"name": "siem", "url": "ftp://siem", "audience": "siem"}]}},
     "/securityEvents/receivers/0/url"),
    ({"securityEvents": {"receivers": [{"name": "siem", "url": "https://siem", "audience": "siem", "token": "x"}]}},
     "/securityEvents/receivers/0"),  # a receiver's token only ever comes from a Secret
])
def test_schema_refuses_bad_values(chart: Any, bad: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=where):
        render(chart, bad)


def test_security_event_receivers_reach_the_broker_as_it_reads_them(chart: Any) -> None:
    receivers = [{"name": "siem", "url": "https://siem.example.com/events", "audience": "https://siem.example.com"},
                 {"name": "gateway", "url": "https://gw.example.com/set", "audience": "gateway"}]
    docs = render(chart, {"securityEvents": {"receivers": receivers}})
    env = {e["name"]: e for e in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    parsed = Settings(security_event_receivers=env["BROKER_SECURITY_EVENT_RECEIVERS"]["value"])
    assert [(r.name, r.url, r.audience) for r in parsed.security_event_receiver_list()] == \
        [(r["name"], r["url"], r["audience"]) for r in receivers]
    assert env["BROKER_SECURITY_EVENT_RECEIVER_TOKENS"]["valueFrom"]["secretKeyRef"]["key"] == \
        "security-event-receiver-tokens"
    default = {e["name"]: e for e in one(render(chart, {}), "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert Settings(security_event_receivers=default["BROKER_SECURITY_EVENT_RECEIVERS"]["value"]) \
        .security_event_receiver_list() == []


def test_required_provider_settings_are_named(chart: Any) -> None:
    with pytest.raises(helm.HelmError, match=r"providers\.vault\.addr is required"):
        render(chart, {"providers": {"vault": {"enabled": True}}})
    with pytest.raises(helm.HelmError, match=r"providers\.github\.appId is required"):
        render(chart, {"providers": {"github": {"enabled": True}}})


def _leaves(values: dict[str, Any], schema: dict[str, Any], prefix: str = "") -> list[str]:
    """Value paths down to where the schema stops describing properties (free-form maps)."""
    out = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        node = schema.get("properties", {}).get(key)
        assert node is not None, f"{path} is not in values.schema.json"
        assert node.get("description"), f"{path} has no description in values.schema.json"
        if isinstance(value, dict) and "properties" in node:
            out += _leaves(value, node, path + ".")
        else:
            out.append(path)
    return out


def test_every_value_is_documented(chart: Any) -> None:
    schema = chart.schema
    assert schema is not None and schema.get("additionalProperties") is False
    readme = (CHART / "README.md").read_text()
    leaves = _leaves(chart.values, schema)
    assert len(leaves) > 60
    undocumented = [p for p in leaves if f"`{p}`" not in readme]
    assert undocumented == [], f"values missing from helm/jit-broker/README.md: {undocumented}"
    chart.validate_schema(PRODUCTION)


# Settings the chart does not expose as values, and why (the rest must reach the pod).
NOT_FROM_THE_CHART = {
    "state_dir": "embedded default only",
    "embedded": "`broker-cli dev` only; never in a cluster",
    "cimd_allow_loopback": "tests only: lets the MCP tests serve client metadata over loopback; never in a cluster",
}


def test_every_broker_setting_reaches_the_pod(chart: Any) -> None:
    """A BROKER_* setting added to broker/config.py needs a value here (or broker.extraEnv, and a line above)."""
    everything = {"providers": {
        "vault": {"enabled": True, "addr": "https://bao:8200", "namespace": "team", "auth": {"tokenKey": "vault-token"}},
        "aws": {"enabled": True, "endpointUrl": "https://vpce.example:443", "accountId": "123456789012"},
        "github": {"enabled": True, "appId": "1", "privateKey": {"secretName": "gh"}}},
        "oidc": {"issuer": "https://idp.example", "audience": "jit-broker", "cliClientId": "broker-cli",
                 "cliResource": "https://broker.example"},
        "policy": {"shadowContent": chart.values["policy"]["content"]}}
    docs = render(chart, everything)
    env = {e["name"] for e in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    # Core settings, and every installed plugin's own (the settings model its package declares).
    plugin_models = installed_settings_models()
    assert {m.__name__ for m in plugin_models} >= {"AwsSettings", "GitHubSettings", "VaultSettings"}
    fields = set(Settings.model_fields) | {name for model in plugin_models for name in model.model_fields}
    expected = {f"BROKER_{name.upper()}" for name in fields if name not in NOT_FROM_THE_CHART}
    assert expected - env == set()
    assert_secrets_referenced(docs)


def test_signing_key_copy_gives_keys_the_broker_accepts(chart: Any, tmp_path: Path) -> None:
    """The init container's own command, run here with its paths under tmp_path: from a Secret
    volume's group-readable files to 0600 copies that the broker's key check accepts."""
    pod = one(render(chart, {}), "Deployment")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (broker,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in broker["env"]}
    assert env["BROKER_SIGNING_KEY_DIR"] == mounts["signing-keys"]
    assert {"name": "signing-keys", "mountPath": mounts["signing-keys"], "readOnly": True} in broker["volumeMounts"]
    source, target = (tmp_path / mounts["signing-keys-secret"].lstrip("/"), tmp_path / mounts["signing-keys"].lstrip("/"))
    rotate(source)
    target.mkdir(parents=True)
    for key in source.glob("*.pem"):
        key.chmod(0o440)  # what the kubelet makes of defaultMode 0440 with fsGroup
    with pytest.raises(ConfigError, match="readable by others"):
        KeyRing.load(source, retire_after=60)
    shell, flag, script = init["command"]
    script = script.replace(mounts["signing-keys-secret"] + "/", "{SRC}/").replace(mounts["signing-keys"] + "/", "{DST}/")
    script = script.replace("{SRC}", str(source)).replace("{DST}", str(target))
    subprocess.run([shell, flag, script], check=True)
    ring = KeyRing.load(target, retire_after=60)
    assert ring.active.kid == next(source.glob("*.pem")).stem
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in target.glob("*.pem"))
