"""`mipo-mlx export --push` against a fake Hub on 127.0.0.1 that records every API call.

    .venv/bin/python -m pytest tests/test_hub.py -x -q

FakeHub answers the endpoints huggingface_hub's HfApi calls for a push (whoami-v2, model
info, repos/create, validate-yaml, preupload, the LFS batch API and the upload it points to,
commit, repos/delete) the way the Hub does, with Xet switched off so that large files take
the plain LFS path. Nothing leaves the machine.
"""

import base64
import hashlib
import http.server
import json
import logging
import re
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml
from huggingface_hub import constants

from export_runs import make_run
from mipo_mlx import cli
from mipo_mlx.errors import UserError
from mipo_mlx.hub import push_folder

TOKEN = "hf_FakeTokenForTheLocalHub0123456789"
USER = "me"
REPO = f"{USER}/tiny-mipo"
LFS_SUFFIXES = (".safetensors", ".gguf")  # what the Hub's .gitattributes sends to LFS
# huggingface_hub's own LFS upload passes a file as data=, which httpx2 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


class FakeHub:
    """The Hub's state (repositories, LFS objects) and every request it was sent."""

    def __init__(self):
        self.requests = []  # (method, path, Authorization header)
        self.repos = {}  # repo_id -> {"private", "files": {path: bytes}, "commits": [summary], "tags"}
        self.lfs = {}  # sha256 hex -> bytes
        self.writable = {USER}  # namespaces the token may write to
        self.fail = None  # "commit" or "lfs": that step answers an error
        self.url = ""

    def add_repo(self, repo_id: str, files: dict, tags: list):
        self.repos[repo_id] = {"private": False, "files": dict(files), "commits": ["initial"], "tags": tags}

    def calls(self, *prefixes) -> list[str]:
        """'METHOD path' of the recorded requests, only those starting with one of `prefixes` when given."""
        names = [f"{method} {path}" for method, path, _ in self.requests]
        return [n for n in names if not prefixes or n.startswith(prefixes)]


class Handler(http.server.BaseHTTPRequestHandler):
    hub: FakeHub  # set on the subclass each server gets

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def do_GET(self):
        self.route()

    def do_POST(self):
        self.route()

    def do_PUT(self):
        self.route()

    def do_DELETE(self):
        self.route()

    def body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while size := int(self.rfile.readline().strip() or b"0", 16):
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return data
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def reply(self, status: int, payload=None, headers: dict | None = None):
        data = json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def route(self):
        hub, path = self.hub, self.path.split("?")[0]
        hub.requests.append((self.command, path, self.headers.get("Authorization")))
        data = self.body()
        if path.startswith("/lfs-upload/"):  # a presigned storage URL: no Hub token
            return self.lfs_upload(path.rsplit("/", 1)[1], data)
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self.reply(401, {"error": "Invalid credentials in Authorization header"},
                              {"X-Error-Message": "Invalid credentials in Authorization header"})
        routes = [
            ("GET", r"/api/whoami-v2", self.whoami),
            ("GET", r"/api/models/([^/]+/[^/]+)", self.model_info),
            ("POST", r"/api/repos/create", self.create_repo),
            ("DELETE", r"/api/repos/delete", self.delete_repo),
            ("POST", r"/api/validate-yaml", lambda body: self.reply(200, {"errors": [], "warnings": []})),
            ("POST", r"/api/models/([^/]+/[^/]+)/preupload/main", self.preupload),
            ("POST", r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", self.lfs_batch),
            ("POST", r"/api/models/([^/]+/[^/]+)/commit/main", self.commit),
        ]
        for method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if method == self.command and match:
                return handler(*match.groups(), data)
        self.reply(404, {"error": f"fake hub has no route {self.command} {path}"})

    def missing(self, repo_id: str) -> bool:
        if repo_id in self.hub.repos:
            return False
        self.reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        return True

    def forbidden(self, namespace: str) -> bool:
        if namespace in self.hub.writable:
            return False
        self.reply(403, {"error": "You don't have the rights to create a model under this namespace"},
                   {"X-Error-Message": "You don't have the rights to create a model under this namespace"})
        return True

    def whoami(self, body):
        self.reply(200, {"type": "user", "name": USER, "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"role": "write"}}})

    def model_info(self, repo_id, body):
        if not self.missing(repo_id):
            repo = self.hub.repos[repo_id]
            self.reply(200, {"id": repo_id, "private": repo["private"], "tags": repo["tags"],
                             "sha": f"{len(repo['commits']):040x}",
                             "siblings": [{"rfilename": name} for name in sorted(repo["files"])]})

    def create_repo(self, body):
        request = json.loads(body)
        repo_id = f"{request['organization']}/{request['name']}"
        if self.forbidden(request["organization"]):
            return
        if repo_id in self.hub.repos:
            return self.reply(409, {"error": "You already created this model repo"})
        self.hub.repos[repo_id] = {"private": request.get("visibility") == "private",
                                   "files": {".gitattributes": b"*.safetensors filter=lfs\n"}, "commits": [],
                                   "tags": []}
        self.reply(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def delete_repo(self, body):
        request = json.loads(body)
        repo_id = f"{request['organization']}/{request['name']}"
        if not self.missing(repo_id):
            del self.hub.repos[repo_id]
            self.reply(200)

    def preupload(self, repo_id, body):
        if self.missing(repo_id) or self.forbidden(repo_id.split("/")[0]):
            return
        files = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                  "shouldIgnore": False} for f in json.loads(body)["files"]]
        self.reply(200, {"files": files})

    def lfs_batch(self, repo_id, body):
        if self.missing(repo_id):
            return
        objects = [{"oid": o["oid"], "size": o["size"],
                    "actions": {"upload": {"href": f"{self.hub.url}/lfs-upload/{o['oid']}"}}}
                   for o in json.loads(body)["objects"]]
        self.reply(200, {"transfer": "basic", "objects": objects})

    def lfs_upload(self, oid, data):
        if self.hub.fail == "lfs":
            return self.reply(403, {"error": "Request has expired"})
        assert hashlib.sha256(data).hexdigest() == oid
        self.hub.lfs[oid] = data
        self.reply(200)

    def commit(self, repo_id, body):
        if self.missing(repo_id) or self.forbidden(repo_id.split("/")[0]):
            return
        if self.hub.fail == "commit":
            return self.reply(500, {"error": "Internal Error - We're working hard to fix this as soon as possible!"})
        lines = [json.loads(line) for line in body.decode().splitlines()]
        repo, files = self.hub.repos[repo_id], {}
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif value["oid"] in self.hub.lfs:  # lfsFile
                files[value["path"]] = self.hub.lfs[value["oid"]]
            else:
                return self.reply(422, {"error": f"LFS object {value['oid']} was never uploaded"})
        repo["files"].update(files)
        repo["commits"].append(lines[0]["value"]["summary"])
        if "README.md" in files:  # the Hub reads tags from the card's front matter
            repo["tags"] = yaml.safe_load(files["README.md"].decode().split("---\n")[1]).get("tags", [])
        oid = f"{len(repo['commits']):040x}"
        self.reply(200, {"commitUrl": f"{self.hub.url}/{repo_id}/commit/{oid}", "commitOid": oid})


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running FakeHub with HF_ENDPOINT and HF_TOKEN pointing at it; no token file, Xet and offline mode off."""
    state = FakeHub()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("BoundHandler", (Handler,), {"hub": state}))
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", state.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    # huggingface_hub reads these at import time, so the module constants are what counts.
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def export_dir(tmp_path) -> Path:
    """A small export folder as `mipo-mlx export` lays it out: card with the mipo tag, LFS and regular files."""
    folder = tmp_path / "export"
    (folder / "mlx").mkdir(parents=True)
    (folder / "README.md").write_text("---\nlibrary_name: peft\ntags:\n- mlx\n- mipo\n- dpo\n- lora\n---\n# tiny\n")
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}\n')
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 40)
    (folder / "mlx" / "adapters.safetensors").write_bytes(b"\x01" * 5000)
    (folder / "mlx" / "adapter_config.json").write_text('{"fine_tune_type": "lora"}\n')
    return folder


def local_files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_token_nowhere(capsys, caplog, root: Path):
    """The token is in no printed line, no log record and no file under `root`."""
    out, err = capsys.readouterr()
    assert TOKEN not in out + err
    assert all(TOKEN not in record.getMessage() for record in caplog.records)
    assert [p for p in root.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()] == []


def test_push_creates_the_repository_and_uploads_everything_in_one_commit(hub, export_dir, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    url = push_folder(export_dir, REPO, private=True)
    repo = hub.repos[REPO]
    assert repo["private"] is True and len(repo["commits"]) == 1
    assert {k: v for k, v in repo["files"].items() if k != ".gitattributes"} == local_files(export_dir)
    assert hub.calls("POST /api/repos/create") == ["POST /api/repos/create"]
    assert len(hub.calls("PUT /lfs-upload/")) == 2  # both safetensors files went through LFS
    assert url == f"{hub.url}/{REPO}/commit/{1:040x}"
    # Every Hub API call carried the token; the storage upload did not get it.
    assert all(auth == f"Bearer {TOKEN}" for method, path, auth in hub.requests if not path.startswith("/lfs-upload"))
    assert all(auth is None for method, path, auth in hub.requests if path.startswith("/lfs-upload"))
    printed = capsys.readouterr().out
    assert f"pushed 5 files to {hub.url}/{REPO} in one commit" in printed
    assert_token_nowhere(capsys, caplog, tmp_path)

    # A second push to the same export repository adds one commit and creates nothing.
    (export_dir / "README.md").write_text((export_dir / "README.md").read_text() + "more\n")
    push_folder(export_dir, REPO, private=False)
    assert len(repo["commits"]) == 2 and repo["private"] is True
    assert hub.calls("POST /api/repos/create") == ["POST /api/repos/create"]
    assert repo["files"]["README.md"].endswith(b"more\n")


def test_public_repository_when_not_private(hub, export_dir):
    push_folder(export_dir, REPO, private=False)
    assert hub.repos[REPO]["private"] is False


def test_dry_run_lists_files_and_sends_nothing(hub, export_dir, capsys):
    assert push_folder(export_dir, REPO, private=True, dry_run=True) is None
    printed = capsys.readouterr().out
    assert hub.requests == [] and hub.repos == {}
    assert f"would upload 5 files (15.4 KB) to {REPO} in one commit, creating it as private if missing" in printed
    assert "token found" in printed and TOKEN not in printed
    for line in ("  README.md  ", "  adapter_model.safetensors  10.2 KB", "  mlx/adapters.safetensors  5.0 KB"):
        assert line in printed


def expect_one_line(call, *words) -> str:
    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and TOKEN not in message and message.startswith("--push: ")
    for word in words:
        assert word in message
    return message


def test_no_token_stops_before_any_request(hub, export_dir, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    expect_one_line(lambda: push_folder(export_dir, REPO, private=True), "no Hugging Face token found",
                    "hf auth login", "HF_TOKEN", "nothing was uploaded")
    assert hub.requests == []


def test_rejected_token(hub, export_dir, monkeypatch, capsys, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HF_TOKEN", TOKEN + "-revoked")
    expect_one_line(lambda: push_folder(export_dir, REPO, private=True), "token was rejected (401)",
                    "hf auth login", "nothing was uploaded")
    assert hub.calls() == ["GET /api/whoami-v2"] and hub.repos == {}
    out, err = capsys.readouterr()
    assert "-revoked" not in out + err and all("-revoked" not in r.getMessage() for r in caplog.records)


def test_no_permission_on_the_namespace(hub, export_dir):
    expect_one_line(lambda: push_folder(export_dir, "someone-else/tiny-mipo", private=True),
                    "cannot write to someone-else (403)", "write access", "nothing was uploaded")
    assert hub.repos == {} and hub.calls("POST /api/models", "PUT") == []


def test_no_permission_on_an_existing_export_repository(hub, export_dir):
    hub.add_repo("team/tiny-mipo", {"README.md": b"old"}, tags=["mipo"])
    expect_one_line(lambda: push_folder(export_dir, "team/tiny-mipo", private=True), "cannot write to team (403)")
    assert hub.repos["team/tiny-mipo"]["files"] == {"README.md": b"old"} and hub.lfs == {}


def test_unreachable_endpoint(hub, export_dir, monkeypatch):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", closed)
    started = time.monotonic()
    expect_one_line(lambda: push_folder(export_dir, REPO, private=True), f"cannot reach {closed}",
                    "HF_ENDPOINT", "nothing was uploaded")
    assert time.monotonic() - started < 10


def test_offline_mode_is_named(hub, export_dir, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    expect_one_line(lambda: push_folder(export_dir, REPO, private=True), "HF_HUB_OFFLINE")
    assert hub.requests == []


def test_name_clash_with_a_repository_that_is_not_a_mipo_export(hub, export_dir):
    theirs = {"README.md": b"---\ntags: [transformers]\n---\n", "model.safetensors": b"weights"}
    hub.add_repo(REPO, theirs, tags=["transformers"])
    expect_one_line(lambda: push_folder(export_dir, REPO, private=True),
                    f"{REPO} already exists and holds something that is not a mipo-mlx export", "new name")
    assert hub.repos[REPO]["files"] == theirs and hub.repos[REPO]["commits"] == ["initial"]
    assert hub.calls("POST", "PUT", "DELETE") == []


@pytest.mark.parametrize(("step", "words"), [("commit", "the Hub answered 500"),
                                             ("lfs", "the file upload failed (403: Request has expired)")])
def test_a_failed_commit_deletes_the_repository_it_created(hub, export_dir, step, words):
    hub.fail = step
    expect_one_line(lambda: push_folder(export_dir, REPO, private=True), words, "nothing was uploaded")
    assert hub.repos == {}
    assert hub.calls("POST /api/repos/create", "DELETE /api/repos/delete") == [
        "POST /api/repos/create", "DELETE /api/repos/delete"]


def test_a_failed_commit_leaves_an_existing_repository_as_it_was(hub, export_dir):
    hub.add_repo(REPO, {"README.md": b"---\ntags: [mipo]\n---\nv1"}, tags=["mipo"])
    hub.fail = "commit"
    expect_one_line(lambda: push_folder(export_dir, REPO, private=True), "the Hub answered 500")
    assert hub.repos[REPO]["files"] == {"README.md": b"---\ntags: [mipo]\n---\nv1"}
    assert hub.calls("DELETE") == []


def test_bad_repository_ids(hub, export_dir):
    expect_one_line(lambda: push_folder(export_dir, "tiny-mipo", private=True), "has no owner", "OWNER/NAME")
    expect_one_line(lambda: push_folder(export_dir, "me/bad name", private=True), "not a Hub repository id")
    assert hub.requests == []


def test_export_command_pushes_a_real_export(hub, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    run_dir = make_run(tmp_path, "llama")
    out = tmp_path / "out"
    argv = ["export", str(run_dir), "--to", str(out), "--format", "mlx", "peft", "--push", REPO, "--no-private"]
    assert cli.main([*argv, "--dry-run"]) == 0
    assert hub.requests == [] and "would upload 7 files" in capsys.readouterr().out

    out.rename(tmp_path / "dry")
    assert cli.main(argv) == 0
    repo = hub.repos[REPO]
    assert repo["private"] is False and len(repo["commits"]) == 1 and "mipo" in repo["tags"]
    assert {k: v for k, v in repo["files"].items() if k != ".gitattributes"} == local_files(out)
    assert f'PeftModel.from_pretrained(base, "{REPO}")' in repo["files"]["README.md"].decode()
    assert_token_nowhere(capsys, caplog, tmp_path)


def test_export_command_failure_is_one_line_and_keeps_the_export(hub, tmp_path, capsys):
    run_dir = make_run(tmp_path, "llama")
    hub.fail = "commit"
    out = tmp_path / "out"
    assert cli.main(["export", str(run_dir), "--to", str(out), "--format", "mlx", "--push", REPO]) == 2
    # stderr also had the export's progress lines; the error is one line, the last.
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "error" in line] == err[-1:]
    assert err[-1].startswith("mipo-mlx: error: --push: the Hub answered 500")
    assert err[-1].endswith(f"the export is kept in {out}") and (out / "mlx" / "adapters.safetensors").is_file() and hub.repos == {}
