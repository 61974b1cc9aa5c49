"""``instseg serve``: the JSON API through Starlette's test client, the evaluation analyses
against pycocotools, and both pages in a real headless Chromium (tests/test_serve_browser.py).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette", reason="instseg serve needs the serve extra")

from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from starlette.testclient import TestClient

from browser import background_server, chromium_driver
from instseg.cli import main
from instseg.configs import ConfigError
from instseg.serve import (
    EvaluationView,
    UploadLimits,
    build_app,
    create_app,
    is_loopback,
    resolve_sources,
)
from test_cli import TINY


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny training run with validation: model_final.safetensors, config.json,
    results.json, metrics.json; its data under ``data/``. Score threshold 0 so that even a
    model trained for two iterations returns detections."""
    from instseg.data import ShapesConfig, generate_shapes

    root = tmp_path_factory.mktemp("serve")
    data = root / "data"
    ann = generate_shapes(
        data,
        ShapesConfig(num_images=3, image_size=(96, 128), max_size=40, size_jitter=0.0, seed=3),
        "val",
    )
    work = root / "run"
    paths = ["--train-ann", str(ann), "--train-images", str(data)]
    paths += ["--val-ann", str(ann), "--val-images", str(data)]
    argv = ["train", "mask_rcnn_r18_fpn_small", "--work-dir", str(work), *paths]
    overrides = [*TINY, "model.roi_head.score_thr=0.0"]
    assert main([*argv, "--max-iters", "2", "--set", *overrides]) == 0
    for name in ("model_final.safetensors", "results.json", "metrics.json", "config.json"):
        assert (work / name).is_file(), name
    return work


@pytest.fixture(scope="module")
def client(run) -> TestClient:
    app = build_app(resolve_sources(work_dir=str(run)))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def _image_files(run: Path) -> list[Path]:
    config = json.loads((run / "config.json").read_text())
    return sorted((Path(config["data"]["val_images"]) / "images").glob("*.png"))


def _post(client: TestClient, data: bytes, name: str = "x.png", media="image/png", **params):
    return client.post("/api/predict", files={"image": (name, data, media)}, params=params)


# ------------------------------------------------------------------------------- predict API


def test_predict_api_gives_the_detections_of_instseg_predict(run, client, tmp_path):
    image = _image_files(run)[0]
    # Without score_thr every detection the model keeps comes back; pick a threshold that
    # keeps about half of them.
    response = _post(client, image.read_bytes(), image.name)
    assert response.status_code == 200, response.text
    everything = response.json()["results"]
    threshold = round(float(np.median([r["score"] for r in everything])), 4)
    out = tmp_path / "pred"
    argv = ["predict", "--checkpoint", str(run / "model_final.safetensors"), str(image)]
    assert main([*argv, "--out", str(out), "--score-thr", str(threshold)]) == 0
    expected = json.loads((out / "results.json").read_text())
    response = _post(client, image.read_bytes(), image.name, score_thr=threshold)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["image"] == {"file_name": image.name, "width": 128, "height": 96}
    assert 0 < len(expected) < len(everything)
    assert body["results"] == expected  # same boxes, scores, classes and RLE strings
    assert [r for r in everything if r["score"] >= threshold] == expected
    for r in everything:
        assert mask_utils.decode(r["segmentation"]).shape == (96, 128)
    info = client.get("/api/info").json()
    assert info["predict"] and info["model"] == "mask_rcnn_r18_fpn_small"
    assert [c["id"] for c in info["categories"]] == [1, 3, 7]


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (20, 40, 60)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_uploads_get_a_4xx_with_a_message(run):
    limits = UploadLimits(max_bytes=60_000, max_pixels=200 * 200)
    app = build_app(resolve_sources(checkpoint=str(run / "model_final.safetensors")), limits=limits)
    png = _png(128, 96)
    gif = io.BytesIO()
    Image.new("RGB", (32, 32)).save(gif, format="GIF")
    noise = np.random.default_rng(0).integers(0, 256, (180, 180, 3), dtype=np.uint8)
    big_file = io.BytesIO()
    Image.fromarray(noise).save(big_file, format="BMP")  # 97 kB, under the pixel limit
    cases = {
        "text": (
            _post,
            (b"this is not an image\n", "notes.png"),
            400,
            "notes.png: not in an image",
        ),
        "truncated": (_post, (png[: len(png) // 2], "cut.png"), 400, "cut.png"),
        "empty": (_post, (b"", "empty.png"), 400, "empty"),
        "bytes": (_post, (big_file.getvalue(), "big.bmp", "image/bmp"), 413, "too large"),
        "pixels": (_post, (_png(300, 200), "wide.png"), 413, "60000 pixels"),
        "gif": (_post, (gif.getvalue(), "anim.gif", "image/gif"), 415, "GIF images are not"),
    }
    with TestClient(app, raise_server_exceptions=False) as test_client:
        for label, (post, args, status, words) in cases.items():
            response = post(test_client, *args)
            assert response.status_code == status, (label, response.text)
            assert words in response.json()["error"], (label, response.json())
        missing = test_client.post("/api/predict", files={"picture": ("a.png", png)})
        assert missing.status_code == 400 and "'image'" in missing.json()["error"]
        raw = test_client.post("/api/predict", content=png, headers={"content-type": "image/png"})
        assert raw.status_code == 400 and "image" in raw.json()["error"]
        for bad in ("abc", "1.5", "-0.1"):
            response = _post(test_client, png, score_thr=bad)
            assert response.status_code == 400 and "score_thr" in response.json()["error"]
        # After all that, a good upload still works.
        assert _post(test_client, png).status_code == 200
        # No evaluation in this server: its endpoints say so.
        response = test_client.get("/api/metrics")
        assert response.status_code == 404 and "--work-dir" in response.json()["error"]


def test_a_chunked_upload_is_cut_off_at_the_limit(run):
    """Without a Content-Length the body is counted as it arrives: the server answers 413
    after about the limit, not after spooling the whole 8 MB (driven at the ASGI level, as
    a server hands chunks over; the test client would send the body in one piece)."""
    import anyio

    limits = UploadLimits(max_bytes=60_000)
    app = build_app(resolve_sources(checkpoint=str(run / "model_final.safetensors")), limits=limits)
    head = (
        b"--b\r\nContent-Disposition: form-data; name=image; filename=x.png\r\n"
        b"Content-Type: image/png\r\n\r\n"
    )
    chunk, count = 16384, 512  # 8 MiB of file content
    sent, replies = [], []

    async def receive():
        if not sent:
            sent.append(len(head))
            return {"type": "http.request", "body": head, "more_body": True}
        if len(sent) <= count:
            sent.append(chunk)
            return {"type": "http.request", "body": bytes(chunk), "more_body": True}
        return {"type": "http.request", "body": b"\r\n--b--\r\n", "more_body": False}

    async def send(message):
        replies.append(message)

    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/predict",
        "raw_path": b"/api/predict",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"multipart/form-data; boundary=b")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }

    async def call():
        await app(scope, receive, send)

    anyio.run(call)
    start = next(m for m in replies if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in replies if m["type"] == "http.response.body")
    assert start["status"] == 413, body
    assert b"upload too large" in body
    assert sum(sent) <= limits.max_bytes + 65536 + chunk  # read up to the limit, no further


# ---------------------------------------------------------------------------- evaluation API


def test_evaluation_endpoints_serve_the_runs_numbers(run, client):
    metrics = client.get("/api/metrics")
    assert metrics.status_code == 200
    assert metrics.json() == json.loads((run / "metrics.json").read_text())
    info = client.get("/api/info").json()["evaluation"]
    assert info["iou_types"] == ["bbox", "segm"] and info["num_images"] == 3
    assert info["has_images"]
    results = json.loads((run / "results.json").read_text())
    assert info["num_results"] == len(results)
    # Per-category AP: pycocotools, one category at a time, gives the same numbers.
    ann = json.loads((run / "config.json").read_text())["data"]["val_ann"]
    for iou_type in ("bbox", "segm"):
        rows = client.get("/api/categories", params={"iou_type": iou_type}).json()
        for row in rows:
            stats = _pycocotools_stats(ann, results, iou_type, row["id"])
            assert row["AP"] == pytest.approx(stats[0] * 100, abs=1e-9), (iou_type, row)
            assert row["AP50"] == pytest.approx(stats[1] * 100, abs=1e-9), (iou_type, row)
        assert [r["AP"] for r in rows] == sorted(r["AP"] for r in rows)
    images = client.get("/api/images", params={"score_thr": 0.0}).json()
    assert sorted(r["id"] for r in images) == [1, 2, 3]
    errors = [r["missed"] + r["false_positives"] for r in images]
    assert errors == sorted(errors, reverse=True)
    detail = client.get(f"/api/images/{images[0]['id']}").json()
    assert len(detail["predictions"]) == images[0]["num_dt"]
    file = client.get(f"/api/images/{images[0]['id']}/file")
    assert file.status_code == 200 and file.content.startswith(b"\x89PNG")
    for path, status in [
        ("/api/images/99", 404),
        ("/api/images/x", 400),
        ("/api/images/99/file", 404),
        ("/api/categories?iou_type=boundary", 400),
        ("/api/pr?category=2", 404),
        ("/api/pr?category=cat", 400),
        ("/api/images?score_thr=2", 400),
    ]:
        response = client.get(path)
        assert response.status_code == status, (path, response.text)
        assert response.json()["error"]
    for page in ("/predict", "/evaluation", "/static/common.js", "/static/style.css"):
        assert client.get(page).status_code == 200, page


def _pycocotools_stats(ann, results, iou_type, category) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann)
        dt = gt.loadRes(copy.deepcopy(results))
        evaluator = COCOeval(gt, dt, iou_type)
        evaluator.params.catIds = [category]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def _perfect_results(gt: dict) -> list[dict]:
    """Every non-crowd ground truth as a detection of score 1 (box and RLE mask)."""
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    results = []
    for a in gt["annotations"]:
        rle = coco.annToRLE(a)
        counts = rle["counts"]
        rle = {
            "size": rle["size"],
            "counts": counts if isinstance(counts, str) else counts.decode(),
        }
        results.append(
            {
                "image_id": a["image_id"],
                "category_id": a["category_id"],
                "bbox": a["bbox"],
                "score": 1.0,
                "segmentation": rle,
            }
        )
    return results


def test_per_image_errors_and_pr_curves_on_known_results(tmp_path):
    from instseg.data import ShapesConfig, generate_shapes

    ann = generate_shapes(
        tmp_path,
        ShapesConfig(num_images=4, image_size=(64, 80), max_size=30, size_jitter=0.0, seed=1),
        "v",
    )
    gt = json.loads(ann.read_text())
    perfect = _perfect_results(gt)
    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps(perfect))
    view = EvaluationView(ann, results_path)
    for iou_type in ("bbox", "segm"):
        errors = view.image_errors(iou_type, 0.5)
        assert {e.errors for e in errors.values()} == {0}
        per_image = {im["id"]: 0 for im in gt["images"]}
        for a in gt["annotations"]:
            per_image[a["image_id"]] += 1
        assert {i: e.num_gt for i, e in errors.items()} == per_image
        for row in view.category_ap(iou_type):
            assert row["AP"] == pytest.approx(100.0)
        curves = view.pr_curves(iou_type)["curves"]
        assert len(curves) == 10
        assert all(p == 1.0 for c in curves for p in c["precision"])
    # Drop one image's first ground truth from the results and add a detection where there is
    # nothing to another image: one missed object there, one false positive here; below the
    # score threshold the spurious detection does not count.
    dropped = next(a for a in gt["annotations"])
    worse = [
        r for r in perfect if r["bbox"] != dropped["bbox"] or r["image_id"] != dropped["image_id"]
    ]
    other = next(im["id"] for im in gt["images"] if im["id"] != dropped["image_id"])
    spurious = {"image_id": other, "category_id": gt["categories"][0]["id"], "score": 0.7}
    spurious["bbox"] = [0.0, 0.0, 2.0, 2.0]
    box_mask = np.zeros((64, 80), dtype=np.uint8, order="F")
    box_mask[:2, :2] = 1
    rle = mask_utils.encode(box_mask)
    spurious["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
    results_path.write_text(json.dumps([*worse, spurious]))
    view = EvaluationView(ann, results_path)
    for iou_type in ("bbox", "segm"):
        errors = view.image_errors(iou_type, 0.5)
        assert (errors[dropped["image_id"]].missed, errors[dropped["image_id"]].errors) == (1, 1)
        assert (errors[other].false_positives, errors[other].errors) == (1, 1)
        assert sum(e.errors for e in errors.values()) == 2
        assert view.image_errors(iou_type, 0.8)[other].false_positives == 0
        rows = view.images(iou_type, 0.5)
        assert {rows[0]["id"], rows[1]["id"]} == {dropped["image_id"], other}
        assert [r["missed"] + r["false_positives"] for r in rows[2:]] == [0] * (len(rows) - 2)
        only = view.images(iou_type, 0.5, category=dropped["category_id"])
        with_category = {
            a["image_id"] for a in gt["annotations"] if a["category_id"] == dropped["category_id"]
        }
        assert {r["id"] for r in only} >= with_category
        # Per category: the missed object is the dropped one's category's; the spurious
        # detection counts only under its own category.
        for cat in (c["id"] for c in gt["categories"]):
            by_cat = view.image_errors(iou_type, 0.5, cat)
            assert by_cat[dropped["image_id"]].missed == int(cat == dropped["category_id"])
            assert by_cat[other].false_positives == int(cat == spurious["category_id"])
            assert sum(e.num_gt for e in by_cat.values()) == sum(
                a["category_id"] == cat for a in gt["annotations"]
            )
    # The mean PR curve at IoU 0.5 equals pycocotools' precision array averaged over classes.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(ann))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(str(results_path)), "segm")
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"][0, :, :, 0, 2]  # IoU 0.5, area all, 100 dets
    expected = precision[:, (precision > -1).any(axis=0)].mean(axis=1)
    got = view.pr_curves("segm")["curves"][0]
    assert got["iou"] == 0.5
    np.testing.assert_allclose(np.array(got["precision"], dtype=float), expected, atol=1e-12)


def test_a_ground_truth_numbered_from_0_is_matched_in_full(tmp_path):
    """Annotation 0 is matched like any other (pycocotools reads a match to id 0 as none),
    and the image browser still shows the file's own ids."""
    from instseg.data import ShapesConfig, generate_shapes

    ann = generate_shapes(
        tmp_path,
        ShapesConfig(num_images=2, image_size=(64, 80), max_size=30, size_jitter=0.0, seed=2),
        "v",
    )
    gt = json.loads(ann.read_text())
    for i, a in enumerate(gt["annotations"]):
        a["id"] = i
    ann.write_text(json.dumps(gt))
    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps(_perfect_results(gt)))
    view = EvaluationView(ann, results_path)
    for iou_type in ("bbox", "segm"):
        errors = view.image_errors(iou_type, 0.5)
        assert sum(e.errors for e in errors.values()) == 0
        assert sum(e.num_gt for e in errors.values()) == len(gt["annotations"])
        assert all(row["AP"] == pytest.approx(100.0) for row in view.category_ap(iou_type))
    first = gt["annotations"][0]
    shown = view.image_detail(first["image_id"])["ground_truth"]
    assert 0 in {item["id"] for item in shown}


def test_bad_evaluation_inputs_name_the_problem(tmp_path):
    from instseg.data import DataError, ShapesConfig, generate_shapes

    ann = generate_shapes(
        tmp_path,
        ShapesConfig(num_images=2, image_size=(48, 48), max_size=20, size_jitter=0.0, seed=2),
        "v",
    )
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("[{")
    with pytest.raises(DataError, match="not valid json"):
        EvaluationView(ann, bad_json)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(
        json.dumps([{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}])
    )
    with pytest.raises(DataError, match="99"):
        EvaluationView(ann, unknown)
    # A file name that climbs out of the images folder is refused.
    gt = json.loads(ann.read_text())
    gt["images"][0]["file_name"] = "../../etc/passwd"
    climbing = tmp_path / "climbing.json"
    climbing.write_text(json.dumps(gt))
    ok = tmp_path / "ok.json"
    ok.write_text("[]")
    view = EvaluationView(climbing, ok, images_dir=tmp_path)
    with pytest.raises(PermissionError):
        view.image_file(gt["images"][0]["id"])
    with TestClient(create_app(evaluation=view)) as test_client:
        response = test_client.get(f"/api/images/{gt['images'][0]['id']}/file")
        assert response.status_code == 404 and "leaves" in response.json()["error"]
        # An empty results file: no detections, every ground truth missed.
        rows = test_client.get("/api/images").json()
        assert sum(r["missed"] for r in rows) == len(gt["annotations"])
        assert test_client.post("/api/predict").status_code == 404


# ----------------------------------------------------------------------------- the command


def test_serve_arguments_and_the_warning_off_loopback(run, tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match="nothing to serve"):
        resolve_sources()
    with pytest.raises(ConfigError, match="go together"):
        resolve_sources(ann=str(run / "results.json"))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        resolve_sources(work_dir=str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="neither"):
        resolve_sources(work_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        resolve_sources(checkpoint=str(tmp_path / "model.safetensors"))
    sources = resolve_sources(work_dir=str(run))
    assert sources.checkpoint == run / "model_final.safetensors"
    assert sources.metrics == run / "metrics.json"
    assert sources.results == run / "results.json"
    # Explicit results replace the run's, and the run's metrics no longer describe them.
    other = tmp_path / "other.json"
    other.write_text("[]")
    replaced = resolve_sources(work_dir=str(run), results=str(other))
    assert replaced.results == other and replaced.metrics is None
    assert replaced.ann == sources.ann

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
    started = []
    monkeypatch.setattr("uvicorn.run", lambda app, host, port, **kw: started.append((host, port)))
    argv = ["serve", "--work-dir", str(run), "--port", "8765"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv) == 0
        assert not caught, [str(w.message) for w in caught]
        assert main([*argv, "--host", "0.0.0.0"]) == 0
    assert started == [("127.0.0.1", 8765), ("0.0.0.0", 8765)]
    assert any("no authentication" in str(w.message) for w in caught)
    assert main(["serve"]) == 2
    assert "nothing to serve" in capsys.readouterr().err


# ---------------------------------------------------------------------------- in a browser


def _canvas_rgb(driver, canvas_id: str) -> np.ndarray:
    import base64

    url = driver.execute_script(f"return document.getElementById('{canvas_id}').toDataURL()")
    png = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int64)


def _column(driver, table: str, column: int | str) -> list[str]:
    """One column of a table's body (a cell's text, or a ``data-`` attribute of the rows),
    read in one script so that a table re-rendered meanwhile cannot go stale under us."""
    return driver.execute_script(
        """const [table, column] = arguments;
        return Array.from(document.querySelectorAll(table + " tbody tr")).map((row) =>
          typeof column === "number" ? row.cells[column].textContent : row.dataset[column]);""",
        table,
        column,
    )


def _blend(image: np.ndarray, instances: list[dict], colors: dict[int, list[int]]) -> np.ndarray:
    """The page's mask drawing, from pycocotools' decoding: each mask in turn averages the
    pixels under it with its category's colour (integer halving)."""
    out = image.astype(np.int64).copy()
    for r in instances:
        mask = mask_utils.decode(r["segmentation"]).astype(bool)
        out[mask] = (out[mask] + np.array(colors[r["category_id"]])) >> 1
    return out


def test_the_pages_in_headless_chromium(run, client, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    image = _image_files(run)[0]
    everything = _post(client, image.read_bytes(), image.name).json()["results"]
    scores = np.array([r["score"] for r in everything])
    pixels = np.asarray(Image.open(image).convert("RGB"))
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = chromium_driver(downloads=str(downloads))
    try:
        with background_server(build_app(resolve_sources(work_dir=str(run)))) as base:
            wait = WebDriverWait(driver, 60)
            driver.get(f"{base}/predict")
            wait.until(lambda d: d.find_element(By.ID, "limits").text)
            driver.find_element(By.ID, "file").send_keys(str(image))
            overlay = driver.find_element(By.ID, "overlay")
            wait.until(lambda d: overlay.is_displayed())
            colors = {
                c: driver.execute_script("return categoryRgb(arguments[0])", c) for c in (1, 3, 7)
            }
            slider = driver.find_element(By.ID, "threshold")
            assert slider.get_attribute("value") == "0.3"  # the page's starting threshold
            assert int(overlay.get_attribute("data-drawn")) == int((scores >= 0.3).sum())
            driver.save_screenshot(str(tmp_path / "predict_page.png"))
            # Masks only, then move the threshold with the keyboard: lowest, a middle value
            # that splits the detections, highest. The drawn count follows the API's scores
            # and the canvas is exactly the image with those masks (decoded in JavaScript)
            # blended in.
            driver.find_element(By.ID, "show-boxes").click()
            driver.find_element(By.ID, "show-labels").click()
            split = min(range(101), key=lambda k: abs((scores >= k / 100).sum() - len(scores) / 2))
            saved, downloaded = downloads / f"{image.stem}_results.json", 0
            for keys in (Keys.HOME, Keys.HOME + Keys.ARROW_RIGHT * split, Keys.END):
                slider.send_keys(keys)
                threshold = float(slider.get_attribute("value"))
                kept = [r for r in everything if r["score"] >= threshold]
                assert int(overlay.get_attribute("data-drawn")) == len(kept), threshold
                shown = driver.find_element(By.ID, "count").text
                assert shown.startswith(f"{len(kept)} of {len(everything)} instances")
                np.testing.assert_array_equal(
                    _canvas_rgb(driver, "overlay"), _blend(pixels, kept, colors)
                )
                if 0 < len(kept) < len(everything):
                    # The download button saves exactly the detections shown.
                    driver.find_element(By.ID, "download").click()
                    wait.until(lambda d: saved.is_file() and saved.stat().st_size > 0)
                    assert json.loads(saved.read_text()) == kept
                    saved.unlink()
                    downloaded += 1
            assert threshold == 1.0 and float(slider.get_attribute("value")) == 1.0
            assert downloaded == 1
            assert 0 < len([s for s in scores if s >= split / 100]) < len(scores)
            # A corrupt upload: the server's message on the page, no overlay.
            corrupt = tmp_path / "corrupt.png"
            corrupt.write_bytes(image.read_bytes()[:200])
            driver.find_element(By.ID, "file").send_keys(str(corrupt))
            message = driver.find_element(By.ID, "message")
            wait.until(lambda d: "corrupt" in message.text)
            assert not overlay.is_displayed()
            assert "corrupt.png" in message.text
            # Dropping a file on the page predicts it too (a drop event carrying the image of
            # the evaluation's image 2, fetched by the page itself).
            slider.send_keys(Keys.HOME)
            driver.execute_async_script(
                """const done = arguments[arguments.length - 1];
                fetch("/api/images/2/file").then((r) => r.blob()).then((blob) => {
                  const transfer = new DataTransfer();
                  transfer.items.add(new File([blob], "dropped.png", {type: "image/png"}));
                  const drop = document.getElementById("drop");
                  drop.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer}));
                  done();
                });"""
            )
            wait.until(lambda d: overlay.is_displayed())
            dropped = Path(client.get("/api/images/2").json()["image"]["file_name"])
            dropped_bytes = (Path(_image_files(run)[0]).parents[1] / dropped).read_bytes()
            expected = _post(client, dropped_bytes, "dropped.png").json()["results"]
            assert int(overlay.get_attribute("data-drawn")) == len(expected) > 0

            # The evaluation page: metrics of metrics.json, a row per category, the images
            # in the API's order, ground truth and predictions of the worst image drawn.
            driver.get(f"{base}/evaluation")
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
            metrics = json.loads((run / "metrics.json").read_text())
            assert _column(driver, "#metrics", 0) == list(metrics)
            assert _column(driver, "#metrics", 1) == [f"{m['AP']:.1f}" for m in metrics.values()]
            categories = client.get("/api/categories").json()
            assert _column(driver, "#categories", 0) == [c["name"] for c in categories]
            listed = client.get("/api/images", params={"score_thr": 0.5}).json()
            assert _column(driver, "#images", "image") == [str(r["id"]) for r in listed]
            gt_canvas = driver.find_element(By.ID, "gt-canvas")
            wait.until(lambda d: gt_canvas.get_attribute("data-drawn") is not None)
            assert int(gt_canvas.get_attribute("data-drawn")) == listed[0]["num_gt"]
            dt_canvas = driver.find_element(By.ID, "dt-canvas")
            assert int(dt_canvas.get_attribute("data-drawn")) == listed[0]["num_dt"]
            driver.save_screenshot(str(tmp_path / "evaluation_page.png"))
            # Filtering by a category (a click on its row) lists the API's images for it.
            driver.find_element(By.CSS_SELECTOR, "#categories tbody tr").click()
            chosen = str(categories[0]["id"])
            filtered = client.get(
                "/api/images", params={"score_thr": 0.5, "category": chosen}
            ).json()
            wanted = [str(r["id"]) for r in filtered]
            wait.until(lambda d: _column(d, "#images", "image") == wanted)
            assert driver.find_element(By.ID, "category").get_attribute("value") == chosen
        # No script errors nor failed requests, except the corrupt upload's 400.
        logged = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert [m for m in logged if "/api/predict" not in m or "400" not in m] == [], logged
    finally:
        driver.quit()
    for name in ("predict_page.png", "evaluation_page.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")


def test_serve_without_its_extra_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "uvicorn" else find_spec(name, *a),
    )
    assert main(["serve", "--ann", "a.json", "--results", "r.json"]) == 2
    err = capsys.readouterr().err
    assert "missing: uvicorn" in err and "pip install 'instseg[serve]'" in err
