"""One typed, frozen Config: defaults -> TOML file -> PACSD_* environment -> command line.

Every setting is declared once, as a field of its section's dataclass (sections.py: help,
validator, flag as metadata); the TOML and environment readers, the flat view (`cfg.dicom_port`),
`pacsd serve`'s flags, `pacsd config --list` and the settings reference come from there.
A bad value raises ConfigError with one line that names the setting and where it came from.

  sections.py    the settings: ServerSettings, DicomSettings, ... (one per TOML section)
  validators.py  checks of single values (AE titles, ports, addresses, ranges)
  tables.py      [[nodes]], [[routes]], [[users]], [[retention]],
                 [[compression]]
  loader.py      Config, load(), check() (every problem), folder_problems(), describe()
"""

from pacsd.config.loader import (
    CONFIG_FILE_NAME,
    FLAT,
    Config,
    check,
    describe,
    folder_problems,
    load,
    read_toml,
)
from pacsd.config.sections import (
    AuditSettings,
    DEFAULT_DATA,
    SECTIONS,
    SETTINGS,
    DicomSettings,
    HooksSettings,
    HttpSettings,
    IndexSettings,
    LogSettings,
    RoutingSettings,
    ServerSettings,
    Setting,
    StorageSettings,
    WatchdogSettings,
    WorklistSettings,
    Hl7Settings,
)
from pacsd.config.tables import (NODE_RIGHTS, Compression, Group, LabelRule, Node, Retention,
                                 Route, User, node_from, valid_label)
from pacsd.config.validators import valid_aet
from pacsd.errors import ConfigError

__all__ = [
    "AuditSettings", "WorklistSettings", "Hl7Settings",
    "CONFIG_FILE_NAME", "DEFAULT_DATA", "FLAT", "NODE_RIGHTS", "SECTIONS", "SETTINGS", "Config",
    "ConfigError", "DicomSettings", "HooksSettings", "HttpSettings", "IndexSettings",
    "LogSettings", "Compression", "Group", "LabelRule", "Node", "Retention", "Route", "RoutingSettings", "ServerSettings", "Setting",
    "StorageSettings", "User", "WatchdogSettings", "check", "describe", "folder_problems", "load",
    "node_from", "read_toml", "valid_aet", "valid_label",
]
