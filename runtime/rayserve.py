"""Stateless operator pools as Ray Serve deployments: the engine beyond one machine.

With ``EngineConfig.pools = "ray"`` every stateless operator group (embedding, QKV/O
projections, MLP, LM head: no state outlives a call) runs as a Ray Serve application of one
deployment, ``{app_prefix}-{group}``, whose replicas Ray places on whichever node of the
cluster has the resources the deployment asks for (``num_gpus`` / ``num_cpus`` per replica).
Serve owns the replicas' processes, routing, health checks, restarts and graceful draining;
opscale's controller only sets how many there are, through Serve's external-scaler hook
(applications deployed with ``external_scaler_enabled``; the same call Serve's scaling REST
endpoint makes). No cluster manager of our own.

The attention groups stay in the engine's process, beside its KV cache: a sequence's KV lives
on one attention replica, and Serve's request router, which sends each call to any replica
of a deployment, cannot pin a call to the replica holding that state.

Inside the engine each Serve replica the plan asks for is a :class:`RemoteReplica`, a proxy
with the same life cycle and interface as a local :class:`runtime.pools.Replica`
(loading -> ready -> draining -> dead), so the engine's routing, ``pool_calls`` dispatch,
metrics, micro-batches, plan changes and failure handling are the code paths of the
in-process runtime. A proxy becomes ready when Serve reports one more running replica of its
deployment than the proxies already ready; removing a proxy lowers the deployment's target,
and Serve drains the replica it stops (calls in flight finish). A call that fails because its
Serve replica died fails its work item with :class:`runtime.pools.WorkerDied`, as a local
replica's death does: the engine abandons the iteration (nothing committed) and re-runs it,
and replaces the proxy; Serve has already restarted the replica. Calls carry the operator's
name (one of :data:`OPS`) and its tensors; results come back through Ray's object store.

Units: seconds.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from runtime.engine import _embed, _head, _mlp, _o_proj, _qkv
from runtime.pools import DEAD, DRAINING, LOADING, READY, WorkerDied, WorkItem, _replica_ids, clone_to

log = logging.getLogger("opscale.runtime")

#: groups that may run as Serve deployments (attention holds KV and stays in the engine)
STATELESS = ("embed", "proj", "mlp", "head")


#: the operator calls a pool deployment runs, by name (the engine's per-group functions)
_OPS: dict[str, Callable[..., Any]] = {f.__name__: f for f in (_embed, _qkv, _o_proj, _mlp, _head)}
#: names of the operator calls a pool deployment accepts
OPS = tuple(_OPS)


@dataclass
class RayPoolsConfig:
    """Where and how the stateless pools run on Ray Serve.

    Attributes:
        groups: groups served by Ray Serve (a subset of :data:`STATELESS`); the others run in
            the engine's process.
        address: Ray cluster to join (``ray.init(address=...)``, e.g. ``auto`` on a node of a
            running cluster); None starts a local Ray instance when none is connected.
        num_cpus: CPUs Ray reserves per pool replica (0: replicas share the CPUs, as on a
            single CPU machine).
        num_gpus: GPUs Ray reserves per pool replica of each group (a fraction packs
            replicas of several groups onto one GPU); groups not named get 0 (CPU).
        tp: tensor parallelism of each group's Serve replicas (runtime/tensor_parallel.py): a
            replica splits its weights over its GPUs (at most the ``num_gpus`` Ray gives it; on
            CPU over CPU shards); groups not named get 1. Fixed while the pools run: the plans'
            ``tp`` for these groups follows it.
        max_ongoing_requests: calls Serve sends to one replica before queueing in the router
            (the engine already cuts calls to the group's ``max_batch``).
        app_prefix: Serve application names are ``{app_prefix}-{group}``.
        ready_timeout_s: how long a proxy may wait for its Serve replica before it counts as
            failed to load (the engine then backs off and retries).
        poll_s: how often the monitor thread reads Serve's replica counts while proxies load.
        seed: seed of each head replica's sampling generator (plus its replica rank).
    """

    groups: tuple[str, ...] = STATELESS
    address: str | None = None
    num_cpus: float = 0.0
    num_gpus: dict[str, float] = field(default_factory=dict)
    tp: dict[str, int] = field(default_factory=dict)
    max_ongoing_requests: int = 16
    app_prefix: str = "opscale"
    ready_timeout_s: float = 300.0
    poll_s: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [g for g in self.groups if g not in STATELESS]
        if bad:
            raise ValueError(f"RayPoolsConfig.groups: {bad} cannot run on Ray Serve; stateless groups are "
                             f"{list(STATELESS)} (attention keeps its KV cache in the engine's process)")
        bad = {g: v for g, v in self.num_gpus.items() if g not in self.groups or v < 0}
        if bad:
            raise ValueError(f"RayPoolsConfig.num_gpus: {bad} names a group not in groups={list(self.groups)} "
                             f"or a negative GPU count")
        bad = {g: v for g, v in self.tp.items() if g not in self.groups or int(v) != v or not 1 <= v <= 8}
        if bad:
            raise ValueError(f"RayPoolsConfig.tp: {bad} names a group not in groups={list(self.groups)} "
                             f"or a tp outside 1..8")


def _to_cpu(x: Any) -> Any:
    """Tensors (or tuples of them) in host memory: what crosses between processes and nodes."""
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, tuple):
        return tuple(_to_cpu(v) for v in x)
    return x


class _Shim:
    """What the engine's operator functions read of a replica: its modules and device."""

    def __init__(self, group: str, modules: Any, device: torch.device) -> None:
        self.group = group
        self.modules = modules
        self.device = device


class OperatorPool:
    """A Serve replica of one stateless operator group (the class Serve instantiates).

    Args:
        group: operator group name.
        modules: the group's master modules (or an ObjectRef of them), copied to this
            replica's device.
        seed: sampling seed (head replicas add their replica rank).
        tp: devices its weights are split over (its GPUs, at most as many as Ray gave it; CPU
            shards on a CPU replica).
    """

    def __init__(self, group: str, modules: Any, seed: int = 0, tp: int = 1) -> None:
        import ray
        from ray import serve

        from runtime.tensor_parallel import shard_group

        if isinstance(modules, ray.ObjectRef):
            modules = ray.get(modules)
        gpus = len(ray.get_gpu_ids()) if torch.cuda.is_available() else 0
        if gpus:  # Ray made this replica's GPUs cuda:0..gpus-1
            devices = [torch.device("cuda", i) for i in range(min(tp, gpus, torch.cuda.device_count()))]
        else:
            devices = [torch.device("cpu")] * tp
        device = devices[0]
        mods = shard_group(modules, group, devices) if len(devices) > 1 else clone_to(modules, device)
        self.rep = _Shim(group, mods, device)
        try:
            rank = int(serve.get_replica_context().rank.rank)
        except Exception:  # noqa: BLE001 - rank is experimental; any replica-unique number will do
            rank = os.getpid()
        self.gen = torch.Generator(device=device).manual_seed(int(seed) + 7919 * rank)

    def __call__(self, op: str, args: tuple, die: bool = False) -> tuple[Any, float, int]:
        """Run operator call ``op`` on ``args``; returns (result, service seconds, process id).

        ``die`` (fault injection): the replica's process exits after computing, so the call
        fails as if the replica had died mid-batch."""
        fn = _OPS.get(op)
        if fn is None:
            raise ValueError(f"unknown operator call {op!r}; a pool deployment runs one of {list(OPS)}")
        if op == "_head" and args[2] is None:
            args = (*args[:2], self.gen)
        t0 = time.perf_counter()
        out = _to_cpu(fn(self.rep, *args))
        service = time.perf_counter() - t0
        if die:
            os._exit(1)
        return out, service, os.getpid()


class RemoteReplica:
    """The engine's proxy for one Serve replica of a stateless group (see the module docstring).

    Has the interface the engine uses of :class:`runtime.pools.Replica`; ``remote`` tells
    them apart (a remote replica is never fused into a lane: its weights are elsewhere).
    """

    remote = True

    def __init__(self, group: str, slot: str, pools: "RayPools",
                 on_done: Callable[[Any, WorkItem, float, float], None] | None = None) -> None:
        self.id = next(_replica_ids)
        self.group = group
        self.slot = slot
        self.device = torch.device("cpu")  # where its results arrive
        self.tp = pools.config.tp.get(group, 1)  # the deployment's split
        self.devices: list[torch.device] = []  # none of the engine's
        self.state = LOADING
        self.modules: Any = None
        self.kv: Any = None
        self.load_s = 0.0
        self.items_done = 0
        self.load_error: BaseException | None = None
        self.started_s = time.perf_counter()
        self._pools = pools
        self._on_done = on_done
        self._lock = threading.Lock()
        self._inflight: dict[int, WorkItem] = {}
        self._idle = threading.Event()
        self._idle.set()
        self._kill_next = False
        pools.attach(self)

    def __repr__(self) -> str:
        return f"RemoteReplica({self.group}#{self.id} {self.state} slot={self.slot} app={self._pools.app(self.group)})"

    @property
    def ready(self) -> bool:
        return self.state == READY

    @property
    def alive(self) -> bool:
        return self.state != DEAD

    @property
    def load(self) -> int:
        """Calls in flight through this proxy (routing key)."""
        return len(self._inflight)

    @property
    def exited(self) -> bool:
        """Nothing of the engine's runs through this proxy any more."""
        return self.state == DEAD or (self.state == DRAINING and not self._inflight)

    def queued_tokens(self) -> int:
        """Token-steps of calls in flight (queued or running in Serve: it does not tell which)."""
        with self._lock:
            return sum(it.tokens for it in self._inflight.values())

    def weight_bytes(self) -> int:
        """Bytes of the group's weights one replica holds."""
        return self._pools.weight_bytes(self.group)

    def submit(self, item: WorkItem) -> Future:
        """Send ``item`` to the deployment; its future resolves with the result or WorkerDied."""
        if self.state == DEAD:
            item.future.set_exception(WorkerDied(f"replica {self.group}#{self.id} is dead"))
            return item.future
        name = getattr(item.fn, "__name__", "")
        if name not in OPS:
            item.future.set_exception(ValueError(f"{name or item.fn!r} is not an operator call a pool "
                                                 f"deployment runs ({list(OPS)})"))
            return item.future
        die, self._kill_next = self._kill_next, False
        with self._lock:
            self._inflight[id(item)] = item
            self._idle.clear()
        self._pools.call(self, name, item, die)
        return item.future

    run_inline = submit

    def finished(self, item: WorkItem, result: Any, service_s: float, error: BaseException | None,
                 died: bool) -> None:
        """Called by :class:`RayPools` when a call returns (``died``: its Serve replica died)."""
        end = time.perf_counter()
        if died:
            self.state = DEAD
            self._pools.detach(self)
            item.future.set_exception(WorkerDied(f"Serve replica of {self.group} died mid-batch "
                                                 f"({type(error).__name__})"))
        elif error is not None:
            item.future.set_exception(error)
        else:
            self.items_done += 1
            if self._on_done is not None:
                self._on_done(self, item, end - service_s, end)
            item.future.set_result(result)
        with self._lock:
            self._inflight.pop(id(item), None)
            if not self._inflight:
                self._idle.set()

    def kill(self) -> None:
        """Fault injection: the Serve replica running this proxy's next call exits after it."""
        self._kill_next = True

    def check_peer(self) -> None:
        """Never fused, so never a peer: nothing to check."""

    def stop(self) -> None:
        """Leave: no new calls; the deployment's target drops by one (Serve drains a replica)."""
        if self.state != DEAD:
            self.state = DRAINING
        self._pools.detach(self)

    def join(self, timeout: float | None = None) -> None:
        """Wait until the calls in flight through this proxy have returned."""
        self._idle.wait(timeout)

    def release(self) -> None:
        """Nothing held here (the weights live in the Serve replica)."""


class RayPools:
    """The Serve applications of the stateless groups, scaled to the engine's proxies.

    Args:
        masters: each group's master modules (shipped once to Ray's object store).
        config: see :class:`RayPoolsConfig`.
    """

    def __init__(self, masters: dict[str, Any], config: RayPoolsConfig | None = None) -> None:
        import ray
        from ray import serve

        self.config = config or RayPoolsConfig()
        self.groups = tuple(self.config.groups)
        self._started_ray = False
        if not ray.is_initialized():
            root = str(Path(__file__).resolve().parents[1])
            env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}}
            ray.init(address=self.config.address, runtime_env=env, include_dashboard=False,
                     log_to_driver=False, logging_level="WARNING")
            self._started_ray = True
        serve.start(proxy_location="Disabled")  # calls come through handles, not HTTP
        self._refs = {g: ray.put(masters[g]) for g in self.groups}  # kept: the replicas' weights
        self._bytes = {g: sum(p.numel() * p.element_size() for p in masters[g].parameters()) for g in self.groups}
        self._proxies: dict[str, list[RemoteReplica]] = {g: [] for g in self.groups}
        self._target: dict[str, int] = {}
        self._applied: dict[str, int] = {}
        self._lock = threading.Condition()
        self._handles = {}
        #: calls answered per process id of each group's Serve replicas
        self.pid_calls: dict[str, collections.Counter[int]] = {g: collections.Counter() for g in self.groups}
        self._calls = ThreadPoolExecutor(max_workers=64, thread_name_prefix="opscale-ray")
        self._closed = False
        targets = []
        for g in self.groups:
            dep = serve.deployment(OperatorPool, name=f"pool-{g}").options(
                num_replicas=1, max_ongoing_requests=self.config.max_ongoing_requests,
                ray_actor_options={"num_cpus": self.config.num_cpus, "num_gpus": self.config.num_gpus.get(g, 0.0)})
            targets.append(serve.RunTarget(dep.bind(g, self._refs[g], self.config.seed, self.config.tp.get(g, 1)),
                                           name=self.app(g),
                                           route_prefix=None, external_scaler_enabled=True))
            self._applied[g] = 1
        for g, h in zip(self.groups, serve.run_many(targets, wait_for_applications_running=False)):
            self._handles[g] = h
        self._monitor = threading.Thread(target=self._watch, name="opscale-ray-pools", daemon=True)
        self._monitor.start()

    # ---- names and sizes ------------------------------------------------------------
    def app(self, group: str) -> str:
        """Serve application name of ``group``."""
        return f"{self.config.app_prefix}-{group}"

    def weight_bytes(self, group: str) -> int:
        """Bytes of one replica's weights of ``group``."""
        return self._bytes[group]

    def gpus(self) -> float:
        """GPUs Ray reserves for the pools' replicas the engine asks for."""
        with self._lock:
            return sum(len(self._live(g)) * self.config.num_gpus.get(g, 0.0) for g in self.groups)

    def running(self, group: str) -> int:
        """Serve replicas of ``group`` in state RUNNING now."""
        from ray import serve

        app = serve.status().applications.get(self.app(group))
        if app is None:
            return 0
        dep = app.deployments.get(f"pool-{group}")
        return int(dep.replica_states.get("RUNNING", 0)) if dep is not None else 0

    # ---- proxies ----------------------------------------------------------------------
    def _live(self, group: str) -> list[RemoteReplica]:
        return [p for p in self._proxies[group] if p.state in (LOADING, READY)]

    def attach(self, proxy: RemoteReplica) -> None:
        """A new proxy: the deployment's target grows by one."""
        with self._lock:
            self._proxies[proxy.group].append(proxy)
            self._target[proxy.group] = max(len(self._live(proxy.group)), 1)
            self._lock.notify_all()

    def detach(self, proxy: RemoteReplica) -> None:
        """A proxy left or died: the deployment's target shrinks by one."""
        with self._lock:
            if proxy in self._proxies[proxy.group]:
                self._proxies[proxy.group].remove(proxy)
            self._target[proxy.group] = max(len(self._live(proxy.group)), 1)
            self._lock.notify_all()

    def call(self, proxy: RemoteReplica, op: str, item: WorkItem, die: bool) -> None:
        """Send one operator call; ``proxy.finished`` is called when it returns."""
        handle = self._handles[proxy.group]

        def run() -> None:
            from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

            try:
                out, service, pid = handle.remote(op, _to_cpu(item.args), die).result()
                self.pid_calls[proxy.group][pid] += 1
            except (ActorDiedError, ActorUnavailableError, RayActorError) as e:
                proxy.finished(item, None, 0.0, e, died=True)
            except BaseException as e:  # noqa: BLE001 - the work item carries it to the engine
                proxy.finished(item, None, 0.0, e, died=False)
            else:
                proxy.finished(item, out, service, None, died=False)
        self._calls.submit(run)

    # ---- the monitor: targets out, readiness in ----------------------------------------
    def _set_replicas(self, group: str, n: int) -> None:
        # Serve's external-scaler hook (what POST .../deployments/{name}/scale calls); the
        # application was deployed with external_scaler_enabled, so Serve keeps this count
        from ray.serve._private.common import DeploymentID
        from ray.serve.context import _get_global_client

        import ray

        controller = _get_global_client()._controller
        ray.get(controller.update_deployment_replicas.remote(DeploymentID(name=f"pool-{group}",
                                                                          app_name=self.app(group)), n))

    def _watch(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                todo = {g: n for g, n in self._target.items() if self._applied.get(g) != n}
                loading = any(p.state == LOADING for ps in self._proxies.values() for p in ps)
                if not todo and not loading:
                    self._lock.wait(1.0)
                    continue
            for g, n in todo.items():
                try:
                    self._set_replicas(g, n)
                    self._applied[g] = n
                except Exception as e:  # noqa: BLE001 - retried on the next pass
                    log.warning("could not scale %s to %d replicas: %s", self.app(g), n, e)
            if loading:
                self._promote()
            time.sleep(self.config.poll_s)

    def _promote(self) -> None:
        """Mark loading proxies ready while Serve runs more replicas than proxies are ready."""
        now = time.perf_counter()
        for g in self.groups:
            with self._lock:
                waiting = [p for p in self._proxies[g] if p.state == LOADING]
            if not waiting:
                continue
            run = self.running(g)
            with self._lock:
                serving = sum(p.state == READY for p in self._proxies[g])
                for p in waiting:
                    if serving < run:
                        p.load_s = now - p.started_s
                        p.state = READY
                        serving += 1
                    elif now - p.started_s > self.config.ready_timeout_s:
                        p.load_error = TimeoutError(f"no Serve replica of {self.app(g)} became ready within "
                                                    f"{self.config.ready_timeout_s} s (running {run}; are the "
                                                    f"cluster's resources enough for num_gpus / num_cpus?)")
                        p.state = DEAD
                        self._proxies[g].remove(p)
                        self._target[g] = max(len(self._live(g)), 1)

    def shutdown(self) -> None:
        """Delete the pools' Serve applications (and the local Ray instance this started)."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._monitor.join(5.0)
        self._calls.shutdown(wait=True)
        import ray
        from ray import serve

        for g in self.groups:
            try:
                serve.delete(self.app(g))
            except Exception as e:  # noqa: BLE001 - best effort at shutdown
                log.warning("could not delete %s: %s", self.app(g), e)
        if self._started_ray:
            serve.shutdown()
            ray.shutdown()
