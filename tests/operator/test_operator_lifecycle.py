"""The real kopf operator against kmock: create, scale, change the model, delete, restart, bad specs."""

from __future__ import annotations

import asyncio
import json

from pdserve.operator import constants as c

SPEC = {"model": {"source": {"bundled": "smollm2-135m-instruct"}}}
EXPECTED = {
    ("ConfigMap", "chat-config"), ("ServiceAccount", "chat-router"), ("Role", "chat-router"),
    ("RoleBinding", "chat-router"), ("Service", "chat-prefill"), ("Service", "chat-decode"),
    ("Service", "chat-router"), ("Deployment", "chat-prefill"), ("Deployment", "chat-decode"),
    ("Deployment", "chat-router"), ("PodDisruptionBudget", "chat-prefill"),
    ("PodDisruptionBudget", "chat-decode"), ("PodDisruptionBudget", "chat-router"),
    ("Secret", "chat-cluster-secret"), ("NetworkPolicy", "chat-prefill"), ("NetworkPolicy", "chat-decode"),
    ("NetworkPolicy", "chat-router"),
}


def template(cluster, role: str) -> dict:
    return cluster.children()[("Deployment", f"chat-{role}")]["spec"]["template"]


def phase(cluster, name: str = "chat") -> str | None:
    return ((cluster.isvc(name) or {}).get("status") or {}).get("phase")


def condition(cluster, ctype: str, name: str = "chat") -> dict:
    return next(cd for cd in cluster.isvc(name)["status"]["conditions"] if cd["type"] == ctype)


async def test_create_scale_change_delete(cluster, operator_running) -> None:
    async with operator_running():
        # create -> every child appears, owned by the InferenceService (the garbage collector's cascade key)
        uid = (await cluster.create_isvc("chat", SPEC))["metadata"]["uid"]
        children = await cluster.wait_for(lambda: set(cluster.children()) == EXPECTED and cluster.children(),
                                          what="all children")
        for obj in children.values():
            assert obj["metadata"]["ownerReferences"] == [
                {"apiVersion": c.API_VERSION, "kind": c.KIND, "name": "chat", "uid": uid, "controller": True,
                 "blockOwnerDeletion": True}]
        assert not cluster.isvc("chat")["metadata"].get("finalizers"), "nothing outside Kubernetes to clean up"
        (applied,) = await cluster.wait_for(lambda: cluster.events("Applied"), what="an Applied Event")
        assert applied["type"] == "Normal" and applied["message"].startswith(
            "created Secret/chat-cluster-secret, ConfigMap/chat-config")
        await cluster.wait_for(lambda: phase(cluster) == "Progressing", what="Progressing")
        assert cluster.isvc("chat")["status"]["url"] == "http://chat-router.default.svc:8000"

        # the Deployment controller rolls the pods out -> Ready, from the children's real state
        await cluster.roll_out()
        await cluster.wait_for(lambda: phase(cluster) == "Ready", what="Ready")
        st = cluster.isvc("chat")["status"]
        assert (st["prefill"]["ready"], st["decode"]["ready"], st["router"]["ready"]) == ("1/1", "1/1", "1/1")
        assert {cd["type"]: cd["status"] for cd in st["conditions"]} == {
            "Ready": "True", "PrefillReady": "True", "DecodeReady": "True", "RouterReady": "True",
            "Degraded": "False", "Progressing": "False"}
        assert st["servedModel"] == "smollm2-135m-instruct"

        # scale prefill -> exactly one merge patch of exactly spec.replicas; the pods do not roll
        templates = {role: template(cluster, role) for role in c.ROLES}
        mark = cluster.mark()
        await cluster.patch_isvc("chat", {"spec": {"prefill": {"replicas": 3}}})
        await cluster.wait_for(lambda: cluster.children()[("Deployment", "chat-prefill")]["spec"]["replicas"] == 3,
                               what="3 prefill replicas")
        await cluster.wait_for(lambda: phase(cluster) == "Progressing", what="Progressing after scale")
        writes = cluster.writes(mark)
        assert [(m, plural, name) for m, plural, name, _ in writes] == [("PATCH", "deployments", "chat-prefill")]
        body = writes[0][3]
        assert body["spec"] == {"replicas": 3}
        assert set(body["metadata"]) == {"annotations"}  # only the operator's last-applied record
        assert {role: template(cluster, role) for role in c.ROLES} == templates
        await cluster.roll_out()
        await cluster.wait_for(lambda: phase(cluster) == "Ready", what="Ready after scale")
        assert cluster.isvc("chat")["status"]["prefill"]["ready"] == "3/3"

        # change the model -> the config and the three pod templates change (so the pods roll); nothing else
        mark = cluster.mark()
        await cluster.patch_isvc("chat", {"spec": {"model": {"source": {"bundled": None, "pvc": {
            "claimName": "weights", "path": "qwen3-0.6b"}}}}})
        await cluster.wait_for(lambda: template(cluster, "router") != templates["router"], what="router rolled")
        await asyncio.sleep(0.3)
        patched = sorted((plural, name) for _, plural, name, _ in cluster.writes(mark))
        assert patched == [("configmaps", "chat-config"), ("deployments", "chat-decode"),
                           ("deployments", "chat-prefill"), ("deployments", "chat-router")]
        for role in c.ENGINE_ROLES:  # the engines read the changed engine.json: a new config hash
            assert (template(cluster, role)["metadata"]["annotations"][c.ANNOTATION_CONFIG_HASH]
                    != templates[role]["metadata"]["annotations"][c.ANNOTATION_CONFIG_HASH])
        router_args = template(cluster, "router")["spec"]["containers"][0]["args"]
        assert router_args[router_args.index("--model") + 1] == "/models/qwen3-0.6b"  # the new model's tokenizer
        engine = json.loads(cluster.children()[("ConfigMap", "chat-config")]["data"]["engine.json"])
        assert engine["model"]["model"] == "/models/qwen3-0.6b"
        prefill = cluster.children()[("Deployment", "chat-prefill")]["spec"]["template"]["spec"]
        assert {"name": "model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}} in prefill[
            "volumes"]
        await cluster.wait_for(lambda: cluster.isvc("chat")["status"].get("servedModel") == "qwen3-0.6b",
                               what="status follows the model")

        # delete -> no finalizer holds it; the garbage collector removes the children by their owner reference,
        # and the operator neither recreates them nor keeps polling the deleted object
        await cluster.delete_isvc("chat")
        assert cluster.isvc("chat") is None
        deleted = await cluster.collect_garbage()
        assert len(deleted) == len(EXPECTED)
        mark = cluster.mark()
        await asyncio.sleep(1.0)
        assert cluster.children() == {}
        assert cluster.writes(mark) == []
        late_reads = [r for r in list(cluster.server)[mark + 2:] if r.name == "chat"]
        assert late_reads == [], "the status loop of a deleted object must stop"


async def test_restart_resumes_without_duplicates(cluster, operator_running) -> None:
    async with operator_running():
        await cluster.create_isvc("chat", SPEC)
        await cluster.wait_for(lambda: set(cluster.children()) == EXPECTED, what="all children")
        await cluster.roll_out()
        await cluster.wait_for(lambda: phase(cluster) == "Ready", what="Ready")

    # restarted with nothing changed: resume finds everything in place and writes nothing
    mark = cluster.mark()
    async with operator_running():
        # the resume handler compares every child (only it reads the ConfigMap)
        await cluster.wait_for(lambda: [r for r in list(cluster.server)[mark:] if r.method.value == "GET"
                                        and r.name == "chat-config"], what="the resume handler")
        await asyncio.sleep(0.5)
    assert cluster.writes(mark) == []
    assert set(cluster.children()) == EXPECTED

    # changed while the operator was down: the restart applies exactly that change, and creates nothing
    await cluster.patch_isvc("chat", {"spec": {"decode": {"replicas": 2}}})
    mark = cluster.mark()
    async with operator_running():
        await cluster.wait_for(lambda: cluster.isvc("chat")["status"]["decode"]["replicas"] == 2,
                               what="decode scaled")
        await asyncio.sleep(0.3)
    assert [(m, p, n) for m, p, n, _ in cluster.writes(mark)] == [("PATCH", "deployments", "chat-decode")]
    assert set(cluster.children()) == EXPECTED


async def test_invalid_spec_degrades_and_recovers(cluster, operator_running) -> None:
    async with operator_running():
        # redis chosen without url or deploy: Degraded with a reason and an Event, no children, no crash
        await cluster.create_isvc("chat", {**SPEC, "kvConnector": {"type": "redis"}})
        await cluster.wait_for(lambda: phase(cluster) == "Degraded", what="Degraded")
        degraded = condition(cluster, "Degraded")
        assert (degraded["status"], degraded["reason"]) == ("True", "InvalidSpec")
        assert "redis.url or redis.deploy" in degraded["message"]
        assert condition(cluster, "Ready")["status"] == "False"
        (event,) = await cluster.wait_for(lambda: cluster.events("InvalidSpec"), what="an InvalidSpec Event")
        assert event["type"] == "Warning" and "redis" in event["message"]
        assert event["involvedObject"]["name"] == "chat"
        assert cluster.children() == {}

        # fixed: a managed Redis comes with the rest, and the engines are pointed at it
        await cluster.patch_isvc("chat", {"spec": {"kvConnector": {"redis": {"deploy": True}}}})
        redis = {("Deployment", "chat-redis"), ("Service", "chat-redis"), ("Secret", "chat-redis-auth"),
                 ("NetworkPolicy", "chat-redis")}
        await cluster.wait_for(lambda: set(cluster.children()) == EXPECTED | redis, what="children and Redis")
        await cluster.wait_for(lambda: condition(cluster, "Degraded")["status"] == "False", what="not Degraded")
        args = cluster.children()[("Deployment", "chat-decode")]["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--redis-url") + 1] == "redis://chat-redis.default.svc:6379/0"

        # broken again by an update: Degraded, and the running children are left exactly as they were
        mark = cluster.mark()
        await cluster.patch_isvc("chat", {"spec": {"prefill": {"replicas": -1}}})
        await cluster.wait_for(lambda: phase(cluster) == "Degraded", what="Degraded again")
        assert "spec.prefill.replicas" in condition(cluster, "Degraded")["message"]
        await asyncio.sleep(0.3)
        assert cluster.writes(mark) == []

        # an option turned off takes its objects with it
        await cluster.patch_isvc("chat", {"spec": {"prefill": {"replicas": 1}, "kvConnector": {
            "type": "grpc", "redis": None}}})
        await cluster.wait_for(lambda: set(cluster.children()) == EXPECTED, what="Redis removed")
        await cluster.wait_for(lambda: phase(cluster) == "Progressing", what="healthy again")
        assert len(cluster.events("InvalidSpec")) == 2  # one per bad spec, not one per retry
        assert cluster.events("Logging") == []  # no log line turned into a second Event


async def test_two_replicas_elect_one_leader(cluster, operator_running) -> None:
    # no peering object yet (the chart creates one): the first replica creates it rather than wait forever
    leader = operator_running(peering="pdserve", priority=200)
    await leader.__aenter__()
    try:
        async with operator_running(peering="pdserve", priority=100):
            await cluster.wait_for(lambda: len(cluster.peers("pdserve")) == 2, what="both replicas in the peering")
            mark = cluster.mark()
            await cluster.create_isvc("chat", SPEC)
            await cluster.wait_for(lambda: set(cluster.children()) == EXPECTED, what="all children")
            await asyncio.sleep(0.5)
            creates = [n for m, _, n, _ in cluster.writes(mark) if m == "POST"]
            assert sorted(creates) == sorted(n for _, n in EXPECTED), "only the leader creates, once each"

            # the leader goes away: the standby takes over and applies the next change
            await leader.__aexit__(None, None, None)
            leader = None
            await cluster.wait_for(lambda: len(cluster.peers("pdserve")) == 1, what="the leader to leave")
            await cluster.patch_isvc("chat", {"spec": {"router": {"replicas": 2}}})
            await cluster.wait_for(lambda: cluster.children()[("Deployment", "chat-router")]["spec"]["replicas"] == 2,
                                   what="the standby to take over")
    finally:
        if leader is not None:
            await leader.__aexit__(None, None, None)


async def test_the_command_line_runs_the_operator(cluster, tmp_path) -> None:
    """``pdserve operator run`` as its own process: it serves /healthz, reconciles, and exits cleanly on SIGTERM."""
    import signal
    import socket
    import sys
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pdserve.cli.main", "operator", "run", "--standalone",
        "--liveness-port", str(port), "--status-interval", "0.5", "--log-level", "WARNING",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
                    return resp.status == 200
            except OSError:
                return False

        await cluster.wait_for(lambda: proc.returncode is not None or healthy(), timeout=30, what="/healthz")
        assert proc.returncode is None
        await cluster.create_isvc("chat", SPEC)
        await cluster.wait_for(lambda: set(cluster.children()) == EXPECTED, what="children from the CLI's operator")
        await cluster.wait_for(lambda: phase(cluster) == "Progressing", what="status from the CLI's operator")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        output = (await asyncio.wait_for(proc.communicate(), timeout=30))[0].decode()
    assert proc.returncode == 0, output
