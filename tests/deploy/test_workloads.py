"""The rendered workloads on their own terms and against the image that runs them: Redis
is durable, private and has room for its AOF rewrite, every pod meets Pod Security
"restricted", the image agrees with the pods, and each overlay has its expected shape."""

from __future__ import annotations

import json

import pytest

from tests.deploy.manifests import (
    OVERLAYS,
    Doc,
    config_map,
    dockerfile_stages,
    env_of,
    final_image_env,
    find,
    memory_bytes,
    one,
    pod_specs,
    render,
    tessera_container,
)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_is_durable_private_and_has_room_to_rewrite(overlay: str) -> None:
    docs = render(overlay)
    stateful = one(docs, "StatefulSet", "tessera-redis")
    pod = stateful["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config_name = next(v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v)
    files = config_map(docs, config_name)
    conf: dict[str, str] = {}
    for text in (files["redis.conf"], files["memory.conf"]):
        for line in text.splitlines():
            if line.strip() and not line.startswith("#"):
                key, _, value = line.partition(" ")
                conf[key] = value.strip()
    assert conf["appendonly"] == "yes" and conf["appendfsync"] == "everysec"
    assert conf["save"] == '""' and conf["maxmemory-policy"] == "noeviction"
    assert conf["include"] == "/etc/redis/memory.conf"
    maxmemory = memory_bytes(conf["maxmemory"])
    limit = memory_bytes(container["resources"]["limits"]["memory"])
    assert limit >= 2 * maxmemory + 2**30, (maxmemory, limit)  # the AOF rewrite forks
    assert container["resources"]["requests"]["memory"] == \
        container["resources"]["limits"]["memory"]  # never the first pod the node kills
    claim = stateful["spec"]["volumeClaimTemplates"][0]
    assert memory_bytes(claim["spec"]["resources"]["requests"]["storage"]) >= 2.5 * maxmemory
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[conf["dir"]] == claim["metadata"]["name"]  # the AOF lands on the PVC
    assert container["command"] == ["redis-server", "/run/redis/redis.conf"]
    assert "env" not in container  # the password is a file, not a variable
    (init,) = pod["initContainers"]
    assert "requirepass" in init["command"][-1] and "/run/secrets/redis/password" in \
        init["command"][-1]
    assert "@sha256:" in container["image"] and container["image"] == init["image"]
    # only tessera reaches it
    (policy,) = [p for p in find(docs, "NetworkPolicy")
                 if p["spec"]["podSelector"].get("matchLabels") ==
                 {"app.kubernetes.io/name": "tessera-redis"}]
    sources = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    assert sources == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "tessera"}}}]
    assert policy["spec"]["egress"] == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_pod_security_restricted(overlay: str) -> None:
    docs = render(overlay)
    (namespace,) = find(docs, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    policies = find(docs, "NetworkPolicy")
    assert any(p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) ==
               {"Ingress", "Egress"} for p in policies)  # default deny
    for doc, pod in pod_specs(docs):
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True, where
        assert context["seccompProfile"]["type"] == "RuntimeDefault", where
        assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod), where
        for volume in pod.get("volumes", []):
            assert "hostPath" not in volume, where
        labels = pod_labels(doc)
        assert any(p["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()
                   and p["spec"]["podSelector"] for p in policies), f"{where}: no policy"
        for container in pod.get("initContainers", []) + pod["containers"]:
            at = f"{where}/{container['name']}"
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, at
            assert security["capabilities"]["drop"] == ["ALL"], at
            assert not security["capabilities"].get("add"), at
            assert security["readOnlyRootFilesystem"] is True, at
            assert security.get("privileged") is not True, at
            uid = security.get("runAsUser", context.get("runAsUser"))
            assert uid is None or uid >= 10000, at
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory", "ephemeral-storage"} <= set(resources[kind]), at
            for probe in ("readinessProbe", "livenessProbe"):
                if doc["kind"] != "Job" and container in pod["containers"]:
                    assert probe in container, at


def pod_labels(doc: Doc) -> dict[str, str]:
    labels: dict[str, str] = doc["spec"]["template"]["metadata"]["labels"]
    return labels


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_image_and_pod_agree(overlay: str) -> None:
    docs = render(overlay)
    final = dockerfile_stages()[-1]
    (user,) = [args for instruction, args in final.instructions if instruction == "USER"]
    uid, _, gid = user.partition(":")
    pod = one(docs, "Deployment", "tessera")["spec"]["template"]["spec"]
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == \
        (int(uid), int(gid))
    container = tessera_container(docs)
    assert "command" not in container and "args" not in container  # the image's `tessera serve`
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    (volumes,) = [json.loads(a) for i, a in final.instructions if i == "VOLUME"]
    env = final_image_env()
    assert "/data" in mounts and "/tmp" in mounts  # writable places on a read-only root
    assert set(volumes) <= mounts | {"/models"}
    for name in ("HOME", "HF_HOME", "TESSERA_STORE_DATA_DIR"):
        assert any(env[name].startswith(m + "/") for m in mounts), name


def test_gpu_prod_shape() -> None:
    docs = render("gpu-prod")
    deployment = one(docs, "Deployment", "tessera")
    pod = deployment["spec"]["template"]["spec"]
    container = tessera_container(docs)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        pod["tolerations"]
    assert pod["affinity"]["podAntiAffinity"] and pod["topologySpreadConstraints"]
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # model loading
    env = env_of(docs, container)
    assert env["TESSERA_DEVICE"] == "cuda" and str(env["TESSERA_MODEL"]).startswith("/models/")
    models = next(m for m in container["volumeMounts"] if m["mountPath"] == "/models")
    assert models["readOnly"] is True
    claim = next(v for v in pod["volumes"] if v["name"] == models["name"])
    pvc = one(docs, "PersistentVolumeClaim", claim["persistentVolumeClaim"]["claimName"])
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    # the replica waits for the marker the fetch Job writes last
    (wait,) = pod["initContainers"]
    job = one(docs, "Job", "tessera-model-fetch")
    script = job["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert ".tessera-complete" in wait["command"][-1] and '".tessera-complete"' in script
    assert "os.replace(tmp, dest)" in script
    # KEDA owns the replica count
    assert "replicas" not in deployment["spec"]
    scaled = one(docs, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "tessera"
    assert scaled["spec"]["minReplicaCount"] >= 2
    assert one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_cpu_dev_shape() -> None:
    docs = render("cpu-dev")
    deployment = one(docs, "Deployment", "tessera")
    assert deployment["spec"]["replicas"] == 1
    assert "nvidia.com/gpu" not in tessera_container(docs)["resources"]["limits"]
    assert not find(docs, "PodDisruptionBudget")  # one replica: it would block drains
    env = env_of(docs, tessera_container(docs))
    assert env["TESSERA_DEVICE"] == "cpu" and "TESSERA_MODEL" not in env  # built-in model
    assert not {"ServiceMonitor", "ScaledObject", "InferencePool"} & {d["kind"] for d in docs}
