"""Matching, table-driven and in-process: DICOM query keys (PS3.4 C.2.2.2, pacsd.query) and
OsiriX predicates (pacsd.query.predicate), each run against one small SQLite index whose rows are
chosen so that every case has a row it must find and a row it must not.

The rows (study: patient, date, time, accession, description, series modalities):
    S1  P1 DOE^JOHN       20240115 083000    A100  "CT HEAD"    CT, MR   10 images
    S2  P1 DOE^JOHN       20231231 120000.5  A101  "CHEST"      CT
    S3  P2 Yamada^Tarou=  20240201 235959    B200  "ct head"    MR
    S4  P3 DOE^JANE^^^    (empty)  (empty)   (empty) "Head[1]?" SR
    S5  P_4% (no name)    20240131 1200      B201  "ABDOMEN"    US
"""

from __future__ import annotations

import pytest

from pacsd import query
from pacsd.index import Index
from pacsd.index.models import Patient, Series, Study, database, name_key
from pacsd.query import predicate as predicates
from pacsd.web import osirix

PATIENTS = {
    "P1": ("DOE^JOHN", "19700101", "M"),
    "P2": ("Yamada^Tarou=山田^太郎=やまだ^たろう", "19800202", "M"),
    "P3[1]": ("DOE^JANE^^^", "", "F"),
    "P_4%": ("", "", ""),
}
STUDIES = [
    # uid, patient, date, time, accession, description, modalities, images
    ("1.2.3.1", "P1", "20240115", "083000", "A100", "CT HEAD", ("CT", "MR"), 10),
    ("1.2.3.2", "P1", "20231231", "120000.5", "A101", "CHEST", ("CT",), 1),
    ("1.2.3.3", "P2", "20240201", "235959", "B200", "ct head", ("MR",), 1),
    ("1.2.3.4", "P3[1]", "", "", "", "Head[1]?", ("SR",), 1),
    ("1.2.3.44", "P_4%", "20240131", "1200", "B201", "ABDOMEN", ("US",), 1),
]
S1, S2, S3, S4, S5 = (s[0] for s in STUDIES)
ALL = {S1, S2, S3, S4, S5}


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    idx = Index(f"sqlite:///{tmp_path_factory.mktemp('match') / 'index.sqlite3'}")
    idx.open(writer=False)
    with database.connection_context(), database.atomic():
        patients = {pid: Patient.create(patient_id=pid, patient_name=name,
                                        patient_name_key=name_key(name),
                                        patient_birth_date=birth, patient_sex=sex)
                    for pid, (name, birth, sex) in PATIENTS.items()}
        for uid, pid, date, time_, acc, desc, mods, images in STUDIES:
            study = Study.create(patient=patients[pid], study_instance_uid=uid, study_date=date,
                                 study_time=time_, accession_number=acc, study_description=desc,
                                 modalities_in_study="\\".join(mods),
                                 number_of_instances=images, number_of_series=len(mods))
            for n, modality in enumerate(mods, 1):
                Series.create(study=study, series_instance_uid=f"{uid}.{n}", modality=modality,
                              series_number=n)
    yield idx
    idx.close()


def studies(keys: dict[str, str]) -> set[str]:
    req = query.Request("STUDY", keys)
    with database.connection_context():
        return {m["StudyInstanceUID"] for m in query.find(req, ["StudyInstanceUID"])}


# --- DICOM matching (PS3.4 C.2.2.2) -----------------------------------------------------------

@pytest.mark.parametrize("keys,expected", [
    # Universal matching (C.2.2.2.3): empty or only '*'
    ({"StudyDate": ""}, ALL),
    ({"StudyDescription": "*"}, ALL),
    ({"StudyDescription": "***"}, ALL),
    # Single value matching (C.2.2.2.1): exact, case-sensitive except for PN
    ({"AccessionNumber": "A100"}, {S1}),
    ({"AccessionNumber": "A10"}, set()),
    ({"StudyDescription": "CT HEAD"}, {S1}),
    ({"StudyDescription": "ct head"}, {S3}),
    ({"PatientID": "P3[1]"}, {S4}),
    ({"PatientID": "P_4%"}, {S5}),
    ({"StudyDate": "20240115"}, {S1}),
    ({"StudyDate": "2024.01.15"}, {S1}),          # ACR-NEMA form (PS3.5 6.2, DA)
    ({"StudyTime": "083000"}, {S1}),
    ({"StudyTime": "08:30:00"}, {S1}),            # ACR-NEMA form (PS3.5 6.2, TM)
    # Wildcards (C.2.2.2.4): '*' any run, '?' one character; nothing else is special
    ({"StudyDescription": "*HEAD*"}, {S1}),
    ({"StudyDescription": "?HEST"}, {S2}),
    ({"StudyDescription": "?EST"}, set()),
    ({"StudyDescription": "Head[1]?"}, {S4}),
    ({"StudyDescription": "Head[1]*"}, {S4}),
    ({"StudyDescription": "Head[?]?"}, {S4}),      # '[' a literal, '?' the 1
    ({"PatientID": "P3[1*"}, {S4}),
    ({"PatientID": "P_*"}, {S5}),                  # '_' is a literal, not LIKE's any-one
    ({"PatientID": "P%*"}, set()),                 # '%' is a literal, not LIKE's any-run
    ({"AccessionNumber": "A*"}, {S1, S2}),         # an empty value matches no wildcard
    # Lists (C.2.2.2.2 for UIDs; a list of values for other keys)
    ({"StudyInstanceUID": "1.2.3.4"}, {S4}),      # no prefix matching: not 1.2.3.44
    ({"StudyInstanceUID": "1.2.3.1\\1.2.3.3"}, {S1, S3}),
    ({"StudyInstanceUID": "1.2.3.*"}, set()),     # no wildcards in UIDs
    ({"AccessionNumber": "A100\\B201"}, {S1, S5}),
    # Range matching (C.2.2.2.5): inclusive; a missing bound is open; an empty value is
    # unknown, within no range
    ({"StudyDate": "20240101-20240131"}, {S1, S5}),
    ({"StudyDate": "20240115-20240115"}, {S1}),
    ({"StudyDate": "-20231231"}, {S2}),
    ({"StudyDate": "20240201-"}, {S3}),
    ({"StudyDate": "20240116-20240130"}, set()),
    ({"StudyTime": "080000-110000"}, {S1}),
    ({"StudyTime": "1200-"}, {S2, S3, S5}),
    ({"StudyTime": "-0830"}, {S1}),               # 0830 is the whole minute 08:30
    ({"StudyTime": "-082959"}, set()),
    # Person names: case-insensitive, trailing empty components ignored, and a name without
    # component groups matches the alphabetic group (PS3.5 6.2.1)
    ({"PatientName": "doe^john"}, {S1, S2}),
    ({"PatientName": "DOE^JO*"}, {S1, S2}),
    ({"PatientName": "DOE^J*"}, {S1, S2, S4}),
    ({"PatientName": "DOE*"}, {S1, S2, S4}),
    ({"PatientName": "DOE^JANE"}, {S4}),
    ({"PatientName": "Doe^Jane^^"}, {S4}),
    ({"PatientName": "YAMADA^TAROU"}, {S3}),
    ({"PatientName": "yamada*"}, {S3}),
    ({"PatientName": "DOE"}, set()),
    # ModalitiesInStudy (C.2.2.2.8 / C.6.2.1.2): any series of any listed modality
    ({"ModalitiesInStudy": "CT"}, {S1, S2}),
    ({"ModalitiesInStudy": "MR"}, {S1, S3}),
    ({"ModalitiesInStudy": "CT\\SR"}, {S1, S2, S4}),
    ({"ModalitiesInStudy": "M*"}, {S1, S3}),
    ({"ModalitiesInStudy": "XA"}, set()),
    # Several keys: all must match
    ({"PatientID": "P1", "ModalitiesInStudy": "MR"}, {S1}),
    ({"PatientID": "P1", "StudyDate": "20230101-20231231"}, {S2}),
    ({"PatientName": "DOE*", "StudyDescription": "Head*"}, {S4}),
    ({"PatientID": "P2", "ModalitiesInStudy": "CT"}, set()),
])
def test_dicom_matching(index, keys, expected):
    assert studies(keys) == expected


@pytest.mark.parametrize("level,keys,expected", [
    ("SERIES", {"Modality": "CT"}, {"1.2.3.1.1", "1.2.3.2.1"}),
    ("SERIES", {"StudyInstanceUID": S1, "Modality": "M?"}, {"1.2.3.1.2"}),
    ("SERIES", {"SeriesNumber": "2"}, {"1.2.3.1.2"}),
    ("SERIES", {"SeriesNumber": "1\\2", "PatientID": "P1"}, {"1.2.3.1.1", "1.2.3.1.2",
                                                              "1.2.3.2.1"}),
    ("SERIES", {"PatientName": "YAMADA*"}, {"1.2.3.3.1"}),
])
def test_series_level_keys_and_keys_of_the_levels_above(index, level, keys, expected):
    with database.connection_context():
        found = {m["SeriesInstanceUID"] for m in query.find(query.Request(level, keys),
                                                           ["SeriesInstanceUID"])}
    assert found == expected


@pytest.mark.parametrize("keyword,value", [
    ("StudyDate", "-"),                  # a range with neither bound
    ("StudyDate", "2024-01-15"),         # ISO 8601 is not DA
    ("StudyDate", "20240115-2024013x"),
    ("StudyDate", "Jan 2024"),
    ("StudyTime", "8h30"),
    ("SeriesNumber", "two"),
])
def test_malformed_keys_are_refused(keyword, value):
    with pytest.raises(query.QueryError):
        query.condition(keyword, value)


@pytest.mark.parametrize("level", ["", "FOO", "STUDIES"])
def test_unknown_levels_are_refused(level):
    with pytest.raises(query.QueryError):
        query.Request(level, {})


@pytest.mark.parametrize("level,expected", [("study", "STUDY"), (" image ", "IMAGE")])
def test_the_level_is_read_as_a_code_string(level, expected):
    assert query.Request(level, {}).level == expected


# --- OsiriX predicates (DBWindowFind) ---------------------------------------------------------

def osirix_studies(predicate: str) -> set[str]:
    cond = predicates.parse("Study", predicate)
    with database.connection_context():
        return {s.study_instance_uid for s in predicates.select("Study", cond)}


@pytest.mark.parametrize("predicate,expected", [
    ("TRUEPREDICATE", ALL),
    ("FALSEPREDICATE", set()),
    ("patientID == 'P1'", {S1, S2}),
    ("patientID = \"P1\"", {S1, S2}),
    ("patientID != 'P1'", {S3, S4, S5}),
    ("patientID <> 'P1'", {S3, S4, S5}),
    ("patientID IN {'P2', 'P_4%'}", {S3, S5}),
    # names: upper-cased, '^' and spaces alike (OsiriX shows DOE^JOHN as "DOE JOHN")
    ("name == 'DOE JOHN'", {S1, S2}),
    ("name == 'doe^john'", {S1, S2}),
    ("name LIKE 'DOE *'", {S1, S2, S4}),
    ("name BEGINSWITH[c] 'doe j'", {S1, S2, S4}),
    ("name CONTAINS 'JANE'", {S4}),
    # text: case-sensitive unless [c]; LIKE's * and ?, the other operators' values literal
    ("studyName CONTAINS 'HEAD'", {S1}),
    ("studyName CONTAINS[c] 'head'", {S1, S3, S4}),
    ("studyName ENDSWITH 'EST'", {S2}),
    ("studyName LIKE '?HEST'", {S2}),
    ("studyName LIKE 'ct*'", {S3}),
    ("studyName LIKE[c] 'ct*'", {S1, S3}),
    ("studyName CONTAINS '[1]?'", {S4}),
    ("studyName BEGINSWITH '*'", set()),
    ("studyName == 'Head[1]?'", {S4}),
    ("accessionNumber BEGINSWITH 'A'", {S1, S2}),
    # dates: DICOM or ISO, single or a range; an empty date is unknown, never before or after
    ("date == '20240115'", {S1}),
    ("date == '2024-01-15'", {S1}),
    ("date == '2024-01-01 - 2024-01-31'", {S1, S5}),
    ("date == '20240101-20240131'", {S1, S5}),
    ("date >= '20240101'", {S1, S3, S5}),
    ("date < '20240101'", {S2}),
    ("date <= '2024-01-15'", {S1, S2}),
    # modality: any series of the study
    ("modality == 'MR'", {S1, S3}),
    ("modality != 'MR'", {S2, S4, S5}),
    ("modality IN {'SR', 'US'}", {S4, S5}),
    ("modality BEGINSWITH 'M'", {S1, S3}),
    ("modality CONTAINS[c] 'r'", {S1, S3, S4}),
    # numbers
    ("numberOfImages >= 10", {S1}),
    ("numberOfImages == '1'", {S2, S3, S4, S5}),
    # logic: NOT binds tighter than AND, AND than OR
    ("patientID == 'P1' AND date == '2024-01-15'", {S1}),
    ("patientID == 'P1' && modality == 'MR'", {S1}),
    ("patientID == 'P2' OR patientID == 'P3[1]'", {S3, S4}),
    ("patientID == 'P2' || modality == 'US'", {S3, S5}),
    ("NOT modality == 'CT'", {S3, S4, S5}),
    ("!(modality == 'CT')", {S3, S4, S5}),
    ("patientID == 'P2' OR patientID == 'P1' AND modality == 'MR'", {S1, S3}),
    ("(patientID == 'P2' OR patientID == 'P1') AND modality == 'MR'", {S1, S3}),
    ("NOT patientID == 'P1' AND NOT modality == 'US'", {S3, S4}),
    ("TRUEPREDICATE AND patientID == 'P2'", {S3}),
    ("FALSEPREDICATE OR patientID == 'P2'", {S3}),
    ("FALSEPREDICATE AND patientID == 'P2'", set()),
    ("NOT FALSEPREDICATE", ALL),
    ("patientID == 'P2' OR TRUEPREDICATE", ALL),
    ("studyName == 'it\\'s'", set()),
])
def test_osirix_predicates_on_studies(index, predicate, expected):
    assert osirix_studies(predicate) == expected


@pytest.mark.parametrize("table,predicate,expected", [
    ("Series", "study.patientID == 'P1'", {"1.2.3.1.1", "1.2.3.1.2", "1.2.3.2.1"}),
    ("Series", "patientID == 'P1' AND modality == 'CT'", {"1.2.3.1.1", "1.2.3.2.1"}),
    ("Series", "modality == 'MR'", {"1.2.3.1.2", "1.2.3.3.1"}),
    ("Series", "id == 2", {"1.2.3.1.2"}),
    ("Series", "study.name BEGINSWITH 'YAMADA'", {"1.2.3.3.1"}),
])
def test_osirix_predicates_on_series(index, table, predicate, expected):
    cond = predicates.parse(table, predicate)
    with database.connection_context():
        assert {s.series_instance_uid for s in predicates.select(table, cond)} == expected


@pytest.mark.parametrize("table,keypath,field", [
    ("Study", "patientID", Patient.patient_id),
    ("Series", "patientID", Patient.patient_id),          # looked up on the entities above
    ("Series", "study.patientID", Patient.patient_id),
    ("Image", "series.study.patientID", Patient.patient_id),
    ("Image", "series.modality", Series.modality),
    ("Image", "modality", Series.modality),
    ("Series", "name", Series.series_description),       # the Series' own name, not the patient's
    ("Image", "study.date", Study.study_date),
])
def test_key_paths_resolve_upwards(table, keypath, field):
    assert predicates.resolve(table, keypath).field is field


@pytest.mark.parametrize("table,predicate,fragment", [
    ("Study", "", "empty request"),
    ("Study", "   ", "empty request"),
    ("Study", "patientID ==", "ends too early"),
    ("Study", "patientID == 'P1' AND", "ends too early"),
    ("Study", "(patientID == 'P1'", "missing ')'"),
    ("Study", "patientID == 'P1')", "unexpected ')'"),
    ("Study", "patientID == 'P1' 'P2'", "unexpected"),
    ("Study", "patientID 'P1'", "expected a comparison"),
    ("Study", "== 'P1'", "expected an attribute name"),
    ("Study", "patientID == P1", "expected a quoted value"),
    ("Study", "patientID == {'P1', 'P2'}", "a list needs IN"),
    ("Study", "patientID IN {'P1' 'P2'}", "expected ',' or '}'"),
    ("Study", "patientId == 'P1'", "unknown attribute"),
    ("Study", "series.modality == 'CT'", "only relationships upwards"),
    ("Series", "images.sopInstanceUID == '1'", "only relationships upwards"),
    ("Series", "patient.name == 'x'", "unknown relationship"),
    ("Study", "patientID[c] == 'P1'", "after 'patientID'"),
    ("Study", "patientID == 'P1; DROP TABLE study", "cannot read"),
    ("Study", "numberOfImages CONTAINS '1'", "does not apply to a number"),
    ("Study", "numberOfImages == 'ten'", "not a number"),
    ("Study", "modality < 'CT'", "does not apply to modality"),
    ("Study", "date == '2024-13-45 - x'", "not a date"),
    ("Study", "(" * 40 + "patientID == 'P1'" + ")" * 40, "nested too deeply"),
    ("Study", "NOT " * 40 + "patientID == 'P1'", "nested too deeply"),
    ("Study", "patientID == '" + "x" * 5000 + "'", "longer than"),
    ("Patient", "patientID == 'P1'", "is not one of"),
])
def test_malformed_predicates_are_refused(table, predicate, fragment):
    with pytest.raises(predicates.PredicateError) as e:
        predicates.parse(table, predicate)
    assert fragment in str(e.value)


@pytest.mark.parametrize("name,shown", [
    ("DOE^JOHN", "DOE JOHN"),
    ("DOE^JOHN^^^", "DOE JOHN"),
    ("Doe^John^A^Dr^", "Doe John A Dr"),
    ("Yamada^Tarou=山田^太郎=やまだ^たろう", "Yamada Tarou"),
    ("", ""),
])
def test_names_as_osirix_shows_them(name, shown):
    assert osirix.osirix_name(name) == shown


@pytest.mark.parametrize("date,time_,shown", [
    ("20240102", "080100", "2024-01-02 08:01:00 +0000"),
    ("20240102", "080100.123456", "2024-01-02 08:01:00 +0000"),
    ("20240102", "08:01:00", "2024-01-02 08:01:00 +0000"),
    ("20240102", "0801", "2024-01-02 08:01:00 +0000"),
    ("20240102", "08", "2024-01-02 08:00:00 +0000"),
    ("20240102", "", "2024-01-02 00:00:00 +0000"),
    ("2024", "", ""),
    ("2024.01.02", "", ""),
    ("", "080100", ""),
])
def test_dates_as_osirix_shows_them(date, time_, shown):
    assert osirix.osirix_date(date, time_) == shown
