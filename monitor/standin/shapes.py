"""The JSON documents the stand-in answers with, shaped as GitHub's OpenAPI description
says (the fields its schema requires), and the JIT config a runner agent is started with.
Pure functions: no state, no I/O."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from typing import Any

from monitor.standin.state import Artifact
from monitor.standin.state import Runner


def artifact_json(artifact: Artifact, base: str) -> dict[str, Any]:
    """An Artifact as the list of a run's artifacts holds it; `base` is the API's URL."""
    url = f"{base}/repos/{artifact.repo}/actions/artifacts/{artifact.id}"
    return {
        "id": artifact.id,
        "node_id": base64.b64encode(f"08:Artifact{artifact.id}".encode()).decode(),
        "name": artifact.name,
        "size_in_bytes": len(artifact.data),
        "url": url,
        "archive_download_url": f"{url}/zip",
        "expired": artifact.expired,
        "created_at": iso(artifact.created_at),
        "expires_at": iso(artifact.created_at + timedelta(days=1)),
        "updated_at": iso(artifact.created_at),
        "digest": "sha256:" + hashlib.sha256(artifact.data).hexdigest(),
        "workflow_run": {
            "id": artifact.run_id,
            "repository_id": repo_id(artifact.repo),
            "head_repository_id": repo_id(artifact.repo),
            "head_branch": "main",
            "head_sha": hashlib.sha1(str(artifact.run_id).encode()).hexdigest(),
        },
    }


def jit_config(runner: Runner) -> str:
    """A config shaped like GitHub's: base64 JSON of base64 `.runner`/`.credentials` files."""

    def b64(value: Any) -> str:
        return base64.b64encode(json.dumps(value).encode()).decode()

    files = {
        ".runner": b64(
            {
                "AgentId": str(runner.id),
                "AgentName": runner.name,
                "PoolId": str(runner.runner_group_id),
                "ServerUrl": "https://pipelinesghubeus1.actions.githubusercontent.com/standin/",
                "WorkFolder": "_work",
                "Ephemeral": "true",
            }
        ),
        ".credentials": b64({"Scheme": "OAuthAccessToken", "Data": {"token": runner.jit_token}}),
        ".credentials_rsaparams": b64({"d": secrets.token_urlsafe(32)}),
    }
    return b64(files)


def jit_identity(encoded: str) -> tuple[int, str]:
    """(runner id, credential token) of an encoded JIT config as `jit_config` makes them;
    ValueError if it is not one."""
    try:
        files = json.loads(base64.b64decode(encoded, validate=True))
        runner = json.loads(base64.b64decode(files[".runner"], validate=True))
        credentials = json.loads(base64.b64decode(files[".credentials"], validate=True))
        agent_id, token = int(runner["AgentId"]), credentials["Data"]["token"]
    except (ValueError, TypeError, KeyError) as e:  # binascii.Error is a ValueError
        raise ValueError(f"that is no JIT config: {type(e).__name__}") from None
    if not isinstance(token, str):
        raise ValueError("that is no JIT config: no credential token")
    return agent_id, token


def workflow_run(
    base: str, repo: str, run_id: int, status: str, conclusion: str | None
) -> dict[str, Any]:
    """A Workflow Run as GET /repos/{owner}/{repo}/actions/runs/{run_id} answers it (the
    fields GitHub's schema requires; the monitor reads `status` and `conclusion`)."""
    url = f"{base}/repos/{repo}/actions/runs/{run_id}"
    sha = hashlib.sha1(str(run_id).encode()).hexdigest()
    created = iso(datetime.fromtimestamp(1_700_000_000 + run_id % 10_000_000, UTC))
    repository = minimal_repository(base, repo)
    return {
        "id": run_id,
        "name": "CI",
        "node_id": base64.b64encode(f"WorkflowRun{run_id}".encode()).decode(),
        "head_branch": "main",
        "head_sha": sha,
        "path": ".github/workflows/main.yml",
        "display_title": "CI",
        "run_number": run_id % 100_000,
        "run_attempt": 1,
        "event": "push",
        "status": status,
        "conclusion": conclusion,
        "workflow_id": 1,
        "url": url,
        "html_url": f"https://github.com/{repo}/actions/runs/{run_id}",
        "pull_requests": [],
        "created_at": created,
        "updated_at": created,
        "run_started_at": created,
        "jobs_url": f"{url}/jobs",
        "logs_url": f"{url}/logs",
        "check_suite_url": f"{base}/repos/{repo}/check-suites/{run_id}",
        "artifacts_url": f"{url}/artifacts",
        "cancel_url": f"{url}/cancel",
        "rerun_url": f"{url}/rerun",
        "workflow_url": f"{base}/repos/{repo}/actions/workflows/1",
        "head_commit": {
            "id": sha,
            "tree_id": sha,
            "message": "CI",
            "timestamp": created,
            "author": {"name": "Servo", "email": "servo@example.org"},
            "committer": {"name": "Servo", "email": "servo@example.org"},
        },
        "repository": repository,
        "head_repository": repository,
    }


# The URL fields a Minimal Repository must have, as <name>_url -> path under the repo's URL.
_REPOSITORY_URLS = {
    name: f"/{path}"
    for name, path in {
        "archive": "{archive_format}{/ref}",
        "assignees": "assignees{/user}",
        "blobs": "git/blobs{/sha}",
        "branches": "branches{/branch}",
        "collaborators": "collaborators{/collaborator}",
        "comments": "comments{/number}",
        "commits": "commits{/sha}",
        "compare": "compare/{base}...{head}",
        "contents": "contents/{+path}",
        "contributors": "contributors",
        "deployments": "deployments",
        "downloads": "downloads",
        "events": "events",
        "forks": "forks",
        "git_commits": "git/commits{/sha}",
        "git_refs": "git/refs{/sha}",
        "git_tags": "git/tags{/sha}",
        "hooks": "hooks",
        "issue_comment": "issues/comments{/number}",
        "issue_events": "issues/events{/number}",
        "issues": "issues{/number}",
        "keys": "keys{/key_id}",
        "labels": "labels{/name}",
        "languages": "languages",
        "merges": "merges",
        "milestones": "milestones{/number}",
        "notifications": "notifications{?since,all,participating}",
        "pulls": "pulls{/number}",
        "releases": "releases{/id}",
        "stargazers": "stargazers",
        "statuses": "statuses/{sha}",
        "subscribers": "subscribers",
        "subscription": "subscription",
        "tags": "tags",
        "teams": "teams",
        "trees": "git/trees{/sha}",
    }.items()
}


def minimal_repository(base: str, repo: str) -> dict[str, Any]:
    owner, _, name = repo.partition("/")
    url = f"{base}/repos/{repo}"
    user = f"{base}/users/{owner}"
    return {
        "id": repo_id(repo),
        "node_id": base64.b64encode(f"Repository{repo_id(repo)}".encode()).decode(),
        "name": name,
        "full_name": repo,
        "private": False,
        "fork": False,
        "description": None,
        "html_url": f"https://github.com/{repo}",
        "url": url,
        **{f"{field}_url": url + path for field, path in _REPOSITORY_URLS.items()},
        "owner": {
            "login": owner,
            "id": repo_id(owner),
            "node_id": base64.b64encode(f"User{owner}".encode()).decode(),
            "avatar_url": f"https://avatars.githubusercontent.com/{owner}",
            "gravatar_id": "",
            "url": user,
            "html_url": f"https://github.com/{owner}",
            "type": "Organization",
            "site_admin": False,
            **{
                f"{field}_url": f"{user}/{path}"
                for field, path in {
                    "events": "events{/privacy}",
                    "followers": "followers",
                    "following": "following{/other_user}",
                    "gists": "gists{/gist_id}",
                    "organizations": "orgs",
                    "received_events": "received_events",
                    "repos": "repos",
                    "starred": "starred{/owner}{/repo}",
                    "subscriptions": "subscriptions",
                }.items()
            },
        },
    }


def iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def repo_id(repo: str) -> int:
    return int(hashlib.sha1(repo.encode()).hexdigest()[:7], 16)
