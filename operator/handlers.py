"""Thin kopf handlers: parse, render, apply; and a per-object status loop.

The handlers are registered on a fresh :class:`kopf.OperatorRegistry` by :func:`build_registry`, so nothing is
global and a test can run two operators side by side.

Why a status loop of our own instead of ``@kopf.timer``: kopf puts a finalizer on every object that has a timer
or a daemon, and a finalizer blocks ``kubectl delete`` whenever the operator is not running (for instance after
``helm uninstall``). Nothing outside Kubernetes needs cleaning here -- owner references cascade the deletion -- so
the operator keeps no finalizer: a watch handler (no finalizer needed) starts one small loop per object and stops
it when the object is gone.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from dataclasses import dataclass
from typing import Any, Callable

import kopf
import kubernetes
from kubernetes.client import ApiException

from pdserve.operator import constants as c
from pdserve.operator import autoscaling, kube, render, secrets, spec, status

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OperatorOptions:
    """How one operator process behaves; built once from the command line."""

    namespaces: tuple[str, ...] = ()  # empty: every namespace
    peering: str | None = "pdserve"  # kopf peering object that elects one active replica; None: standalone
    priority: int | None = None  # peering priority; None: a random one (the highest live replica is active)
    default_image: str = c.DEFAULT_IMAGE
    status_interval: float = 10.0
    liveness_port: int | None = None
    permissions: spec.Permissions = spec.Permissions()  # hostPath sources and raw extraArgs: off unless allowed
    # Where the autoscaler's observations come from: a factory of one MetricsSource per InferenceService
    # (default: scrape the engine pods' /metrics). Tests and the simulator pass their own.
    metrics_source: Callable[[], autoscaling.MetricsSource] | None = None


def parse_body(body: Any, options: OperatorOptions) -> spec.ServiceSpec:
    """The spec of an InferenceService object (a dict or a kopf body), parsed under the operator's options."""
    meta = body["metadata"]
    return spec.parse(meta["name"], meta["namespace"], body.get("spec"), default_image=options.default_image,
                      permissions=options.permissions, annotations=meta.get("annotations") or {})


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def sync_status(api: kubernetes.client.ApiClient, namespace: str, name: str, options: OperatorOptions) -> bool:
    """Recompute the status of ``namespace/name`` from its children and write it if it changed.

    Returns False when the object is gone or being deleted, so its status loop can stop.
    """
    body = kube.read_inference_service(api, namespace, name)
    if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
        return False
    meta = body.get("metadata") or {}
    try:
        parsed: spec.ServiceSpec | None = parse_body(body, options)
        error, reason = None, "InvalidSpec"
    except spec.SpecError as exc:
        parsed, error, reason = None, str(exc), exc.reason
    deployments = {role: kube.read_deployment(api, namespace, f"{name}-{role}") for role in c.ROLES}
    desired = ({"prefill": parsed.prefill.replicas, "decode": parsed.decode.replicas,
                "router": parsed.router.replicas} if parsed else None)
    if parsed is not None and parsed.autoscaling is not None and desired is not None:
        for role in ("prefill", "decode"):  # the autoscaler owns these counts: the Deployments say what it wants
            replicas = ((deployments.get(role) or {}).get("spec") or {}).get("replicas")
            if replicas is not None:
                desired[role] = replicas
    new = status.compute(generation=meta.get("generation") or 0, desired=desired, deployments=deployments,
                         spec_error=error, spec_error_reason=reason,
                         served_model=parsed.model.served_name if parsed else None,
                         url=render.router_url(parsed) if parsed else None,
                         previous=body.get("status"), now=now_rfc3339())
    if not status.same_status(body.get("status"), new):
        kube.patch_status(api, namespace, name, new)
    return True


def reconcile(api: kubernetes.client.ApiClient, body: kopf.Body, options: OperatorOptions,
              logger: logging.Logger | logging.LoggerAdapter[Any]) -> None:
    """Bring the children of ``body`` in line with its spec; an invalid spec becomes Degraded plus an Event."""
    name, namespace, uid = body.metadata.name, body.metadata.namespace, body.metadata.uid
    live = kube.read_inference_service(api, namespace, name)
    if live is None or live["metadata"].get("uid") != uid or live["metadata"].get("deletionTimestamp"):
        # A stale event of an object deleted meanwhile: children created now would only be garbage-collected.
        logger.info("%s/%s is gone; nothing to reconcile", namespace, name)
        return
    try:
        parsed = parse_body(body, options)
    except spec.SpecError as exc:
        # Not an exception for kopf: retrying cannot fix a spec, only the user's next edit can (which calls us again).
        # Logged at INFO: kopf would also post a WARNING log line as an Event, next to the explicit one.
        logger.info("invalid spec: %s", exc)
        kopf.warn(body, reason=exc.reason, message=str(exc))
        sync_status(api, namespace, name, options)
        return
    objs = render.render(parsed)
    kopf.adopt(objs, owner=body)
    outcome: dict[str, list[str]] = {"created": [], "patched": [], "unchanged": []}
    try:
        for obj in objs:
            try:
                if obj["kind"] == "Secret":  # generated once, never overwritten by a reconcile
                    result = kube.ensure_secret(api, obj, uid, secrets.generate)
                else:
                    result = kube.apply(api, obj, uid)
                outcome[result].append(f"{obj['kind']}/{obj['metadata']['name']}")
            except ApiException as exc:
                if exc.status != 404 or obj["kind"] != "ServiceMonitor":
                    raise
                # Monitoring is optional: without the Prometheus operator, say so once per change and go on.
                kopf.warn(body, reason="ServiceMonitorUnavailable", message="monitoring.serviceMonitor is set, but "
                          "this cluster serves no ServiceMonitor resource (is the Prometheus operator installed?)")
        wanted = {(o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in objs}
        deleted = kube.prune(api, [k for k in render.child_keys(name) if k not in wanted], namespace, uid)
    except kube.ChildConflict as exc:
        kopf.warn(body, reason="ChildConflict", message=str(exc))
        raise kopf.TemporaryError(str(exc), delay=60) from exc
    except ApiException as exc:
        if exc.status in (400, 422):  # the API server refused what we rendered: a bug or a too-old cluster
            kopf.warn(body, reason="ApplyRejected", message=f"{exc.status} {exc.reason}: {exc.body}"[:1000])
        raise kopf.TemporaryError(f"applying children failed: {exc.status} {exc.reason}", delay=15) from exc
    changes = {k: v for k, v in (("created", outcome["created"]), ("patched", outcome["patched"]),
                                 ("deleted", deleted)) if v}
    if changes:
        message = "; ".join(f"{k} {', '.join(v)}" for k, v in changes.items())
        logger.info("applied: %s", message)
        # kopf.event, not kopf.info: routine INFO logs are not posted (settings.posting.level), this is.
        kopf.event(body, type="Normal", reason="Applied", message=message[:1000])
    sync_status(api, namespace, name, options)


async def status_loop(api: kubernetes.client.ApiClient, namespace: str, name: str, options: OperatorOptions) -> None:
    """Refresh one object's status every ``status_interval`` seconds until the object is gone."""
    while True:
        try:
            # The kubernetes client is synchronous: keep it off the event loop that serves every other object.
            if not await asyncio.to_thread(sync_status, api, namespace, name, options):
                return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an API hiccup must not end the loop; the next round retries
            # The module's logger, not the object's: kopf would post each failure as an Event.
            log.warning("status refresh of %s/%s failed: %s", namespace, name, exc)
        await asyncio.sleep(options.status_interval)


def autoscale_step(api: kubernetes.client.ApiClient, namespace: str, name: str, options: OperatorOptions,
                   run: autoscaling.AutoscalerRun | None) -> tuple[bool, autoscaling.AutoscalerRun | None, float,
                                                                  tuple[dict, str, str] | None]:
    """One autoscaling round of ``namespace/name``: (still there?, the run to keep, seconds to the next round,
    an Event to post as (body, reason, message) or None)."""
    body = kube.read_inference_service(api, namespace, name)
    if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
        return False, None, 0.0, None
    try:
        parsed = parse_body(body, options)
    except spec.SpecError:
        return True, run, options.status_interval, None  # reconcile reports it
    policy = parsed.autoscaling
    if policy is None:
        return True, None, options.status_interval, None
    if run is None:
        run = autoscaling.AutoscalerRun((options.metrics_source or autoscaling.PodMetricsSource)())
    result = autoscaling.autoscale_round(api, namespace, name, parsed, run, now_rfc3339())
    if result is None or not result[1]:
        return True, run, run.next_delay(policy), None
    decision, changes = result
    reason = "AutoscaleDryRun" if policy.dry_run else "Autoscaled"
    verb = "would scale" if policy.dry_run else "scaled"
    return True, run, run.next_delay(policy), (body, reason, f"{verb} {', '.join(changes)}: {decision.reason}"[:1000])


async def autoscale_loop(api: kubernetes.client.ApiClient, namespace: str, name: str,
                         options: OperatorOptions) -> None:
    """Run the autoscaler of one object while it exists (idle, checking its spec, while autoscaling is off)."""
    run = None
    while True:
        delay = options.status_interval
        try:
            alive, run, delay, event = await asyncio.to_thread(autoscale_step, api, namespace, name, options, run)
            if not alive:
                return
            if event is not None:
                kopf.event(event[0], type="Normal", reason=event[1], message=event[2])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a scrape or API hiccup must not end the loop
            log.warning("autoscaling of %s/%s failed: %s", namespace, name, exc)
        await asyncio.sleep(delay)


def build_registry(options: OperatorOptions) -> kopf.OperatorRegistry:
    """A registry with every handler of the operator, bound to ``options``."""
    registry = kopf.OperatorRegistry()
    resource = (c.GROUP, c.VERSION, c.PLURAL)

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        # The same credentials as the kubernetes client below: in-cluster service account, else kubeconfig.
        return kube.connection_info(kube.load_configuration())

    @kopf.on.startup(registry=registry)
    def startup(*, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
        memo.api = kube.new_api_client()
        memo.loops = {}
        if options.peering:
            for problem in kube.ensure_peering(memo.api, options.peering, options.namespaces):
                logger.error("%s; this replica waits until the peering object exists", problem)

    @kopf.on.cleanup(registry=registry)
    async def cleanup(*, memo: kopf.Memo, **_: Any) -> None:
        loops: dict[str, asyncio.Task[None]] = memo.get("loops") or {}
        for task in loops.values():
            task.cancel()
        await asyncio.gather(*loops.values(), return_exceptions=True)
        if memo.get("api") is not None:
            memo.api.close()

    @kopf.on.resume(*resource, registry=registry)
    @kopf.on.create(*resource, registry=registry)
    @kopf.on.update(*resource, registry=registry)
    def reconcile_handler(*, body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
        reconcile(memo.api, body, options, logger)

    @kopf.on.event(*resource, registry=registry)
    async def track_status(*, event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        uid = body.metadata.uid
        loops: dict[str, asyncio.Task[None]] = memo.loops
        if event["type"] == "DELETED":
            for key in (uid, f"autoscale/{uid}"):
                task = loops.pop(key, None)
                if task is not None:
                    task.cancel()
            return
        namespace, name = body.metadata.namespace, body.metadata.name
        if uid not in loops or loops[uid].done():
            loops[uid] = asyncio.create_task(status_loop(memo.api, namespace, name, options),
                                             name=f"pdserve status {namespace}/{name}")
        key = f"autoscale/{uid}"
        if key not in loops or loops[key].done():
            loops[key] = asyncio.create_task(autoscale_loop(memo.api, namespace, name, options),
                                             name=f"pdserve autoscaler {namespace}/{name}")

    return registry

