"""Run a pipeline's fields on Ray actors (``smear run --engine ray``): the same results, in the same order.

Ray Core actors, not Ray Data: each actor builds the stages once and is handed the paths of a run of
fields (a local run's detector batch: same batches, same numbers); it reads them from shared storage,
runs ``iter_field_results`` as a local run does, writes the cache itself and sends back the results,
which are small. The driver keeps a bounded window of runs in flight and yields the results in slide
and field order into the same report code. Ray Data would add its own batching, ordering and a
dataset layer (and pyarrow) for what is here a list of paths and an ordered stream.

A whole slide (``tiles``) goes the same way: the driver finds the monolayer (reading, no model) and
hands the workers the reading path a few tiles a call; each worker opens the file from shared
storage, runs ``wsi_tiles.tile_outcomes`` on its tiles and writes the cache; the driver counts the
outcomes in path order and stops at the target, cancelling the calls in flight (a call that has
started runs to its end). So that few tiles are run past the stop, the tiles in flight are about as
many as the white cells still missing need at the rate counted so far (``wsi_tiles.TileBudget``),
and a call holds fewer tiles as the count nears the target.

Ray is imported only by the functions here that need it, so the module loads without the extra.
"""

from __future__ import annotations

import contextlib

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generator, Sequence

from smear.config_models import PipelineConfig
from smear.errors import SmearError
from smear.io import Slide
from smear.pipeline.cache import FieldCache
from smear.pipeline.run import Stages, iter_field_results
from smear.types import FieldResult, SkippedField

_log = logging.getLogger(__name__)

INSTALL = 'pip install "smear[ray]"'
RESTARTS = 3     # a worker process that dies is started again this many times; its runs are retried
EXIT_WAIT_S = 10.0  # the most a closing engine waits for its killed workers to exit
PER_WORKER = 2   # runs queued on each worker, so it never waits for the driver between runs
TILES_PER_CALL = 2  # whole-slide tiles a call (at most): the second is read while the models run on the first
START_TIMEOUT_S = 600.0

Item = FieldResult | SkippedField

if TYPE_CHECKING:
    from smear.pipeline.wsi_tiles import TileJob, TileOutcome
    from smear.wsi.finder import TileScore


def require_ray():
    """The ray module, or a one-line SmearError with the pip command."""
    try:
        import ray
    except ImportError as exc:
        raise SmearError(f"--engine ray needs Ray, which is not installed: {INSTALL}") from exc
    return ray


@dataclass(frozen=True)
class Chunk:
    """A run of consecutive fields of one slide: one call on a worker."""

    index: int
    slide: str
    fields: tuple[Path, ...]


def chunks(slides: Sequence[Slide], field_batch: int) -> list[Chunk]:
    """Each slide's fields in runs of ``field_batch`` (the local run's detector batches), in order."""
    out: list[Chunk] = []
    step = max(1, int(field_batch))
    for slide in slides:
        for i in range(0, len(slide.fields), step):
            out.append(Chunk(len(out), slide.name, tuple(slide.fields[i:i + step])))
    return out


@dataclass(frozen=True)
class BuildFromConfig:
    """Builds a worker's stages from the resolved pipeline config; ``device: auto`` means the GPU Ray
    gave the worker, and the CPU when it gave none (a GPU node's other workers leave its GPUs alone)."""

    cfg: PipelineConfig
    keep_views: bool = False  # the results hold what the review page shows (Stages.keep_views)

    def __call__(self) -> Stages:
        import ray

        from smear.pipeline.build import build_stages

        cfg = self.cfg
        if cfg.device.strip().lower() == "auto" and not ray.get_gpu_ids():
            cfg = cfg.model_copy(update={"device": "cpu"})
        return build_stages(cfg, views=self.keep_views)


class FieldWorker:
    """What one Ray actor holds: the stages, built once by ``build``, and the shared result cache
    (``cache``: its folder and the stages' version, as the driver's FieldCache has them)."""

    def __init__(self, build: Callable[[], Stages], cache: tuple[str, str] | None = None):
        self.stages: Stages | None = None
        self.error: Exception | None = None
        try:
            self.stages = build()
        except Exception as exc:  # noqa: BLE001 - told by ready(); a constructor that raised would be rerun
            self.error = exc
        self.notes: list[str] = []
        self.cache = FieldCache(cache[0], cache[1], warn=self.notes.append) if cache else None
        self.slide: Any = None  # the whole-slide file open for run_tiles (smear.wsi.slide.WholeSlide)

    def ready(self) -> tuple[int, str, tuple[float, int] | None]:
        """The worker's process id, its Ray node and its stages' crop geometry, once its models are
        loaded; what building them raised, if it did."""
        if self.error is not None:
            raise self.error
        assert self.stages is not None
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id(), self.stages.crop_geometry

    def run(self, slide: str, fields: Sequence[Path], max_pixels: int, resume: bool) -> tuple[list[Item], list[str]]:
        """The results of these fields of a slide, in order, and the cache's warnings meanwhile."""
        assert self.stages is not None, "ready() raised"
        items = list(iter_field_results(Slide(slide, tuple(fields)), self.stages, max_pixels, self.cache, resume))
        notes, self.notes = self.notes, []
        return items, notes

    def run_tiles(self, job: TileJob, tiles: Sequence[TileScore], resume: bool) -> tuple[list[TileOutcome], list[str]]:
        """The outcomes of these tiles of a whole slide, in order, and the cache's warnings meanwhile
        (the file stays open for the next call on it)."""
        assert self.stages is not None, "ready() raised"
        from smear.pipeline.wsi_tiles import tile_outcomes
        from smear.wsi.slide import WholeSlide

        if self.slide is None or str(self.slide.path) != job.path:
            if self.slide is not None:
                self.slide.close()
            self.slide = WholeSlide(job.path)
        items = list(tile_outcomes(self.slide, job, tiles, self.stages, self.cache, resume))
        notes, self.notes = self.notes, []
        return items, notes


def _smear_error(exc: BaseException) -> SmearError | None:
    """The SmearError a worker raised, found in the causes Ray wraps it in."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None)  # RayTaskError: the worker's own exception
        if isinstance(inner, BaseException):
            exc = inner
            continue
        if isinstance(exc, SmearError):
            return SmearError(_first_line(exc), exc.hint)
        exc = exc.__cause__
    return None


@contextlib.contextmanager
def _loopback_only(ray):
    """While a local Ray instance starts: its node address is the loopback one, so its GCS, raylet,
    object manager, agents and workers listen on 127.0.0.1 only. Ray does that where it does not
    support clusters (its ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` switch); the processes it starts
    inherit the setting, and this process gets its environment back afterwards."""
    from ray._private import ray_constants

    env = os.environ.get(_CLUSTER_ENV)
    flag = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[_CLUSTER_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if env is None:
            os.environ.pop(_CLUSTER_ENV, None)
        else:
            os.environ[_CLUSTER_ENV] = env
        if flag is not None:
            ray_constants.ENABLE_RAY_CLUSTER = flag


_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@dataclass
class RayEngine:
    """Workers on a Ray cluster, as a context manager: ``results`` streams the fields of many slides.

    ``address``: None starts a local Ray (or joins $RAY_ADDRESS), "auto" joins the cluster of this
    node, "HOST:PORT" a remote one; a Ray already initialised in this process is used as it is.
    ``workers``: default one per GPU (``gpus_per_worker`` each) or one per node; each worker gets an
    equal share of the cluster's CPUs (at most a node's). ``gpus_per_worker``: default 1 when the
    cluster has GPUs, else 0.
    """

    build: Callable[[], Stages]
    field_batch: int = 8
    cache: FieldCache | None = None
    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    warn: Callable[[str], None] | None = None  # the workers' warnings, said once each (None: the logger)
    worker_logs: bool = False
    start_timeout_s: float = START_TIMEOUT_S
    classified: bool = True  # whether the stages ``build`` makes classify (the reports say so)
    guard: Any = None  # the classifier's slide guard statistics, for the slide evidence (driver side)
    crop_geometry: tuple[float, int] | None = field(default=None, init=False)  # the workers' stages'
    actors: list[Any] = field(default_factory=list, init=False)
    pids: list[int] = field(default_factory=list, init=False)
    _owns: bool = field(default=False, init=False)
    _noted: set[str] = field(default_factory=set, init=False)
    _local: list[int] = field(default_factory=list, init=False)   # worker pids on this machine

    def __enter__(self) -> RayEngine:
        ray = require_ray()
        self._connect(ray)
        try:
            self._start(ray)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *_exc) -> None:
        ray = require_ray()
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - an actor that is already gone
                pass
        self.actors = []
        _wait_gone(self._local, EXIT_WAIT_S)  # a killed worker may still be writing its last cache entry
        self._local = []
        if self._owns and ray.is_initialized():
            ray.shutdown()
        self._owns = False

    def _connect(self, ray) -> None:
        if ray.is_initialized():
            return
        kwargs: dict[str, Any] = {"log_to_driver": self.worker_logs,  # workers' prints would mix into stdout
                                  "logging_level": logging.INFO if self.worker_logs else logging.ERROR}
        local = self.address is None and not os.environ.get("RAY_ADDRESS")
        if local:
            kwargs["include_dashboard"] = False
        try:
            with _loopback_only(ray) if local else contextlib.nullcontext():
                ray.init(address=self.address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = self.address or os.environ.get("RAY_ADDRESS") or "a new local instance"
            raise SmearError(f"cannot start or reach Ray at {where}: {str(exc).splitlines()[0]}",
                             hint="start a cluster with `ray start --head` and pass --address auto or HOST:PORT") from exc
        self._owns = True

    def _shape(self, ray) -> tuple[int, float, float]:
        """(workers, CPUs each, GPUs each) for the cluster Ray sees."""
        total = ray.cluster_resources()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
        per_gpu = float(self.gpus_per_worker) if self.gpus_per_worker is not None else (1.0 if gpus >= 1 else 0.0)
        if per_gpu < 0 or (per_gpu > 0 and gpus < per_gpu):
            raise SmearError(f"--gpus-per-worker {per_gpu:g}: the Ray cluster has {gpus:g} GPUs",
                             hint="--gpus-per-worker 0 runs the workers on CPUs")
        n = int(self.workers) if self.workers else (int(gpus // per_gpu) if per_gpu else max(1, len(nodes)))
        if n < 1 or n > cpus:
            raise SmearError(f"--workers {n}: the Ray cluster has {cpus:g} CPUs (at least one per worker)")
        node_cpus = max((float(nd.get("Resources", {}).get("CPU", 0)) for nd in nodes), default=cpus)
        return n, max(1.0, min(float(int(cpus // n)), node_cpus)), per_gpu

    def _start(self, ray) -> None:
        n, cpus, gpus = self._shape(ray)
        cache = (str(self.cache.folder.parent), self.cache.stages_version) if self.cache is not None else None
        worker = ray.remote(FieldWorker).options(num_cpus=cpus, num_gpus=gpus, max_restarts=RESTARTS,
                                                 max_task_retries=RESTARTS)
        self.actors = [worker.remote(self.build, cache) for _ in range(n)]
        pending = {a.ready.remote(): a for a in self.actors}
        ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=self.start_timeout_s)
        started, self.pids, self._local = [], [], []
        for ref in ready:
            try:
                pid, node, self.crop_geometry = ray.get(ref)
                self.pids.append(pid)
                if node == ray.get_runtime_context().get_node_id():
                    self._local.append(pid)
            except Exception as exc:  # noqa: BLE001 - a worker whose stages could not be built
                raise _smear_error(exc) or SmearError(f"a Ray worker could not load the models: {_first_line(_cause(exc))}",
                                                      hint="rerun with --verbose for the worker's traceback") from exc
            started.append(pending[ref])
        for ref in late:
            ray.kill(pending[ref])
        if not started:
            raise SmearError(f"no Ray worker started within {self.start_timeout_s:g} s "
                             f"(each asks for {cpus:g} CPUs and {gpus:g} GPUs)",
                             hint="see `ray status`; --workers and --gpus-per-worker ask for less")
        if late:
            self._say(f"{len(late)} of {n} Ray workers did not start within {self.start_timeout_s:g} s; "
                      f"running on {len(started)}")
        self.actors = started

    def _note(self, notes: Sequence[str]) -> None:
        for message in notes:
            if message not in self._noted:
                self._noted.add(message)
                self._say(message)

    def _say(self, message: str) -> None:
        (self.warn or _log.warning)(message)

    def _collect(self, ray, ref, what: str) -> list:
        """A call's results; ``what`` names its slide and items for the errors."""
        try:
            items, notes = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            raise SmearError(f"{what}: the Ray worker running them died {RESTARTS + 1} times",
                             hint="see the worker logs (`ray logs`, or /tmp/ray/session_latest/logs)") from exc
        except ray.exceptions.RayTaskError as exc:
            raise _smear_error(exc) or SmearError(f"{what}: a Ray worker failed: {_first_line(_cause(exc))}",
                                                  hint="rerun with --verbose for the worker's traceback") from exc
        self._note(notes)
        return items

    def _ordered(self, send: Callable[[Any, int, int], Any], what: Callable[[int], str]
                 ) -> Generator[list, None, None]:
        """The results of the calls ``send`` starts, in the order started: ``send(actor, i, given)``
        starts call i on that worker and returns its object ref, or None when no call is to start now
        (``given`` calls are given out; with all of them given out, None means that none is left). At
        most PER_WORKER calls wait on a worker; closing the generator cancels the calls in flight."""
        ray = require_ray()
        if not self.actors:
            raise SmearError("RayEngine runs inside `with RayEngine(...)`")
        flying: dict[Any, tuple[int, int]] = {}   # object ref -> (call, worker)
        load = [0] * len(self.actors)
        done: dict[int, list] = {}
        sent = given = 0
        try:
            while True:
                while min(load) < PER_WORKER:
                    k = load.index(min(load))
                    ref = send(self.actors[k], sent, given)
                    if ref is None:
                        break
                    flying[ref] = (sent, k)
                    load[k] += 1
                    sent += 1
                if given in done:
                    yield done.pop(given)
                    given += 1
                    continue
                if not flying:
                    return
                ready, _ = ray.wait(list(flying), num_returns=1)
                for ref in ready:
                    index, k = flying.pop(ref)
                    load[k] -= 1
                    done[index] = self._collect(ray, ref, what(index))
        finally:
            for ref in flying:
                try:
                    ray.cancel(ref)
                except Exception:  # noqa: BLE001 - finished meanwhile, or not cancellable
                    pass

    def results(self, slides: Sequence[Slide], max_pixels: int, resume: bool) -> Generator[Item, None, None]:
        """One result or SkippedField per field of every slide, in slide and field order (a window of
        2 x PER_WORKER calls a worker sent and not yet given out: it bounds the driver's memory)."""
        todo = chunks(slides, self.field_batch)
        window = 2 * PER_WORKER * len(self.actors)

        def send(actor, i: int, given: int):
            if i >= len(todo) or i - given >= window:
                return None
            return actor.run.remote(todo[i].slide, todo[i].fields, max_pixels, resume)

        def what(i: int) -> str:
            return f"{todo[i].slide}: {todo[i].fields[0].name} .. {todo[i].fields[-1].name}"

        with contextlib.closing(self._ordered(send, what)) as stream:
            for items in stream:
                yield from items

    def tiles(self, job: TileJob, tiles: Sequence[TileScore], resume: bool, target_wbc: int | None = None
              ) -> Generator[TileOutcome, None, None]:
        """One outcome per tile of a whole slide, in the order given, at most ``TILES_PER_CALL`` tiles
        a call; the tiles in flight follow ``wsi_tiles.TileBudget`` towards ``target_wbc`` (at most
        PER_WORKER calls a worker); closing the generator cancels the calls in flight."""
        from smear.pipeline.wsi_tiles import PRIOR_WBC_PER_MM2, TileBudget

        n = len(self.actors)
        budget = TileBudget(target_wbc, self.classified, most=PER_WORKER * n * TILES_PER_CALL,
                            start=n * TILES_PER_CALL, prior_wbc=PRIOR_WBC_PER_MM2 * job.geo.tile_mm2)
        calls: list[tuple[TileScore, ...]] = []
        first = [0]  # the next tile to send

        def send(actor, i: int, _given: int):
            size = min(TILES_PER_CALL, len(tiles) - first[0], budget.window() - (first[0] - budget.taken))
            if size < 1:
                return None
            calls.append(tuple(tiles[first[0]:first[0] + size]))
            first[0] += size
            return actor.run_tiles.remote(job, calls[i], resume)

        def what(i: int) -> str:
            return f"{job.name}: tiles {calls[i][0].name} .. {calls[i][-1].name}"

        with contextlib.closing(self._ordered(send, what)) as stream:
            for items in stream:
                for out in items:
                    budget.took(out)
                    yield out


def _wait_gone(pids: Sequence[int], timeout_s: float) -> None:
    """Waits, at most ``timeout_s``, until these processes of this machine have exited, so that
    nothing they write lands after the engine has closed."""
    deadline = time.monotonic() + timeout_s
    while not all(_exited(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _exited(pid: int) -> bool:
    """Whether a process of this machine is gone (a zombie counts as gone): /proc where there is one,
    else a signal 0."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        if Path("/proc/self").exists():
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _cause(exc: BaseException) -> BaseException:
    """The exception a worker raised, out of Ray's wrapping."""
    return getattr(exc, "cause", None) or exc
