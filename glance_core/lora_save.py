"""Saving trained LoRAs: every check before the work (:func:`plan_save`), all-or-nothing writes of a set of
files, and the metadata. Files use the diffusers/PEFT layout (``transformer.<name>.lora_A/lora_B.weight``) with
alpha/rank folded into lora_B, so ComfyUI and diffusers both load them at strength 1.0."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid

import torch

from . import GlanceError

log = logging.getLogger("comfyui-glance")


def image_hash(image: torch.Tensor) -> str:
    return hashlib.sha256(image.detach().to(torch.float32).cpu().contiguous().numpy().tobytes()).hexdigest()


#: Temporary files of a save live in a hidden folder of their own next to the final file (the rename is atomic
#: there): safetensors itself writes through a hidden ``.tmp*`` file in the folder it is given, so that one lands
#: inside too. The file has an extension no loader lists. A killed run's leftovers are removed by the next save
#: planned in that folder.
TMP_PREFIX = ".glance-tmp-"
_TMP_SUFFIX = ".part"
#: This process's start (the pack is imported at server start): older temporary files belong to no live save.
_STARTED = time.time()
#: Longest file name (bytes) on the common file systems (ext4, NTFS, APFS).
NAME_MAX = 255
#: Characters refused in save_name: control characters (NUL…) and those Windows forbids in a file name, so
#: a name valid here is valid on every system the graph travels to.
_BAD_CHARS = set('<>:"|?*\\') | {chr(i) for i in range(32)} | {chr(127)}


def _shown(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def plan_save(root: str, save_name: str, suffixes: list[str], overwrite: bool) -> dict[str, str]:
    """Every check that decides whether a result can be saved, done before the work: ``save_name`` (a name
    inside ``root``, optionally with sub-folders ``a/b``) → ``{suffix: path}`` for ``<name><suffix>.safetensors``.
    Refuses, naming the problem and the fix: traversal or absolute paths, control and reserved characters,
    names too long for the file system, folders that cannot be created or written, and any existing file of
    the whole set unless ``overwrite``. Also removes a killed run's temporary files in the target folder."""
    name = save_name.strip().removesuffix(".safetensors")
    if not name:
        return {}
    bad = sorted({c for c in name if c in _BAD_CHARS})
    if bad:
        raise GlanceError(
            f"save_name {_shown(save_name)} contains {', '.join(repr(c) for c in bad)}: file names cannot hold "
            f"control characters or any of < > : \" | ? * \\. Use letters, digits, '-', '_', '.' and '/' for "
            f"sub-folders. Nothing was trained."
        )
    norm = os.path.normpath(name)
    parts = name.replace(os.sep, "/").split("/")
    if os.path.isabs(name) or norm.startswith("..") or ".." in parts:
        raise GlanceError(
            f"save_name {_shown(save_name)} must be a name inside models/loras/, without '..' or a leading '/'. "
            f"Nothing was trained."
        )
    ending = f"{max(suffixes, key=len)}.safetensors"
    if any(not part.strip() or part == "." for part in parts):
        raise GlanceError(
            f"save_name {_shown(save_name)} has an empty folder or file name (a '//', a '.' or a trailing '/'): "
            f"give a file name after the last '/'. Nothing was trained."
        )
    for part in parts[:-1] + [parts[-1] + ending]:
        if len(part.encode()) > NAME_MAX:
            raise GlanceError(
                f"save_name is too long: {_shown(part)} is {len(part.encode())} bytes and file systems allow "
                f"{NAME_MAX} per name ('{ending}' included, so the file name may have at most "
                f"{NAME_MAX - len(ending.encode())} bytes before it). Shorten save_name. Nothing was trained."
            )
    root = os.path.abspath(root)
    paths = {sfx: os.path.join(root, f"{norm}{sfx}.safetensors") for sfx in suffixes}
    folder = os.path.dirname(next(iter(paths.values())))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise GlanceError(
            f"Cannot save under {folder}: {existing} is a file, not a folder. Choose another save_name. "
            f"Nothing was trained."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise GlanceError(
            f"Cannot save under {folder}: {existing} is not writable by ComfyUI. Fix its permissions or choose "
            f"another save_name. Nothing was trained."
        )
    for p in paths.values():
        if os.path.isdir(p):
            raise GlanceError(f"{p} is a folder; choose another save_name. Nothing was trained.")
    taken = [p for p in paths.values() if os.path.exists(p)]
    if taken and not overwrite:
        raise GlanceError(
            f"{' and '.join(taken)} already exist{'s' if len(taken) == 1 else ''}: choose another save_name or turn "
            f"on overwrite. Nothing was trained."
        )
    clean_stale_temporaries(folder)
    return paths


def clean_stale_temporaries(folder: str) -> list[str]:
    """Remove temporary save files in ``folder`` left by a run that was killed or failed before this process
    started (a live save in this process is never touched). Returns the removed paths."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for n in names:
        if not n.startswith(TMP_PREFIX):
            continue
        p = os.path.join(folder, n)
        try:
            if os.path.getmtime(p) >= _STARTED:
                continue
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.remove(p)
            removed.append(p)
            log.info("Glance: removed %s, left by an interrupted save", p)
        except OSError:
            pass
    return removed


def _temp_path(path: str) -> str:
    """A fresh temporary file path for ``path``, inside its own hidden folder next to it."""
    folder = os.path.join(os.path.dirname(path), f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}")
    os.mkdir(folder)
    return os.path.join(folder, "file" + _TMP_SUFFIX)


def _remove(tmp: str) -> None:
    """Remove a temporary file made by :func:`_temp_path` and its folder."""
    shutil.rmtree(os.path.dirname(tmp), ignore_errors=True)


def _raise_write_error(e: BaseException, path: str, outcome: str) -> None:
    """Re-raise ``e`` (the clean-up is done): a file-system error as a GlanceError naming the file and the
    outcome; anything else (Stop, a bug) as it is."""
    if isinstance(e, OSError):
        raise GlanceError(f"Could not write {path}: {e.strerror or e}. {outcome}") from e
    raise e


def save_files_atomic(files: list[tuple[str, dict[str, torch.Tensor], dict[str, str]]], overwrite: bool) -> list[str]:
    """Write several files all-or-nothing: every file goes to a temporary file in its folder first; only when
    all are written (and none of the targets appeared meanwhile, unless ``overwrite``) are they renamed into
    place. If a rename fails, the files already placed are removed and replaced ones restored, so either
    the whole set is written or none of it is. Returns the written paths."""
    from safetensors.torch import save_file

    paths = [p for p, _, _ in files]

    def check_free() -> None:
        taken = [p for p in paths if os.path.exists(p)]
        if taken and not overwrite:
            raise GlanceError(
                f"{' and '.join(taken)} appeared while training: choose another save_name or turn on overwrite. "
                f"Nothing was written."
            )

    check_free()
    temps: list[str] = []
    current = paths[0]
    try:
        for path, sd, meta in files:
            current = path
            os.makedirs(os.path.dirname(path), exist_ok=True)
            temps.append(_temp_path(path))
            save_file(
                {k: v.detach().to("cpu").contiguous() for k, v in sd.items()},
                temps[-1],
                metadata={k: str(v) for k, v in meta.items()},
            )
    except BaseException as e:
        for t in temps:
            _remove(t)
        _raise_write_error(e, current, "Free disk space or fix the folder's permissions. Nothing was written.")
    placed: list[str] = []
    backups: dict[str, str] = {}
    try:
        check_free()
        for path, tmp in zip(paths, temps):
            if os.path.exists(path):
                backups[path] = _temp_path(path)
                os.replace(path, backups[path])
            os.replace(tmp, path)
            placed.append(path)
    except BaseException as e:
        for p in placed:
            with contextlib.suppress(OSError):
                os.remove(p)
        for p, b in backups.items():
            try:
                os.replace(b, p)
                _remove(b)
            except OSError:
                log.error("Glance: could not put %s back; the previous file is kept at %s", p, b)
        for t in temps:
            _remove(t)
        _raise_write_error(
            e,
            paths[len(placed)],
            "Nothing was written (the files of this save that were already in place were removed, replaced "
            "ones restored).",
        )
    for t in [*temps, *backups.values()]:
        _remove(t)
    return paths


def save_lora_atomic(
    path: str, state_dict: dict[str, torch.Tensor], metadata: dict[str, str], overwrite: bool = False
) -> str:
    """Write one file all-or-nothing (see :func:`save_files_atomic`)."""
    return save_files_atomic([(path, state_dict, metadata)], overwrite)[0]


def metadata_for(
    arch: str,
    expert: str,
    objective: str,
    rank: int,
    alpha: float,
    sigmas: list[float],
    steps: int,
    seed: int,
    lr: float,
    targets: str,
    image_sha256: str | None,
    captions: int,
) -> dict[str, str]:
    return {
        "glance.format": "1",
        "glance.base_arch": arch,
        "glance.expert": expert,
        "glance.objective": objective,
        "glance.rank": str(rank),
        "glance.alpha": str(alpha),
        "glance.scale_convention": "alpha/rank folded into lora_B: load at strength 1.0 (no alpha tensors)",
        "glance.timesteps": json.dumps([round(s, 6) for s in sigmas]),
        "glance.steps": str(steps),
        "glance.seed": str(seed),
        "glance.learning_rate": str(lr),
        "glance.targets": targets,
        "glance.source_image_sha256": image_sha256 or "",
        "glance.captions": str(captions),
    }
