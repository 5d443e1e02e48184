"""Model sources: turn a matrix's `[model]` section into a local diffusers folder, before any cell runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bench.errors import MatrixError, UserError
from bench.methods.base import Component


@dataclass(frozen=True)
class ResolvedModel:
    """A pipeline folder on local disk that cells load with `from_pretrained`."""

    source: str
    folder: Path
    revision: str | None
    weights_label: str
    pipeline_class: str
    components: dict[str, Component]


def resolve_model(matrix) -> ResolvedModel:
    """Build, find or download the matrix's model; UserError when that cannot be done."""
    source = matrix.model
    if source.builtin:
        from bench.models.builtin import build_builtin

        folder, revision, name = build_builtin(source.builtin), None, f"builtin:{source.builtin}"
    elif source.path:
        folder, revision, name = matrix.resolve_path(source.path), None, f"path:{source.path}"
    else:
        folder, revision = _download(source.hub, source.revision)
        name = f"hub:{source.hub}"
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise MatrixError(matrix.path, "model", "not a diffusers pipeline folder (no model_index.json)", str(folder))
    index = json.loads(index_file.read_text())
    components = {
        key: Component(name=key, library=value[0], class_name=value[1], folder=folder)
        for key, value in index.items()
        if isinstance(value, list) and len(value) == 2 and value[0] and (folder / key).is_dir()
    }
    model = ResolvedModel(name, folder, revision, source.weights_label, index["_class_name"], components)
    _check_components(matrix, model)
    _check_regional(matrix, model)
    return model


def _check_components(matrix, model: ResolvedModel) -> None:
    weighted = sorted(name for name, component in model.components.items() if component.has_weights)
    for group in matrix.spec.axes.components:
        for name in group:
            if name not in weighted:
                raise MatrixError(
                    matrix.path, "axes.components", f"{model.pipeline_class} has no such component", name, weighted
                )


def _check_regional(matrix, model: ResolvedModel) -> None:
    """Regional compilation needs a denoiser whose class names its repeated blocks (`_repeated_blocks`)."""
    if not any(cell.regional for cell in matrix.cells):
        return
    import diffusers

    component = model.components.get("transformer") or model.components.get("unet")
    cls = getattr(diffusers, component.class_name, None) if component else None
    if not getattr(cls, "_repeated_blocks", None):
        name = component.class_name if component else model.pipeline_class
        raise MatrixError(
            matrix.path,
            "axes.regional",
            f"{name} lists no repeated blocks to compile (`_repeated_blocks`, diffusers {diffusers.__version__})",
            True,
            [False],
        )


def _download(repo_id: str, revision: str | None) -> tuple[Path, str]:
    """Snapshot a hub repository; the folder name is the resolved commit hash."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision))
    except Exception as error:  # offline, gated, missing: all end the same way for the user
        raise UserError(
            f"cannot get hub model {repo_id!r}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}. "
            "Download it first or point [model] path at a local folder."
        ) from None
    return folder, folder.name
