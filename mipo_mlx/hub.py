"""Push an export folder to the Hugging Face Hub in one commit (`mipo-mlx export ... --push REPO_ID`).

    check_push_target("me/smollm2-mipo")          # the id and a token, before any export work (no request)
    push_folder(Path("exports/quickstart"), "me/smollm2-mipo", private=True)
    push_folder(Path("exports/quickstart"), "me/smollm2-mipo", private=True, dry_run=True)  # list only

The token comes from where huggingface_hub looks (HF_TOKEN, then the cached `hf auth
login`); it goes only into request headers, never into output, logs or files. The
repository is created when missing; every file goes up in a single commit, so a failure
leaves the repository as it was (and a repository created by this push is deleted again).
A missing token, a rejected token, no write permission, no network and a name clash each
end in one line that says what to do. HF_ENDPOINT (read when the push starts) points at
another Hub, such as a local test server.
"""

import contextlib
import os
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id

from mipo_mlx.errors import UserError
from mipo_mlx.recipe import is_hub_id

try:  # huggingface_hub 2 talks through httpx2, 1.x through httpx
    from httpx2 import TransportError
except ImportError:
    from httpx import TransportError

# Tag every mipo-mlx card carries: a repository with it may be updated, one without is someone else's work.
EXPORT_TAG = "mipo"
KEY = "--push"


def upload_plan(folder: Path) -> list[tuple[str, Path]]:
    """(path in the repository, local file) for every file under `folder`."""
    return [(path.relative_to(folder).as_posix(), path) for path in sorted(folder.rglob("*")) if path.is_file()]


def _size(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000


@contextlib.contextmanager
def hub_errors(repo_id: str, endpoint: str, token: str | None):
    """Turn what the Hub or the network answers into one UserError line; the token never appears."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        message = _explain(error, repo_id, endpoint)
        # Server and library messages are quoted in part; one that echoed the token must not show it.
        raise UserError(message.replace(token, "***") if token else message, key=KEY) from None


def _explain(error: BaseException, repo_id: str, endpoint: str) -> str:
    # Upload failures arrive wrapped (RuntimeError from the LFS threads): look down the chain.
    cause = error
    while cause is not None and not isinstance(cause, (HfHubHTTPError, TransportError, OfflineModeIsEnabled)):
        cause = cause.__cause__ or cause.__context__
    nothing = "nothing was uploaded"
    if isinstance(cause, OfflineModeIsEnabled):
        return f"HF_HUB_OFFLINE is set, so huggingface_hub sends no request; unset it to push; {nothing}"
    if isinstance(cause, TransportError):
        return f"cannot reach {endpoint} ({type(cause).__name__}); check the network or HF_ENDPOINT; {nothing}"
    if cause is None:
        return f"the push failed ({type(error).__name__}: {' '.join(str(error).split())[:160]}); {nothing}"
    status = cause.response.status_code if cause.response is not None else None
    reason = " ".join(str(getattr(cause, "server_message", "") or "").split())[:160]
    if not _from_hub_api(cause, endpoint):
        # The LFS storage a file was sent to (a presigned URL), not the Hub: permissions are not the cause.
        return f"the file upload failed ({status}{f': {reason}' if reason else ''}); {nothing}"
    namespace = repo_id.split("/")[0]
    if status == 401:
        return f"the Hugging Face token was rejected (401); run `hf auth login` again or set a valid HF_TOKEN; {nothing}"
    if status == 403:
        return (f"your token cannot write to {namespace} (403); use a token with write access, or a repository "
                f"under your own name; {nothing}")
    if status == 409:
        return f"{repo_id} already exists and cannot be used (409); choose another name; {nothing}"
    return f"the Hub answered {status}{f' ({reason})' if reason else ''}; {nothing}"


def _from_hub_api(error: HfHubHTTPError, endpoint: str) -> bool:
    """Whether the failed request went to the Hub's API (or its LFS batch API) rather than to file storage."""
    try:
        url = str(error.response.request.url)
    except (AttributeError, RuntimeError):  # no response, or a response without its request
        return True
    return url.startswith(f"{endpoint}/api/") or (url.startswith(endpoint) and ".git/info/lfs/" in url)


def _ensure_repo(api: HfApi, repo_id: str, private: bool) -> bool:
    """Create the model repository when missing (True if created); refuse one that is not a mipo-mlx export."""
    try:
        info = api.model_info(repo_id)
    except RepositoryNotFoundError:
        api.create_repo(repo_id, private=private, exist_ok=False)
        return True
    tags = info.tags or []
    files = [s.rfilename for s in info.siblings or [] if s.rfilename != ".gitattributes"]
    if files and EXPORT_TAG not in tags:
        raise UserError(
            f"{repo_id} already exists and holds something that is not a mipo-mlx export; push to a new name",
            key=KEY,
        )
    return False


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def check_push_target(repo_id: str, *, dry_run: bool = False) -> str | None:
    """The token a push to `repo_id` sends, after checking the id; a missing token is an error unless `dry_run`.

    Sends no request to the Hub (get_token reads HF_TOKEN or the cached login), so that an
    export checks its push before any work.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(f"{repo_id!r} is not a Hub repository id; expected OWNER/NAME", key=KEY) from None
    if not is_hub_id(repo_id):
        raise UserError(f"{repo_id!r} has no owner; expected OWNER/NAME such as your-name/smollm2-mipo", key=KEY)
    with hub_errors(repo_id, _endpoint(), None):  # get_token may exchange an OIDC token in CI
        token = get_token()
    if not token and not dry_run:
        raise UserError("no Hugging Face token found; run `hf auth login` or set HF_TOKEN; nothing was uploaded", key=KEY)
    return token


def push_folder(folder: Path, repo_id: str, *, private: bool, dry_run: bool = False,
                message: str = "Upload mipo-mlx export") -> str | None:
    """Upload every file of `folder` to `repo_id` in one commit; return the commit URL (None on a dry run)."""
    token = check_push_target(repo_id, dry_run=dry_run)
    plan = upload_plan(folder)
    endpoint = _endpoint()
    if dry_run:
        total = sum(path.stat().st_size for _, path in plan)
        print(f"dry run: would upload {len(plan)} files ({_size(total)}) to {repo_id} in one commit, "
              f"creating it as {'private' if private else 'public'} if missing; token "
              f"{'found' if token else 'NOT found (run `hf auth login` or set HF_TOKEN)'}")
        for name, path in plan:
            print(f"  {name}  {_size(path.stat().st_size)}")
        return None
    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(repo_id, endpoint, token):
        api.whoami()
        created = _ensure_repo(api, repo_id, private)
    try:
        with hub_errors(repo_id, endpoint, token):
            operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in plan]
            commit = api.create_commit(repo_id, operations, commit_message=message)
    except BaseException:  # Ctrl+C too
        if created:
            # The commit failed as a whole; the empty repository made for it goes too.
            with contextlib.suppress(Exception):
                api.delete_repo(repo_id)
        raise
    print(f"pushed {len(plan)} files to {endpoint}/{repo_id} in one commit ({commit.oid[:10]})")
    return commit.commit_url
