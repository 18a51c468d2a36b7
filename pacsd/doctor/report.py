"""How `pacsd doctor` says what it found: the findings (OK / WARN / FAIL, each worded for the
person who has to act on it), as lines on a terminal or as one JSON document."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pacsd.config import Node

if TYPE_CHECKING:
    from pacsd.doctor.checks import OwnListener

OK, WARN, FAIL = "OK", "WARN", "FAIL"


@dataclass
class Finding:
    check: str
    level: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.check, "level": self.level, "message": self.message, **self.data}


@dataclass
class NodeReport:
    node: Node
    source: str
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return any(f.level == FAIL for f in self.findings)

    def as_dict(self) -> dict[str, Any]:
        n = self.node
        return {"name": n.name, "aet": n.aet, "host": n.host, "port": n.port,
                "source": self.source, "ok": not self.failed, "seconds": round(self.seconds, 2),
                "checks": [f.as_dict() for f in self.findings]}


def render_listener(me: OwnListener) -> str:
    assert me.finding is not None
    return f"pacsd here ({me.aet})\n  {me.finding.level:<5} {'listener':<10} {me.finding.message}"


def render(report: NodeReport) -> str:
    n = report.node
    lines = [f"node {n.name!r} ({report.source}): {n.aet} at {n.host}:{n.port}"]
    lines += [f"  {f.level:<5} {f.check:<10} {f.message}" for f in report.findings]
    return "\n".join(lines)


def as_json(aet: str, me: OwnListener, notes: list[str], reports: list[NodeReport]
            ) -> dict[str, Any]:
    """The whole run as `pacsd doctor --json` prints it."""
    failed = any(r.failed for r in reports) or (me.finding is not None
                                                 and me.finding.level == FAIL)
    return {"ok": not failed, "aet": aet,
            "listener": me.finding.as_dict() if me.finding else None,
            "notes": notes, "nodes": [r.as_dict() for r in reports]}
