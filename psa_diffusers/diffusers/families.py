"""Which model family ("cogvideox" or "wan") a pipeline, a transformer or a model id belongs to.

The one place that knows how to tell the families apart:

    family_of_transformer(pipe.transformer)     # "cogvideox" / "wan" / None, from the class
    family_of_pipeline(pipe)                    # the family of its transformer(s), or None
    family_of_model("THUDM/CogVideoX-5b")       # from model_index.json; an error when neither family
    preset_for_model("THUDM/CogVideoX-5b", "cogvideox")   # the built-in preset listing that model
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

FAMILIES = ("cogvideox", "wan")

FPS = {"cogvideox": 8, "wan": 16}
"""Frame rate of the published models' videos (CogVideoX 8 fps, Wan 16 fps)."""

_CLASS_PREFIXES = (("CogVideoX", "cogvideox"), ("Wan", "wan"))
"""Pipeline class name prefixes in ``model_index.json`` (``CogVideoXPipeline``, ``WanPipeline``, ...)."""


def family_of_transformer(transformer: Any) -> str | None:
    """The family of a transformer: "cogvideox" or "wan" (by class, subclasses included), else None."""
    from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel

    if isinstance(transformer, CogVideoXTransformer3DModel):
        return "cogvideox"
    if isinstance(transformer, WanTransformer3DModel):
        return "wan"
    return None


def family_of_pipeline(pipe: Any) -> str | None:
    """The family of the pipeline's transformer (``transformer``, else ``transformer_2``), or None."""
    for attr in ("transformer", "transformer_2"):  # transformer_2: Wan2.2's low-noise expert
        transformer = getattr(pipe, attr, None)
        if transformer is not None:
            return family_of_transformer(transformer)
    return None


def check_model_source(model: str | os.PathLike[str]) -> str:
    """``model`` as a string; FileNotFoundError at once for a local path that does not exist."""
    source = os.fspath(model)
    if not Path(source).expanduser().is_dir() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise FileNotFoundError(f"{source}: no such local pipeline directory (nor a hub id 'owner/name')")
    return source


def family_of_model(model: str | os.PathLike[str]) -> str:
    """The family of a hub id or local pipeline directory, from the pipeline class in its ``model_index.json``.

    Raises FileNotFoundError for a local path that does not exist, OSError when ``model_index.json``
    cannot be read (no such file, hub unreachable), ValueError for a pipeline of another family.
    """
    source = check_model_source(model)
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(source)
    except (OSError, ValueError) as err:
        raise OSError(
            f"{model}: cannot read the pipeline's model_index.json ({err}). Pass a local pipeline directory, "
            "or a hub id with network access (or a cached copy and HF_HUB_OFFLINE=1)"
        ) from err
    name = str(index.get("_class_name", ""))
    for prefix, family in _CLASS_PREFIXES:
        if name.startswith(prefix):
            return family
    raise ValueError(f"{model}: pipeline class {name or '?'} is neither CogVideoX nor Wan")


def preset_for_model(model: str | os.PathLike[str], family: str) -> str:
    """The built-in preset whose ``models`` list ``model`` (hub id, or a directory of the same name)."""
    from ..presets import get_preset, list_presets

    wanted = Path(os.fspath(model)).name.lower()
    for name in list_presets():
        preset = get_preset(name)
        if preset.family != family or name.endswith("-4step"):
            continue
        if any(m == os.fspath(model) or m.rsplit("/", 1)[-1].lower() == wanted for m in preset.models):
            return name
    raise ValueError(
        f"{model}: no built-in preset lists this model; pass one with --preset "
        f"({', '.join(n for n in list_presets() if get_preset(n).family == family)})"
    )
