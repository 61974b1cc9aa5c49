"""``instseg serve``: a local web page to try a model and to look at an evaluation.

Needs the ``serve`` extra (Starlette, uvicorn, python-multipart). :func:`resolve_sources`
turns the command's arguments into what to load, :func:`build_app` loads it, :func:`serve`
runs it.
"""

from __future__ import annotations

import ipaddress
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from instseg.configs import ConfigError, ExperimentConfig

from .analysis import EvaluationView, ImageErrors
from .app import ApiError, Predictor, UploadLimits, create_app


@dataclass(frozen=True)
class ServeSources:
    """What a server loads: a checkpoint for the predict page, and a ground truth with
    results (and optionally the run's metrics and the images) for the evaluation page."""

    checkpoint: Path | None = None
    ann: Path | None = None
    results: Path | None = None
    metrics: Path | None = None
    images: Path | None = None


def resolve_sources(
    checkpoint: str | None = None,
    work_dir: str | None = None,
    ann: str | None = None,
    results: str | None = None,
    images: str | None = None,
) -> ServeSources:
    """The files of ``instseg serve``'s arguments. A training run folder (``--work-dir``)
    gives ``model_final.safetensors``, ``results.json``, ``metrics.json`` and, from its
    ``config.json``, the validation annotations and images; explicit arguments win."""
    run_checkpoint = run_results = run_metrics = run_ann = run_images = None
    if work_dir is not None:
        run = Path(work_dir)
        if not run.is_dir():
            raise FileNotFoundError(f"--work-dir {run} is not a folder")
        if (run / "model_final.safetensors").is_file():
            run_checkpoint = run / "model_final.safetensors"
        if (run / "results.json").is_file():
            run_results = run / "results.json"
        if (run / "metrics.json").is_file():
            run_metrics = run / "metrics.json"
        run_ann, run_images = _run_val_data(run)
        if run_checkpoint is None and run_results is None:
            raise FileNotFoundError(
                f"--work-dir {run} holds neither model_final.safetensors nor results.json: "
                "not a finished training run"
            )
    chosen_results = Path(results) if results is not None else run_results
    chosen_ann = Path(ann) if ann is not None else run_ann
    if (ann is not None or results is not None) and (chosen_ann is None or chosen_results is None):
        raise ConfigError("--ann and --results go together: the evaluation page needs both")
    if ann is not None or results is not None:
        run_metrics = None  # the run's metrics describe the run's files, not these
    if chosen_results is None or chosen_ann is None:
        chosen_results = chosen_ann = run_metrics = None
    for label, path in (("--ann", chosen_ann), ("--results", chosen_results)):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"{label}: file not found: {path}")
    chosen_checkpoint = Path(checkpoint) if checkpoint is not None else run_checkpoint
    if chosen_checkpoint is not None and not chosen_checkpoint.is_file():
        raise FileNotFoundError(f"--checkpoint: file not found: {chosen_checkpoint}")
    chosen_images = Path(images) if images is not None else run_images
    if chosen_images is not None and not chosen_images.is_dir():
        raise FileNotFoundError(f"--images: not a folder: {chosen_images}")
    if chosen_checkpoint is None and chosen_results is None:
        raise ConfigError(
            "nothing to serve: give --checkpoint (predict page), --work-dir (a training run) "
            "or --ann with --results (evaluation page)"
        )
    return ServeSources(chosen_checkpoint, chosen_ann, chosen_results, run_metrics, chosen_images)


def _run_val_data(run: Path) -> tuple[Path | None, Path | None]:
    """The validation annotations and images a run was evaluated on (its ``config.json``)."""
    config = run / "config.json"
    if not config.is_file():
        return None, None
    try:
        data = json.loads(config.read_text(encoding="utf-8")).get("data", {})
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{config}: malformed json at line {exc.lineno}: {exc.msg}") from exc
    ann, images = data.get("val_ann"), data.get("val_images")
    return (Path(ann) if ann else None), (Path(images) if images else None)


def build_app(
    sources: ServeSources,
    cfg: ExperimentConfig | None = None,
    limits: UploadLimits | None = None,
    min_score: float = 0.0,
    device: str = "cpu",
):
    """Load the model and the evaluation of ``sources`` and return the app."""
    predictor = None
    if sources.checkpoint is not None:
        from instseg.runner import load_trained

        trained = load_trained(sources.checkpoint, cfg)
        trained.model.to(device)
        predictor = Predictor(trained, min_score)
    evaluation = None
    if sources.results is not None and sources.ann is not None:
        evaluation = EvaluationView(sources.ann, sources.results, sources.metrics, sources.images)
    return create_app(predictor, evaluation, limits)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(app, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run ``app`` with uvicorn until interrupted; warns when reachable from other machines."""
    import uvicorn

    if not is_loopback(host):
        warnings.warn(
            f"instseg serve is bound to {host}: anyone who can reach this machine on port "
            f"{port} can use the model and read the evaluation and its images (there is no "
            "authentication); bind to 127.0.0.1 unless you mean that",
            stacklevel=2,
        )
    uvicorn.run(app, host=host, port=port, log_level="info")


__all__ = [
    "ApiError",
    "EvaluationView",
    "ImageErrors",
    "Predictor",
    "ServeSources",
    "UploadLimits",
    "build_app",
    "create_app",
    "is_loopback",
    "resolve_sources",
    "serve",
]
