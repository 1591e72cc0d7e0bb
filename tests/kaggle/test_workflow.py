"""The real kaggle client builds its requests from our folders; the network is faked (requests.Session.send).

Credentials are fake values in environment variables (HOME points at an empty folder), so nothing here can
reach Kaggle: an unexpected request fails the test.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest
import requests
from builders import make_artifact
from requests.structures import CaseInsensitiveDict

from kaggle_utils.cli import main as cli
from kaggle_utils.core.config import KaggleConfig
from kaggle_utils.core.errors import UsageError
from kaggle_utils.kaggle.client import MISSING_CREDENTIALS, credential_source
from kaggle_utils.kaggle.wheels import build_wheels, dependency_closure, platform_tags
from kaggle_utils.kaggle.workflow import push_notebook, submit_kernel, upload_dataset

API = "https://api.kaggle.com/v1/"
UPLOAD_HOST = "https://upload.kaggle.test/"
FAKE_KEY = "0123456789abcdef-fake-key"
FAKE_TOKEN = "KGAT_fake_access_token_42"


@dataclass
class Captured:
    method: str
    url: str
    headers: dict
    body: bytes

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class FakeKaggle:
    """Answers the kaggle client's RPCs by name (e.g. "SaveKernel") with canned JSON; records requests."""

    routes: dict = field(default_factory=dict)
    requests: list[Captured] = field(default_factory=list)
    uploads: dict[str, bytes] = field(default_factory=dict)

    def calls(self, name: str) -> list[Captured]:
        return [request for request in self.requests if request.name == name]

    def send(self, session, prepared, **kwargs):
        body = prepared.body
        if hasattr(body, "read"):
            body = body.read()
        if isinstance(body, str):
            body = body.encode()
        headers = dict(prepared.headers)
        if session.auth is not None and "Authorization" not in headers:  # as requests would add it
            probe = requests.Request("GET", prepared.url, auth=session.auth).prepare()
            headers["Authorization"] = probe.headers.get("Authorization", "")
        captured = Captured(prepared.method, prepared.url, headers, body or b"")
        self.requests.append(captured)
        if prepared.url.startswith(UPLOAD_HOST):
            self.uploads[prepared.url] = captured.body
            return _response(prepared, 200, b"{}")
        route = self.routes.get(captured.name)
        if route is None:
            return _response(
                prepared, 599, json.dumps({"code": 599, "message": f"unexpected {captured.name}"})
            )
        status, payload, headers = route(captured) if callable(route) else (200, route, None)
        return _response(prepared, status, payload, headers)


def _response(prepared, status: int, payload, headers: dict | None = None, url: str | None = None):
    response = requests.Response()
    response.status_code = status
    response.reason = {200: "OK", 404: "Not Found", 403: "Forbidden"}.get(status, "Error")
    response.request = prepared
    response.url = (headers or {}).pop("X-Url", None) or url or prepared.url
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    response._content = content
    response._content_consumed = True
    response.raw = io.BytesIO(content)
    response.encoding = "utf-8"
    response.headers = CaseInsensitiveDict(headers or {"Content-Type": "application/json"})
    return response


@pytest.fixture
def fake_kaggle(monkeypatch, tmp_path):
    """Fake network + fake legacy credentials (alice / FAKE_KEY) in env vars; HOME is an empty folder."""
    home = tmp_path / "home"
    home.mkdir()
    for name in list(os.environ):
        if name.startswith("KAGGLE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(home / ".kaggle"))
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", FAKE_KEY)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the client's resumable-upload state
    (tmp_path / "tmp").mkdir()
    fake = FakeKaggle()
    blob_count = iter(range(1, 1000))

    def start_blob(request):
        number = next(blob_count)
        return 200, {"token": f"blob-token-{number}", "createUrl": f"{UPLOAD_HOST}{number}"}, None

    fake.routes["StartBlobUpload"] = start_blob
    monkeypatch.setattr(
        requests.Session, "send", lambda session, prepared, **kw: fake.send(session, prepared, **kw)
    )
    return fake


def run_cli(argv: list[str], monkeypatch) -> int:
    monkeypatch.setattr(cli, "COMMAND_GROUPS", ("kaggle",))
    return cli.main(argv)


def submission_notebook(path: Path) -> Path:
    notebook = nbformat.v4.new_notebook()
    parameters = nbformat.v4.new_code_cell('ARTIFACT_DATASET = "arena-preference-artifact"\n')
    parameters.metadata["tags"] = ["parameters"]
    run = nbformat.v4.new_code_cell(
        "!pip install --no-index --find-links /kaggle/input/kaggle-utils-wheels -r "
        "/kaggle/input/kaggle-utils-wheels/requirements.txt\n"
        'print(open("/kaggle/input/llm-classification-finetuning/test.csv").read())\n'
    )
    run.outputs = [nbformat.v4.new_output("stream", text="a local output that must not be pushed\n")]
    install = nbformat.v4.new_code_cell("# replaced by the canonical install cell when built\n")
    install.metadata["tags"] = ["offline-install"]
    notebook.cells = [parameters, run, install]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, path)
    return path


SAVE_KERNEL_OK = {
    "ref": "/code/alice/arena-preference-submission",
    "url": "https://www.kaggle.com/code/alice/arena-preference-submission",
    "versionNumber": 7,
}


# --------------------------------------------------------------------------- kernels push


def test_push_sends_the_built_folder(fake_kaggle, tmp_path, monkeypatch, capsys):
    fake_kaggle.routes["SaveKernel"] = SAVE_KERNEL_OK
    notebook = submission_notebook(tmp_path / "notebooks" / "submission.ipynb")
    cfg = KaggleConfig(build_dir=str(tmp_path / "build"))
    result = push_notebook(notebook, cfg)

    (call,) = fake_kaggle.requests
    assert call.method == "POST" and call.url == API + "kernels.KernelsApiService/SaveKernel"
    assert call.headers["Authorization"] == "Basic " + base64.b64encode(f"alice:{FAKE_KEY}".encode()).decode()
    body = call.json()
    assert body["slug"] == "alice/arena-preference-submission"
    assert body["newTitle"] == "Arena Preference Submission"
    assert body["enableInternet"] is False and body["enableGpu"] is True
    assert body["machineShape"] == "NvidiaTeslaT4"
    assert body["competitionDataSources"] == ["llm-classification-finetuning"]
    assert body["datasetDataSources"] == [
        "alice/arena-preference-artifact",
        "alice/kaggle-utils-wheels",
        "alice/kaggle-utils-package",
    ]
    assert body["kernelType"] == "notebook" and body["language"] == "python"
    pushed = json.loads(body["text"])
    assert pushed["cells"][1]["outputs"] == []  # the client strips outputs
    assert "/kaggle/input/kaggle-utils-wheels" in pushed["cells"][1]["source"]
    from kaggle_utils.kaggle.install_cell import INSTALL_CELL_SOURCE

    assert "".join(pushed["cells"][2]["source"]) == INSTALL_CELL_SOURCE  # what is pushed is the template
    assert (result.kernel, result.version) == ("alice/arena-preference-submission", 7)
    assert FAKE_KEY not in capsys.readouterr().out


def test_push_command_with_accelerator(fake_kaggle, tmp_path, monkeypatch, capsys):
    fake_kaggle.routes["SaveKernel"] = SAVE_KERNEL_OK
    notebook = submission_notebook(tmp_path / "submission.ipynb")
    config = tmp_path / "config.yaml"
    config.write_text(f"kaggle:\n  build_dir: {tmp_path / 'build'}\n")
    argv = ["kaggle", "push", str(notebook), "--accelerator", "NvidiaL4", "--config", str(config)]
    assert run_cli(argv, monkeypatch) == 0
    body = fake_kaggle.calls("SaveKernel")[0].json()
    assert body["machineShape"] == "NvidiaL4" and body["enableGpu"] is True
    assert "pushed alice/arena-preference-submission version 7" in capsys.readouterr().out


def test_push_refused_when_the_check_fails(fake_kaggle, tmp_path):
    notebook = submission_notebook(tmp_path / "submission.ipynb")
    nb = nbformat.read(notebook, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell('open("/kaggle/input/not-attached/x.bin")'))
    nbformat.write(nb, notebook)
    with pytest.raises(UsageError, match="'not-attached'"):
        push_notebook(notebook, KaggleConfig(build_dir=str(tmp_path / "build")))
    assert fake_kaggle.calls("SaveKernel") == []


def test_push_reports_sources_kaggle_rejected(fake_kaggle, tmp_path):
    fake_kaggle.routes["SaveKernel"] = {
        **SAVE_KERNEL_OK,
        "invalidDatasetSources": ["alice/kaggle-utils-package"],
    }
    notebook = submission_notebook(tmp_path / "submission.ipynb")
    with pytest.raises(UsageError, match="rejected its dataset sources"):
        push_notebook(notebook, KaggleConfig(build_dir=str(tmp_path / "build")))


def test_access_token_is_introspected_and_sent_as_bearer(fake_kaggle, tmp_path, monkeypatch):
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    monkeypatch.setenv("KAGGLE_API_TOKEN", FAKE_TOKEN)
    fake_kaggle.routes["IntrospectToken"] = {"active": True, "username": "tokenuser"}
    fake_kaggle.routes["SaveKernel"] = SAVE_KERNEL_OK
    push_notebook(
        submission_notebook(tmp_path / "submission.ipynb"), KaggleConfig(build_dir=str(tmp_path / "b"))
    )
    assert fake_kaggle.calls("IntrospectToken")[0].json() == {"token": FAKE_TOKEN}
    save = fake_kaggle.calls("SaveKernel")[0]
    assert save.headers["Authorization"] == f"Bearer {FAKE_TOKEN}"
    assert save.json()["slug"] == "tokenuser/arena-preference-submission"


# --------------------------------------------------------------------------- credentials


def test_missing_credentials_is_one_clear_line(fake_kaggle, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    assert credential_source() is None
    notebook = submission_notebook(tmp_path / "submission.ipynb")
    assert run_cli(["kaggle", "push", str(notebook)], monkeypatch) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {MISSING_CREDENTIALS}\n"
    for where in ("KAGGLE_API_TOKEN", "~/.kaggle/access_token", "KAGGLE_USERNAME", "~/.kaggle/kaggle.json"):
        assert where in captured.err
    assert fake_kaggle.requests == []


def test_kaggle_json_is_found_and_never_printed(fake_kaggle, tmp_path, monkeypatch, capsys):
    from kaggle.api.kaggle_api_extended import KaggleApi

    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    config = Path(os.environ["KAGGLE_CONFIG_DIR"])
    config.mkdir()
    (config / "kaggle.json").write_text(json.dumps({"username": "carol", "key": FAKE_KEY}))
    assert credential_source() == str(config / "kaggle.json")
    # Even with the client's verbose mode on (it prints request headers), the key must not reach the terminal.
    monkeypatch.setattr(KaggleApi, "args", ["--verbose"])
    fake_kaggle.routes["SaveKernel"] = SAVE_KERNEL_OK
    push_notebook(
        submission_notebook(tmp_path / "submission.ipynb"), KaggleConfig(build_dir=str(tmp_path / "b"))
    )
    assert fake_kaggle.calls("SaveKernel")[0].json()["slug"] == "carol/arena-preference-submission"
    captured = capsys.readouterr()
    encoded = base64.b64encode(f"carol:{FAKE_KEY}".encode()).decode()
    assert FAKE_KEY not in captured.out + captured.err and encoded not in captured.out + captured.err


def test_http_errors_become_one_line(fake_kaggle, tmp_path):
    fake_kaggle.routes["SaveKernel"] = lambda request: (
        403,
        {"code": 403, "message": "Permission denied"},
        None,
    )
    with pytest.raises(UsageError, match="Kaggle refused kernels push .*HTTP 403.*Permission denied"):
        push_notebook(
            submission_notebook(tmp_path / "submission.ipynb"), KaggleConfig(build_dir=str(tmp_path / "b"))
        )


# --------------------------------------------------------------------------- datasets


REAL_LOOKING_KEY = "0123456789abcdef0123456789abcdef"  # 32 hex digits, the shape of a legacy Kaggle key


def add_junk(folder: Path) -> dict[str, bytes]:
    """Secrets and clutter that real run folders collect; none of it is in the manifest."""
    junk = {
        ".env": b"KAGGLE_KEY=" + REAL_LOOKING_KEY.encode() + b"\n",
        ".kaggle/kaggle.json": json.dumps({"username": "alice", "key": REAL_LOOKING_KEY}).encode(),
        "kaggle.json": json.dumps({"username": "alice", "key": REAL_LOOKING_KEY}).encode(),
        "checkpoint-500/optimizer.pt": b"optimizer state " * 8,
        ".ipynb_checkpoints/train-checkpoint.ipynb": b"{}",
        "tmp/scratch.bin": b"scratch",
        "adapter/.ipynb_checkpoints/adapter_config-checkpoint.json": b"{}",
    }
    for relative, content in junk.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(content)
    return junk


def _zip_names(data: bytes) -> set[str]:
    return set(zipfile.ZipFile(io.BytesIO(data)).namelist())


def test_upload_creates_a_dataset_with_subfolders_kept(fake_kaggle, tmp_path, capsys):
    fake_kaggle.routes["GetDatasetStatus"] = lambda request: (
        404,
        {"code": 404, "message": "Not found"},
        None,
    )
    fake_kaggle.routes["CreateDataset"] = {
        "ref": "alice/arena-preference-artifact",
        "url": "https://k/d",
        "status": "ok",
    }
    artifact = make_artifact(tmp_path / "artifact")
    result = upload_dataset(artifact, KaggleConfig(), role="artifact", message="fold 0")

    assert {k: v for k, v in result.items() if k != "files"} == {
        "ref": "alice/arena-preference-artifact",
        "created": True,
        "url": "https://k/d",
        "role": "artifact",
    }
    written = json.loads((artifact / "dataset-metadata.json").read_text())
    assert written == {
        "title": "Arena Preference Artifact",
        "id": "alice/arena-preference-artifact",
        "licenses": [{"name": "CC0-1.0"}],
    }
    starts = {call.json()["name"]: call.json() for call in fake_kaggle.calls("StartBlobUpload")}
    assert set(starts) == {
        "adapter.zip",
        "model.zip",
        "tokenizer.zip",
        "notes.txt",
        "manifest.json",
    }  # folders as archives
    assert all(start["type"] == "DATASET" for start in starts.values())
    zips = [body for body in fake_kaggle.uploads.values() if body.startswith(b"PK")]
    assert {"adapter_config.json", "adapter_model.safetensors"} in [_zip_names(z) for z in zips]
    assert b"trained on fold 0" in fake_kaggle.uploads.values()
    (create,) = fake_kaggle.calls("CreateDataset")
    body = create.json()
    assert (body["ownerSlug"], body["slug"], body["title"]) == (
        "alice",
        "arena-preference-artifact",
        "Arena Preference Artifact",
    )
    assert body["licenseName"] == "CC0-1.0" and body["isPrivate"] is True
    assert sorted(f["token"] for f in body["files"]) == [f"blob-token-{n}" for n in range(1, 6)]
    assert "created dataset alice/arena-preference-artifact" in capsys.readouterr().out


def test_upload_versions_an_existing_dataset(fake_kaggle, tmp_path, monkeypatch):
    fake_kaggle.routes["GetDatasetStatus"] = {"status": "ready"}
    fake_kaggle.routes["CreateDatasetVersion"] = {
        "ref": "alice/kaggle-utils-wheels",
        "url": "https://k/w",
        "status": "ok",
    }
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "peft-0.21.2-py3-none-any.whl").write_bytes(b"PK-not-really")
    (wheels / "wheels.json").write_text("{}")
    argv = ["kaggle", "upload-artifact", str(wheels), "-m", "peft 0.21.2", "--dir-mode", "tar"]
    assert run_cli(argv, monkeypatch) == 0  # role "wheels" found from wheels.json
    (version,) = fake_kaggle.calls("CreateDatasetVersion")
    body = version.json()
    assert (body["ownerSlug"], body["datasetSlug"]) == ("alice", "kaggle-utils-wheels")
    assert body["body"]["versionNotes"] == "peft 0.21.2"
    assert len(body["body"]["files"]) == 2
    assert fake_kaggle.calls("CreateDataset") == []


def test_upload_checks_an_artifact_manifest_first(fake_kaggle, tmp_path):
    artifact = make_artifact(tmp_path / "artifact", with_manifest=False)
    (artifact / "manifest.json").write_text(json.dumps({"ordering": "quant-then-ft"}))
    with pytest.raises(UsageError, match="missing fields"):
        upload_dataset(artifact, KaggleConfig())
    assert fake_kaggle.requests == []


def test_upload_refuses_unknown_folders_and_skip_mode(fake_kaggle, tmp_path):
    folder = tmp_path / "stuff"
    folder.mkdir()
    (folder / "x.txt").write_text("x")
    with pytest.raises(UsageError, match="pass --role or --slug"):
        upload_dataset(folder, KaggleConfig())
    with pytest.raises(UsageError, match="other modes drop subfolders"):
        upload_dataset(folder, KaggleConfig(), role="artifact", dir_mode="skip")


def _sent(fake: FakeKaggle) -> tuple[set[str], set[str]]:
    """Top-level names the client uploaded, and every member name inside the uploaded zip archives."""
    names = {call.json()["name"] for call in fake.calls("StartBlobUpload")}
    members = set()
    for body in fake.uploads.values():
        if body.startswith(b"PK"):
            members |= _zip_names(body)
    return names, members


def test_upload_sends_exactly_the_manifest_files_and_lists_the_rest(fake_kaggle, tmp_path, capsys):
    fake_kaggle.routes["GetDatasetStatus"] = {"status": "ready"}
    fake_kaggle.routes["CreateDatasetVersion"] = {
        "ref": "alice/arena-preference-artifact",
        "url": "u",
        "status": "ok",
    }
    artifact = make_artifact(tmp_path / "artifact")
    junk = add_junk(artifact)
    result = upload_dataset(artifact, KaggleConfig(), message="fold 0")

    names, members = _sent(fake_kaggle)
    assert names == {"adapter.zip", "model.zip", "tokenizer.zip", "notes.txt", "manifest.json"}
    assert members == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "model.safetensors",
        "tokenizer.json",
    }
    uploaded = b"".join(fake_kaggle.uploads.values())
    assert REAL_LOOKING_KEY.encode() not in uploaded and b"optimizer state" not in uploaded
    assert set(result["files"]) == {
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "model/model.safetensors",
        "tokenizer/tokenizer.json",
        "notes.txt",
        "manifest.json",
    }
    out = capsys.readouterr().out
    assert "sending 6 files" in out
    for relative, size in result["files"].items():
        assert f"  {relative}  {size:,} bytes" in out  # path + bytes of everything sent
    assert f"left out (not sent): {len(junk)} files" in out
    for relative in junk:
        assert f"  {relative}  " in out
    assert ".env  " in out and "[credential-looking]" in out


def test_upload_refuses_a_credential_the_manifest_lists(fake_kaggle, tmp_path, monkeypatch, capsys):
    artifact = make_artifact(tmp_path / "artifact")
    manifest = json.loads((artifact / "manifest.json").read_text())
    (artifact / ".env").write_text("SECRET=1\n")
    manifest["files"][".env"] = {"bytes": 9, "sha256": hashlib.sha256(b"SECRET=1\n").hexdigest()}
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    assert run_cli(["kaggle", "upload-artifact", str(artifact)], monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing to upload" in err and ".env (credential-looking name)" in err
    assert fake_kaggle.requests == []


def test_upload_refuses_a_file_that_holds_a_kaggle_key(fake_kaggle, tmp_path):
    folder = tmp_path / "stuff"
    folder.mkdir()
    (folder / "settings.json").write_text(json.dumps({"username": "alice", "key": REAL_LOOKING_KEY}))
    (folder / "readme.txt").write_text("plain notes")
    with pytest.raises(UsageError, match=r"settings.json \(contains a Kaggle-looking key or token\)"):
        upload_dataset(folder, KaggleConfig(), slug="stuff", include=["*"])
    assert fake_kaggle.requests == []


def test_upload_refuses_an_artifact_whose_files_differ_from_the_manifest(fake_kaggle, tmp_path):
    artifact = make_artifact(tmp_path / "artifact")
    (artifact / "notes.txt").write_text("trained on fold 1")  # same size, different bytes
    with pytest.raises(UsageError, match="notes.txt does not match its sha256"):
        upload_dataset(artifact, KaggleConfig())
    assert fake_kaggle.requests == []


def test_upload_of_a_wheels_folder_sends_only_what_build_wheels_writes(fake_kaggle, tmp_path, capsys):
    fake_kaggle.routes["GetDatasetStatus"] = {"status": "ready"}
    fake_kaggle.routes["CreateDatasetVersion"] = {
        "ref": "alice/kaggle-utils-wheels",
        "url": "u",
        "status": "ok",
    }
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = wheels / "peft-0.21.2-py3-none-any.whl"
    wheel.write_bytes(b"a stand-in wheel")
    (wheels / "requirements.txt").write_text("peft==0.21.2\n")
    listing = {"wheels": {wheel.name: hashlib.sha256(wheel.read_bytes()).hexdigest()}}
    (wheels / "wheels.json").write_text(json.dumps(listing))
    (wheels / ".env").write_text("KAGGLE_KEY=" + REAL_LOOKING_KEY)
    (wheels / "pip-log.txt").write_text("log")
    upload_dataset(wheels, KaggleConfig())
    names, _ = _sent(fake_kaggle)
    assert names == {wheel.name, "requirements.txt", "wheels.json"}
    out = capsys.readouterr().out
    assert "left out (not sent): 2 files" in out and "pip-log.txt" in out

    wheel.write_bytes(b"a changed wheel!")  # the folder no longer matches its listing
    with pytest.raises(UsageError, match="does not match its sha256 in wheels.json"):
        upload_dataset(wheels, KaggleConfig())


def test_upload_of_another_folder_needs_an_explicit_listing(fake_kaggle, tmp_path):
    folder = tmp_path / "stuff"
    folder.mkdir()
    (folder / "x.txt").write_text("x")
    with pytest.raises(UsageError, match="--include PATTERN"):
        upload_dataset(folder, KaggleConfig(), role="artifact")
    with pytest.raises(UsageError, match="'y.txt' matches no file"):
        upload_dataset(folder, KaggleConfig(), slug="stuff", include=["y.txt"])
    assert fake_kaggle.requests == []


def test_network_failures_become_one_line_naming_the_operation(fake_kaggle, tmp_path, monkeypatch, capsys):
    for failure in (requests.ReadTimeout("read timed out"), requests.ConnectionError("refused")):

        def fail(request, failure=failure):
            raise failure

        fake_kaggle.routes["CreateCodeSubmission"] = fail
        assert run_cli(["kaggle", "submit", "--version", "7", "-m", "m"], monkeypatch) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert err.startswith("error: submission of alice/arena-preference-submission version 7")
        assert type(failure).__name__ in err


# --------------------------------------------------------------------------- submit, status, download


def test_submit_by_kernel_and_version(fake_kaggle, monkeypatch, capsys):
    fake_kaggle.routes["CreateCodeSubmission"] = {
        "message": "Your submission was successfully saved",
        "ref": 42,
    }
    argv = ["kaggle", "submit", "--version", "7", "-m", "quant-then-ft fold 0, swap TTA"]
    assert run_cli(argv, monkeypatch) == 0
    (call,) = fake_kaggle.calls("CreateCodeSubmission")
    assert call.url == API + "competitions.CompetitionApiService/CreateCodeSubmission"
    assert call.json() == {
        "competitionName": "llm-classification-finetuning",
        "kernelOwner": "alice",
        "kernelSlug": "arena-preference-submission",
        "kernelVersion": 7,
        "fileName": "submission.csv",
        "submissionDescription": "quant-then-ft fold 0, swap TTA",
    }
    assert "successfully saved" in capsys.readouterr().out


def test_submit_other_kernel(fake_kaggle):
    fake_kaggle.routes["CreateCodeSubmission"] = {"message": "ok"}
    submit_kernel(KaggleConfig(competition="lmsys-chatbot-arena"), 3, "m", kernel="bob/other-kernel")
    body = fake_kaggle.calls("CreateCodeSubmission")[0].json()
    assert (body["kernelOwner"], body["kernelSlug"], body["competitionName"]) == (
        "bob",
        "other-kernel",
        "lmsys-chatbot-arena",
    )


def test_status_with_submissions(fake_kaggle, monkeypatch, capsys):
    fake_kaggle.routes["GetKernelSessionStatus"] = {
        "status": "ERROR",
        "failureMessage": "Notebook Threw Exception",
    }
    fake_kaggle.routes["ListSubmissions"] = {
        "submissions": [{"ref": 1, "description": "v7", "status": "COMPLETE", "publicScore": "0.9412"}]
    }
    assert run_cli(["kaggle", "status", "--submissions", "3"], monkeypatch) == 0
    status = fake_kaggle.calls("GetKernelSessionStatus")[0].json()
    assert (status["userName"], status["kernelSlug"]) == ("alice", "arena-preference-submission")
    assert (
        fake_kaggle.calls("ListSubmissions")[0].json()["competitionName"] == "llm-classification-finetuning"
    )
    out = capsys.readouterr().out
    assert "alice/arena-preference-submission: ERROR (Notebook Threw Exception)" in out
    assert "0.9412" in out and "v7" in out


def test_download_unzips_competition_files(fake_kaggle, tmp_path, monkeypatch):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("train.csv", "id,prompt\n1,[]\n")
        bundle.writestr("test.csv", "id,prompt\n2,[]\n")
    payload = archive.getvalue()
    headers = {
        "Content-Type": "application/zip",
        "Content-Length": str(len(payload)),
        "X-Url": "https://storage.kaggle.test/llm-classification-finetuning.zip?sig=x",
    }
    fake_kaggle.routes["DownloadDataFiles"] = lambda request: (200, payload, dict(headers))
    assert run_cli(["kaggle", "download", "--path", str(tmp_path / "data")], monkeypatch) == 0
    assert fake_kaggle.calls("DownloadDataFiles")[0].json() == {
        "competitionName": "llm-classification-finetuning"
    }
    assert (tmp_path / "data" / "train.csv").read_text() == "id,prompt\n1,[]\n"
    assert (tmp_path / "data" / "test.csv").is_file()


def test_download_forbidden_says_to_accept_the_rules(fake_kaggle, tmp_path):
    from kaggle_utils.kaggle.workflow import download_competition

    fake_kaggle.routes["DownloadDataFiles"] = lambda request: (
        403,
        {"code": 403, "message": "Forbidden"},
        None,
    )
    with pytest.raises(UsageError, match="accept the rules"):
        download_competition(KaggleConfig(), tmp_path)


# --------------------------------------------------------------------------- build-wheels


def test_dependency_closure_pins_installed_versions_and_leaves_torch_out():
    from importlib import metadata

    cfg = KaggleConfig()
    pins, left_out = dependency_closure(["peft"], cfg.wheel_exclude)
    assert pins["peft"] == metadata.version("peft")
    assert pins["transformers"] == metadata.version("transformers")  # peft -> transformers
    assert "accelerate" in pins and "safetensors" in pins
    assert "torch" not in pins and "numpy" not in pins
    assert left_out["torch"].startswith("excluded")
    with pytest.raises(UsageError, match="not-a-real-package.*not installed"):
        dependency_closure(["not-a-real-package"], ())


def test_platform_tags_cover_older_manylinux():
    tags = platform_tags("manylinux_2_35_x86_64")
    assert tags[0] == "manylinux_2_35_x86_64"
    assert {"manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64"} <= set(tags)
    assert platform_tags("win_amd64") == ["win_amd64"]


def _pip_env() -> dict:
    """pip without the machine's index or find-links configuration: only what a test passes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def test_build_wheels_installs_offline_in_a_fresh_venv(tmp_path, monkeypatch):
    """The folder installs with `pip install --no-index --find-links` into a new venv and imports
    kaggle_utils.

    The third-party part is a small local project here (no network in tests); `--no-deps` because the fresh
    venv has no torch, which the folder leaves to Kaggle's image on purpose."""
    for name in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    probe = tmp_path / "probe"
    (probe / "arena_probe").mkdir(parents=True)
    (probe / "arena_probe" / "__init__.py").write_text('VALUE = "probe ok"\n')
    (probe / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = ["setuptools"]
            build-backend = "setuptools.build_meta"
            [project]
            name = "arena-probe"
            version = "0.1.0"
            """
        )
    )
    source = tmp_path / "source"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(source),
            str(probe),
        ],
        check=True,
        capture_output=True,
        env=_pip_env(),
    )
    out = tmp_path / "wheels"
    report = build_wheels(
        out, packages=["arena-probe==0.1.0"], pip_args=["--no-index", "--find-links", str(source)]
    )
    names = sorted(path.name for path in report.wheels)
    assert names[0].startswith("arena_probe-0.1.0-") and names[1].startswith("kaggle_utils-0.1.0-")
    assert (out / "requirements.txt").read_text() == "arena-probe==0.1.0\nkaggle-utils==0.1.0\n"
    manifest = json.loads((out / "wheels.json").read_text())
    assert set(manifest["wheels"]) == set(names) and manifest["python_version"] == "3.12"
    package_files = zipfile.ZipFile(out / names[1]).namelist()
    assert "kaggle_utils/kaggle/wheels.py" in package_files
    assert "kaggle_utils/cli/kaggle.py" in package_files

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "--no-index", "--find-links", str(out), "--no-deps"]
    install += ["-r", str(out / "requirements.txt")]
    result = subprocess.run(install, capture_output=True, text=True, env=_pip_env())
    assert result.returncode == 0, result.stderr
    probe_import = (
        "import arena_probe, kaggle_utils; "
        "print(arena_probe.VALUE, kaggle_utils.__version__, kaggle_utils.__file__)"
    )
    imported = subprocess.run([str(python), "-c", probe_import], capture_output=True, text=True, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith("probe ok 0.1.0 ")
    location = imported.stdout.split()[-1]
    assert location.startswith(str(venv)), location  # the installed copy, not this checkout

    # --package-only refreshes the package wheel alone, for the small package dataset.
    package = tmp_path / "package"
    report = build_wheels(package, include_dependencies=False)
    assert [path.name for path in report.wheels] == [names[1]]
    assert (package / "requirements.txt").read_text() == "kaggle-utils==0.1.0\n"


def test_build_wheels_reports_pip_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    with pytest.raises(UsageError, match="downloading 1 wheels failed"):
        build_wheels(
            tmp_path / "w",
            packages=["arena-probe==9.9.9"],
            include_package=False,
            pip_args=["--no-index", "--find-links", str(tmp_path)],
        )


# --------------------------------------------------------------------------- push --dry-run without
# credentials


def test_dry_run_without_credentials_names_the_owner_option(fake_kaggle, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    notebook = submission_notebook(tmp_path / "submission.ipynb")
    build = ["--set", f"kaggle.build_dir={tmp_path / 'b'}"]
    assert run_cli(["kaggle", "push", str(notebook), "--dry-run", *build], monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no Kaggle credentials")
    assert "--dry-run needs no credential with --owner NAME (or kaggle.owner in the config)" in err
    assert (
        run_cli(["kaggle", "push", str(notebook), "--dry-run", "--owner", "dora", *build], monkeypatch) == 0
    )
    assert (
        json.loads(
            (tmp_path / "b" / "kernels" / "arena-preference-submission" / "kernel-metadata.json").read_text()
        )["id"]
        == "dora/arena-preference-submission"
    )
    assert fake_kaggle.requests == []


def _shipped_ensemble(tmp_path: Path, train_data) -> tuple[Path, Path]:
    """`ship.write_shipped`'s ensemble of two fold artifacts (stand-in model files) and the feature baseline,
    the baseline also shipped as the fallback; returns (shipped folder, first member's source folder)."""
    from kaggle_utils.core.config import BaselineConfig, FoldConfig
    from kaggle_utils.data.folds import make_folds
    from kaggle_utils.evaluate.candidates import Candidate, decide_ship
    from kaggle_utils.evaluate.ship import write_shipped
    from kaggle_utils.train.baseline import run_baseline_cv

    runs = tmp_path / "runs"
    folds = [make_artifact(runs / "seed0" / "ftq" / f"fold{index}" / "artifact") for index in range(2)]
    frame = train_data.frame
    fitted = run_baseline_cv(
        frame, make_folds(frame, FoldConfig(n_folds=3, seed=0)), BaselineConfig(model="logreg")
    )
    baseline = fitted.model.save(runs / "baseline_model.json")
    members = [
        {"name": f"ftq/fold{index}", "kind": "model", "path": str(path), "weight": 0.4}
        for index, path in enumerate(folds)
    ]
    members.append({"name": "feature-baseline", "kind": "baseline", "path": str(baseline), "weight": 0.2})
    labels = [0, 1, 2] * 10
    candidate = Candidate(name="blend", kind="blend", probs=[[0.4, 0.4, 0.2]] * 30, members=members)
    shipped = write_shipped(
        decide_ship(labels, [candidate]),
        tmp_path / "orderings" / "shipped",
        class_prior=[0.4, 0.4, 0.2],
        dialect="lmsys",
        baseline=baseline,
    )
    return shipped, folds[0]


def test_upload_sends_a_shipped_ensemble_with_every_member_file(fake_kaggle, tmp_path, train_data, capsys):
    """An ensemble artifact (manifest kind: ensemble) uploads: its manifest, every member file it lists with
    sha256 (checked), the fallback baseline; members/ travels as one archive keeping the member folders."""
    from kaggle_utils.kaggle.upload import plan_upload

    fake_kaggle.routes["GetDatasetStatus"] = {"status": "ready"}
    fake_kaggle.routes["CreateDatasetVersion"] = {
        "ref": "alice/arena-preference-artifact",
        "url": "u",
        "status": "ok",
    }
    shipped, _ = _shipped_ensemble(tmp_path, train_data)
    junk = add_junk(shipped)
    member_files = (
        "manifest.json",
        "notes.txt",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "model/model.safetensors",
        "tokenizer/tokenizer.json",
    )
    expected = {"manifest.json", "baseline.json", "baseline.json.manifest.json"} | {
        f"members/ftq_fold{index}/{name}" for index in range(2) for name in member_files
    }
    plan = plan_upload(shipped)
    assert plan.kind == "ensemble" and set(plan.files) == expected
    assert set(plan.left_out) == set(junk)

    result = upload_dataset(shipped, KaggleConfig(), role="artifact", message="ensemble")
    assert set(result["files"]) == expected
    names, members = _sent(fake_kaggle)
    assert names == {"members.zip", "manifest.json", "baseline.json", "baseline.json.manifest.json"}
    assert {f"ftq_fold{index}/{name}" for index in range(2) for name in member_files} <= members
    assert REAL_LOOKING_KEY.encode() not in b"".join(fake_kaggle.uploads.values())
    assert f"sending {len(expected)} files" in capsys.readouterr().out


def test_upload_refuses_an_ensemble_that_is_not_self_contained_or_was_altered(
    fake_kaggle, tmp_path, train_data, monkeypatch, capsys
):
    shipped, source = _shipped_ensemble(tmp_path, train_data)
    old = (
        tmp_path / "old-style"
    )  # members named by absolute paths, no file table: nothing of them would travel
    old.mkdir()
    (old / "manifest.json").write_text(
        json.dumps(
            {
                "kind": "ensemble",
                "class_prior": [0.4, 0.4, 0.2],
                "members": [
                    {"name": "ftq/fold0", "kind": "model", "path": str(source.resolve()), "weight": 1.0}
                ],
            }
        )
    )
    assert run_cli(["kaggle", "upload-artifact", str(old)], monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{old / 'manifest.json'}: an ensemble artifact must list every file it holds" in err

    manifest = json.loads((shipped / "manifest.json").read_text())
    escaped = {
        **manifest,
        "members": [{**manifest["members"][0], "path": str(source.resolve())}, *manifest["members"][1:]],
    }
    (shipped / "manifest.json").write_text(json.dumps(escaped))
    with pytest.raises(
        UsageError, match=r"members\[0\] \(ftq/fold0\) path '/.*' is not inside the ensemble folder"
    ):
        upload_dataset(shipped, KaggleConfig())
    unlisted = {
        **manifest,
        "files": {
            k: v for k, v in manifest["files"].items() if k != "members/ftq_fold1/model/model.safetensors"
        },
    }
    (shipped / "manifest.json").write_text(json.dumps(unlisted))
    with pytest.raises(
        UsageError,
        match=r"members\[1\] \(ftq/fold1\): file members/ftq_fold1/model/model.safetensors "
        r"is not listed in the ensemble's 'files'",
    ):
        upload_dataset(shipped, KaggleConfig())
    (shipped / "manifest.json").write_text(json.dumps(manifest))
    notes = shipped / "members" / "ftq_fold1" / "notes.txt"
    notes.unlink()  # a new file: the shipped copy may be a hard link to the run's
    notes.write_text("trained on fold 9")  # same size, different bytes
    with pytest.raises(UsageError, match="file members/ftq_fold1/notes.txt does not match its sha256"):
        upload_dataset(shipped, KaggleConfig())
    assert fake_kaggle.requests == []


def test_upload_staging_that_is_inside_or_around_the_folder_is_refused(
    fake_kaggle, tmp_path, monkeypatch, capsys
):
    """The staging folder (what the client uploads) must lie apart from the folder being uploaded: one that
    is, contains or lies inside it is refused before anything is linked or sent."""
    import re

    from kaggle_utils.kaggle.upload import plan_upload, stage_upload

    artifact = make_artifact(tmp_path / "artifact")
    plan = plan_upload(artifact)
    before = sorted(p.relative_to(artifact).as_posix() for p in artifact.rglob("*"))
    for staging, relation in ((artifact / "staged", "is inside"), (artifact, "is"), (tmp_path, "contains")):
        with pytest.raises(
            UsageError,
            match=rf"refusing to write {re.escape(str(staging))}: it {relation} the "
            rf"folder to upload {re.escape(str(artifact))}",
        ):
            stage_upload(plan, staging)
    assert sorted(p.relative_to(artifact).as_posix() for p in artifact.rglob("*")) == before

    (artifact / "tmp").mkdir()  # the command stages under the temporary folder: here inside the artifact
    monkeypatch.setattr(tempfile, "tempdir", str(artifact / "tmp"))
    assert run_cli(["kaggle", "upload-artifact", str(artifact)], monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is inside the folder to upload" in err
    assert fake_kaggle.calls("StartBlobUpload") == [] and fake_kaggle.calls("CreateDataset") == []
    assert list((artifact / "tmp").iterdir()) == []


# --------------------------------------------------------------------------- build-wheels: the target image


def _wheel(
    folder: Path, name: str, version: str, requires: list[str], requires_python: str | None = None
) -> Path:
    """A minimal pure-Python wheel whose METADATA declares `requires` (what pip download copies as it is)."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{name.replace('-', '_')}-{version}"
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"Requires-Python: {requires_python}"] if requires_python else []
    lines += [f"Requires-Dist: {requirement}" for requirement in requires]
    path = folder / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{name.replace('-', '_')}/__init__.py", "")
        wheel.writestr(f"{stem}.dist-info/METADATA", "\n".join(lines) + "\n")
        wheel.writestr(
            f"{stem}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{stem}.dist-info/RECORD", "")
    return path


def _build_from(source: Path, out: Path, packages: list[str], image, python: str | None = None) -> object:
    cfg = KaggleConfig(wheel_python_version=python or image.python)
    return build_wheels(
        out,
        cfg,
        packages=packages,
        include_package=False,
        image=image,
        pip_args=["--no-index", "--find-links", str(source)],
    )


@pytest.fixture
def no_pip_config(monkeypatch):
    for name in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)


def test_build_wheels_refuses_a_wheel_that_needs_a_newer_torch_than_the_image(tmp_path, no_pip_config):
    from kaggle_utils.kaggle.wheels import KaggleImage

    source = tmp_path / "source"
    _wheel(source, "arena-accel", "1.16.0", ["numpy>=1.17", "torch>=2.6.0", "arena-dep>=1.0"])
    _wheel(source, "arena-dep", "1.2.0", ['torch<2; python_version < "3.0"'])
    out = tmp_path / "wheels"
    image = KaggleImage(python="3.11", platform="manylinux_2_35_x86_64", packages={"torch": "2.5.1"})
    with pytest.raises(
        UsageError,
        match=r"^build-wheels: arena_accel-1\.16\.0-py3-none-any\.whl requires "
        r"torch>=2\.6\.0, but the target image has torch 2\.5\.1 \(kaggle_image\.json\)$",
    ):
        _build_from(source, out, ["arena-accel==1.16.0", "arena-dep==1.2.0"], image)
    assert not (out / "wheels.json").exists() and not (out / "requirements.txt").exists()
    # the same closure against an image with torch 2.6: built, and what could not be checked is said
    image = KaggleImage(python="3.11", platform="manylinux_2_35_x86_64", packages={"torch": "2.6.0"})
    report = _build_from(source, out, ["arena-accel==1.16.0", "arena-dep==1.2.0"], image)
    manifest = json.loads((out / "wheels.json").read_text())
    assert manifest["image"]["packages"] == {"torch": "2.6.0"} and manifest["python_version"] == "3.11"
    assert manifest["unchecked"] == {"numpy": "numpy>=1.17 (arena_accel-1.16.0-py3-none-any.whl)"}
    assert "not checked" in report.summary()


def test_build_wheels_refuses_a_wheel_for_another_python(tmp_path, no_pip_config):
    """pip download already refuses a downloaded wheel for another Python; the check covers every wheel in the
    folder (the kaggle_utils wheel built here, wheels left by an earlier build) the same way."""
    from kaggle_utils.kaggle.wheels import KaggleImage, check_against_image

    wheel = _wheel(tmp_path / "w", "arena-tf", "5.25.0", ["torch>=2.6"], requires_python=">=3.11.0")
    image = KaggleImage(python="3.10", platform="manylinux_2_35_x86_64", packages={"torch": "2.6.0"})
    with pytest.raises(
        UsageError,
        match=r"^build-wheels: arena_tf-5\.25\.0-py3-none-any\.whl requires Python "
        r">=3\.11\.0, but the target image has Python 3\.10 \(kaggle\.wheel_python_version, by "
        r"default kaggle_image\.json's\)$",
    ):
        check_against_image([wheel], "3.10", image)
    assert check_against_image([wheel], "3.11", image) == {}
    source = tmp_path / "source"
    _wheel(source, "arena-tf", "5.25.0", [], requires_python=">=3.11.0")
    with pytest.raises(UsageError, match=r"requires a different Python: 3\.10\.0 not in '>=3\.11\.0'"):
        _build_from(source, tmp_path / "wheels", ["arena-tf==5.25.0"], image)
    # kaggle.wheel_python_version (default: the image file's Python) is the Python checked
    report = _build_from(source, tmp_path / "w311", ["arena-tf==5.25.0"], image, python="3.11")
    assert [path.name for path in report.wheels] == ["arena_tf-5.25.0-py3-none-any.whl"]


def test_build_wheels_refuses_a_bundle_that_contradicts_itself(tmp_path, no_pip_config):
    from kaggle_utils.kaggle.wheels import KaggleImage

    source = tmp_path / "source"
    _wheel(source, "arena-peft", "0.22.0", ["arena-accel>=2.0"])
    _wheel(source, "arena-accel", "1.16.0", [])
    image = KaggleImage(python="3.12", platform="manylinux_2_35_x86_64", packages={"torch": "2.10.0"})
    with pytest.raises(
        UsageError,
        match=r"^build-wheels: arena_peft-0\.22\.0-py3-none-any\.whl requires "
        r"arena-accel>=2\.0, but the bundle has arena-accel 1\.16\.0$",
    ):
        _build_from(source, tmp_path / "wheels", ["arena-peft==0.22.0", "arena-accel==1.16.0"], image)


def test_the_target_image_is_stated_once():
    """kaggle_image.json is where Kaggle's Python and torch are written; the config and the docs follow it."""
    from kaggle_utils.kaggle.wheels import IMAGE_FILE, kaggle_image

    image = kaggle_image()
    assert IMAGE_FILE.name == "kaggle_image.json" and set(image.packages) >= {"torch"}
    assert KaggleConfig().wheel_python_version == image.python
    assert KaggleConfig().wheel_platform == image.platform
    docs = (Path(__file__).resolve().parents[2] / "docs" / "KAGGLE_WORKFLOW.md").read_text()
    assert f"Python {image.python}" in docs and f"torch {image.packages['torch']}" in docs


def test_pyproject_bounds_admit_only_what_the_bundled_versions_install_on():
    """requires-python and the torch floor in pyproject.toml are at least what every wheel build-wheels
    bundles
    (the versions installed here) requires: a Python or torch pyproject allows can install the bundle."""
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    python_floor = next(s.version for s in SpecifierSet(project["requires-python"]) if s.operator == ">=")
    torch = next(Requirement(line) for line in project["dependencies"] if Requirement(line).name == "torch")
    torch_floor = next(s.version for s in torch.specifier if s.operator == ">=")
    cfg = KaggleConfig()
    pins, _ = dependency_closure(cfg.wheel_packages, cfg.wheel_exclude)
    for name in pins:
        dist = metadata.distribution(name)
        requires_python = dist.metadata.get("Requires-Python")
        if requires_python:
            assert SpecifierSet(requires_python).contains(python_floor), (name, requires_python, python_floor)
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.name == "torch" and (
                requirement.marker is None or requirement.marker.evaluate({"extra": ""})
            ):
                assert requirement.specifier.contains(torch_floor), (name, line, torch_floor)
