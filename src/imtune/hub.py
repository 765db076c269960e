"""Hub snapshots for models and datasets alike: one place that downloads into the standard HF cache and turns
every huggingface_hub failure into one line saying how to fix it. HF_TOKEN is read by huggingface_hub itself and
never appears in a message."""

from __future__ import annotations

import os
from pathlib import Path

from imtune.errors import ImtuneError


def scrub(text: str) -> str:
    """The text with the user's HF_TOKEN masked (error messages may echo request headers or URLs)."""
    token = os.environ.get("HF_TOKEN")
    return text.replace(token, "***") if token else text


def first_line(e: BaseException) -> str:
    return scrub((str(e).strip().splitlines() or [type(e).__name__])[0])


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def snapshot(repo_id: str, kind: str, revision: str | None, patterns: list[str], local: str) -> Path:
    """The cached snapshot of the `kind` ("model" or "dataset") repo `repo_id` with the files matching `patterns`,
    downloaded if needed and allowed; `local` names the local alternative the user can pass instead."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hub_errors

    at = f"{repo_id}@{revision}" if revision else repo_id
    repo_type = "dataset" if kind == "dataset" else None
    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=patterns))
    except hub_errors.GatedRepoError:
        raise ImtuneError(f"{kind} {at} is gated: accept its terms on the Hub, then set HF_TOKEN to a token of that "
                          "account") from None
    except hub_errors.RevisionNotFoundError:
        raise ImtuneError(f"{kind} {repo_id} has no revision {revision!r} on the Hub") from None
    except hub_errors.RepositoryNotFoundError:
        raise ImtuneError(f"{kind} {at} not found on the Hugging Face Hub (check the spelling; a private or gated "
                          f"{kind} needs HF_TOKEN)") from None
    except (hub_errors.LocalEntryNotFoundError, hub_errors.IncompleteSnapshotError):
        why = "HF_HUB_OFFLINE is set" if offline() else "the Hugging Face Hub cannot be reached"
        flag = " --repo-type dataset" if repo_type else ""
        raise ImtuneError(f"{kind} {at} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}: run "
                          f"once with network access (unset HF_HUB_OFFLINE), or `hf download {repo_id}{flag}` "
                          f"elsewhere and copy the cache, or pass {local}") from None
    except (hub_errors.HfHubHTTPError, hub_errors.HFValidationError, OSError) as e:
        raise ImtuneError(f"{kind} {at}: cannot fetch it from the Hugging Face Hub: {first_line(e)}") from None
