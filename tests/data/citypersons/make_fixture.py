"""
Writes the miss-rate fixture of tests/test_safety_setups.py: gt.json, scenes annotated as the
CityPersons evaluation reads them (per pedestrian: bbox XYWH, height, vis_ratio, ignore; one
category "pedestrian"), and dt.json, detections in COCO results format. Seeded, so the files
are the same wherever it runs:

    python tests/data/citypersons/make_fixture.py

The scenes exercise every rule of the "reasonable" protocols: pedestrians below and above 50 px
and in the 50-75 px band, visibility on both sides of 0.65 and 0.2, ignore flags (riders, groups)
and large ignore regions, detections below 40 px (50 / 1.25), detections on ignore regions,
misses, duplicates and false positives. 150 images, so that the first false positive's FPPI
(1/150) is below the first reference point (0.01).
"""

import json
import os

import numpy as np

W, H, NUM_IMAGES = 1024, 512, 150


def main(out_dir=os.path.dirname(os.path.abspath(__file__))):
    rng = np.random.default_rng(2017)
    images, gts, dts = [], [], []
    for image_id in range(1, NUM_IMAGES + 1):
        images.append(
            {"id": image_id, "file_name": f"scene_{image_id:03d}.png", "width": W, "height": H}
        )
        for _ in range(rng.integers(0, 7)):
            h = float(np.round(np.exp(rng.uniform(np.log(15), np.log(300))), 1))
            w = float(np.round(0.41 * h, 1))
            x = float(np.round(rng.uniform(0, W - w), 1))
            y = float(np.round(rng.uniform(0, H - h), 1))
            vis = float(np.round(rng.uniform(0.05, 1.0), 3))
            ignore = int(rng.random() < 0.12)  # riders, sitting persons, groups
            gts.append(
                {
                    "id": len(gts) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "iscrowd": 0,
                    "ignore": ignore,
                    "bbox": [x, y, w, h],
                    "height": h,
                    "vis_ratio": vis,
                    "area": w * h,
                }
            )
            if rng.random() < 0.8:  # detected, with a jittered box; some twice
                for _ in range(1 + int(rng.random() < 0.1)):
                    j = rng.normal(0, 0.08, 4) * [w, h, w, h]
                    score = float(np.clip(rng.beta(2 + 4 * vis, 2) + 0.002 * h / 10, 0, 1))
                    box = [x + j[0], y + j[1], max(2.0, w + j[2]), max(2.0, h + j[3])]
                    dts.append(
                        {
                            "image_id": image_id,
                            "category_id": 1,
                            "score": round(score, 5),
                            "bbox": [round(v, 2) for v in box],
                        }
                    )
        if rng.random() < 0.2:  # an ignore region (category 0 in CityPersons), with a detection
            w, h = float(rng.uniform(100, 300)), float(rng.uniform(60, 200))
            x, y = float(rng.uniform(0, W - w)), float(rng.uniform(0, H - h))
            gts.append(
                {
                    "id": len(gts) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "iscrowd": 0,
                    "ignore": 1,
                    "bbox": [round(x, 1), round(y, 1), round(w, 1), round(h, 1)],
                    "height": round(h, 1),
                    "vis_ratio": 1.0,
                    "area": w * h,
                }
            )
            dts.append(
                {
                    "image_id": image_id,
                    "category_id": 1,
                    "score": round(float(rng.uniform(0.2, 0.9)), 5),
                    "bbox": [
                        round(x + w / 4, 2),
                        round(y + 5, 2),
                        round(h * 0.3, 2),
                        round(h * 0.7, 2),
                    ],
                }
            )
        for _ in range(rng.integers(0, 4)):  # false positives, some of them small
            h = float(np.exp(rng.uniform(np.log(20), np.log(250))))
            w = 0.41 * h
            dts.append(
                {
                    "image_id": image_id,
                    "category_id": 1,
                    "score": round(float(rng.beta(1.5, 3)), 5),
                    "bbox": [
                        round(float(rng.uniform(0, W - w)), 2),
                        round(float(rng.uniform(0, H - h)), 2),
                        round(w, 2),
                        round(h, 2),
                    ],
                }
            )
    gt = {"images": images, "annotations": gts, "categories": [{"id": 1, "name": "pedestrian"}]}
    with open(os.path.join(out_dir, "gt.json"), "w") as f:
        json.dump(gt, f)
    with open(os.path.join(out_dir, "dt.json"), "w") as f:
        json.dump(dts, f)
    print(f"{len(images)} images, {len(gts)} ground truth, {len(dts)} detections in {out_dir}")


if __name__ == "__main__":
    main()
