"""Retention rules ([[retention]], off until each is enabled): studies older than a rule's age,
of its modalities, from its callers, while free space is below its share, go to the recycle bin
(pacsd.storage.trash), never straight to deletion; `pacsd retention plan` shows what a rule
would take before it is switched on. Run by housekeeping (one node of several), a bounded
number of studies per round."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from pacsd.config import Retention
from pacsd.index import Index
from pacsd.storage.archive import Archive

log = logging.getLogger(__name__)

PER_ROUND = 200   # studies one rule moves per housekeeping round, at most


def applies(rule: Retention, storage: str) -> bool:
    """Whether the rule's free-space condition holds now (always, without one)."""
    if rule.free_below_percent is None:
        return True
    st = os.statvfs(storage)
    return 100.0 * st.f_bavail / max(st.f_blocks, 1) < rule.free_below_percent


def plan(index: Index, rule: Retention, limit: int = 100_000) -> list[dict[str, Any]]:
    """The studies the rule would take now (its free-space condition aside)."""
    before = time.strftime("%Y-%m-%d %H:%M:%S",
                           time.localtime(time.time() - rule.older_than_days * 86400))
    return index.retention_candidates(before, rule.modalities, rule.calling_aets, limit)


class Retainer:
    """The enabled rules, applied by housekeeping."""

    def __init__(self, archive: Archive, rules: tuple[Retention, ...], storage: str) -> None:
        self.archive, self.storage = archive, storage
        self.rules = tuple(r for r in rules if r.enabled)

    def run(self) -> int:
        """Apply each enabled rule once; the studies moved to the bin."""
        moved = 0
        for rule in self.rules:
            if not applies(rule, self.storage):
                continue
            found = plan(self.archive.index, rule, PER_ROUND)
            if not found:
                continue
            uids = [s["study_instance_uid"] for s in found]
            n = self.archive.delete("STUDY", uids, who=f"retention rule {rule.name}")
            moved += len(uids)
            log.warning("retention rule %s moved %d study(ies), %d instance(s), to the recycle "
                        "bin (received more than %d day(s) ago%s); restorable until the bin is "
                        "emptied", rule.name, len(uids), n, rule.older_than_days,
                        _conditions(rule))
        return moved


def _conditions(rule: Retention) -> str:
    parts = []
    if rule.modalities:
        parts.append("modality " + "/".join(rule.modalities))
    if rule.calling_aets:
        parts.append("from " + "/".join(rule.calling_aets))
    if rule.free_below_percent is not None:
        parts.append(f"free space below {rule.free_below_percent:g}%")
    return "".join(f", {p}" for p in parts)
