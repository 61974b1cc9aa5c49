"""The README's screenshots of ``instseg serve``: both pages for a finished training run, in
headless Chromium (the browser test's helpers, tests/browser.py).

    python scripts/serve_screenshots.py work_dirs/demo/train --out docs

The predict page shows the validation image with the most objects at threshold 0.5, the
evaluation page its worst image.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from browser import background_server, chromium_driver
from instseg.serve import build_app, resolve_sources


def _shrink(path: Path) -> None:
    """Crop the blank page bottom and store with a 256-colour palette (a tenth of the bytes)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as shot:
        rgb = shot.convert("RGB")
    content = np.flatnonzero((np.asarray(rgb) < 250).any(axis=(1, 2)))
    bottom = min(rgb.height, int(content[-1]) + 24) if content.size else rgb.height
    rgb.crop((0, 0, rgb.width, bottom)).quantize(256).save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a finished training run's folder (instseg train --work-dir)")
    parser.add_argument("--out", default="docs", help="folder for the PNGs (default: docs)")
    parser.add_argument(
        "--image",
        type=int,
        help="index of the validation image to upload (default: the one with the most objects)",
    )
    parser.add_argument("--threshold", type=float, default=0.5, help="predict page's threshold")
    args = parser.parse_args()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    run, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = json.loads((run / "config.json").read_text())["data"]
    ann = json.loads(Path(data["val_ann"]).read_text())
    if args.image is None:
        counts = {im["id"]: 0 for im in ann["images"]}
        for a in ann["annotations"]:
            counts[a["image_id"]] += 1
        args.image = max(range(len(ann["images"])), key=lambda i: counts[ann["images"][i]["id"]])
    image = Path(data["val_images"]) / ann["images"][args.image]["file_name"]
    driver = chromium_driver(1280, 900)
    try:
        with background_server(build_app(resolve_sources(work_dir=str(run)))) as base:
            wait = WebDriverWait(driver, 120)
            driver.get(f"{base}/predict")
            wait.until(lambda d: d.find_element(By.ID, "limits").text)
            driver.find_element(By.ID, "file").send_keys(str(image.resolve()))
            wait.until(lambda d: d.find_element(By.ID, "overlay").is_displayed())
            slider = driver.find_element(By.ID, "threshold")
            slider.send_keys(Keys.HOME + Keys.ARROW_RIGHT * round(args.threshold * 100))
            driver.save_screenshot(str(out / "serve_predict.png"))
            driver.get(f"{base}/evaluation")
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
            wait.until(lambda d: d.find_element(By.ID, "dt-canvas").get_attribute("data-drawn"))
            driver.set_window_size(1280, 1500)
            driver.save_screenshot(str(out / "serve_evaluation.png"))
    finally:
        driver.quit()
    for name in ("serve_predict.png", "serve_evaluation.png"):
        _shrink(out / name)
    print(f"wrote {out / 'serve_predict.png'} and {out / 'serve_evaluation.png'}")


if __name__ == "__main__":
    main()
