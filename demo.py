#!/usr/bin/env python
"""
Run a checkpoint on a folder of photos: each photo annotated with detectron2's Visualizer, and
one detections.json.

    python demo.py --config-file configs/quickstart_flstar.yaml --input photos/ --output out/ \
        MODEL.WEIGHTS output/quickstart_flstar/model_final.pth
    python demo.py --config-file configs/quickstart_flstar.yaml --input photos/ --output out/ \
        --compare-weights output/fl/model_final.pth output/flstar/model_final.pth

With --compare-weights A B (the proposal's Fig. 7: e.g. FL vs FL*), each photo is written as two
labelled panels side by side, A left, and detections.json holds both lists per photo.

Photos of any size, EXIF orientation applied, grayscale/palette/RGBA read as RGB. A file that is
no usable image is skipped with a warning saying why. Writes <output>/<stem>.jpg per photo and
<output>/detections.json: {file: [{"bbox": [x0, y0, x1, y1] (photo pixels), "score",
"category_id" (the model's 0-based class), "category"}]} (with --compare-weights: {file:
{label A: [...], label B: [...]}}); each through a temp file and a rename. The model runs through
detectron2's DefaultPredictor (d2_focalstar.run.predictor) on MODEL.DEVICE, CUDA where there is one.
"""
import warnings

# fvcore jit-scripts its losses when detectron2 imports it, which recent torch deprecates loudly
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)

import argparse
import itertools
import json
import logging
import os
import re
import sys
import time

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from d2_focalstar import register_config_datasets
from d2_focalstar.config import ConfigError
from d2_focalstar.modeling import loss_config_node
from d2_focalstar.run.cli import load_config
from d2_focalstar.run.errors import command_errors, error_line
from d2_focalstar.fileio import atomic_write
from d2_focalstar.data.mapper import SIXTEEN_BIT_MODES  # detectron2 would clip them to white
from d2_focalstar.run.predictor import SafePredictor
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer

logger = logging.getLogger("demo")  # set up by main(), like detectron2's loggers


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like train_net.py's errors
        sys.exit(error_line(self.prog, f"{message} (see --help)"))


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--input", required=True, help="a folder of photos (or one photo)")
    p.add_argument("--output", required=True, help="folder for annotated photos, detections.json")
    p.add_argument("--confidence-threshold", type=float, default=0.5, metavar="S",
                   help="minimum score of a detection, default 0.5 (sets the model's "
                   "SCORE_THRESH_TEST too, e.g. MODEL.RETINANET.SCORE_THRESH_TEST)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (sets MODEL.DEVICE; without CUDA, cuda "
                   "falls back to the CPU with a warning)")
    p.add_argument("--compare-weights", nargs=2, metavar=("A", "B"),
                   help="two checkpoints of the config's model (e.g. FL and FL*): each photo as two "
                   "labelled panels side by side, both detection lists in detections.json")
    p.add_argument("opts", nargs="*", metavar="KEY VALUE",
                   help="config KEY VALUE pairs: MODEL.WEIGHTS FILE, ... (before or after the options)")
    args = p.parse_intermixed_args(argv)
    if not 0 <= args.confidence_threshold <= 1:
        p.error(f"--confidence-threshold {args.confidence_threshold}: must be in [0, 1]")
    if args.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        p.error(f"--device {args.device!r}: use cpu, cuda or cuda:N")
    return args


def setup(args):
    """The checked config (train_net.py's load_config) on the device --device names, MODEL.DEVICE
    otherwise (CUDA where there is one, the CPU with a warning where not); the detector's
    SCORE_THRESH_TEST is --confidence-threshold unless the opts set it."""
    opts = (["MODEL.DEVICE", args.device] if args.device else []) + list(args.opts)
    cfg = load_config(args.config_file, opts, num_gpus=1)
    node = loss_config_node(cfg)
    if f"{node}.SCORE_THRESH_TEST" not in opts[0::2]:
        cfg.merge_from_list([f"{node}.SCORE_THRESH_TEST", args.confidence_threshold])
    if args.compare_weights:
        for path in args.compare_weights:
            if not os.path.isfile(path):
                raise ConfigError(f"--compare-weights {path}: no such file")
    elif not cfg.MODEL.WEIGHTS:
        raise ConfigError("no weights to run: add MODEL.WEIGHTS path/to/model_final.pth")
    if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
        raise ConfigError(f"INPUT.FORMAT={cfg.INPUT.FORMAT!r}: the demo supports RGB and BGR")
    cfg.freeze()
    return cfg


def weight_labels(paths):
    """Panel labels for two checkpoints: their last two path parts ('fl/model_final.pth'), or
    A and B where those are the same."""
    labels = [os.path.join(*os.path.normpath(p).split(os.sep)[-2:]) for p in paths]
    return labels if len(set(labels)) == len(labels) else ["A", "B"]


def list_inputs(src, dst):
    """The files to process (sorted; sub-folders and hidden files are left out)."""
    if not os.path.exists(src):
        raise ConfigError(f"--input {src}: no such folder or file")
    folder = src if os.path.isdir(src) else os.path.dirname(src) or "."
    if os.path.isdir(dst) and os.path.samefile(folder, dst):
        raise ConfigError(f"--output {dst} is the input folder: its photos could be overwritten")
    if not os.path.isdir(src):
        return [src]
    files = [e.path for e in sorted(os.scandir(src), key=lambda e: e.name)
             if e.is_file() and not e.name.startswith(".")]
    if not files:
        raise ConfigError(f"--input {src}: no files in it")
    return files


def output_names(files):
    """A different output name for each file: <stem>.jpg, or <name>.jpg where two files share a
    stem (a.jpg and a.png), or <name>_2.jpg, _3, ... where that is taken too (a.jpg.jpg beside
    a.jpg). Names that differ only in case count as taken (case-insensitive file systems)."""
    stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
    taken, names = set(), []
    for stem, path in zip(stems, files):
        name = os.path.basename(path)
        candidates = itertools.chain([stem + ".jpg"] if stems.count(stem) == 1 else [],
                                     [name + ".jpg"], (f"{name}_{k}.jpg" for k in itertools.count(2)))
        out = next(c for c in candidates if c.casefold() not in taken)
        taken.add(out.casefold())
        names.append(out)
    return names


def dataset_metadata(cfg):
    """thing_classes of DATASETS.TEST[0]; a DATASETS.COCO_JSON one is read to learn them."""
    if not cfg.DATASETS.TEST:
        return MetadataCatalog.get("__unused")
    name = cfg.DATASETS.TEST[0]
    own = [entry[0] for key in ("COCO_JSON", "YOLO", "VOC_STYLE") for entry in cfg.DATASETS[key]]
    if not MetadataCatalog.get(name).get("thing_classes") and name in own:
        register_config_datasets(cfg)  # a YOLO or VOC-style folder's classes: from its files
        if not MetadataCatalog.get(name).get("thing_classes"):
            DatasetCatalog.get(name)  # load_coco_json sets thing_classes
    return MetadataCatalog.get(name)


def read_photo(path, resize):
    """``resize``: the predictor's ResizeShortestEdge."""
    # (BGR uint8 array, None), or (None, why it cannot be used)
    try:
        with Image.open(path) as im:
            if im.mode in SIXTEEN_BIT_MODES:
                return None, f"16-bit image (PIL mode {im.mode}): convert it to 8 bits"
        image = read_image(path, format="BGR")  # EXIF orientation applied; gray, RGBA -> 3 channels
    except UnidentifiedImageError:
        return None, "not an image (cannot identify image file)"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return None, f"unreadable image ({e})"
    h, w = image.shape[:2]
    if 0 in resize.get_output_shape(h, w, resize.short_edge_length[0], resize.max_size):
        return None, f"{w}x{h} pixels: too narrow to resize to the model's input size"
    return image, None


def save(path, data):
    """Write bytes to path through a temporary file and a rename (a crash leaves no half file)."""
    atomic_write(path, lambda f: f.write(data))


def detection_list(inst, names):
    return [{"bbox": [round(v, 2) for v in box], "score": round(score, 4), "category_id": k,
             "category": names[k] if k < len(names) else str(k)}
            for box, score, k in zip(inst.pred_boxes.tensor.tolist(), inst.scores.tolist(),
                                     inst.pred_classes.tolist())]


def labelled_panel(drawn_rgb, label):
    """The drawn photo (RGB) under a white strip with ``label``."""
    h, w = drawn_rgb.shape[:2]
    scale = max(0.5, w / 900)
    strip = np.full((int(34 * scale), w, 3), 255, np.uint8)
    cv2.putText(strip, label, (int(8 * scale), int(24 * scale)), cv2.FONT_HERSHEY_SIMPLEX, 0.7 * scale,
                (0, 0, 0), max(1, int(2 * scale)), cv2.LINE_AA)
    return np.vstack([strip, drawn_rgb])


def annotate(args):
    """Run the checkpoint(s) on every usable photo of --input: the command's work."""
    setup_logger(name="demo")
    setup_logger(name="d2_focalstar")
    setup_logger(name="fvcore")  # the checkpointer's messages: what was loaded, what did not fit
    cfg = setup(args)
    files = list_inputs(args.input, args.output)
    metadata = dataset_metadata(cfg)
    names = metadata.get("thing_classes", None) or []
    # a file that is not a checkpoint, a damaged or unsafe one, or one without the detector's
    # heads (backbone weights): a one-line error naming it
    weights = args.compare_weights or [cfg.MODEL.WEIGHTS]
    predictors = [SafePredictor(cfg, w) for w in weights]
    labels = weight_labels(weights) if args.compare_weights else [None]
    os.makedirs(args.output, exist_ok=True)

    detections, skipped = {}, []
    json_path = os.path.join(args.output, "detections.json")
    for i, (path, out_name) in enumerate(zip(files, output_names(files)), 1):
        name = os.path.basename(path)
        image, why = read_photo(path, predictors[0].aug)
        if image is None:
            logger.warning(f"{i}/{len(files)} skipped {name}: {why}")
            skipped.append(name)
            continue
        panels, found, counts, start = [], {}, [], time.perf_counter()
        for predictor, label in zip(predictors, labels):
            inst = predictor(image)["instances"].to("cpu")
            inst = inst[inst.scores >= args.confidence_threshold]
            found[label] = detection_list(inst, names)
            counts.append(len(inst))
            drawn = Visualizer(image[:, :, ::-1], metadata).draw_instance_predictions(inst).get_image()
            panels.append(labelled_panel(drawn, label) if label else drawn)
        ms = 1000 * (time.perf_counter() - start)
        detections[name] = found if args.compare_weights else found[None]
        jpeg = cv2.imencode(".jpg", np.hstack(panels)[:, :, ::-1])[1].tobytes()
        save(os.path.join(args.output, out_name), jpeg)
        # rewritten (atomically) after each photo: a run cut off leaves a detections.json that
        # matches the annotated photos beside it; a run without any usable photo leaves none
        save(json_path, json.dumps(detections, indent=1).encode())
        logger.info(f"{i}/{len(files)} {name}: {' vs '.join(map(str, counts))} detections, "
                    f"{ms:.0f} ms -> {out_name}")

    if detections:
        logger.info(f"{len(detections)} photos annotated in {args.output}, detections in {json_path}; "
                    f"{len(skipped)} file(s) skipped" + (f": {', '.join(skipped)}" if skipped else ""))
    else:
        raise ConfigError(f"--input {args.input}: none of its {len(files)} file(s) is a usable "
                          "image")


def main(argv=None):
    args = parse_args(argv)
    with command_errors("demo.py"):  # bad input: one line naming it
        annotate(args)


if __name__ == "__main__":
    main()
