"""
Datasets as annotation tools leave them on disk, read without code: YOLO folders (an images
folder, a labels folder of ``<class> <cx> <cy> <w> <h>`` lines, a names file) and Pascal
VOC-style folders (``Annotations/*.xml``, ``JPEGImages/*.jpg``, ``ImageSets/Main/<set>.txt``,
read by detectron2's ``load_voc_instances``). Every problem a user's files can have is one
ConfigError naming the file (and line): nothing is trained silently wrong. Layouts:
datasets/README.md.
"""

import math
import os
import xml.etree.ElementTree as ET
from typing import Dict, List, Tuple

import yaml
from detectron2.structures import BoxMode
from PIL import Image

from ..config import ConfigError

__all__ = [
    "YOLO_IMAGE_EXTENSIONS",
    "VOC_STYLE_YEAR",
    "read_class_names",
    "load_yolo_folder",
    "voc_style_classes",
    "check_voc_folder",
]

#: The files of a YOLO images folder that are images (those ultralytics reads, by extension).
YOLO_IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
#: How far, in pixels, a box may reach past the image's edge (rounding in the tools that wrote
#: it) before it is an error; within it, the box is clipped to the image.
EDGE_TOLERANCE = 1.0
#: The metadata year of a VOC-style dataset: it picks the AP of detectron2's Pascal VOC
#: evaluation, 2012 being the all-point AP of VOC2010 and later (2007: the 11-point AP).
VOC_STYLE_YEAR = 2012
#: What detectron2's Pascal VOC evaluation reads of every object of a test split besides its
#: name and box (pascal_voc_evaluation.parse_rec; LabelImg and the VOC devkit write them).
VOC_EVALUATION_TAGS = ("pose", "truncated", "difficult")
# a names entry that is a path, even where the file is missing (else: a comma-separated list)
_NAMES_FILE_EXTENSIONS = (".txt", ".names", ".yaml", ".yml")


def read_class_names(spec: str, where: str) -> List[str]:
    """
    The class names, in class-index order, that ``spec`` gives: a text file of one name a line
    (YOLO's classes.txt, darknet's obj.names), a YAML file with ``names`` (a list or {index:
    name}, as ultralytics' data.yaml), or a comma-separated list ("person,car"). ConfigError
    starting with ``where`` for a missing or unreadable file, no names, or a name given twice.
    """
    if os.path.isfile(spec):
        names = _names_from_file(spec, where)
        where = f"{where}: {spec}"
    elif os.sep in spec or "/" in spec or spec.lower().endswith(_NAMES_FILE_EXTENSIONS):
        raise ConfigError(f"{where}: names file {spec} does not exist")
    else:
        names = [n.strip() for n in spec.split(",")]
    if not names or not all(names):
        raise ConfigError(f"{where}: an empty class name or none at all in {names!r}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(
            f"{where}: class {twice[0]!r} is named more than once: its boxes "
            "would split between two class indices"
        )
    return names


def _names_from_file(path, where):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: names file {path} cannot be read ({e})") from None
    if not path.lower().endswith((".yaml", ".yml")):
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        names = (yaml.safe_load(text) or {}).get("names")
    except (yaml.YAMLError, AttributeError) as e:
        raise ConfigError(f"{where}: {path} is not a YAML mapping with 'names' ({e})") from None
    if isinstance(names, dict) and sorted(names) == list(range(len(names))):
        names = [names[i] for i in range(len(names))]
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise ConfigError(
            f"{where}: {path}: 'names' is {names!r}; allowed a list of class names "
            "or {0: name, 1: name, ...}"
        )
    return [n.strip() for n in names]


def _image_size(path, where):
    """(width, height) as detectron2 reads the image (EXIF orientation applied), from its header."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees on reading
                width, height = height, width
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ConfigError(f"{path} {where}: not an image that can be read ({e})") from None
    return width, height


def load_yolo_folder(
    images_dir: str, labels_dir: str, class_names: List[str], dataset_name: str
) -> List[Dict]:
    """
    detectron2's dataset dicts of a YOLO folder: every image of ``images_dir`` (by extension,
    YOLO_IMAGE_EXTENSIONS; sorted by name, its index being its image_id) with the boxes of
    ``labels_dir/<image stem>.txt``, one ``<class> <cx> <cy> <w> <h>`` line each (normalised to
    the image's width and height), in absolute XYXY. An empty label file is an image without
    objects. ConfigError naming the file and line for a missing label file, a line that is not
    five numbers, a class index beyond ``class_names``, a box of no size or outside the image,
    an image that cannot be read.
    """
    where = f"(dataset {dataset_name!r})"
    files = sorted(
        f
        for f in os.listdir(images_dir)
        if f.lower().endswith(YOLO_IMAGE_EXTENSIONS) and not f.startswith(".")
    )
    dicts = []
    for image_id, file in enumerate(files):
        image_path = os.path.join(images_dir, file)
        label_path = os.path.join(labels_dir, os.path.splitext(file)[0] + ".txt")
        if not os.path.isfile(label_path):
            raise ConfigError(
                f"{label_path} {where}: missing, the label file of image "
                f"{image_path} (an image without objects needs an empty one)"
            )
        width, height = _image_size(image_path, where)
        try:
            with open(label_path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{label_path} {where}: cannot be read ({e})") from None
        annotations = [
            _yolo_box(
                line, f"{label_path}:{number} {where}", class_names, width, height, image_path
            )
            for number, line in enumerate(lines, 1)
            if line.strip()
        ]
        dicts.append(
            {
                "file_name": image_path,
                "image_id": image_id,
                "width": width,
                "height": height,
                "annotations": annotations,
            }
        )
    return dicts


def _yolo_box(line, where, class_names, width, height, image_path):
    try:
        values = [float(v) for v in line.split()]
    except ValueError:
        values = []
    if len(values) != 5 or not all(math.isfinite(v) for v in values):
        polygon = " (a segmentation polygon? only boxes are read)" if len(values) > 5 else ""
        raise ConfigError(
            f"{where}: {line.strip()[:80]!r} is not five numbers 'class cx cy w h'{polygon}"
        )
    cls, cx, cy, w, h = values
    if cls != int(cls) or cls < 0:
        raise ConfigError(f"{where}: class index {line.split()[0]!r} is not a whole number >= 0")
    if cls >= len(class_names):
        raise ConfigError(
            f"{where}: class index {int(cls)} is beyond the {len(class_names)} class "
            f"names (indices 0 to {len(class_names) - 1})"
        )
    if w <= 0 or h <= 0:
        raise ConfigError(f"{where}: box of no size (w {w:g}, h {h:g})")
    box = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
    if not _inside(box, width, height):
        raise ConfigError(
            f"{where}: box outside the {width}x{height} image {image_path} "
            f"(x0 y0 x1 y1 in pixels: {' '.join(f'{v:.1f}' for v in box)})"
        )
    box = [min(max(v, 0.0), size) for v, size in zip(box, (width, height, width, height))]
    return {"bbox": box, "bbox_mode": BoxMode.XYXY_ABS, "category_id": int(cls), "iscrowd": 0}


def _inside(box, width, height):
    x0, y0, x1, y1 = box
    return (
        x0 >= -EDGE_TOLERANCE
        and y0 >= -EDGE_TOLERANCE
        and x1 <= width + EDGE_TOLERANCE
        and y1 <= height + EDGE_TOLERANCE
    )


def _parse_xml(path, where):
    try:
        if os.path.getsize(path) == 0:
            raise ConfigError(
                f"{path} {where}: empty: an annotation file holds <annotation> with "
                "<size> and its <object>s"
            )
        return ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ConfigError(f"{path}:{e.position[0]} {where}: not valid XML ({e})") from None
    except OSError as e:
        raise ConfigError(f"{path} {where}: cannot be read ({e.strerror or e})") from None


def voc_style_classes(root: str, dataset_name: str) -> List[str]:
    """The sorted object names of all ``root/Annotations/*.xml``: a VOC-style dataset's class list
    where its entry gives none (train and test splits of one root share it)."""
    folder = os.path.join(root, "Annotations")
    names = set()
    for file in sorted(os.listdir(folder)):
        if file.endswith(".xml"):
            path = os.path.join(folder, file)
            root = _parse_xml(path, f"(dataset {dataset_name!r})")
            names.update(o.findtext("name") or "" for o in root.findall("object"))
    names.discard("")
    if not names:
        raise ConfigError(
            f"{folder} (dataset {dataset_name!r}): no <object> with a <name> in "
            "its XML files: give the class list as the entry's fourth element"
        )
    return sorted(names)


def check_voc_folder(
    dirname: str, split: str, class_names: List[str], dataset_name: str, evaluation: bool = False
) -> Tuple[int, int]:
    """
    Check what detectron2's ``load_voc_instances`` will read of a VOC-style folder: every image
    of ``ImageSets/Main/<split>.txt`` has ``Annotations/<id>.xml``, not empty and valid XML, with a
    ``<size>`` in whole pixels, and ``JPEGImages/<id>.jpg``; every object has a name of
    ``class_names`` and a ``<bndbox>`` of four numbers, not empty and inside the image. With
    ``evaluation`` (a test split, which detectron2's Pascal VOC evaluation reads), also whole-number
    coordinates and VOC_EVALUATION_TAGS. Returns (images, objects); ConfigError naming the file
    (and line) of the first problem.
    """
    where = f"(dataset {dataset_name!r})"
    set_file = os.path.join(dirname, "ImageSets", "Main", split + ".txt")
    if not os.path.isfile(set_file):
        raise ConfigError(
            f"{set_file} {where}: the image set file does not exist "
            "(VOC layout: datasets/README.md)"
        )
    with open(set_file, encoding="utf-8", errors="replace") as f:
        lines = [(n, line.split()) for n, line in enumerate(f, 1) if line.strip()]
    if not lines:
        raise ConfigError(f"{set_file} {where}: lists no image")
    objects = 0
    for number, words in lines:
        if len(words) != 1:
            raise ConfigError(
                f"{set_file}:{number} {where}: {' '.join(words)!r} is not one image id"
            )
        fileid = words[0]
        xml_file = os.path.join(dirname, "Annotations", fileid + ".xml")
        if not os.path.isfile(xml_file):
            raise ConfigError(
                f"{xml_file} {where}: missing, the annotation file of image "
                f"{fileid!r} ({set_file}:{number})"
            )
        image = os.path.join(dirname, "JPEGImages", fileid + ".jpg")
        if not os.path.isfile(image):
            raise ConfigError(
                f"{image} {where}: missing, the image of {xml_file} (detectron2's "
                "VOC reader takes JPEGImages/<id>.jpg)"
            )
        objects += _check_voc_annotation(
            xml_file, _parse_xml(xml_file, where), class_names, where, evaluation
        )
    return len(lines), objects


def _check_voc_annotation(xml_file, root, class_names, where, evaluation):
    try:
        width, height = int(root.findtext("size/width")), int(root.findtext("size/height"))
    except (TypeError, ValueError):
        width = height = 0
    if width <= 0 or height <= 0:
        raise ConfigError(
            f"{xml_file} {where}: lacks <size> with <width> and <height> in whole pixels > 0"
        )
    for k, obj in enumerate(root.findall("object"), 1):
        name = obj.findtext("name")
        if name not in class_names:
            shown = ", ".join(class_names[:8]) + (", ..." if len(class_names) > 8 else "")
            raise ConfigError(
                f"{xml_file} {where}: object {k} has class {name!r}, not one of the "
                f"dataset's {len(class_names)} classes ({shown})"
            )
        texts = [obj.findtext(f"bndbox/{t}") for t in ("xmin", "ymin", "xmax", "ymax")]
        try:
            box = [float(t) for t in texts]
        except (TypeError, ValueError):
            box = []
        if len(box) != 4 or not all(math.isfinite(v) for v in box):
            raise ConfigError(
                f"{xml_file} {where}: object {k} ({name}) lacks a <bndbox> of four "
                f"numbers xmin ymin xmax ymax (has {texts})"
            )
        if box[0] >= box[2] or box[1] >= box[3]:
            raise ConfigError(
                f"{xml_file} {where}: object {k} ({name}) has an empty box "
                f"{' '.join(texts)} (xmin ymin xmax ymax)"
            )
        # VOC's coordinates are 1-based pixels (1..width); some tools write 0-based ones
        if not _inside([box[0] - 1, box[1] - 1, box[2], box[3]], width, height):
            raise ConfigError(
                f"{xml_file} {where}: object {k} ({name}) has a box outside the "
                f"{width}x{height} image: {' '.join(texts)} (xmin ymin xmax ymax)"
            )
        if evaluation:
            _check_voc_evaluation_fields(xml_file, where, k, name, obj, texts)
    return len(root.findall("object"))


def _check_voc_evaluation_fields(xml_file, where, k, name, obj, texts):
    why = "which detectron2's Pascal VOC evaluation of a test split reads"
    try:
        [int(t) for t in texts]
    except ValueError:
        raise ConfigError(
            f"{xml_file} {where}: object {k} ({name}) has box {' '.join(texts)}: "
            f"whole numbers of pixels, {why}"
        ) from None
    missing = [t for t in VOC_EVALUATION_TAGS if not (obj.findtext(t) or "").strip()]
    if missing:
        raise ConfigError(
            f"{xml_file} {where}: object {k} ({name}) lacks "
            f"{', '.join(f'<{t}>' for t in missing)}, {why} (e.g. <pose>Unspecified"
            "</pose> <truncated>0</truncated> <difficult>0</difficult>)"
        )
    for t in ("truncated", "difficult"):
        try:
            int(obj.findtext(t))
        except ValueError:
            raise ConfigError(
                f"{xml_file} {where}: object {k} ({name}) has <{t}>"
                f"{obj.findtext(t)}</{t}>: 0 or 1, {why}"
            ) from None
