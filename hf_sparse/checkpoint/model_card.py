"""The model card (README.md) of a sparse checkpoint, rendered with huggingface_hub's card tools.

The front matter is built from ``ModelCardData``/``EvalResult`` so it is exactly what the Hub
parses (tags, datasets, ``model-index`` metrics); the body comes from the Jinja template in the
repository's ``model_cards/templates/`` (installed as ``hf_sparse/model_cards/``) and shows the
per-layer densities as a table and as a bar chart (``density.png``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..runtime.speed import speed_sentence
from .formats import get_format


def _template_dir() -> Path:
    """``model_cards/templates/`` of a clone (editable install), else the copy a wheel installs."""
    package = Path(__file__).resolve().parents[1]
    for folder in (package.parent / "model_cards" / "templates", package / "model_cards"):
        if (folder / "sparse_model.md").is_file():
            return folder
    raise FileNotFoundError(f"no model-card template: neither {package.parent / 'model_cards/templates'} "
                            f"nor {package / 'model_cards'} holds sparse_model.md (a broken install?)")


#: The card template; edit it without touching code.
TEMPLATE = _template_dir() / "sparse_model.md"
#: Written where the repo id is not known yet; ``hub.push_to_hub`` substitutes the real id in the pushed copy.
REPO_PLACEHOLDER = "<repo_id>"
#: hf_sparse's task names (``DataBundle.task``) that differ from the Hub's pipeline tags.
_TASK_ALIASES = {"ctc": "automatic-speech-recognition"}
_NOT_METRICS = ("runtime", "per_second", "epoch", "step", "flos", "memory")


def _num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _metric_rows(eval_metrics: dict | None, dense: dict | None) -> list[dict[str, str]]:
    rows = []
    for k, v in (eval_metrics or {}).items():
        name = k.removeprefix("eval_")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or any(s in name for s in _NOT_METRICS):
            continue
        ref = (dense or {}).get(k, (dense or {}).get(name))
        rows.append({"name": name, "sparse": _num(float(v)), "dense": _num(None if ref is None else float(ref)),
                     "value": float(v)})
    return rows


def _recipe_section(recipe_yaml: str | None, name: str) -> dict:
    try:
        section = (yaml.safe_load(recipe_yaml or "") or {}).get(name) or {}
    except (yaml.YAMLError, AttributeError):
        return {}
    return section if isinstance(section, dict) else {}


def _recipe_dataset(recipe_yaml: str | None) -> str | None:
    data = _recipe_section(recipe_yaml, "data")
    return data.get("hub_id") or data.get("path") or data.get("name")


def _is_local_path(name: str) -> bool:
    """A folder or file on this machine, not a Hub id (which is never absolute, relative or deeper than owner/name)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or Path(name).expanduser().exists()


def card_dataset(dataset: str | None) -> tuple[str | None, str | None]:
    """(the ``datasets:`` id for the front matter, the name the card shows): a local folder is shown by
    its own name and never published as an id (its absolute path says nothing on the Hub)."""
    if not dataset:
        return None, None
    if _is_local_path(dataset):
        return None, Path(dataset).expanduser().name or dataset
    return dataset, dataset


def base_model_of(model: dict) -> str | None:
    """The Hub id a recipe's model started from (``base_model:``); None for local weights or none."""
    path, name = model.get("path"), model.get("name") or ""
    if path:
        return None if _is_local_path(str(path)) else str(path)
    if model.get("source") == "timm":
        if name.startswith("hf-hub:"):
            return name.removeprefix("hf-hub:").partition("@")[0]
        if model.get("pretrained") and ":" not in name:
            try:
                import timm

                return getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None) or None
            except Exception:  # noqa: BLE001 - an unknown name has no base model to name
                return None
    return None


def _card_license(folder_or_repo: str, revision: str | None = None) -> str | None:
    """The ``license:`` of a model card: a local checkpoint's README.md, or a Hub repo's cached one."""
    readme = Path(folder_or_repo).expanduser() / "README.md"
    if not readme.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(folder_or_repo, "README.md", revision=revision)
        except Exception:  # noqa: BLE001 - not a repo id
            cached = None
        readme = Path(cached) if isinstance(cached, str) else None
    if readme is None:
        return None
    try:
        return ModelCard.load(readme).data.license
    except Exception:  # noqa: BLE001 - a card without front matter has no license to inherit
        return None


def license_of(recipe_yaml: str | None) -> tuple[str | None, str]:
    """(the card's ``license:``, where it came from): ``export.license``, else the base model's."""
    export, model = _recipe_section(recipe_yaml, "export"), _recipe_section(recipe_yaml, "model")
    if export.get("license"):
        return str(export["license"]), "set by the recipe's `export.license`"
    found = None
    if model.get("path"):
        found = _card_license(str(model["path"]), model.get("revision"))
    elif model.get("source") == "timm" and model.get("pretrained") and ":" not in (model.get("name") or ""):
        try:
            import timm

            found = getattr(timm.models.get_pretrained_cfg(model["name"]), "license", None)
        except Exception:  # noqa: BLE001
            found = None
    if found:
        return str(found), "the base model's"
    return None, ("not set: the base model's license is not known here; set `export.license` in the recipe "
                  "before publishing")


def density_words(facts: dict) -> tuple[str, str]:
    """(target, achieved) density as text, in the unit the target counts.

    ``facts`` is a ``results.json`` or ``sparsity.json``. With ``target_unit: gates`` (L0's
    ``count: gates``) the target and the achieved kept fraction of gates (units/channels) are
    compared, and the kept fraction of weights is shown beside them: a met gate target must not
    read as a miss against the weights.
    """
    target, weights = facts.get("target_density"), facts.get("achieved_density")
    gates = (facts.get("method_metrics") or {}).get("hard_density")
    weights_text = "-" if weights is None else f"{weights:.4f} of weights"
    if facts.get("target_unit") == "gates" and gates is not None:
        return ("-" if target is None else f"{target:.4f} of gates"), f"{gates:.4f} of gates ({weights_text})"
    return ("-" if target is None else f"{target:.4f} of weights"), weights_text


def density_plot(path: Path, layers: dict[str, dict], target: float | None, unit: str = "weights") -> Path | None:
    """Horizontal bar chart of per-layer density; None when there is nothing to plot.

    The bars count weights; a target set in gates is not drawn on that axis, the label says so."""
    if not layers:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: leaves the user's backend and global state alone

    names = list(layers)
    values = [float(layers[n]["density"]) for n in names]
    fig = Figure(figsize=(7, 0.6 + 0.28 * len(names)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.barh(range(len(names)), values, color="#4c72b0")
    ax.set_yticks(range(len(names)), labels=names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("density (kept fraction of weights)" if unit != "gates" or target is None else
                  f"density (kept fraction of weights; the target, {target:g}, counts gates)")
    if target is not None and unit != "gates":
        ax.axvline(target, color="#c44e52", linestyle="--", label=f"target {target:g}")
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _plain_load(sparsity: dict) -> tuple[str, str]:
    """(library_name for the front matter, a sentence + snippet on loading without hf_sparse)."""
    library = sparsity["library"]
    if library == "torch":
        cls = sparsity["model_class"].rpartition(".")[2]
        return "pytorch", (f"The weights are the state dict of a plain PyTorch module (`{cls}`): build that module, "
                           "then `hf_sparse.load_sparse(path, model=module)` fills it in place.")
    decided, note = get_format(sparsity["format"]).load_note(sparsity)
    if decided is not None:
        return decided, note
    if library == "timm":
        return "timm", ("It also loads with plain timm:\n\n```python\nimport timm\n\n"
                        f'model = timm.create_model("hf-hub:{REPO_PLACEHOLDER}", pretrained=True)\n```')
    module, _, cls = sparsity["model_class"].rpartition(".")
    module = "transformers" if module.startswith("transformers.") else module
    snippet = f'```python\nfrom {module} import {cls}\n\nmodel = {cls}.from_pretrained("{REPO_PLACEHOLDER}")\n```'
    if module == "transformers":
        return "transformers", note + "It also loads with plain transformers:\n\n" + snippet
    return "hf_sparse", note + "It also loads with `from_pretrained` (the class comes with hf_sparse):\n\n" + snippet


def render_model_card(sparsity: dict, *, recipe_yaml: str | None = None, dataset: str | None = None,
                      task: str | None = None, model_name: str | None = None, plot: str | None = None,
                      template: Path = TEMPLATE) -> ModelCard:
    """The card for a checkpoint described by ``sparsity`` (the contents of ``sparsity.json``)."""
    method, fmt = sparsity.get("method") or "none", sparsity["format"]
    task = _TASK_ALIASES.get(task, task) if task else None
    layers = sparsity.get("per_layer") or {}
    architecture = sparsity.get("timm_name") or sparsity["model_class"].rpartition(".")[2]
    achieved = sparsity.get("achieved_density")
    model_name = model_name or f"{architecture}-{method}" + (f"-density-{achieved:.3f}" if achieved else "")
    dataset_id, dataset = card_dataset(dataset or _recipe_dataset(recipe_yaml))
    rows = _metric_rows(sparsity.get("eval"), sparsity.get("dense_reference"))
    library_name, plain_load = _plain_load(sparsity)
    base_model = base_model_of(_recipe_section(recipe_yaml, "model"))
    license_id, license_note = license_of(recipe_yaml)

    eval_results = None
    if rows and dataset and task:
        eval_results = [EvalResult(task_type=task, dataset_type=dataset_id or dataset, dataset_name=dataset,
                                   metric_type=r["name"], metric_value=r["value"]) for r in rows]
    tags = ["hf_sparse", "sparse", "pruning", method, f"{fmt}-checkpoint", library_name] + ([task] if task else [])
    card_data = ModelCardData(
        library_name=library_name, tags=[t for t in tags if t and t != "none"], pipeline_tag=task,
        datasets=[dataset_id] if dataset_id else None, metrics=[r["name"] for r in rows] or None,
        model_name=model_name if eval_results else None, eval_results=eval_results,
        base_model=base_model, license=license_id,
    )
    target_text, achieved_text = density_words(sparsity)
    kept = sum(int(v.get("nonzero", 0)) for v in layers.values())
    total = sum(int(v.get("numel", 0)) for v in layers.values())
    kinds = sorted({str(v["layer_type"]) for v in layers.values() if v.get("layer_type")})
    purged = sparsity.get("purged") or {}
    purged_rows = [{"name": k, "kept": len(v), "shape": (purged.get("per_layer") or {}).get(k, {}).get("shape", "-")}
                   for k, v in (purged.get("kept") or {}).items()]
    return ModelCard.from_template(
        card_data, template_path=str(template),
        model_name=model_name, architecture=architecture, library=sparsity["library"], method=method,
        targeted_count=len(layers), layer_kinds=", ".join(kinds) or "weight tensors",
        kept=f"{kept:,}", total=f"{total:,}", format=fmt, format_note=get_format(fmt).card_note,
        target_density=target_text, achieved_density=achieved_text, base_model=base_model,
        license=license_id, license_note=license_note,
        model_density=_num(sparsity.get("model_density")), version=sparsity.get("hf_sparse_version", "-"),
        plot=plot,
        layers=[{"name": k, "shape": "×".join(map(str, v.get("shape", []))), "density": _num(v.get("density")),
                 "nonzero": f"{int(v.get('nonzero', 0)):,}", "numel": f"{int(v.get('numel', 0)):,}"}
                for k, v in layers.items()],
        purged_rows=purged_rows, metrics=rows, dataset=dataset,
        recipe=(recipe_yaml or "").rstrip("\n"), load_id=REPO_PLACEHOLDER, plain_load=plain_load,
        runtime_speed=speed_sentence(sparsity.get("runtime_speed")),
        purged_cost=_purged_cost(sparsity.get("method_metrics") or {}) or _measured_purge(purged),
    )


def _measured_purge(purged: dict) -> str | None:
    """Parameters and MACs the export measured on the purged model itself (``sparsity.json`` ``purged``)."""
    p, m = purged.get("params"), purged.get("macs")
    if not p or not m:
        return None
    return (f"parameters {p['fraction']:.4f} ({int(p['purged']):,} of {int(p['dense']):,}), MACs per sample "
            f"{m['fraction']:.4f} ({int(m['purged']):,} of {int(m['dense']):,}, measured at input "
            f"{purged.get('input_shape')})")


def _purged_cost(metrics: dict) -> str | None:
    """The purged model's parameters and MACs per sample relative to dense (structured runs)."""
    if "purged_params_fraction" not in metrics:
        return None
    return (f"parameters {metrics['purged_params_fraction']:.4f} ({int(metrics['purged_params']):,} of "
            f"{int(metrics['dense_params']):,}), MACs per sample {metrics['purged_macs_fraction']:.4f} "
            f"({int(metrics['purged_macs']):,} of {int(metrics['dense_macs']):,}, at the training resolution)")


def write_model_card(folder: str | Path, sparsity: dict, *, recipe_yaml: str | None = None,
                     dataset: str | None = None, task: str | None = None, model_name: str | None = None) -> Path:
    """Write ``README.md`` (and ``density.png``) into ``folder``; return the README path."""
    folder = Path(folder)
    plot = density_plot(folder / "density.png", sparsity.get("per_layer") or {}, sparsity.get("target_density"),
                        sparsity.get("target_unit") or "weights")
    card = render_model_card(sparsity, recipe_yaml=recipe_yaml, dataset=dataset, task=task, model_name=model_name,
                             plot=plot.name if plot else None)
    card.save(folder / "README.md")
    return folder / "README.md"


__all__ = ["REPO_PLACEHOLDER", "TEMPLATE", "density_plot", "render_model_card", "write_model_card"]
