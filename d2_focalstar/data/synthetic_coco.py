"""
Synthetic COCO-format ground truth and detections of any size, for tests and benchmarks of the
evaluation code (a COCO-val-sized set: 5,000 images, ~36,000 boxes, 100 detections per image).
Detections are the ground-truth boxes jittered (some well, some badly), with some missed, plus
false positives, scores higher for the better ones: a detector's output, in shape.
"""

import numpy as np

__all__ = ["synthetic_coco"]


def synthetic_coco(
    num_images=5000,
    num_categories=80,
    boxes_per_image=7.3,
    dets_per_image=100,
    image_size=(640, 480),
    seed=0,
):
    """(ground truth dict, detections list) in COCO's formats; deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    w_img, h_img = image_size
    images = [
        {"id": i + 1, "width": w_img, "height": h_img, "file_name": f"{i + 1:012d}.jpg"}
        for i in range(num_images)
    ]
    categories = [{"id": k + 1, "name": f"class{k + 1}"} for k in range(num_categories)]
    annotations, detections = [], []
    for img in images:
        n = rng.poisson(boxes_per_image)
        # COCO-like sizes: many small, some large (log-uniform side from 8 to 400 px)
        side = np.exp(rng.uniform(np.log(8), np.log(400), size=(n, 2)))
        wh = np.minimum(side, [w_img - 1, h_img - 1])
        xy = rng.uniform(0, 1, size=(n, 2)) * ([w_img, h_img] - wh)
        cats = rng.integers(1, num_categories + 1, size=n)
        crowd = rng.random(n) < 0.01
        for (x, y), (w, h), c, iscrowd in zip(xy, wh, cats, crowd):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": img["id"],
                    "category_id": int(c),
                    "bbox": [float(x), float(y), float(w), float(h)],
                    "area": float(w * h),
                    "iscrowd": int(iscrowd),
                }
            )
        dets = []
        for (x, y), (w, h), c in zip(xy, wh, cats):
            if rng.random() < 0.2:
                continue  # missed
            quality = rng.random()
            jitter = rng.normal(0, 0.25 * (1 - quality) + 0.02, size=4) * [w, h, w, h]
            dets.append(
                (
                    [
                        x + jitter[0],
                        y + jitter[1],
                        max(1.0, w + jitter[2]),
                        max(1.0, h + jitter[3]),
                    ],
                    int(c),
                    0.3 + 0.7 * quality * rng.random(),
                )
            )
        for _ in range(max(0, dets_per_image - len(dets))):  # false positives, lower scores
            w, h = np.exp(rng.uniform(np.log(8), np.log(300), size=2))
            x, y = rng.uniform(0, w_img - w), rng.uniform(0, max(1.0, h_img - h))
            dets.append(
                ([x, y, w, h], int(rng.integers(1, num_categories + 1)), 0.6 * rng.random() ** 2)
            )
        for box, c, score in dets[:dets_per_image]:
            detections.append(
                {
                    "image_id": img["id"],
                    "category_id": c,
                    "bbox": [float(v) for v in box],
                    "score": float(score),
                }
            )
    gt = {"images": images, "annotations": annotations, "categories": categories}
    return gt, detections
