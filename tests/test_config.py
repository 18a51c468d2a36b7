"""Configuration: defaults -> TOML -> PACSD_* environment -> command line, validated at load."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacsd import config
from pacsd.errors import EXIT_CONFIG, ConfigError


def load(tmp_path: Path, text: str = "", env: dict | None = None, **overrides):
    f = tmp_path / "pacsd.toml"
    f.write_text(text)
    return config.load(f, env=env or {}, overrides=overrides)


def test_defaults(tmp_path):
    cfg = config.load(None, env={"PACSD_DATA": str(tmp_path / "d")})
    assert (cfg.dicom_aet, cfg.dicom_port, cfg.dicom_bind) == ("PACSD", 11112, "0.0.0.0")
    assert cfg.dicom_max_associations >= 64
    assert cfg.http_bind == "127.0.0.1"
    assert cfg.storage_path == tmp_path / "d" / "storage"
    assert cfg.index_url == f"sqlite:///{tmp_path / 'd' / 'index.sqlite3'}"
    assert cfg.dicom_allowed_calling_aets == () and cfg.nodes == ()


def test_precedence_file_then_env_then_cli(tmp_path):
    text = '[dicom]\naet = "FROMFILE"\nport = 1000\nmax_associations = 10\n'
    cfg = load(tmp_path, text)
    assert (cfg.dicom_aet, cfg.dicom_port, cfg.dicom_max_associations) == ("FROMFILE", 1000, 10)
    cfg = load(tmp_path, text, env={"PACSD_DICOM_PORT": "2000", "PACSD_DICOM_AET": "FROMENV"})
    assert (cfg.dicom_aet, cfg.dicom_port) == ("FROMENV", 2000)
    cfg = load(tmp_path, text, env={"PACSD_DICOM_PORT": "2000"}, **{"dicom.port": 3000})
    assert (cfg.dicom_port, cfg.dicom_max_associations) == (3000, 10)


def test_storage_path_and_nodes(tmp_path):
    cfg = load(tmp_path, f'''
[server]
data = "{tmp_path / 'data'}"
[storage]
path = "{tmp_path / 'nas'}"
[dicom]
allowed_calling_aets = ["CT1", "MR1"]
[[nodes]]
name = "osirix"
aet = "OSIRIX"
host = "10.0.0.5"
port = 11112
[[nodes]]
aet = "WEASIS"
host = "ws1"
port = 104
''')
    assert cfg.storage_path == tmp_path / "nas"
    assert cfg.index_path == tmp_path / "data" / "index.sqlite3"
    assert cfg.dicom_allowed_calling_aets == ("CT1", "MR1")
    assert cfg.node_by_aet("OSIRIX") == config.Node("osirix", "OSIRIX", "10.0.0.5", 11112)
    assert cfg.node_by_aet("WEASIS").name == "WEASIS"
    assert cfg.node_by_aet("NOBODY") is None


def test_a_node_s_wado_url(tmp_path):
    cfg = load(tmp_path, '''
[[nodes]]
aet = "OSIRIX"
host = "PACS.example.org"
port = 11112
wado_url = "https://pacs.example.org:8443/wado"
''')
    assert cfg.node_by_aet("OSIRIX").wado_url == "https://pacs.example.org:8443/wado"


@pytest.mark.parametrize("text,env,fragment", [
    ("[dicom]\nport = 70000\n", {}, "[dicom] port"),
    ("[dicom]\nport = \"x\"\n", {}, "[dicom] port"),
    ("[dicom]\naet = \"ABCDEFGHIJKLMNOPQ\"\n", {}, "AE title"),
    ("[dicom]\naet = \"A\\\\B\"\n", {}, "AE title"),
    ("[dicom]\nbind = \"not-an-ip\"\n", {}, "[dicom] bind"),
    ("[dicom]\nmax_associations = 0\n", {}, "max_associations"),
    ("[dicom]\nportt = 1\n", {}, "unknown setting [dicom] portt"),
    ("[dicom\n", {}, "not valid TOML"),
    ("", {"PACSD_DICOM_PORT": "abc"}, "$PACSD_DICOM_PORT"),
    ("", {"PACSD_STORAGE_OVERWRITE": "maybe"}, "overwrite"),
    ("[index]\nurl = \"mysql://x\"\n", {}, "[index] url"),
    ("[[nodes]]\naet = \"X\"\nhost = \"h\"\n", {}, "missing 'port'"),
    ("[[nodes]]\naet = \"X\"\nhost = \"h\"\nport = 1\n[[nodes]]\naet = \"X\"\nhost = \"g\"\nport = 2\n",
     {}, "appears twice"),
    # A node's WADO server is on the node itself: no caller makes pacsd fetch from elsewhere.
    ("[[nodes]]\naet = \"X\"\nhost = \"h\"\nport = 1\nwado_url = \"http://evil:80/wado\"\n",
     {}, "wado_url's host 'evil' is not the node's host 'h'"),
    ("[[nodes]]\naet = \"X\"\nhost = \"h\"\nport = 1\nwado_url = \"http://h.evil/wado\"\n",
     {}, "is not the node's host"),
    ("[[nodes]]\naet = \"X\"\nhost = \"h\"\nport = 1\nwado_url = \"ftp://h/wado\"\n",
     {}, "wado_url must be http"),
    ("[[nodes]]\naet = \"X\"\nhost = \"h\"\nport = 1\nwado_url = \"http://u:p@h/wado\"\n",
     {}, "credentials"),
])
def test_bad_values_are_refused_with_one_clear_line(tmp_path, text, env, fragment):
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text, env=env)
    message = str(e.value)
    assert fragment in message and "\n" not in message
    assert e.value.exit_code == EXIT_CONFIG == 78


def test_every_setting_is_documented_in_the_manual():
    # The manual's settings reference (docs/hooks/generate.py builds it from describe()).
    from test_docs import manual_generator
    reference = manual_generator().settings_page()
    for s in config.SETTINGS:
        assert f"`[{s.section}] {s.key}`" in reference, s
        assert s.env in reference, s.env
