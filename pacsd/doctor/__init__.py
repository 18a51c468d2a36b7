"""`pacsd doctor`: check, node by node, everything that must hold for images to flow.

  checks.py   what is probed: our own listener (OwnListener), DNS, TCP, C-ECHO, the way back
              (C-MOVE to us), what the node accepts
  report.py   how it is said: findings OK / WARN / FAIL, lines on a terminal, one JSON document
"""

from pacsd.doctor.checks import (
    IMAGE_CLASSES,
    OTHER_CLASSES,
    STORAGE_CLASSES,
    SYNTAXES,
    TIMEOUT,
    OwnListener,
    capability_findings,
    check_all,
    check_dns,
    check_echo,
    check_move,
    check_node,
    check_tcp,
    own_listener,
    probe,
    proposals,
    return_path,
)
from pacsd.doctor.report import (
    FAIL,
    OK,
    WARN,
    Finding,
    NodeReport,
    as_json,
    render,
    render_listener,
)

__all__ = [
    "FAIL", "IMAGE_CLASSES", "OK", "OTHER_CLASSES", "STORAGE_CLASSES", "SYNTAXES", "TIMEOUT",
    "WARN", "Finding", "NodeReport", "OwnListener", "as_json", "capability_findings", "check_all",
    "check_dns", "check_echo", "check_move", "check_node", "check_tcp", "own_listener", "probe",
    "proposals", "render", "render_listener", "return_path",
]
