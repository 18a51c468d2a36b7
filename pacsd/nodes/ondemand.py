"""PACS On-Demand, its search: a search falls through to the upstream nodes.

An upstream is a [[nodes]] table with `on_demand = true` (config file only). Every search
front end (C-FIND, QIDO-RS, the study list) asks `start()` before it reads the index: the
upstreams are C-FINDed at once, in parallel, each on a thread of its own (we are the SCU,
PS3.4 C.4.1), while the local matches are read; `Search.results()` then waits for them within
[dicom] on_demand_budget and merges: local matches first, then each upstream's, in
on_demand_order, leaving out those whose unique key (C.2.2.1.1: PatientID at PATIENT level,
the level's UID below it) was already seen. An upstream that is down or slower than the
budget is left out of that answer, its association aborted, and logged once until it answers
again: never an error to the caller.

Nothing happens without an upstream (`start` returns None), nor for a caller restricted by
[[groups]] (an upstream's studies carry no labels here: nothing says such a caller may see
them), nor for a C-FIND from an upstream itself (two archives falling through to each other
would ask each other for ever).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from pydicom.dataset import Dataset
from pynetdicom import build_context
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # names made at import
    PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind)

from pacsd import query
from pacsd.config import Config, Node
from pacsd.dicom_status import PENDING, PENDING_OPTIONAL_KEYS, SUCCESS
from pacsd.nodes import remote

log = logging.getLogger(__name__)

# What a response identifier carries that is the upstream's, not the match's.
_NOT_VALUES = {"QueryRetrieveLevel", "RetrieveAETitle", "SpecificCharacterSet",
               "InstanceAvailability", "RetrieveURL"}


def upstreams(cfg: Config) -> list[Node]:
    """The upstream nodes, in order of preference (on_demand_order, then as listed)."""
    found = [n for n in cfg.nodes if n.on_demand]
    return sorted(found, key=lambda n: n.on_demand_order)


@dataclass
class Found:
    """One upstream match: the node that has it and its values (keyword -> text)."""

    node: Node
    values: dict[str, str]


@dataclass
class _Ask:
    """One upstream's C-FIND of one search, as its thread fills it in."""

    node: Node
    matches: list[dict[str, str]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)   # answered or failed
    error: str = ""
    assoc: Association | None = None
    late: bool = False   # the search answered without it: abort, keep nothing
    lock: threading.Lock = field(default_factory=threading.Lock)


# Upstreams known to be down or slow, by (host, port, AE title): logged once until they answer.
_down: dict[tuple[str, int, str], str] = {}
_down_lock = threading.Lock()


def _note(node: Node, failure: str) -> None:
    key = (node.host, node.port, node.aet)
    with _down_lock:
        was = _down.get(key)
        if failure:
            _down[key] = failure
        else:
            _down.pop(key, None)
    if failure and was is None:
        log.warning("on-demand: upstream %s (%s@%s:%d) left out of searches: %s; said once, "
                    "until it answers again", node.name, node.aet, node.host, node.port,
                    failure)
    elif not failure and was is not None:
        log.info("on-demand: upstream %s (%s@%s:%d) answers searches again", node.name,
                 node.aet, node.host, node.port)


class Search:
    """The upstreams' C-FINDs of one search, running; `results()` waits for them."""

    def __init__(self, cfg: Config, nodes: list[Node], level: str, keys: dict[str, str]
                 ) -> None:
        self.cfg = cfg
        self.level = level
        self.key = query.UNIQUE_KEYS[level]
        self.budget = cfg.dicom_on_demand_budget
        self.deadline = time.monotonic() + self.budget
        wanted = {k: v for k, v in keys.items() if k not in _NOT_VALUES}
        wanted.setdefault(self.key, "")   # to tell matches apart
        self.identifier: Dataset | None
        try:
            self.identifier = remote.query_identifier(level, wanted)
            if not all(v.isascii() for v in wanted.values()):
                self.identifier.SpecificCharacterSet = "ISO_IR 192"   # PS3.5 6.1.2.5.3
        except (ValueError, TypeError) as e:   # a value pydicom will not set: not asked
            log.debug("on-demand: keys not sent upstream: %s", e)
            self.identifier = None
        self.asks = [_Ask(n) for n in nodes]
        if self.identifier is not None:
            for ask in self.asks:
                threading.Thread(target=self._ask, args=(ask,), daemon=True,
                                 name=f"on-demand find {ask.node.name}").start()

    def _ask(self, ask: _Ask) -> None:
        node = ask.node
        model = (PatientRootQueryRetrieveInformationModelFind if self.level == "PATIENT"
                 else StudyRootQueryRetrieveInformationModelFind)
        ae = remote.scu_ae(self.cfg)
        bound = self.budget + 0.5   # the thread outlives the answer by this, at most
        for name in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            setattr(ae, name, min(getattr(ae, name), bound))
        try:
            assoc = remote.open_association(ae, node, [build_context(model)])
        except remote.RemoteError as e:
            ask.error = str(e)
            ask.done.set()
            return
        except Exception as e:   # noqa: BLE001 - a failed upstream is reported, never raised
            ask.error = f"association failed: {e}"
            ask.done.set()
            return
        with ask.lock:
            ask.assoc = assoc
            late = ask.late
        if late:
            assoc.abort()
            ae.shutdown()
            return
        final = None
        # A copy each: pydicom's encoding is not meant to be shared between threads.
        asked = copy.deepcopy(self.identifier) or Dataset()   # (never None: see __init__)
        try:
            for status, identifier in assoc.send_c_find(asked, model):
                if not status:   # no answer within the timeout, or aborted
                    break
                final = int(status.Status)
                if final in (PENDING, PENDING_OPTIONAL_KEYS) and identifier is not None:
                    if len(ask.matches) < remote.MAX_MATCHES:
                        ask.matches.append(
                            {k: v for k, v in remote.values_of(identifier).items()
                             if k not in _NOT_VALUES})
                if ask.late:
                    break
            if final != SUCCESS:
                ask.error = f"C-FIND answered status {'none' if final is None else hex(final)}"
        except Exception as e:   # noqa: BLE001
            ask.error = f"C-FIND failed: {e}"
        finally:
            ask.done.set()   # before the release: the search need not wait for it
            try:
                if assoc.is_established and not ask.late:
                    assoc.release()
                elif assoc.is_established:
                    assoc.abort()
            finally:
                ae.shutdown()

    def results(self, local: Iterable[str]) -> list[Found]:
        """The upstreams' matches whose unique key is not among `local` (the local matches'),
        nor already given by an upstream earlier in order; waits until the budget is spent
        at most. Each upstream that failed or was late is noted (logged once)."""
        for ask in self.asks:
            ask.done.wait(max(0.0, self.deadline - time.monotonic()))
        seen = set(local)
        out: list[Found] = []
        for ask in self.asks:
            if self.identifier is None:
                break
            assoc = None
            with ask.lock:
                finished = ask.done.is_set()
                if not finished:
                    ask.late = True
                    assoc = ask.assoc
            if not finished:
                if assoc is not None:
                    assoc.abort(block=False)
                _note(ask.node, f"no complete answer within the {self.budget:g} s budget "
                                "([dicom] on_demand_budget)")
                continue
            _note(ask.node, ask.error)
            if ask.error:
                continue
            for values in ask.matches:
                uid = values.get(self.key) or ""
                if uid and uid not in seen:
                    seen.add(uid)
                    out.append(Found(ask.node, values))
        return out


def start(cfg: Config, level: str, keys: dict[str, str], scope: Any = None,
          caller_aet: str = "") -> Search | None:
    """The upstreams' C-FINDs of a search at `level` ("PATIENT" ... "IMAGE") with `keys`
    (keyword -> matching value, "" to return it), started; None when there is nothing to ask:
    no upstream, a restricted caller (`scope` not None), or a C-FIND from an upstream."""
    nodes = upstreams(cfg)
    if not nodes or scope is not None:
        return None
    if caller_aet and any(n.aet == caller_aet for n in nodes):
        return None
    return Search(cfg, nodes, level, keys)
