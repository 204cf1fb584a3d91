"""The model card (`README.md`) every run writes into its output directory, and the upload to the Hugging Face Hub.

The card says what the model is and how it was made: the base model, the method and every hyper-parameter, the data,
the clean validation metrics and, once `uegr-eval` has scored the model, its robustness numbers. Its metadata is
`huggingface_hub`'s model card YAML (`model-index` with one result per metric), so `ModelCard.load` reads it and the
Hub shows it. `uegr-eval` adds its results to `robustness_results.json` beside the model and writes the card again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CARD = "README.md"
ROBUSTNESS_RESULTS = "robustness_results.json"


@dataclass
class CardInfo:
    """What a model card says (the CLI and the Trainer integration each fill one)."""

    name: str
    base_model: str
    method: str
    hyperparameters: dict[str, Any]
    """Dotted key -> value: the method section and the training settings."""
    data: dict[str, str]
    """Role (task, train, validation) -> where the data came from."""
    dataset_id: str | None
    """Hub id of a registered task's dataset (None for local files)."""
    metrics: dict[str, float]
    """Final clean validation metrics."""
    steps: int = 0
    num_processes: int = 1
    robustness: list[dict[str, Any]] = field(default_factory=list)
    """`uegr-eval` summaries (see `robustness_entry`)."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested dict: {"a": {"b": 1}} -> {"a.b": 1}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def card_info_from_run(out: Path, config: dict[str, Any], summary: dict[str, Any]) -> CardInfo:
    """The card of a `uegr-train` run from its resolved config (as in config.yaml) and metrics.json summary."""
    hyper = flatten({"method": config["method"]})
    hyper.update(flatten({"train": {k: v for k, v in config["train"].items() if k not in _RUN_ONLY_KEYS}}))
    data_cfg = config["data"]
    data = {
        role: str(data_cfg[key])
        for role, key in (("task", "task"), ("task path", "task_path"), ("train", "train_file"))
        if data_cfg.get(key)
    }
    if data_cfg.get("validation_file"):
        data["validation"] = str(data_cfg["validation_file"])
    if data_cfg.get("max_train_samples"):
        data["training rows"] = f"{data_cfg['max_train_samples']} (seeded subset)"
    dataset_id = None
    if data_cfg.get("task"):
        from uegr_dist.data.tasks import get_task

        dataset_id = get_task(data_cfg["task"]).hub_id
    return CardInfo(
        name=out.name,
        base_model=_base_model(config["model"]),
        method=str(config["method"]["name"]),
        hyperparameters=hyper,
        data=data,
        dataset_id=dataset_id,
        metrics={k: float(v) for k, v in summary.get("final", {}).items()},
        steps=int(summary.get("train", {}).get("steps", 0)),
        num_processes=int(summary.get("train", {}).get("num_processes", 1)),
        robustness=read_robustness(out),
    )


def _base_model(model: dict[str, Any]) -> str:
    """What the run started from: the pretrained model, or a random initialisation of an architecture."""
    if model.get("init", "pretrained") == "random":
        return f"a randomly initialised {model.get('architecture')} (no pretrained weights)"
    return str(model["name_or_path"])


# Train keys that say where and how a run was executed, not what the model is.
_RUN_ONLY_KEYS = (
    "output_dir",
    "overwrite",
    "progress",
    "tracker",
    "resume",
    "save_every",
    "keep_last",
    "log_every",
    "save_model",
    "collective_timeout",
    "push_to_hub",
)


def read_robustness(model_dir: Path) -> list[dict[str, Any]]:
    """The robustness entries `uegr-eval` recorded beside a model (empty when none)."""
    path = Path(model_dir) / ROBUSTNESS_RESULTS
    if not path.is_file():
        return []
    return list(json.loads(path.read_text(encoding="utf-8")))


def robustness_entry(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One card entry per attack of a `uegr-eval` summary.json: data, examples, clean and attacked accuracy."""
    entries = []
    for attack, metrics in summary.get("attacks", {}).items():
        entry = {"attack": attack, "data": str(summary.get("data")), "examples": summary.get("n_examples")}
        if "curve" in metrics:
            entry["curve"] = [{"eps": p["eps"], "accuracy": p["accuracy"]} for p in metrics["curve"]]
        else:
            entry["clean_accuracy"] = metrics["clean_accuracy"]
            entry["attacked_accuracy"] = metrics["attacked_accuracy"]
            entry["attack_success_rate"] = metrics["attack_success_rate"]
        entries.append(entry)
    if not entries and "clean" in summary:
        entries.append(
            {
                "attack": "none",
                "data": str(summary.get("data")),
                "examples": summary.get("n_examples"),
                "clean_accuracy": summary["clean"]["accuracy"],
            }
        )
    return entries


def record_robustness(model_dir: Path, summary: dict[str, Any]) -> None:
    """Add a `uegr-eval` summary's results to the model's robustness_results.json (an entry for the same data and
    attack is replaced) and write its card again (a model directory without config.yaml / metrics.json, i.e. not
    written by uegr-train, only gets the JSON)."""
    model_dir = Path(model_dir)
    new = robustness_entry(summary)
    keys = {(e["data"], e["attack"]) for e in new}
    kept = [e for e in read_robustness(model_dir) if (e["data"], e["attack"]) not in keys]
    (model_dir / ROBUSTNESS_RESULTS).write_text(json.dumps(kept + new, indent=2), encoding="utf-8")
    config, metrics = model_dir / "config.yaml", model_dir / "metrics.json"
    if config.is_file() and metrics.is_file():
        import yaml

        info = card_info_from_run(
            model_dir,
            yaml.safe_load(config.read_text(encoding="utf-8")),
            json.loads(metrics.read_text(encoding="utf-8")),
        )
        (model_dir / CARD).write_text(render_model_card(info), encoding="utf-8")


_METRIC_NAMES = {"f1": "F1", "mcc": "MCC", "mse": "MSE"}


def _metric_name(key: str) -> str:
    return _METRIC_NAMES.get(key, key.replace("_", " ").capitalize())


def _is_hub_id(name: str) -> bool:
    """A Hub repository id (user/name or name), not a local path, a package path or a description."""
    return (
        bool(name) and " " not in name and not name.startswith(("package:", "/", ".", "~")) and not Path(name).exists()
    )


def _described(base_model: str) -> str:
    return base_model.capitalize() if " " in base_model else f"`{base_model}`"


def render_model_card(info: CardInfo) -> str:
    """The card's markdown with `huggingface_hub` model card metadata (model-index)."""
    from huggingface_hub import EvalResult, ModelCardData

    from uegr_dist import __version__

    dataset_name = info.data.get("task") or info.data.get("train") or "local data"
    dataset_type = info.dataset_id or "local"
    results = [
        EvalResult(
            task_type="text-classification",
            task_name="Text Classification",
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_split="validation",
            metric_type=key,
            metric_name=_metric_name(key),
            metric_value=round(value, 6),
        )
        for key, value in info.metrics.items()
        if isinstance(value, (int, float))
    ]
    for entry in info.robustness:
        if "attacked_accuracy" in entry:
            results.append(
                EvalResult(
                    task_type="text-classification",
                    task_name="Text Classification",
                    dataset_type="local",
                    dataset_name=f"{entry['data']} ({entry['attack']} attack, {entry['examples']} examples)",
                    metric_type="accuracy",
                    metric_name=f"Accuracy under {entry['attack']} attack",
                    metric_value=round(float(entry["attacked_accuracy"]), 6),
                )
            )
        elif entry.get("attack") == "none":
            results.append(
                EvalResult(
                    task_type="text-classification",
                    task_name="Text Classification",
                    dataset_type="local",
                    dataset_name=f"{entry['data']} ({entry['examples']} examples)",
                    metric_type="accuracy",
                    metric_name="Accuracy",
                    metric_value=round(float(entry["clean_accuracy"]), 6),
                )
            )
    data = ModelCardData(
        base_model=info.base_model if _is_hub_id(info.base_model) else None,
        datasets=[info.dataset_id] if info.dataset_id else None,
        library_name="transformers",
        pipeline_tag="text-classification",
        tags=["uegr-dist", info.method, "robust-fine-tuning"],
        model_name=info.name,
        eval_results=results or None,
    )
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {info.name}",
        "",
        f"{_described(info.base_model)} fine-tuned for sequence classification with **{info.method}** by uegr-dist "
        f"{__version__} ({info.steps} optimizer steps on {info.num_processes} process(es)).",
        "",
        "## Data",
        "",
        *[f"- {role}: `{where}`" for role, where in info.data.items()],
        "",
        "## Validation metrics (clean)",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {key} | {value:.4f} |" for key, value in info.metrics.items() if isinstance(value, (int, float))],
        "",
    ]
    text_attacks = [e for e in info.robustness if "curve" not in e]
    curves = [e for e in info.robustness if "curve" in e]
    if info.robustness:
        lines += ["## Robustness (uegr-eval)", ""]
    if text_attacks:
        lines += ["| data | attack | examples | clean accuracy | accuracy under attack | attack success rate |"]
        lines += ["|---|---|---|---|---|---|"]
        for e in text_attacks:
            attacked = f"{e['attacked_accuracy']:.4f}" if "attacked_accuracy" in e else "-"
            success = f"{e['attack_success_rate']:.4f}" if "attack_success_rate" in e else "-"
            lines.append(
                f"| `{e['data']}` | {e['attack']} | {e['examples']} | {e['clean_accuracy']:.4f} | {attacked} | "
                f"{success} |"
            )
        lines.append("")
    for e in curves:
        lines += [f"{e['attack']} on `{e['data']}` ({e['examples']} examples): accuracy by radius", ""]
        lines += ["| eps | accuracy |", "|---|---|", *[f"| {p['eps']:g} | {p['accuracy']:.4f} |" for p in e["curve"]]]
        lines.append("")
    lines += [
        "## Training hyper-parameters",
        "",
        "| key | value |",
        "|---|---|",
        *[f"| `{key}` | `{value}` |" for key, value in info.hyperparameters.items()],
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
        "",
        'model = AutoModelForSequenceClassification.from_pretrained("<this folder or repo>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this folder or repo>")',
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(out: Path, cfg: Any, summary: dict[str, Any]) -> Path:
    """Write out/README.md for a finished `uegr-train` run."""
    from uegr_dist.config import config_to_dict

    info = card_info_from_run(Path(out), config_to_dict(cfg), summary)
    path = Path(out) / CARD
    path.write_text(render_model_card(info), encoding="utf-8")
    return path


class PushError(RuntimeError):
    """The upload to the Hub failed; everything stays saved in the output directory."""


def push_to_hub(out: Path, repo_id: str) -> str:
    """Upload the output directory's model, tokenizer and card (not checkpoints or logs) to `repo_id`; returns the
    repository URL. PushError (with the way to retry) when the Hub cannot be reached or refuses."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(out),
            ignore_patterns=["checkpoints/*", "uegr/*", "*.pt"],
            commit_message="Upload model and card (uegr-dist)",
        )
    except Exception as error:  # the Hub client raises many kinds (offline, auth, HTTP)
        raise PushError(
            f"train.push_to_hub = {repo_id!r}: the upload failed ({type(error).__name__}: {error}). The model and "
            f"its card are saved in {out}; push them later with: hf upload {repo_id} {out}"
        ) from error
    return f"https://huggingface.co/{repo_id}"
