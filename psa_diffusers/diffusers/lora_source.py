"""Where a LoRA file comes from: a local file, a file inside a local folder, or a file of a hub repo.

``resolve_lora_file`` turns what the user passed into one local ``.safetensors`` path without reading
it (``lora_check.check_lora_file`` reads it). ``weight_name`` may come from an untrusted place (a
config, a web form): it must name a file *inside* the folder or repo, so absolute paths, ``..`` and
folders that are symlinks to elsewhere are refused.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath

_SEPARATORS = re.compile(r"[\\/]")


def resolve_lora_file(repo_or_path: str | os.PathLike[str], weight_name: str | None = None) -> Path:
    """The local ``.safetensors`` file for a hub repo id, a local directory or a local file.

    A local file is used as is (``weight_name`` ignored); for a directory, ``weight_name`` is the file
    inside it; anything else is taken as a hub repo id and ``weight_name`` is downloaded (or taken from
    the local cache). A missing local file raises ``FileNotFoundError``; a ``weight_name`` that is
    absolute or leads out of the directory or repo raises ``ValueError``; a hub that cannot be reached,
    or a repo/file that does not exist there, raises ``OSError`` saying so, with what to do instead.
    """
    source = os.fspath(repo_or_path)
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if not weight_name:
            raise FileNotFoundError(f"{path}: is a directory; pass weight_name, the LoRA file inside it")
        file = file_in_directory(path, weight_name)
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such LoRA file (directory {path}, weight_name {weight_name!r})")
        return file
    if looks_like_path(source):
        raise FileNotFoundError(f"{source}: no such LoRA file or directory")
    if not weight_name:
        raise ValueError(f"{source}: a hub repo id needs weight_name, the LoRA file's path in the repo")
    check_weight_name(weight_name, where=f"hub repo {source!r}")
    return hub_download(source, weight_name)


def check_weight_name(weight_name: str, *, where: str) -> None:
    """ValueError unless ``weight_name`` is a relative path without ``..`` (``/`` or ``\\`` separated)."""
    if (
        PurePosixPath(weight_name).is_absolute()
        or PureWindowsPath(weight_name).is_absolute()
        or PureWindowsPath(weight_name).drive
        or weight_name.startswith(("/", "\\"))
    ):
        raise ValueError(f"{where}: weight_name {weight_name!r} is an absolute path; name a file inside it")
    if ".." in _SEPARATORS.split(weight_name):
        raise ValueError(f"{where}: weight_name {weight_name!r} contains '..'; name a file inside it")


def file_in_directory(directory: Path, weight_name: str) -> Path:
    """``directory / weight_name``, after checking that it lies inside ``directory``.

    ``check_weight_name`` first; then the folder holding the file, with symlinks resolved, must be
    ``directory`` or below it. The file itself may be a symlink (a hub cache snapshot links its files
    to ``../../blobs``).
    """
    check_weight_name(weight_name, where=str(directory))
    file = directory / weight_name
    root = directory.resolve()
    folder = file.parent.resolve()
    if folder != root and root not in folder.parents:
        raise ValueError(
            f"{directory}: weight_name {weight_name!r} leads outside the directory (to {folder}); name a file inside it"
        )
    return file


def looks_like_path(source: str) -> bool:
    """Whether ``source`` is meant as a local path rather than a hub repo id ``owner/name``."""
    return (
        source.startswith((".", "/", "~", "\\"))
        or source.count("/") > 1
        or (os.sep != "/" and os.sep in source)
        or source.endswith((".safetensors", ".bin", ".pt", ".pth"))
    )


def hub_download(repo_id: str, weight_name: str) -> Path:
    """``hf_hub_download(repo_id, weight_name)`` with errors that say what went wrong and what to do."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    where = f"hub repo {repo_id!r}, file {weight_name!r}"
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, weight_name))
    except LocalEntryNotFoundError as err:
        why = (
            "HF_HUB_OFFLINE is set"
            if constants.HF_HUB_OFFLINE
            else "the Hugging Face hub cannot be reached (no network?)"
        )
        raise OSError(
            f"{where}: not in the local cache and {why}. Download it where there is a network "
            f"(`huggingface-cli download {repo_id} {weight_name}`) and set HF_HUB_OFFLINE=1, "
            f"or pass a local path to the .safetensors file"
        ) from err
    except RepositoryNotFoundError as err:
        raise OSError(f"{where}: no such repository on the hub (or it is private: log in first)") from err
    except EntryNotFoundError as err:
        raise OSError(f"{where}: the repository has no such file") from err
    except HFValidationError as err:
        raise FileNotFoundError(f"{repo_id}: neither a local file or directory nor a valid hub repo id") from err
