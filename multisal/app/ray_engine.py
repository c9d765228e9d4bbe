"""The ray engine: a batch job's images spread over a pool of Ray actors, one backend per actor.

    [engine]
    name = "ray"
    address = "ray://head:10001"   # unset: start a local cluster of num_cpus CPUs
    actors = 4                     # default: the cluster's CPUs // cpus_per_actor
    cpus_per_actor = 1             # also the actor's thread count for torch / onnxruntime
    gpus_per_actor = 0             # > 0: the actor's backend runs on its GPU
    batch_size = 8                 # images per actor call, explained together

Ray Data reads the inputs (plain tasks, outside the actor pool) and hands them in batches to the
actors; each actor builds the job once (model, backend, gradient graphs) and explains its batches
with the same code as the local engine (Job.explain_batch), writing each image's files straight
into the output folder, which on a cluster must be shared by every node. The records come back to
the driver, which alone writes the manifest, so resuming and fault tolerance are the local
engine's (multisal.batch).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import socket
import sys

import numpy as np

from ..errors import MissingFrameworkError, MultisalError
from ..files import is_regular_file
from ..frameworks import available, lazy_import
from ..registry import backend_class, external_backends, register_backend
from .config import DEFAULT_BATCH
from .job import Job
from .malloc import tune_malloc

ray = lazy_import("ray")
ray_data = lazy_import("ray.data")

# Files larger than this are left for the actor to open itself, where the pixel limit refuses them
# from the header alone instead of shipping them through the object store.
READ_LIMIT = 256 * 2 ** 20


def connect_ray(cfg) -> bool:
    """Start or join the configuration's Ray cluster, before a run writes anything, and check it
    has what the actors ask for (a GPU per actor would otherwise wait for ever). True when this
    call started Ray (run_on_ray then shuts it down)."""
    if not available("ray"):
        raise MissingFrameworkError("engine \"ray\" needs Ray Data: pip install 'multisal[ray]'")
    engine = cfg.get("engine", {})
    started = not ray.is_initialized()
    if started:
        address = engine.get("address")
        _check_reachable(address)
        # A cluster started here imports what this process imports (a model factory's module
        # included); a remote cluster needs them installed, or shipped with Ray's runtime_env.
        local = None if address else {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}}
        try:
            ray.init(address=address, num_cpus=None if address else engine.get("num_cpus"), runtime_env=local,
                     include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        except Exception as err:   # a wrong address, a cluster that is not up
            raise MultisalError(f"config key 'engine.address': cannot start or join a Ray cluster at "
                                f"{address or 'this machine'}: {_last_line(err)}") from None
    resources = ray.cluster_resources()
    for key, resource in (("gpus_per_actor", "GPU"), ("cpus_per_actor", "CPU")):
        wanted = float(engine.get(key, 1 if resource == "CPU" else 0))
        if wanted > resources.get(resource, 0):
            if started:
                ray.shutdown()
            raise MultisalError(f"config key 'engine.{key}': {wanted:g} asked for, but the Ray cluster has "
                                f"{resources.get(resource, 0):g} {resource}s; an actor would wait for ever")
    return started


def _check_reachable(address, timeout=5.0):
    """Refuse, in one line and within seconds, a cluster address nothing answers at: ray.init keeps
    trying an unreachable GCS for minutes (20 attempts, each with its own timeouts). Only a
    "[ray://]host:port" address is tried ("auto", "local" and None are Ray's own to resolve)."""
    if not address:
        return
    host, _, port = str(address).split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise MultisalError(f"config key 'engine.address': no Ray cluster answers at {address}: "
                            f"{err.strerror or err}") from None


def run_on_ray(cfg, items, on_record, progress=False, cluster=None, temp_tag=None):
    """Explain `items` ([(source, folder)]) on Ray, passing each image's record to `on_record` in
    the driver as it arrives. `cluster` is connect_ray's answer (None: connect now)."""
    started = connect_ray(cfg) if cluster is None else cluster
    engine = cfg.get("engine", {})
    logging.getLogger("ray.data").setLevel(logging.INFO if progress else logging.ERROR)
    try:
        if not items:
            return
        cpus = float(engine.get("cpus_per_actor", 1))
        gpus = float(engine.get("gpus_per_actor", 0))
        actors = engine.get("actors") or max(1, int(ray.cluster_resources().get("CPU", 1) // max(cpus, 1)))
        context = ray_data.DataContext.get_current()
        context.enable_progress_bars = bool(progress)
        batch = engine.get("batch_size", DEFAULT_BATCH)
        rows = [{"source": str(source), "folder": str(folder)} for source, folder in items]
        # Reading is I/O: its tasks take no CPU from the actors, and two at a time, batch by batch,
        # keep the actors fed without starting a Ray worker process per file.
        data = ray_data.from_items(rows, override_num_blocks=max(1, len(rows) // batch)).map_batches(
            _read, batch_size=batch, batch_format="numpy", num_cpus=0, compute=ray_data.TaskPoolStrategy(size=2))
        explained = data.map_batches(
            ExplainActor, fn_constructor_kwargs={"config": cfg, "threads": max(1, int(cpus)), "gpus": gpus,
                                                 "backends": list(external_backends().values()),
                                                 "temp_tag": temp_tag},
            batch_size=batch, batch_format="numpy", compute=ray_data.ActorPoolStrategy(size=actors),
            num_cpus=cpus, num_gpus=gpus)
        try:
            for row in explained.iter_rows():
                on_record(json.loads(row["record"]))
        except (MultisalError, OSError):   # the driver's own (writing the manifest)
            raise
        except Exception as err:   # Ray wraps a worker's error in pages of traceback
            raise MultisalError(f"ray engine: {_last_line(err)}") from None
    finally:
        if started:
            ray.shutdown()


def _last_line(err) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _read(batch):
    """The bytes of each image file (None for skimage:NAME, a missing, unreadable or huge file, or
    one that is not a regular file: the actor then opens the source itself and records why it fails)."""
    data = []
    for path in batch["source"]:
        try:
            if is_regular_file(path) and os.path.getsize(path) <= READ_LIMIT:
                with open(path, "rb") as f:
                    data.append(f.read())
                continue
        except OSError:
            pass
        data.append(None)
    return {**batch, "data": np.array(data, dtype=object)}


class ExplainActor:
    """One backend per actor: the job is set up once, then explains batch after batch. The
    backends registered in the driver outside multisal are registered here too, and the job's
    backend gets the actor's threads and GPUs its own way (Backend.worker_options)."""

    def __init__(self, config, threads, gpus, backends, temp_tag):
        tune_malloc()
        for cls in backends:
            register_backend(cls)
        config = copy.deepcopy(config)
        name = config["backend"]
        config[name] = backend_class(name).worker_options(config.get(name, {}), threads, gpus)
        self.job = Job(config, temp_tag=temp_tag)

    def __call__(self, batch):
        items = list(zip((str(s) for s in batch["source"]), batch["folder"]))
        data = {s: bytes(d) for (s, _), d in zip(items, batch["data"]) if d is not None}
        records = self.job.explain_batch(items, data=data)
        os.sync()   # on this node: the files reach the disk before the driver records them
        return {"record": np.array([json.dumps(r, ensure_ascii=False) for r in records], dtype=object)}
