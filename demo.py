#!/usr/bin/env python
"""
Run a checkpoint on photos or a video: each photo annotated with detectron2's Visualizer, and one
detections.json; a video annotated frame by frame.

    python demo.py --config-file configs/quickstart_flstar.yaml --input photos/ --output out/ \
        MODEL.WEIGHTS output/quickstart_flstar/model_final.pth
    python demo.py --config-file configs/quickstart_flstar.yaml --input photos/ --output out/ \
        --compare-weights output/fl/model_final.pth output/flstar/model_final.pth
    python demo.py --config-file configs/quickstart_flstar.yaml --video-input walk.mp4 \
        --output out/walk_annotated.mp4 --confidence-threshold 0.3 \
        --opts MODEL.WEIGHTS output/quickstart_flstar/model_final.pth

detectron2's demo/demo.py command line works too: --input takes several files, folders or globs
('photos/*.jpg'), --output names a folder or one file (name.jpg/.png for a single photo,
name.mp4/.mkv/.avi/.mov for a video), config KEY VALUE pairs go after --opts (or, as before, at
the end without it).

With --compare-weights A B (the proposal's Fig. 7: e.g. FL vs FL*), each photo or video frame is
written as two labelled panels side by side, A left, and detections.json holds both lists per photo.

Photos of any size, EXIF orientation applied, grayscale/palette/RGBA read as RGB. A file that is
no usable image is skipped with a warning saying why. Writes <output>/<stem>.jpg per photo and
<output>/detections.json (with a file --output: that file and <its stem>.json beside it):
{file: [{"bbox": [x0, y0, x1, y1] (photo pixels), "score", "category_id" (the model's 0-based
class), "category"}]} (with --compare-weights: {file: {label A: [...], label B: [...]}}); each
through a temp file and a rename. A video is read and written by OpenCV (FFmpeg, MPEG-4 'mp4v'),
<output>/<stem>.mp4 by default, under a temporary name until its last frame, with progress and an
ETA logged; one that OpenCV cannot read, or that has no frame, is a one-line error naming it. The
model runs through detectron2's DefaultPredictor (d2_focalstar.run.predictor) on MODEL.DEVICE,
CUDA where there is one.
"""

import warnings

# fvcore jit-scripts its losses when detectron2 imports it, which recent torch deprecates loudly
warnings.filterwarnings(
    "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
)

import argparse
import contextlib
import glob
import itertools
import json
import logging
import math
import os
import re
import sys
import tempfile
import time

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer
from PIL import Image, UnidentifiedImageError

from d2_focalstar import register_config_datasets
from d2_focalstar.config import ConfigError
from d2_focalstar.data.mapper import SIXTEEN_BIT_MODES  # detectron2 would clip them to white
from d2_focalstar.fileio import atomic_write, usual_mode
from d2_focalstar.modeling import loss_config_node
from d2_focalstar.run.cli import load_config
from d2_focalstar.run.errors import command_errors, error_line
from d2_focalstar.run.predictor import SafePredictor

logger = logging.getLogger("demo")  # set up by main(), like detectron2's loggers

# What a file --output may be named (anything else is a folder).
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov")
# MPEG-4 Part 2, as detectron2's demo writes: every FFmpeg build that OpenCV's wheels ship has its
# encoder, where H.264 ('avc1') is often missing for its licence.
VIDEO_FOURCC = "mp4v"
PROGRESS_SECONDS = 10  # a video's progress line at most this often
# A config key as detectron2 spells them (MODEL.WEIGHTS): where --input's list of paths ends
CONFIG_KEY = re.compile(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like train_net.py's errors
        sys.exit(error_line(self.prog, f"{message} (see --help)"))


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--config-file", required=True, metavar="FILE")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input",
        nargs="+",
        metavar="PATH",
        help="photos: files, folders (their files) or globs such as 'photos/*.jpg'",
    )
    source.add_argument("--video-input", metavar="FILE", help="a video, annotated frame by frame")
    p.add_argument(
        "--output",
        required=True,
        help="a folder (annotated photos and detections.json, or the video as <stem>.mp4), or a "
        f"file: {'/'.join(PHOTO_SUFFIXES)} for one photo, {'/'.join(VIDEO_SUFFIXES)} for a video",
    )
    p.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        metavar="S",
        help="minimum score of a detection, default 0.5 (sets the model's "
        "SCORE_THRESH_TEST too, e.g. MODEL.RETINANET.SCORE_THRESH_TEST)",
    )
    p.add_argument(
        "--device",
        help="cpu, cuda or cuda:N (sets MODEL.DEVICE; without CUDA, cuda "
        "falls back to the CPU with a warning)",
    )
    p.add_argument(
        "--compare-weights",
        nargs=2,
        metavar=("A", "B"),
        help="two checkpoints of the config's model (e.g. FL and FL*): each photo or frame as two "
        "labelled panels side by side (photos: both detection lists in detections.json)",
    )
    p.add_argument(
        "--opts",
        nargs="*",
        default=[],
        dest="flag_opts",
        metavar="KEY VALUE",
        help="config KEY VALUE pairs, as detectron2's demo takes them",
    )
    p.add_argument(
        "opts",
        nargs="*",
        metavar="KEY VALUE",
        help="config KEY VALUE pairs: MODEL.WEIGHTS FILE, ... (before or after the options)",
    )
    args = p.parse_intermixed_args(argv)
    if args.input:
        # '--input photos/ MODEL.WEIGHTS w' (today's order) gives --input the config pairs too
        keys = [i for i, s in enumerate(args.input) if CONFIG_KEY.fullmatch(s)]
        key = next((i for i in keys if not os.path.exists(args.input[i])), None)
        if key is not None:
            args.opts, args.input = args.opts + args.input[key:], args.input[:key]
        if not args.input:
            p.error("--input: expected a photo, a folder or a glob before the config pairs")
    args.opts += args.flag_opts
    del args.flag_opts
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


def is_named_file(output, suffixes):
    """Whether --output names a file with one of ``suffixes`` rather than a folder."""
    return not os.path.isdir(output) and output.lower().endswith(suffixes)


def list_inputs(sources):
    """The files that --input names, in its order, each once: a file as it is, a folder's files
    (sorted; sub-folders and hidden files are left out), a glob's matches (sorted)."""
    files = []
    for src in sources:
        if os.path.isdir(src):
            found = [
                e.path
                for e in sorted(os.scandir(src), key=lambda e: e.name)
                if e.is_file() and not e.name.startswith(".")
            ]
            if not found:
                raise ConfigError(f"--input {src}: no files in it")
        elif os.path.exists(src):
            found = [src]
        else:
            found = sorted(p for p in glob.glob(os.path.expanduser(src)) if os.path.isfile(p))
            if not found:
                raise ConfigError(f"--input {src}: no such folder or file, nor a glob matching one")
        files += [f for f in found if f not in files]
    return files


def photo_outputs(files, output):
    """(output path per file, detections.json's path) for --output, a folder or one photo file;
    an output that could overwrite an input photo is refused."""
    if is_named_file(output, PHOTO_SUFFIXES):
        if len(files) != 1:
            raise ConfigError(
                f"--output {output} names one file, and --input gives {len(files)}: name a folder"
            )
        if os.path.exists(output) and os.path.samefile(output, files[0]):
            raise ConfigError(f"--output {output} is the input photo: it would be overwritten")
        return [output], os.path.splitext(output)[0] + ".json"
    if os.path.isfile(output):
        raise ConfigError(
            f"--output {output}: a file, not a folder nor a {'/'.join(PHOTO_SUFFIXES)} photo"
        )
    for path in files:
        folder = os.path.dirname(path) or "."
        if os.path.isdir(output) and os.path.samefile(folder, output):
            raise ConfigError(
                f"--output {output} is the input folder: its photos could be overwritten"
            )
    paths = [os.path.join(output, name) for name in output_names(files)]
    return paths, os.path.join(output, "detections.json")


def output_names(files):
    """A different output name for each file: <stem>.jpg, or <name>.jpg where two files share a
    stem (a.jpg and a.png), or <name>_2.jpg, _3, ... where that is taken too (a.jpg.jpg beside
    a.jpg). Names that differ only in case count as taken (case-insensitive file systems)."""
    stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
    taken, names = set(), []
    for stem, path in zip(stems, files):
        name = os.path.basename(path)
        candidates = itertools.chain(
            [stem + ".jpg"] if stems.count(stem) == 1 else [],
            [name + ".jpg"],
            (f"{name}_{k}.jpg" for k in itertools.count(2)),
        )
        out = next(c for c in candidates if c.casefold() not in taken)
        taken.add(out.casefold())
        names.append(out)
    return names


def detection_keys(files):
    """detections.json's key per file: its name, or the path as given where two inputs from
    different folders share a name."""
    names = [os.path.basename(f) for f in files]
    return [n if names.count(n) == 1 else f for n, f in zip(names, files)]


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


def too_small(image, resize):
    """Why ``image`` cannot go through the predictor's ResizeShortestEdge ``resize``, or None."""
    h, w = image.shape[:2]
    if 0 in resize.get_output_shape(h, w, resize.short_edge_length[0], resize.max_size):
        return f"{w}x{h} pixels: too narrow to resize to the model's input size"
    return None


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
    why = too_small(image, resize)
    return (None, why) if why else (image, None)


def save(path, data):
    """Write bytes to path through a temporary file and a rename (a crash leaves no half file)."""
    atomic_write(path, lambda f: f.write(data))


def detection_list(inst, names):
    return [
        {
            "bbox": [round(v, 2) for v in box],
            "score": round(score, 4),
            "category_id": k,
            "category": names[k] if k < len(names) else str(k),
        }
        for box, score, k in zip(
            inst.pred_boxes.tensor.tolist(), inst.scores.tolist(), inst.pred_classes.tolist()
        )
    ]


def labelled_panel(drawn_rgb, label):
    """The drawn photo (RGB) under a white strip with ``label``."""
    h, w = drawn_rgb.shape[:2]
    scale = max(0.5, w / 900)
    strip = np.full((int(34 * scale), w, 3), 255, np.uint8)
    cv2.putText(
        strip,
        label,
        (int(8 * scale), int(24 * scale)),
        cv2.FONT_HERSHEY_SIMPLEX,
        0.7 * scale,
        (0, 0, 0),
        max(1, int(2 * scale)),
        cv2.LINE_AA,
    )
    return np.vstack([strip, drawn_rgb])


class Annotator:
    """The checkpoint(s) on one BGR image: its detections drawn by detectron2's Visualizer, as
    one picture, or two labelled panels side by side with --compare-weights."""

    def __init__(self, cfg, args):
        self.metadata = dataset_metadata(cfg)
        self.names = self.metadata.get("thing_classes", None) or []
        # a file that is not a checkpoint, a damaged or unsafe one, or one without the detector's
        # heads (backbone weights): a one-line error naming it
        weights = args.compare_weights or [cfg.MODEL.WEIGHTS]
        self.predictors = [SafePredictor(cfg, w) for w in weights]
        self.labels = weight_labels(weights) if args.compare_weights else [None]
        self.threshold = args.confidence_threshold
        self.resize = self.predictors[0].aug

    def __call__(self, image):
        """(RGB picture, {label: detection list}, detections per checkpoint); label None
        without --compare-weights."""
        panels, found, counts = [], {}, []
        for predictor, label in zip(self.predictors, self.labels):
            inst = predictor(image)["instances"].to("cpu")
            inst = inst[inst.scores >= self.threshold]
            found[label] = detection_list(inst, self.names)
            counts.append(len(inst))
            drawn = Visualizer(image[:, :, ::-1], self.metadata)
            drawn = drawn.draw_instance_predictions(inst).get_image()
            panels.append(labelled_panel(drawn, label) if label else drawn)
        return np.hstack(panels), found, counts


def annotate_photos(args, annotator, files, out_paths, json_path):
    """Every usable photo of ``files``, annotated into ``out_paths``, and the detections in one
    JSON."""
    os.makedirs(os.path.dirname(out_paths[0]) or ".", exist_ok=True)
    detections, skipped = {}, []
    for i, (path, key, out_path) in enumerate(zip(files, detection_keys(files), out_paths), 1):
        name = os.path.basename(path)
        image, why = read_photo(path, annotator.resize)
        if image is None:
            logger.warning(f"{i}/{len(files)} skipped {name}: {why}")
            skipped.append(name)
            continue
        start = time.perf_counter()
        picture, found, counts = annotator(image)
        ms = 1000 * (time.perf_counter() - start)
        detections[key] = found if args.compare_weights else found[None]
        ext = os.path.splitext(out_path)[1].lower()
        save(out_path, cv2.imencode(".png" if ext == ".png" else ".jpg", picture[:, :, ::-1])[1])
        # rewritten (atomically) after each photo: a run cut off leaves a detections.json that
        # matches the annotated photos beside it; a run without any usable photo leaves none
        save(json_path, json.dumps(detections, indent=1).encode())
        logger.info(
            f"{i}/{len(files)} {name}: {' vs '.join(map(str, counts))} detections, "
            f"{ms:.0f} ms -> {os.path.basename(out_path)}"
        )

    if not detections:
        raise ConfigError(
            f"--input {' '.join(args.input)}: none of its {len(files)} file(s) is a usable image"
        )
    logger.info(
        f"{len(detections)} photos annotated in {os.path.dirname(out_paths[0]) or '.'}, "
        f"detections in {json_path}; {len(skipped)} file(s) skipped"
        + (f": {', '.join(skipped)}" if skipped else "")
    )


@contextlib.contextmanager
def quiet_opencv():
    """OpenCV's and FFmpeg's own warnings off while a video is opened: the one-line error says
    what went wrong (OPENCV_FFMPEG_LOGLEVEL=32 shows FFmpeg's messages again)."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "8")  # fatal only; read at FFmpeg's first use
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


def open_video(path):
    """(cv2.VideoCapture, its first frame) of --video-input, or a ConfigError naming it."""
    if not os.path.isfile(path):
        raise ConfigError(f"--video-input {path}: no such file")
    with quiet_opencv():
        video = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
        ok, frame = video.read() if video.isOpened() else (False, None)
    if not video.isOpened():
        raise ConfigError(f"--video-input {path}: not a video that OpenCV (FFmpeg) can read")
    if not ok:
        video.release()
        raise ConfigError(f"--video-input {path}: no frame could be read (empty or damaged)")
    return video, frame


def video_output(video_path, output):
    """The annotated video's path: --output if it names a video file, else <output>/<stem>.mp4."""
    if is_named_file(output, VIDEO_SUFFIXES):
        path = output
    elif os.path.isfile(output) or is_named_file(output, PHOTO_SUFFIXES):
        raise ConfigError(
            f"--output {output}: for a video, a folder or a {'/'.join(VIDEO_SUFFIXES)} file"
        )
    else:
        stem = os.path.splitext(os.path.basename(video_path))[0]
        path = os.path.join(output, stem + ".mp4")
    if os.path.exists(path) and os.path.samefile(path, video_path):
        raise ConfigError(f"--output {path} is the input video: it would be overwritten")
    return path


def even_size(frame):
    """``frame`` padded with black to an even width and height: MPEG-4's encoder would crop an odd
    row or column."""
    h, w = frame.shape[:2]
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)))


def duration(seconds):
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"


def annotate_video(annotator, video, frame, source, out):
    """Every frame of ``video`` (``frame`` its first, read from ``source``), annotated, into the
    video ``out`` of the same frame rate: written to a temporary name beside it and renamed after
    the last frame, so that a crash or a kill never leaves a half video under its name."""
    why = too_small(frame, annotator.resize)
    if why:
        raise ConfigError(f"--video-input {source}: {why}")
    fps = video.get(cv2.CAP_PROP_FPS)
    fps = fps if math.isfinite(fps) and fps > 0 else 30.0
    total = video.get(cv2.CAP_PROP_FRAME_COUNT)  # an estimate from the container; may be absent
    total = int(total) if math.isfinite(total) and 0 < total < 1e9 else None
    folder = os.path.dirname(out) or "."
    os.makedirs(folder, exist_ok=True)
    name, ext = os.path.splitext(os.path.basename(out))
    # the suffix last: OpenCV picks the container by it
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".tmp{ext}", dir=folder)
    os.close(fd)
    writer, done, start = None, 0, time.perf_counter()
    last_log = start
    try:
        while frame is not None:
            picture, _, counts = annotator(frame)
            picture = even_size(np.ascontiguousarray(picture[:, :, ::-1]))
            if writer is None:
                size = (picture.shape[1], picture.shape[0])
                writer = cv2.VideoWriter(
                    tmp, cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*VIDEO_FOURCC), fps, size
                )
                if not writer.isOpened():
                    raise ConfigError(
                        f"--output {out}: OpenCV cannot write a {VIDEO_FOURCC} video of "
                        f"{size[0]}x{size[1]} pixels as {ext}"
                    )
            writer.write(picture)
            done += 1
            ok, frame = video.read()
            now = time.perf_counter()
            if now - last_log >= PROGRESS_SECONDS or not ok or done == 1:
                last_log, rate = now, done / (now - start)
                left = f", ETA {duration((total - done) / rate)}" if total and total > done else ""
                of = f"/{total} ({100 * done / total:.0f}%)" if total else ""
                logger.info(
                    f"frame {done}{of}: {' vs '.join(map(str, counts))} detections, "
                    f"{rate:.2f} frames/s{left}"
                )
            frame = frame if ok else None
        writer.release()
        writer = None
        os.chmod(tmp, usual_mode())  # mkstemp's file is owner-only
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out)
    except BaseException:
        if writer is not None:
            writer.release()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if total and done < total:
        logger.warning(f"{source}: {done} of its {total} frames could be read")
    logger.info(
        f"{done} frames annotated in {duration(time.perf_counter() - start)} "
        f"({fps:g} frames/s video) -> {out}"
    )


def annotate(args):
    """Run the checkpoint(s) on every usable photo of --input, or every frame of --video-input:
    the command's work."""
    setup_logger(name="demo")
    setup_logger(name="d2_focalstar")
    setup_logger(name="fvcore")  # the checkpointer's messages: what was loaded, what did not fit
    cfg = setup(args)
    # an input or output that cannot be used fails before the model is loaded, with no output
    if args.video_input:
        video, frame = open_video(args.video_input)
        try:
            out = video_output(args.video_input, args.output)
            annotate_video(Annotator(cfg, args), video, frame, args.video_input, out)
        finally:
            video.release()
    else:
        files = list_inputs(args.input)
        out_paths, json_path = photo_outputs(files, args.output)
        annotate_photos(args, Annotator(cfg, args), files, out_paths, json_path)


def main(argv=None):
    args = parse_args(argv)
    with command_errors("demo.py"):  # bad input: one line naming it
        annotate(args)


if __name__ == "__main__":
    main()
