"""Rules, table-driven and in-process: which instances a routing rule takes (pacsd.nodes.routing), what
the web guard believes of a request (pacsd.web.guard), and what the config accepts
(pacsd.config's validators, through `load` as a site writes them)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from pydicom.multival import MultiValue

from pacsd import config
from pacsd.config import ConfigError, Route
from pacsd.nodes.routing import matches
from pacsd.web import guard


def load(tmp_path: Path, toml: str, env: dict[str, str] | None = None) -> config.Config:
    f = tmp_path / "pacsd.toml"
    f.write_text(f'[server]\ndata = "{tmp_path / "data"}"\n' + toml)
    return config.load(f, env=env or {})


# --- routing rules ----------------------------------------------------------------------------

CT_HEAD = Route("ct-head", "ARCHIVE", match=(("Modality", ("CT",)),
                                             ("StudyDescription", ("*HEAD*",))))


@pytest.mark.parametrize("route,values,callers,taken", [
    # no condition: everything, from anyone
    (Route("all", "X"), {}, [], True),
    (Route("all", "X"), {"Modality": "MR"}, ["ANY"], True),
    # callers: any of them; AE titles compared without their padding
    (Route("r", "X", calling_aets=("CT1",)), {}, ["CT1"], True),
    (Route("r", "X", calling_aets=("CT1",)), {}, ["CT1 "], True),
    (Route("r", "X", calling_aets=("CT1",)), {}, ["MR1"], False),
    (Route("r", "X", calling_aets=("CT1",)), {}, [], False),
    (Route("r", "X", calling_aets=("CT1", "CT2")), {}, ["MR1", "CT2"], True),
    # a value: exact and case-sensitive (CS, LO), padding ignored
    (Route("r", "X", match=(("Modality", ("CT",)),)), {"Modality": "CT"}, [], True),
    (Route("r", "X", match=(("Modality", ("CT",)),)), {"Modality": "CT "}, [], True),
    (Route("r", "X", match=(("Modality", ("CT",)),)), {"Modality": "MR"}, [], False),
    (Route("r", "X", match=(("Modality", ("CT",)),)), {"Modality": "ct"}, [], False),
    (Route("r", "X", match=(("Modality", ("CT",)),)), {"Modality": "CTA"}, [], False),
    (Route("r", "X", match=(("Modality", ("CT",)),)), {}, [], False),          # absent
    (Route("r", "X", match=(("Modality", ("CT",)),)), {"Modality": None}, [], False),
    # a list: any of its patterns
    (Route("r", "X", match=(("Modality", ("CT", "MR")),)), {"Modality": "MR"}, [], True),
    (Route("r", "X", match=(("Modality", ("CT", "MR")),)), {"Modality": "US"}, [], False),
    # DICOM wildcards: * any run (also none), ? exactly one character
    (Route("r", "X", match=(("Modality", ("C?",)),)), {"Modality": "CT"}, [], True),
    (Route("r", "X", match=(("Modality", ("C?",)),)), {"Modality": "C"}, [], False),
    (Route("r", "X", match=(("Modality", ("C?",)),)), {"Modality": "CTA"}, [], False),
    (Route("r", "X", match=(("StationName", ("CT*",)),)), {"StationName": "CT"}, [], True),
    (Route("r", "X", match=(("StationName", ("*",)),)), {}, [], True),   # universal
    # nothing else is special: '[' is a character like any other (PS3.4 C.2.2.2.4)
    (Route("r", "X", match=(("StationName", ("CT[1]",)),)), {"StationName": "CT[1]"}, [],
     True),
    (Route("r", "X", match=(("StationName", ("CT[12]",)),)), {"StationName": "CT1"}, [],
     False),
    # a value of several values (ImageType; a study's modalities when stable): any of them
    (Route("r", "X", match=(("ImageType", ("AXIAL",)),)),
     {"ImageType": MultiValue(str, ["ORIGINAL", "PRIMARY", "AXIAL"])}, [], True),
    (Route("r", "X", match=(("ImageType", ("LOCALIZER",)),)),
     {"ImageType": MultiValue(str, ["ORIGINAL", "PRIMARY", "AXIAL"])}, [], False),
    (Route("r", "X", match=(("Modality", ("MR",)),)), {"Modality": ["CT", "MR"]}, [], True),
    (Route("r", "X", match=(("Modality", ("MR",)),)), {"Modality": []}, [], False),
    # numbers are matched as they are written
    (Route("r", "X", match=(("SeriesNumber", ("3",)),)), {"SeriesNumber": 3}, [], True),
    (Route("r", "X", match=(("SeriesNumber", ("3*",)),)), {"SeriesNumber": 31}, [], True),
    # every key must match, and the caller too
    (CT_HEAD, {"Modality": "CT", "StudyDescription": "CT HEAD W/O"}, [], True),
    (CT_HEAD, {"Modality": "CT", "StudyDescription": "CHEST"}, [], False),
    (CT_HEAD, {"Modality": "MR", "StudyDescription": "HEAD"}, [], False),
    (Route("r", "X", calling_aets=("CT1",), match=(("Modality", ("CT",)),)),
     {"Modality": "CT"}, ["MR1"], False),
])
def test_what_a_rule_takes(route, values, callers, taken):
    assert matches(route, values, callers) is taken


@pytest.mark.parametrize("key,keyword", [
    ("Modality", "Modality"),
    ("00080060", "Modality"),
    ("0008,0060", "Modality"),
    ("(0008,1030)", "StudyDescription"),
    ("00091001", "00091001"),   # a private tag has no keyword: kept as the tag
])
def test_rules_name_attributes_by_keyword_or_tag(tmp_path, key, keyword):
    cfg = load(tmp_path, f'[[routes]]\nname = "r"\nto = "X"\nmatch = {{ "{key}" = "CT" }}\n')
    assert cfg.routes[0].match == ((keyword, ("CT",)),)


@pytest.mark.parametrize("table,expected", [
    ('name = "r"\nto = "X"\n', Route("r", "X")),
    ('name = "r"\nto = "X"\nwhen = "stored"\ncalling_aet = " CT1 "\n',
     Route("r", "X", when="stored", calling_aets=("CT1",))),
    ('name = "r"\nto = "X"\ncalling_aet = ["CT1", "CT2"]\nmatch = { Modality = ["CT", "MR"], '
     'SeriesNumber = 3 }\n',
     Route("r", "X", calling_aets=("CT1", "CT2"),
           match=(("Modality", ("CT", "MR")), ("SeriesNumber", ("3",))))),
])
def test_a_rule_as_written(tmp_path, table, expected):
    assert load(tmp_path, "[[routes]]\n" + table).routes == (expected,)


@pytest.mark.parametrize("table,fragment", [
    ('to = "X"\n', "name and to"),
    ('name = "r"\n', "name and to"),
    ('name = "r"\nto = "X"\nwhen = "sometimes"\n', "when must be"),
    ('name = "r"\nto = "X"\nmatch = { Modaliti = "CT" }\n', "neither a DICOM keyword nor a tag"),
    ('name = "r"\nto = "X"\nmatch = { Modality = [] }\n', "a value or a list"),
    ('name = "r"\nto = "X"\nmatch = "CT"\n', "match must be a table"),
    ('name = "r"\nto = "X"\ncalling_aet = 3\n', "calling_aet must be"),
    ('name = "r"\nto = "X"\ncalling_aet = "A\\\\B"\n', "AE title"),
    ('name = "r"\nto = "X"\nfrom = "CT1"\n', "unknown key(s) from"),
    ('name = "r"\nto = "X"\n[[routes]]\nname = "r"\nto = "Y"\n', "appears twice"),
])
def test_bad_rules_are_refused(tmp_path, table, fragment):
    with pytest.raises(ConfigError) as e:
        load(tmp_path, "[[routes]]\n" + table)
    assert fragment in str(e.value)


# --- the web guard ----------------------------------------------------------------------------

@pytest.mark.parametrize("header,parsed", [
    ("pacs.example.org", ("pacs.example.org", None)),
    ("PACS.Example.ORG:8042", ("pacs.example.org", 8042)),     # host names are case-insensitive
    ("pacs.example.org.", ("pacs.example.org", None)),         # the root's dot
    (" pacs:8042 ", ("pacs", 8042)),
    ("127.0.0.1:8042", ("127.0.0.1", 8042)),
    ("[::1]:8042", ("::1", 8042)),
    ("[::1]", ("::1", None)),
    ("pacs:", ("pacs", None)),                  # RFC 3986: an empty port is no port
    ("", None),
    (":8042", None),
    ("::1", None),                              # an IPv6 address must be in brackets
    ("pacs:http", None),
    ("pacs:70000", None),
    ("user@pacs", None),
    ("pacs/admin", None),
    ("pacs?x=1", None),
])
def test_host_headers(header, parsed):
    assert guard._host_port(header) == parsed


@pytest.mark.parametrize("value,parsed", [
    ("https://pacs.example.org", ("https", "pacs.example.org", 443)),
    ("http://pacs.example.org", ("http", "pacs.example.org", 80)),
    ("HTTP://PACS:8042", ("http", "pacs", 8042)),
    ("http://pacs:8042/app/study?uid=1.2", ("http", "pacs", 8042)),   # a Referer
    ("http://[::1]:8042", ("http", "::1", 8042)),
    ("https://pacs.example.org.:443/", ("https", "pacs.example.org", 443)),
    ("null", None),                             # an opaque origin (sandbox, file:)
    ("", None),
    ("file:///etc/passwd", None),
    ("ftp://pacs", None),                       # no default port: not a web origin of ours
    ("http://pacs:99999", None),
])
def test_origins(value, parsed):
    assert guard._origin(value) == parsed


@pytest.mark.parametrize("trusted,remote,forwarded,client", [
    # no proxy trusted: the connecting address, whatever the headers say
    ((), "10.0.0.9", "203.0.113.7", "10.0.0.9"),
    (("10.0.0.0/8",), "192.168.1.1", "203.0.113.7", "192.168.1.1"),
    # behind a trusted proxy: the right-most entry that is not a trusted proxy
    (("10.0.0.0/8",), "10.0.0.1", "203.0.113.7", "203.0.113.7"),
    (("10.0.0.0/8",), "10.0.0.1", "6.6.6.6, 203.0.113.7, 10.0.0.2", "203.0.113.7"),
    (("10.0.0.1",), "10.0.0.1", " 203.0.113.7 ,", "203.0.113.7"),
    (("::1",), "::1", "2001:db8::1", "2001:db8::1"),
    (("10.0.0.0/8",), "10.0.0.1", "", "10.0.0.1"),
    (("10.0.0.0/8",), "10.0.0.1", "10.0.0.3, 10.0.0.2", "10.0.0.3"),   # proxies all the way
    (("10.0.0.0/8",), "10.0.0.1", "x" * 100, "x" * 64),               # bounded, for logs
])
def test_the_client_behind_proxies(trusted, remote, forwarded, client):
    environ = {"REMOTE_ADDR": remote}
    if forwarded:
        environ["HTTP_X_FORWARDED_FOR"] = forwarded
    assert guard.Proxies(trusted).client(environ) == client


def app(environ, start_response):
    start_response("200 OK", [])
    return [b""]


@pytest.mark.parametrize("allowed,host,ok", [
    ((), "localhost", True),
    ((), "127.0.0.1", True),
    ((), "::1", True),
    ((), "10.1.2.3", True),          # an address is no DNS name: nothing to rebind
    ((), "fe80::1%eth0", True),
    ((), socket.gethostname().lower(), True),
    ((), "pacs.example.org", False),
    ((), "127.0.0.1.nip.io", False),
    (("pacs.example.org",), "pacs.example.org", True),
    (("pacs.example.org",), "www.pacs.example.org", False),
    (("PACS.Example.org.",), "pacs.example.org", True),
    ((".hospital.org",), "ris.hospital.org", True),
    ((".hospital.org",), "a.b.hospital.org", True),
    ((".hospital.org",), "hospital.org", True),
    ((".hospital.org",), "evilhospital.org", False),
    ((".hospital.org",), "hospital.org.evil.com", False),
    (("*",), "anything.example", True),
])
def test_hosts_a_browser_may_use(tmp_path, allowed, host, ok):
    hosts = ", ".join(f'"{h}"' for h in allowed)
    g = guard.Guard(app, load(tmp_path, f"[http]\nallowed_hosts = [{hosts}]\n").http)
    assert g.host_allowed(host) is ok


# --- config validators ------------------------------------------------------------------------

@pytest.mark.parametrize("value,valid", [
    ("CT1", "CT1"),
    (" CT1 ", "CT1"),
    ("A" * 16, "A" * 16),
    ("A B-C_D.E", "A B-C_D.E"),
    ("A" * 17, None),
    ("", None),
    ("   ", None),
    ("A\\B", None),                 # the value separator
    ("A\tB", None),                 # control characters
    ("ÄRZTE", None),                # the default repertoire only
])
def test_ae_titles(value, valid):
    if valid is None:
        with pytest.raises(ValueError):
            config.valid_aet(value)
    else:
        assert config.valid_aet(value) == valid


@pytest.mark.parametrize("toml,attribute,value", [
    ("[dicom]\nport = 0\n", "dicom_port", 0),
    ("[dicom]\nport = 65535\n", "dicom_port", 65535),
    ("[dicom]\nbind = \"::\"\n", "dicom_bind", "::"),
    ("[dicom]\nbind = \"localhost\"\n", "dicom_bind", "localhost"),
    ("[dicom]\nallowed_calling_aets = [\" CT1\", \"MR1 \"]\n", "dicom_allowed_calling_aets",
     ("CT1", "MR1")),
    ("[http]\nallowed_hosts = [\"PACS.example.org.\", \".Hospital.org\", \"[::1]\", \"*\"]\n",
     "http_allowed_hosts", ("pacs.example.org", ".hospital.org", "::1", "*")),
    ("[http]\ntrusted_proxies = [\"10.0.0.0/8\", \" 192.168.1.1 \", \"::1\"]\n",
     "http_trusted_proxies", ("10.0.0.0/8", "192.168.1.1", "::1")),
    ("[log]\nlevel = \"debug\"\n", "log_level", "DEBUG"),
    ("[http]\nthreads = 2\n", "http_threads", 2),
    ("[http]\ntimeout = 1\n", "http_timeout", 1.0),
])
def test_values_accepted(tmp_path, toml, attribute, value):
    assert getattr(load(tmp_path, toml), attribute) == value


@pytest.mark.parametrize("env,attribute,value", [
    ({"PACSD_STORAGE_OVERWRITE": "yes"}, "storage_overwrite", True),
    ({"PACSD_STORAGE_OVERWRITE": " On "}, "storage_overwrite", True),
    ({"PACSD_STORAGE_OVERWRITE": "1"}, "storage_overwrite", True),
    ({"PACSD_STORAGE_OVERWRITE": "off"}, "storage_overwrite", False),
    ({"PACSD_STORAGE_OVERWRITE": "false"}, "storage_overwrite", False),
    ({"PACSD_DICOM_PORT": "104"}, "dicom_port", 104),
    ({"PACSD_DICOM_ALLOWED_CALLING_AETS": "CT1, MR1 US1"}, "dicom_allowed_calling_aets",
     ("CT1", "MR1", "US1")),
    ({"PACSD_DICOM_ALLOWED_CALLING_AETS": ""}, "dicom_allowed_calling_aets", ()),
])
def test_values_from_the_environment(tmp_path, env, attribute, value):
    assert getattr(load(tmp_path, "", env), attribute) == value


@pytest.mark.parametrize("toml,env,fragment", [
    ("[dicom]\nport = -1\n", {}, "not a TCP port"),
    ("[dicom]\nport = 65536\n", {}, "not a TCP port"),
    ("[dicom]\nport = 104.0\n", {}, "not an integer"),
    ("[dicom]\nport = true\n", {}, "not an integer"),
    ("[dicom]\nbind = \"pacs.local\"\n", {}, "not an IP address"),
    ("[dicom]\nallowed_calling_aets = [1]\n", {}, "not a list of strings"),
    ("[dicom]\nallowed_calling_aets = [\"ABCDEFGHIJKLMNOPQ\"]\n", {}, "AE title"),
    ("[http]\nallowed_hosts = [\"pacs example\"]\n", {}, "not a host name"),
    ("[http]\nallowed_hosts = [\"http://pacs\"]\n", {}, "not a host name"),
    ("[http]\nallowed_hosts = [\"pacs/x\"]\n", {}, "not a host name"),
    ("[http]\ntrusted_proxies = [\"10.0.0.0/33\"]\n", {}, "not an IP address or network"),
    ("[http]\ntrusted_proxies = [\"proxy.local\"]\n", {}, "not an IP address or network"),
    ("[http]\nthreads = 1\n", {}, "outside 2..512"),
    ("[http]\ntimeout = 0\n", {}, "greater than zero"),
    ("[log]\nlevel = \"TRACE\"\n", {}, "not one of DEBUG"),
    ("", {"PACSD_STORAGE_OVERWRITE": "maybe"}, "not a boolean"),
    ("", {"PACSD_HTTP_TIMEOUT": "fast"}, "not a number"),
    ("[http]\ncert = \"c.pem\"\n", {}, "set both"),
    ("[dicom]\ntls_ca = \"ca.pem\"\n", {}, "tls_ca needs tls_cert"),
    ("[[users]]\nname = \"a:b\"\npassword_hash = \"pbkdf2_sha256$x\"\n", {}, "without ':'"),
    ("[[users]]\nname = \"a\"\npassword_hash = \"secret\"\n", {}, "from `pacsd passwd`"),
    ("[[nodes]]\naet = \"X\"\nhost = \"h\"\nport = 0\n", {}, "not 1-65535"),
    ("[[nodes]]\naet = \"X\"\nhost = \"a b\"\nport = 104\n", {}, "not a host name"),
    ("[[nodes]]\naet = \"X\"\nhost = \"h\"\nport = 104\nallow_find = \"no\"\n", {},
     "true or false"),
    ("[[nodes]]\naet = \"X\"\nhost = \"h\"\nport = 104\ntransfer_syntaxes = [\"1.2.3\"]\n", {},
     "not a transfer syntax"),
])
def test_values_refused(tmp_path, toml, env, fragment):
    with pytest.raises(ConfigError) as e:
        load(tmp_path, toml, env)
    assert "\n" not in str(e.value)
    assert fragment in str(e.value)
