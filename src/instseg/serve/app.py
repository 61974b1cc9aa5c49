"""The ``instseg serve`` web app: a predict page, an evaluation page and their JSON API.

Starlette (ASGI) serves plain HTML, CSS and JavaScript from ``static/`` (no front-end build)
and the API below; uvicorn runs it. Masks travel as COCO compressed RLE, decoded and drawn in
the browser, so the score threshold is applied there without another request.

API (all JSON; errors are ``{"error": message}`` with a 4xx status):

- ``GET /api/info``: what the server holds (model, categories, limits, evaluation).
- ``POST /api/predict`` (multipart field ``image``; query ``score_thr``, default the
  server's lowest): ``{"image": {file_name, width, height}, "results": [COCO results]}``,
  image id 1, the same detections as ``instseg predict`` at that threshold.
- ``GET /api/metrics``: the run's ``metrics.json`` (or the results scored here).
- ``GET /api/categories?iou_type=``: per-category AP, worst first.
- ``GET /api/pr?iou_type=&category=``: precision-recall curves per IoU threshold.
- ``GET /api/images?iou_type=&category=&score_thr=``: images by missed objects plus false
  positives at IoU 0.5, most first (of one category: the images with it, its errors).
- ``GET /api/images/{id}``: one image's ground truth and predictions.
- ``GET /api/images/{id}/file``: the image file itself.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Message

from instseg.data.coco import DataError, decode_image
from instseg.evaluation import instances_to_coco_results
from instseg.runner import TrainedModel, eval_transform, predict_image

from .analysis import EvaluationView

STATIC = Path(__file__).parent / "static"
# Pillow format names accepted for upload.
UPLOAD_FORMATS = ("BMP", "JPEG", "PNG", "TIFF", "WEBP")
UPLOAD_MEDIA_TYPES = ("image/bmp", "image/jpeg", "image/png", "image/tiff", "image/webp")


@dataclass(frozen=True)
class UploadLimits:
    """What ``POST /api/predict`` accepts."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    formats: tuple[str, ...] = UPLOAD_FORMATS


class ApiError(Exception):
    """A request the API refuses: ``status`` and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Predictor:
    """A trained model behind a lock: one image at a time (the model is not re-entrant and
    parallel requests would only share the same cores)."""

    def __init__(self, trained: TrainedModel, min_score: float) -> None:
        self.trained = trained
        self.transform = eval_transform(trained.cfg)
        self.min_score = min_score
        self.category_ids = [c.id for c in trained.categories]
        self._lock = threading.Lock()

    def __call__(self, image, file_name: str, score_thr: float) -> list[dict[str, Any]]:
        with self._lock:
            detections = predict_image(
                self.trained.model, self.trained.cfg, self.transform, image, 1, file_name
            )
        kept = detections[(detections.scores >= score_thr).nonzero().flatten()]
        return instances_to_coco_results(kept, 1, self.category_ids)


def create_app(
    predictor: Predictor | None = None,
    evaluation: EvaluationView | None = None,
    limits: UploadLimits | None = None,
) -> Starlette:
    """The app for a model (predict page), an evaluation (evaluation page), or both."""
    if predictor is None and evaluation is None:
        raise ValueError("serve needs a model (--checkpoint) or an evaluation (--work-dir, --ann)")
    limits = limits or UploadLimits()

    def page(name: str) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            return FileResponse(STATIC / name, media_type="text/html")

        return handler

    async def index(request: Request) -> Response:
        return RedirectResponse("/predict" if predictor is not None else "/evaluation")

    async def info(request: Request) -> Response:
        body: dict[str, Any] = {"predict": predictor is not None, "evaluation": None}
        if predictor is not None:
            body["model"] = predictor.trained.cfg.name
            body["categories"] = [
                {"id": c.id, "name": c.name} for c in predictor.trained.categories
            ]
            body["min_score"] = predictor.min_score
            body["limits"] = {**asdict(limits), "media_types": list(UPLOAD_MEDIA_TYPES)}
        if evaluation is not None:
            body["evaluation"] = {
                "iou_types": list(evaluation.iou_types),
                "default_iou_type": evaluation.default_iou_type,
                "categories": [{"id": k, "name": v} for k, v in evaluation.categories.items()],
                "num_images": len(evaluation.gt.imgs),
                "num_results": len(evaluation.results),
                "has_images": evaluation.images_dir is not None,
            }
        return JSONResponse(body)

    async def predict(request: Request) -> Response:
        if predictor is None:
            raise ApiError(404, "no model loaded: start serve with --checkpoint")
        score_thr = _float_param(request, "score_thr", predictor.min_score, 0.0, 1.0)
        # The form's own fields and boundaries may add this much to the file's bytes.
        max_body = limits.max_bytes + 65536
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            raise ApiError(413, f"upload too large: {int(length)} bytes, limit {limits.max_bytes}")
        try:
            form = await _body_limited(request, max_body).form(max_files=1, max_fields=4)
        except ApiError:
            raise
        except Exception as exc:  # malformed multipart bodies
            raise ApiError(400, f"not a multipart form upload: {exc}") from exc
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "no file in the form field 'image'")
        data = await upload.read(limits.max_bytes + 1)
        if len(data) > limits.max_bytes:
            raise ApiError(413, f"upload too large: over {limits.max_bytes} bytes")
        if not data:
            raise ApiError(400, "the uploaded file is empty")
        name = upload.filename or "upload"
        try:
            image = decode_image(io.BytesIO(data), name, limits.max_pixels, limits.formats)
        except DataError as exc:
            message = str(exc)
            status = 413 if "pixels" in message else 415 if "not accepted" in message else 400
            raise ApiError(status, message) from exc
        results = await run_in_threadpool(predictor, image, name, score_thr)
        height, width = image.shape[:2]
        return JSONResponse(
            {"image": {"file_name": name, "width": width, "height": height}, "results": results}
        )

    def view() -> EvaluationView:
        if evaluation is None:
            raise ApiError(
                404, "no evaluation loaded: start serve with --work-dir or --ann/--results"
            )
        return evaluation

    async def metrics(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(lambda: view().metrics))

    async def categories(request: Request) -> Response:
        v = view()
        iou_type = _iou_type(v, request)
        return JSONResponse(await run_in_threadpool(v.category_ap, iou_type))

    async def pr(request: Request) -> Response:
        v = view()
        iou_type = _iou_type(v, request)
        category = _category(v, request)
        return JSONResponse(await run_in_threadpool(v.pr_curves, iou_type, category))

    async def images(request: Request) -> Response:
        v = view()
        iou_type = _iou_type(v, request)
        category = _category(v, request)
        score_thr = _float_param(request, "score_thr", 0.5, 0.0, 1.0)
        return JSONResponse(await run_in_threadpool(v.images, iou_type, score_thr, category))

    async def image_detail(request: Request) -> Response:
        v = view()
        image_id = _image_id(request)
        try:
            return JSONResponse(v.image_detail(image_id))
        except KeyError as exc:
            raise ApiError(404, str(exc.args[0])) from exc

    async def image_file(request: Request) -> Response:
        v = view()
        image_id = _image_id(request)
        try:
            return FileResponse(v.image_file(image_id))
        except KeyError as exc:
            raise ApiError(404, str(exc.args[0])) from exc
        except (FileNotFoundError, PermissionError) as exc:
            raise ApiError(404, str(exc)) from exc

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    routes = [
        Route("/", index),
        Route("/predict", page("predict.html")),
        Route("/evaluation", page("evaluation.html")),
        Route("/api/info", info),
        Route("/api/predict", predict, methods=["POST"]),
        Route("/api/metrics", metrics),
        Route("/api/categories", categories),
        Route("/api/pr", pr),
        Route("/api/images", images),
        Route("/api/images/{image_id}", image_detail),
        Route("/api/images/{image_id}/file", image_file),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, exception_handlers={ApiError: api_error})


def _body_limited(request: Request, max_bytes: int) -> Request:
    """``request`` whose body stops with a 413 once more than ``max_bytes`` have arrived: a
    chunked upload has no Content-Length to refuse it by, and would otherwise be spooled
    whole before its size is known."""
    received = 0

    async def receive() -> Message:
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > max_bytes:
                raise ApiError(413, f"upload too large: over {max_bytes} bytes received")
        return message

    return Request(request.scope, receive)


def _float_param(request: Request, name: str, default: float, lo: float, hi: float) -> float:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be a number, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ApiError(400, f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _iou_type(view: EvaluationView, request: Request) -> str:
    try:
        return view.check_iou_type(request.query_params.get("iou_type"))
    except ValueError as exc:
        raise ApiError(400, str(exc)) from exc


def _category(view: EvaluationView, request: Request) -> int | None:
    raw = request.query_params.get("category")
    if raw in (None, ""):
        return None
    try:
        return view.check_category(int(raw))
    except ValueError:
        raise ApiError(400, f"category must be a category id, got {raw!r}") from None
    except KeyError as exc:
        raise ApiError(404, str(exc.args[0])) from exc


def _image_id(request: Request) -> int:
    raw = request.path_params["image_id"]
    try:
        return int(raw)
    except ValueError:
        raise ApiError(400, f"image id must be an integer, got {raw!r}") from None
