"""The PACS connection (``ctapp.pacs``) against a real Orthanc with its
DICOMweb plugin, started on loopback with its own storage and credentials
(``orthanc_server``): the worklist, retrieval, the SR stored back, the batch
and each fault's message; no patient identifier in logs, records or output.
Skipped when Orthanc is not installed."""
from __future__ import annotations

import io
import logging
import socket
import tomllib
from datetime import date
from pathlib import Path

import numpy as np
import pytest
from app_fixtures import app_env, app_settings  # noqa: F401
from orthanc_server import OrthancServer, generated_series, orthanc_missing
from pg_cluster import free_port
from synthetic import PATIENT_ID, PATIENT_NAME

from ctapp.auth import ADMIN, CLINICIAN, User
from ctapp.pacs import Pacs, PacsError, process_series, run_batch
from ctapp.pacs_results import result_uids
from ctapp.pacs_settings import PacsConfig, PacsConfigError, may_see_identifiers
from ctapp.series import classify_series
from ctapp.series_inputs import read_inputs
from ctapp.store import Store
from ctapp.volumes import Input, Limits

# Every identifying value the generated headers carry (synthetic.ct_dataset), and the name inside a description.
IDENTIFIERS = (PATIENT_NAME, PATIENT_ID, "ACC-4455", "19510203", "Doe", "Nowhere")

needs_orthanc = pytest.mark.skipif(orthanc_missing() is not None, reason=str(orthanc_missing()))


# --------------------------------------------------------------------------- settings (no server needed)


@pytest.mark.parametrize("section, words", [
    ({}, "url must be the DICOMweb root"),
    ({"url": "ftp://pacs/dicom-web"}, "url must be the DICOMweb root"),
    ({"url": "https://u:p@pacs/dicom-web"}, "not in the url"),
    ({"url": "https://pacs/dicom-web", "username": "a"}, "username and password go together"),
    ({"url": "https://pacs/dicom-web", "username": "a", "password": "b", "token": "t"}, "not both"),
    ({"url": "https://pacs/dicom-web", "verify_tls": "no"}, "verify_tls is true or false"),
    ({"url": "https://pacs/dicom-web", "ca_bundle": "/no/such.pem"}, "ca_bundle must be a readable"),
    ({"url": "https://pacs/dicom-web", "read_timeout": 0}, "read_timeout is a number of seconds"),
    ({"url": "https://pacs/dicom-web", "identifiers_for": ["everyone"]}, "identifiers_for lists roles"),
    ({"url": "https://pacs/dicom-web", "passwd": "x"}, "unknown setting(s) passwd"),
])
def test_a_pacs_section_that_cannot_be_used_says_what_to_fix(section, words):
    with pytest.raises(PacsConfigError, match=None) as caught:
        PacsConfig.from_mapping(section)
    assert words in str(caught.value)


def test_settings_keep_secrets_out_of_their_repr_and_roles_decide_who_sees_identifiers():
    config = PacsConfig.from_mapping({"url": "https://pacs.example.org/dicom-web/", "username": "ctapp",
                                      "password": "s3cret-pw", "read_timeout": 30, "identifiers_for": ["admin"]})
    assert (config.url, config.read_timeout, config.host) == ("https://pacs.example.org/dicom-web", 30.0,
                                                              "https://pacs.example.org")
    assert "s3cret-pw" not in repr(config)
    assert may_see_identifiers(User("a@x", ADMIN), config)
    assert not may_see_identifiers(User("c@x", CLINICIAN), config)
    assert not may_see_identifiers(None, config)  # sign-in off: nobody is known, nothing is shown
    default = PacsConfig.from_mapping({"url": "http://127.0.0.1:8042/dicom-web", "token": "abc"})
    assert may_see_identifiers(User("c@x", CLINICIAN), default) and default.verify is True


def test_result_uids_depend_on_model_version_and_series_only():
    first = result_uids("m", "2025-01-01", "1.2.3")
    assert first == result_uids("m", "2025-01-01", "1.2.3")
    assert first.sr != result_uids("m", "2025-01-02", "1.2.3").sr != result_uids("m", "2025-01-01", "1.2.4").sr
    assert len({first.series, first.sr, first.capture, first.capture_series}) == 4


def test_the_store_keeps_one_row_per_model_version_and_series(tmp_path):
    store = Store(tmp_path / "audit.sqlite")
    try:
        store.record_pacs_result(user="", model="m", model_version="v1", study="T-1", series="a" * 64,
                                 status="failed", message="The PACS at x did not answer")
        assert store.pacs_done("m", "v1") == set()
        store.record_pacs_result(user="dr", model="m", model_version="v1", study="T-1", series="a" * 64,
                                 status="stored", slices=6, verdict="No finding")
        store.record_pacs_result(user="dr", model="m", model_version="v2", study="T-1", series="a" * 64,
                                 status="already stored", slices=6)
        assert store.pacs_done("m", "v1") == store.pacs_done("m", "v2") == {"a" * 64}
        rows = store.pacs_results()
        assert sorted((r["model_version"], r["status"], r["message"]) for r in rows) == [
            ("v1", "stored", ""), ("v2", "already stored", "")]
    finally:
        store.close()


# --------------------------------------------------------------------------- against Orthanc


@pytest.fixture(scope="module")
def orthanc():
    if orthanc_missing():
        pytest.skip(orthanc_missing())
    with OrthancServer() as server:
        server.ct_files = generated_series(6, study_date="20250105", seed=1)
        server.upload(server.ct_files)
        server.upload(generated_series(4, study_date="20250106", modality="MR", description="MR knee"))
        server.upload(generated_series(4, study_date="20241201", description="CT abdomen", seed=2))
        yield server


@pytest.fixture(scope="module")
def pacs(orthanc) -> Pacs:
    return Pacs(PacsConfig.from_mapping(orthanc.pacs_settings()))


@pytest.fixture(scope="module")
def model(tiny_model):
    from ctapp.model_folders import load_model

    return load_model(tiny_model)


def only_study(pacs: Pacs, **filters):
    (study,) = pacs.studies(**filters)
    return study


@needs_orthanc
def test_the_worklist_finds_generated_studies_by_date_modality_accession_and_description(pacs):
    january = dict(since=date(2025, 1, 1), until=date(2025, 1, 31))
    ct = only_study(pacs, **january)
    assert (ct.date, ct.modalities, ct.series_count) == ("2025-01-05", ("CT",), 1)
    assert (ct.identifiers.patient_name, ct.identifiers.patient_id, ct.identifiers.description) == (
        PATIENT_NAME, PATIENT_ID, "CT chest")
    assert only_study(pacs, modality="MR", **january).modalities == ("MR",)
    assert [s.date for s in pacs.studies()] == ["2025-01-05", "2024-12-01"]  # CT only, newest first
    assert pacs.studies(since=date(2025, 1, 6)) == []
    assert [s.date for s in pacs.studies(description="abdomen")] == ["2024-12-01"]
    assert len(pacs.studies(accession="ACC-4455")) == 2 and pacs.studies(accession="ACC-0000") == []
    (series,) = pacs.series(ct)
    assert (series.modality, series.slices, series.thickness, series.number) == ("CT", 6, 2.5, None)
    assert not any(word in repr(ct) + repr(series) for word in IDENTIFIERS)


@needs_orthanc
def test_a_retrieved_series_gives_the_probabilities_of_its_uploaded_files(pacs, orthanc, model):
    (series_entry,) = pacs.series(only_study(pacs, since=date(2025, 1, 5), until=date(2025, 1, 5)))
    steps = []
    retrieved = pacs.read_series(series_entry, on_progress=lambda done, total: steps.append((done, total)))
    assert steps == [(k, 6) for k in range(1, 7)]
    uploaded = read_inputs([Input(f"upload/{k}", data) for k, data in enumerate(orthanc.ct_files)]).series[0]
    assert retrieved.id == uploaded.id == series_entry.key
    np.testing.assert_array_equal(retrieved.values, uploaded.values)
    np.testing.assert_allclose(classify_series(model, retrieved).probabilities,
                               classify_series(model, uploaded).probabilities, rtol=0, atol=1e-7)


@needs_orthanc
def test_the_sr_is_stored_in_the_same_study_and_a_second_store_is_no_duplicate(pacs, orthanc, model):
    import highdicom as hd

    study = only_study(pacs, since=date(2025, 1, 5), until=date(2025, 1, 5))
    (entry,) = pacs.series(study)
    series = pacs.read_series(entry)
    result = classify_series(model, series)
    first = pacs.store_result(model, series, result, capture=True)
    assert first.instances == 2 and first.sr_uid == result_uids(model.name, model.version, entry.uid).sr
    assert pacs.store_result(model, series, result, capture=True).instances == 0  # found, nothing written
    stored = {s.modality: s for s in pacs.series(study)}
    assert set(stored) == {"CT", "SR", "OT"} and stored["SR"].slices == stored["OT"].slices == 1
    assert len(orthanc.study_series(study.uid)) == 3  # one study in Orthanc: the results joined the images
    (again,) = pacs.studies(since=date(2025, 1, 5), until=date(2025, 1, 5), description="chest")
    assert (again.uid, again.modalities, again.identifiers) == (study.uid, ("CT", "OT", "SR"), study.identifiers)

    sr_dataset = pacs.client.retrieve_instance(study.uid, stored["SR"].uid, first.sr_uid)
    sr = hd.sr.ComprehensiveSR.from_dataset(sr_dataset)
    assert sr.SOPInstanceUID == first.sr_uid and sr.StudyInstanceUID == study.uid
    (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
    (referenced,) = evidence.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == entry.uid
    sources = {item.ReferencedSOPInstanceUID for item in referenced.ReferencedSOPSequence}
    assert sources == {uid for _, uid, _ in series.reference.instances}
    (group,) = sr.content.get_image_measurement_groups()
    assert {img.referenced_sop_instance_uid for img in group.source_images} <= sources and group.source_images
    assert model.name in sr.SeriesDescription and "research use only" in sr.SeriesDescription
    assert (sr.PatientID, str(sr.PatientName)) == (PATIENT_ID, PATIENT_NAME)  # filed with the patient's images


def sleeping_server() -> tuple[socket.socket, int]:
    """A socket that accepts connections (in its backlog) and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    return listener, listener.getsockname()[1]


@needs_orthanc
def test_each_fault_has_its_message(pacs, orthanc, model):
    down = Pacs(PacsConfig.from_mapping({"url": f"http://127.0.0.1:{free_port()}/dicom-web", "connect_timeout": 2}))
    with pytest.raises(PacsError, match=r"cannot be reached \(searching studies\): it may be down"):
        down.studies()
    listener, port = sleeping_server()
    try:
        slow = Pacs(PacsConfig.from_mapping({"url": f"http://127.0.0.1:{port}/dicom-web", "read_timeout": 1}))
        with pytest.raises(PacsError, match=r"did not answer within 1 s \(searching studies\)"):
            slow.studies()
    finally:
        listener.close()
    wrong = Pacs(PacsConfig.from_mapping(orthanc.pacs_settings(password="wrong")))
    with pytest.raises(PacsError, match=r"refused the credentials \(HTTP 401, searching studies\): check \[pacs\] "
                                        "username and password"):
        wrong.studies()

    mr_study = only_study(pacs, modality="MR")
    (mr,) = pacs.series(mr_study)
    with pytest.raises(PacsError, match=f"Series {mr.key} is MR, not CT"):
        pacs.retrieve(mr)
    (ct,) = pacs.series(only_study(pacs, since=date(2025, 1, 5), until=date(2025, 1, 5)), modality="CT")
    with pytest.raises(PacsError, match=f"Series {ct.key} has 6 instances; at most 4 slices"):
        pacs.retrieve(ct, limits=Limits(max_slices=4))
    with pytest.raises(PacsError, match="add up to more than 0 MB.*nothing of it was kept"):
        pacs.retrieve(ct, limits=Limits(max_total_bytes=20_000))

    orthanc.upload(generated_series(5, study_date="20250107", seed=3))
    (doomed,) = pacs.series(only_study(pacs, since=date(2025, 1, 7), until=date(2025, 1, 7)))

    def delete_after_two(done: int, total: int) -> None:
        if done == 2:
            orthanc.delete_series(doomed.uid)

    with pytest.raises(PacsError, match=f"Series {doomed.key} was deleted from the PACS during retrieval "
                                        r"\(2 of 5 instances read\); nothing of it was kept"):
        pacs.retrieve(doomed, on_progress=delete_after_two)
    with pytest.raises(PacsError, match=f"Series {doomed.key} is no longer in the PACS"):
        pacs.retrieve(doomed)


@needs_orthanc
def test_a_pacs_that_refuses_the_result_gives_its_reason_and_nothing_is_recorded_as_stored(model, tmp_path):
    refuse_results = ("function ReceivedInstanceFilter(dicom, origin, info)\n"
                      "  return dicom.Modality ~= 'SR'\nend\n")
    with OrthancServer(lua=refuse_results) as server:
        server.upload(generated_series(4, study_date="20250110"))
        pacs = Pacs(PacsConfig.from_mapping(server.pacs_settings()))
        (entry,) = pacs.series(pacs.studies()[0])
        outcome = process_series(pacs, model, entry)
        assert outcome.status == "failed"
        assert outcome.message == (f"The PACS at {server.url} accepted the result of series {entry.key} but did not "
                                   "keep it (a storage rule of the PACS may refuse results); it is not recorded as "
                                   "stored")
        assert {s.modality for s in pacs.series(pacs.studies()[0])} == {"CT"}


@needs_orthanc
def test_the_batch_is_resumable_idempotent_and_carries_on_past_a_failure(tiny_model, model, tmp_path, monkeypatch,
                                                                         capsys, caplog):
    from ctapp import pacs as pacs_module

    caplog.set_level(logging.DEBUG)
    with OrthancServer() as server:
        day = generated_series(4, study_date="20250201", seed=5)
        server.upload(day)
        server.upload(generated_series(3, study_date="20250201", seed=6, study_uid=header(day[0]).StudyInstanceUID))
        mixed = generated_series(3, study_date="20250202", seed=7)
        mixed += generated_series(1, size=64, study_date="20250202", study_uid=header(mixed[0]).StudyInstanceUID,
                                  series_uid=header(mixed[0]).SeriesInstanceUID, seed=8)
        server.upload(mixed)  # a CT series whose slices differ in size: it cannot be read as one volume
        server.upload(generated_series(4, study_date="20250115", seed=9))  # before --since: not touched
        secrets = tmp_path / "secrets.toml"
        settings = server.pacs_settings()
        secrets.write_text("[pacs]\n" + "".join(f'{k} = "{v}"\n' for k, v in settings.items()))
        monkeypatch.setenv("CTAPP_AUDIT_LOG", str(tmp_path / "audit.sqlite"))
        monkeypatch.delenv("CTAPP_DATABASE_URL", raising=False)
        argv = ["--since", "2025-02-01", "--model", str(tiny_model), "--secrets", str(secrets)]

        assert pacs_module.main(argv) == 1
        first = capsys.readouterr()
        assert "2 of 3 series done, 1 failed" in first.out
        assert "slices of different sizes in one series" in first.out and "PACS batch" in first.err
        assert pacs_module.main(argv) == 1  # only the failed series is tried again
        again = capsys.readouterr().out
        assert "0 of 1 series done, 1 failed" in again

        store = Store(tmp_path / "audit.sqlite")
        try:
            rows = store.pacs_results()
            pacs = Pacs(PacsConfig.from_mapping(settings))
            sr_series = [s for st in pacs.studies(since=date(2025, 1, 1), modality="SR")
                         for s in pacs.series(st, modality="SR")]
            assert len(sr_series) == 2 and all(s.slices == 1 for s in sr_series)
            outcomes = run_batch(pacs, store, model, since=date(2025, 1, 15), until=date(2025, 1, 15))
            assert [o.status for o in outcomes] == ["stored"]
        finally:
            store.close()
        assert sorted(r["status"] for r in rows) == ["failed", "stored", "stored"]
        assert pacs_module.main(["--since", "2025-02-01", "--model", str(tiny_model), "--secrets",
                                 str(tmp_path / "none.toml")]) == 2
        texts = [first.out, first.err, again, caplog.text, repr(rows)]
        assert not [word for word in IDENTIFIERS if any(word in text for text in texts)]


def header(data: bytes):
    import pydicom

    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


@needs_orthanc
def test_no_patient_identifier_reaches_the_logs(pacs, model, caplog):
    caplog.set_level(logging.DEBUG)
    studies = pacs.studies(accession="ACC-4455", description="chest")
    (entry,) = pacs.series(studies[0], modality="CT")
    outcome = process_series(pacs, model, entry)
    assert outcome.status in ("stored", "already stored") and outcome.verdict
    assert "GET" in caplog.text and "query hidden" in caplog.text  # the HTTP debug lines are there, without queries
    assert not [word for word in IDENTIFIERS if word in caplog.text or word in repr(outcome)]


def test_the_secrets_example_holds_a_usable_pacs_section_commented_out():
    from pathlib import Path

    example = (Path(__file__).resolve().parent.parent / ".streamlit" / "secrets.toml.example").read_text()
    assert "\n[pacs]" not in example  # a copied example adds no PACS pages
    block = example[example.index("# [pacs]"):]
    section = tomllib.loads("\n".join(line.removeprefix("# ") for line in block.splitlines()))["pacs"]
    config = PacsConfig.from_mapping(section)
    assert (config.host, config.username, config.read_timeout) == ("https://pacs.example.org", "ctapp", 60.0)


ADMIN_CLAIMS = {"is_logged_in": True, "email": "head@example.org", "email_verified": True}
CLINICIAN_CLAIMS = {"is_logged_in": True, "email": "dr.c@example.org", "email_verified": True}


@needs_orthanc
@pytest.mark.parametrize("claims, shown", [(ADMIN_CLAIMS, True), (CLINICIAN_CLAIMS, False), (None, False)])
def test_the_worklist_page_shows_patient_identifiers_only_to_the_roles_named(app_settings, orthanc, claims, shown):
    """AppTest of the page: [pacs] names admins only; an admin sees names, a clinician and the local
    user (sign-in off) see opaque ids."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "pages" / "worklist.py"), default_timeout=120)
    at.secrets["pacs"] = orthanc.pacs_settings(identifiers_for=["admin"])
    if claims:
        at.secrets["auth"] = {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "x" * 32,
                              "client_id": "ctapp", "client_secret": "s",
                              "server_metadata_url": "http://localhost:9400/.well-known/openid-configuration"}
        at.secrets["roles"] = {"admin_emails": [ADMIN_CLAIMS["email"]]}
        at.user = claims
    at.run()
    assert [t.value for t in at.title] == ["PACS worklist"] and not at.exception
    at.date_input(key="pacs_dates").set_value((date(2025, 1, 1), date(2025, 1, 31)))
    next(b for b in at.button if b.label == "Search the PACS").click().run()
    studies = at.dataframe[0].value
    assert list(studies["Date"]) == ["2025-01-05"]
    assert ("Patient" in studies.columns) is shown and ("Description" in at.dataframe[1].value.columns) is shown
    page_text = " ".join([*(str(e.value) for e in [*at.markdown, *at.caption, *at.selectbox]),
                          *(e.value.to_csv() for e in at.dataframe)])
    assert (PATIENT_NAME.replace("^", " ") in page_text) is shown and (PATIENT_ID in page_text) is shown


@needs_orthanc
def test_the_batch_page_classifies_new_series_and_lists_the_records(app_settings, orthanc):
    """AppTest of the admin page (sign-in off: the local user is the admin): a batch over the first
    days of January stores the CT series' results, a second finds nothing new."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "pages" / "pacs_admin.py"),
                           default_timeout=300)
    at.secrets["pacs"] = orthanc.pacs_settings()
    at.run()
    at.date_input(key="batch_since").set_value(date(2025, 1, 5))
    at.date_input(key="batch_until").set_value(date(2025, 1, 6))
    at.button[0].click()
    at.run()
    assert not at.exception and not at.error
    assert [s.value for s in at.success] == ["1 of 1 series done, 0 failed."]
    outcomes, records = (frame.value for frame in at.dataframe)
    assert list(outcomes["Status"]) == ["stored"]  # the page's model (tiny-a) has stored nothing in this PACS yet
    assert (records["Study"][0], records["Status"][0], records["Slices"][0]) == (outcomes["Study"][0], "stored", 6)
    at.button[0].click()
    at.run()
    assert [i.value for i in at.info] == ["No new CT series: every one in these days was done by this model version."]
    assert PATIENT_NAME not in records.to_csv() and PATIENT_ID not in records.to_csv()
