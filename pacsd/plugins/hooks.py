"""Hooks: Python plugins that pacsd calls at fixed points, isolated from the server.

A plugin is a module: named in `[hooks] plugins` (a module name or a .py file), or installed
as a package with an entry point in the group `pacsd.plugins`. Its name is its `NAME`, else
the last part of its module name or file stem; its settings are the `[plugin.NAME]` table.
A plugin defines any of these functions (all optional; each payload's keys are a TypedDict
of pacsd.plugins.specs, from which the manual's hooks reference is generated):

    setup(settings: dict, context: Context) -> None        once, at start-up
    on_instance_stored(event: InstanceStored) -> None       notification, after the commit
    on_study_stable(event: StudyStable) -> None             notification: no new instance for
                                                            [hooks] study_stable_after seconds
    on_association(event: Association) -> None | bool | str filter: False or a reason refuses
    on_store(dataset: Dataset, event: StoreRequest) -> None | bool | str | Dataset
                                                            filter: refuse, or a changed data set
    on_query(event: Query) -> None | bool | str | Query     filter: refuse, or the keys to match
    routes(app: bottle.Bottle) -> None                      HTTP routes under /plugins/NAME/

Isolation. A plugin that fails to load is logged and left out; the server starts. Every call is
caught and logged. Notifications run on a small pool of their own threads, never on the
association's or the HTTP request's; one that takes longer than `[hooks] timeout` is logged,
and when the pool is backed up new notifications are dropped with a warning. Filters run on
another pool and are waited for at most `[hooks] timeout`: a filter that fails or is late is
overruled, which means *accept as it is*, and while STUCK_LIMIT late calls of a plugin have not
returned, that plugin is overruled without being asked. A hook can refuse an image, never lose one:
refusals are answered to the sender, who still has the image. A filter should return a changed
data set rather than change the one it is given: changes made in place before a failure are
not undone.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, overload

from pacsd.config import Config
from pacsd.plugins.specs import Association, InstanceStored, Query, StoreRequest, StudyStable

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

NOTIFICATIONS = ("on_instance_stored", "on_study_stable")
FILTERS = ("on_association", "on_store", "on_query")
ENTRY_POINT_GROUP = "pacsd.plugins"
BACKLOG = 1000   # notifications waiting at most; beyond it new ones are dropped
STUCK_LIMIT = 2  # a plugin with this many filter calls late and not returned is not asked


@dataclass(frozen=True)
class Context:
    """What `setup` gets besides its settings: this server's identity and where it keeps its
    files (a plugin may keep its own state in `data / "plugins" / NAME`)."""

    aet: str
    data: Path


@dataclass
class Plugin:
    name: str
    module: ModuleType
    calls: int = 0
    failures: int = 0
    late: int = 0
    stuck: int = 0   # filter calls past their time that have not returned yet
    last_error: str = ""

    def hook(self, name: str) -> Callable[..., Any] | None:
        fn = getattr(self.module, name, None)
        return fn if callable(fn) else None


@dataclass
class Verdict:
    """A filter's answer: `refused` with a reason, or accepted (maybe with a new value)."""

    refused: bool = False
    reason: str = ""
    value: Any = None
    by: list[str] = field(default_factory=list)


def _load(spec: str) -> ModuleType:
    if spec.endswith(".py"):
        path = Path(spec).expanduser()
        mspec = importlib.util.spec_from_file_location(f"pacsd_plugin_{path.stem}", path)
        if mspec is None or mspec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
        return module
    return importlib.import_module(spec)


def _name(module: ModuleType, spec: str) -> str:
    name = getattr(module, "NAME", None)
    if isinstance(name, str) and name:
        return name
    return Path(spec).stem if spec.endswith(".py") else spec.rsplit(".", 1)[-1]


class Hooks:
    def __init__(self, cfg: Config, context: Context | None = None,
                 extra: Iterable[str] = ()) -> None:
        self.cfg = cfg
        self.timeout = cfg.hooks_timeout
        self.plugins: list[Plugin] = []
        self._notify_pool = ThreadPoolExecutor(4, thread_name_prefix="hook-notify")
        self._filter_pool = ThreadPoolExecutor(8, thread_name_prefix="hook-filter")
        self._pending = 0
        self._lock = threading.Lock()
        self._dropped = 0
        context = context or Context(cfg.dicom_aet, cfg.data)
        specs: list[tuple[str, Any]] = [(s, None) for s in (*cfg.hooks_plugins, *extra)]
        try:
            specs += [(ep.value, ep) for ep in entry_points(group=ENTRY_POINT_GROUP)]
        except Exception as e:  # noqa: BLE001 - a broken package must not stop the server
            log.warning("plugins: cannot list installed entry points: %s", e)
        for spec, ep in specs:
            try:
                module = ep.load() if ep is not None else _load(spec)
                if not isinstance(module, ModuleType):   # an entry point naming an object
                    module = importlib.import_module(module.__module__)
                plugin = Plugin(_name(module, spec), module)
                if any(p.name == plugin.name for p in self.plugins):
                    log.warning("plugin %s (%s) is loaded already; left out", plugin.name, spec)
                    continue
                setup = plugin.hook("setup")
                if setup is not None:
                    setup(dict(cfg.plugin_settings.get(plugin.name, {})), context)
            except Exception as e:  # noqa: BLE001 - logged; the server runs without it
                log.error("plugin %s not loaded: %s: %s", spec, type(e).__name__, e)
                continue
            self.plugins.append(plugin)
            log.info("plugin %s loaded from %s (%s)", plugin.name, spec, ", ".join(
                h for h in (*NOTIFICATIONS, *FILTERS, "routes") if plugin.hook(h)) or "no hooks")

    def __bool__(self) -> bool:
        return bool(self.plugins)

    def has(self, hook: str) -> bool:
        return any(p.hook(hook) for p in self.plugins)

    def close(self) -> None:
        self._notify_pool.shutdown(wait=False, cancel_futures=True)
        self._filter_pool.shutdown(wait=False, cancel_futures=True)

    # --- notifications ----------------------------------------------------------------------

    # The payload each hook is given (pacsd.plugins.specs); the last form takes any hook, for
    # callers that build their payload as a plain dict.
    @overload
    def notify(self, hook: Literal["on_instance_stored"], event: InstanceStored) -> None: ...
    @overload
    def notify(self, hook: Literal["on_study_stable"], event: StudyStable) -> None: ...
    @overload
    def notify(self, hook: str, event: Mapping[str, Any]) -> None: ...

    def notify(self, hook: str, event: Mapping[str, Any]) -> None:
        """Call `hook(event)` of every plugin that has it, on the notification pool; returns at
        once."""
        for plugin in self.plugins:
            fn = plugin.hook(hook)
            if fn is None:
                continue
            with self._lock:
                if self._pending >= BACKLOG:
                    self._dropped += 1
                    if self._dropped == 1 or self._dropped % 1000 == 0:
                        log.warning("plugin %s: %d notification(s) dropped: the hooks are too "
                                    "slow or stuck", plugin.name, self._dropped)
                    continue
                self._pending += 1
            try:
                self._notify_pool.submit(self._run_notification, plugin, hook, fn, event)
            except RuntimeError:   # shutting down
                with self._lock:
                    self._pending -= 1

    def _run_notification(self, plugin: Plugin, hook: str, fn: Callable[..., Any],
                          event: Mapping[str, Any]) -> None:
        began = time.monotonic()
        try:
            plugin.calls += 1
            fn(dict(event))
        except Exception as e:  # noqa: BLE001 - a plugin's failure is its own
            self._failed(plugin, hook, e)
        finally:
            took = time.monotonic() - began
            if took > self.timeout:
                plugin.late += 1
                log.warning("plugin %s: %s took %.1f s (more than [hooks] timeout = %g s)",
                            plugin.name, hook, took, self.timeout)
            with self._lock:
                self._pending -= 1

    def _failed(self, plugin: Plugin, hook: str, e: BaseException) -> None:
        plugin.failures += 1
        plugin.last_error = f"{hook}: {type(e).__name__}: {e}"
        log.warning("plugin %s: %s failed: %s: %s", plugin.name, hook, type(e).__name__, e)

    # --- filters ----------------------------------------------------------------------------

    @overload
    def decide(self, hook: Literal["on_association"], event: Association, /) -> Verdict: ...
    @overload
    def decide(self, hook: Literal["on_store"], dataset: Dataset, event: StoreRequest, /
               ) -> Verdict: ...
    @overload
    def decide(self, hook: Literal["on_query"], event: Query, /) -> Verdict: ...
    @overload
    def decide(self, hook: str, *args: Any) -> Verdict: ...

    def decide(self, hook: str, *args: Any) -> Verdict:
        """Ask every plugin with `hook`, in order. The first refusal (False or a reason) wins;
        a returned value (a data set, query keys) replaces the first argument for the next
        plugin and is the verdict's value. A plugin that fails or answers after `timeout`
        seconds is overruled: it is as if it had accepted."""
        verdict = Verdict()
        current = list(args)
        for plugin in self.plugins:
            fn = plugin.hook(hook)
            if fn is None:
                continue
            if plugin.stuck >= STUCK_LIMIT:
                # Hung in calls that ran out of time: overrule at once instead of queueing
                # more work (and data sets) behind them, until one of them returns.
                plugin.late += 1
                if plugin.late % 100 == 1:
                    log.warning("plugin %s: %s is still stuck in an earlier call: overruled "
                                "(accepted) without asking", plugin.name, hook)
                continue
            plugin.calls += 1
            call = {"late": False, "finished": False}

            def run(fn: Callable[..., Any] = fn, plugin: Plugin = plugin,
                    call: dict[str, bool] = call, args: tuple = tuple(current)) -> Any:
                try:
                    return fn(*args)
                finally:
                    with self._lock:
                        call["finished"] = True
                        if call["late"]:
                            plugin.stuck -= 1
            try:
                future: Future = self._filter_pool.submit(run)
                answer = future.result(timeout=self.timeout)
            except FutureTimeout:
                with self._lock:
                    if not call["finished"]:
                        call["late"] = True
                        plugin.stuck += 1
                plugin.late += 1
                log.warning("plugin %s: %s did not answer within %g s: overruled (accepted)",
                            plugin.name, hook, self.timeout)
                continue
            except Exception as e:  # noqa: BLE001 - overruled: accept
                self._failed(plugin, hook, e)
                continue
            if answer is None or answer is True:
                continue
            if answer is False or isinstance(answer, str):
                reason = answer if isinstance(answer, str) else "refused"
                log.info("plugin %s: %s refused: %s", plugin.name, hook, reason)
                return Verdict(True, reason, None, [plugin.name])
            current[0] = answer
            verdict.value = answer
            verdict.by.append(plugin.name)
        return verdict

    # --- status -----------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        return [{"name": p.name, "module": p.module.__name__, "calls": p.calls,
                 "failures": p.failures, "late": p.late, "last_error": p.last_error}
                for p in self.plugins]
