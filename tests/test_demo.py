"""demo.py on a folder of real photos (scikit-learn's sample images) with an untrained checkpoint:
EXIF rotation, grayscale, RGBA, a text file and a truncated JPEG; and its one-line errors. Then
detectron2's demo flags (several --input globs, a file --output, --confidence-threshold, --opts)
and --video-input on a short video that the tests write."""

import json
import os
import shutil

import cv2
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image

import helpers
from d2_focalstar.data.shapes import SHAPE_CLASSES
from d2_focalstar.run.checkpoint import SafeCheckpointer
from helpers import QUICKSTART, run_here
from test_model import quickstart_cfg

# Detections from an untrained model: keep every score; few boxes per photo, so drawing is quick.
ANY_SCORE = [
    "--confidence-threshold",
    "0.0",
    "--device",
    "cpu",
    "MODEL.RETINANET.SCORE_THRESH_TEST",
    "0.0",
    "TEST.DETECTIONS_PER_IMAGE",
    "3",
]
# file name -> (width, height) as displayed, i.e. after the EXIF orientation
GOOD = {
    "a_photo.jpg": (640, 427),
    "b_exif_rotated.jpg": (427, 640),
    "c_gray.png": (517, 301),
    "d_rgba.png": (640, 427),
}
BAD = {"e_notes.txt": "not an image", "f_truncated.jpg": "truncated"}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    SafeCheckpointer(build_model(quickstart_cfg()), save_dir=str(folder)).save("model")
    return str(folder / "model.pth")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    samples = pytest.importorskip("sklearn.datasets").load_sample_images()  # test-only dependency
    china, flower = (Image.fromarray(a) for a in samples.images)  # 640x427 RGB
    shutil.copy(samples.filenames[0], folder / "a_photo.jpg")  # the camera's JPEG as it is
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: display rotated 90 degrees clockwise
    flower.save(folder / "b_exif_rotated.jpg", exif=exif)
    china.convert("L").resize((517, 301)).save(folder / "c_gray.png")
    rgba = flower.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(folder / "d_rgba.png")
    (folder / "e_notes.txt").write_text("not a photo\n")
    data = (folder / "a_photo.jpg").read_bytes()
    (folder / "f_truncated.jpg").write_bytes(data[: len(data) // 2])
    return folder


@pytest.fixture(scope="module")
def demo(weights, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "annotated"
    proc = run_here(
        "demo.py",
        *QUICKSTART,
        "--input",
        str(photos),
        "--output",
        str(out),
        *ANY_SCORE,
        "MODEL.WEIGHTS",
        weights,
    )
    return proc, out


def test_exits_zero_and_counts_the_skipped_files(demo):
    proc, _ = demo
    assert proc.returncode == 0, proc.output[-5000:]
    assert "4 photos annotated" in proc.output and "2 file(s) skipped" in proc.output


def test_bad_files_are_named_with_the_reason(demo):
    proc, _ = demo
    for name, reason in BAD.items():
        lines = [line for line in proc.output.splitlines() if f"skipped {name}:" in line]
        assert len(lines) == 1 and reason in lines[0], proc.output[-5000:]


def test_every_photo_is_annotated_at_its_displayed_size(demo):
    _, out = demo
    for name, size in GOOD.items():  # b_exif_rotated.jpg: stored 640x427, shown 427x640
        with Image.open(out / (os.path.splitext(name)[0] + ".jpg")) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", size), name


def test_boxes_are_drawn_over_the_photo(demo, photos):
    _, out = demo
    with Image.open(photos / "c_gray.png") as im:
        photo = np.asarray(im, dtype=float)
    with Image.open(out / "c_gray.jpg") as im:
        drawn = np.asarray(im, dtype=float)
    assert np.abs(drawn - photo[..., None]).max(axis=2).max() > 100  # colored boxes and labels
    assert np.median(np.abs(drawn - photo[..., None])) < 5  # elsewhere, the photo


def test_detections_json_lists_the_photos_with_boxes_inside_them(demo):
    _, out = demo
    detections = json.loads((out / "detections.json").read_text())
    assert sorted(detections) == sorted(GOOD)
    for name, (w, h) in GOOD.items():
        assert 1 <= len(detections[name]) <= 3, name
        for d in detections[name]:
            x0, y0, x1, y1 = d["bbox"]
            assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h, (name, d)
            assert 0 <= d["score"] <= 1
            assert d["category"] == SHAPE_CLASSES[d["category_id"]]


def test_only_finished_outputs_are_left(demo):
    _, out = demo
    assert sorted(os.listdir(out)) == sorted(
        ["detections.json"] + [os.path.splitext(n)[0] + ".jpg" for n in GOOD]
    )


def assert_one_line_error(proc, *needles):
    helpers.assert_one_line_error(proc, "demo.py", *needles)


@pytest.fixture
def notes(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("hello\n")
    return str(tmp_path / "in")


@pytest.mark.parametrize(
    "opts,needle",
    [
        ([], "add MODEL.WEIGHTS"),
        (["MODEL.WEIGHTS", "nope/model_final.pth"], "'nope/model_final.pth': no such file"),
    ],
)
def test_missing_weights_is_a_one_line_error(notes, tmp_path, opts, needle):
    proc = run_here(
        "demo.py", *QUICKSTART, "--input", notes, "--output", str(tmp_path / "out"), *opts
    )
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "out").exists()


def test_corrupt_weights_are_a_one_line_error(weights, notes, tmp_path):
    cut = tmp_path / "cut.pth"
    with open(weights, "rb") as f:
        cut.write_bytes(f.read(1000))
    proc = run_here(
        "demo.py",
        *QUICKSTART,
        "--input",
        notes,
        "--output",
        str(tmp_path / "out"),
        "MODEL.WEIGHTS",
        str(cut),
    )
    assert_one_line_error(proc, str(cut), "cannot be read as a checkpoint", "truncated")


def test_a_folder_without_any_usable_image_fails(weights, notes, tmp_path):
    # an earlier run's detections stay as they were: nothing is written over them
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "detections.json").write_text('{"earlier.jpg": []}')
    # options may come after the config opts too
    proc = run_here(
        "demo.py",
        *QUICKSTART,
        "--input",
        notes,
        "--output",
        str(tmp_path / "out"),
        "MODEL.WEIGHTS",
        weights,
        "--device",
        "cpu",
    )
    assert_one_line_error(proc, "none of its 1 file(s) is a usable image")
    assert "skipped notes.txt: not an image" in proc.output
    assert (tmp_path / "out" / "detections.json").read_text() == '{"earlier.jpg": []}'


def test_setup_with_cuda_reported_present_picks_the_gpu(monkeypatch, weights, notes, tmp_path):
    """On a machine with CUDA the demo runs on it (it once crashed there before doing anything,
    which CPU-only tests could not see): its setup, with CUDA reported present."""
    import demo

    monkeypatch.chdir(helpers.REPO)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    argv = [
        *QUICKSTART,
        "--input",
        notes,
        "--output",
        str(tmp_path / "out"),
        "MODEL.WEIGHTS",
        weights,
    ]
    cfg = demo.setup(demo.parse_args(argv))
    assert cfg.MODEL.DEVICE == "cuda" and cfg.MODEL.WEIGHTS == weights
    assert cfg.MODEL.RETINANET.SCORE_THRESH_TEST == 0.5  # --confidence-threshold's default
    assert demo.setup(demo.parse_args(argv + ["--device", "cuda:0"])).MODEL.DEVICE == "cuda:0"
    # and without CUDA, the same command falls back to the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert demo.setup(demo.parse_args(argv)).MODEL.DEVICE == "cpu"


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("other") / "flstar"
    folder.mkdir()
    torch.manual_seed(1)
    SafeCheckpointer(build_model(quickstart_cfg()), save_dir=str(folder)).save("model")
    return str(folder / "model.pth")


def test_compare_weights_writes_two_labelled_panels_and_both_lists(
    weights, other_weights, photos, tmp_path
):
    """The proposal's Fig. 7: two checkpoints on the same photos, side by side."""
    out = tmp_path / "cmp"
    proc = run_here(
        "demo.py",
        *QUICKSTART,
        "--input",
        str(photos),
        "--output",
        str(out),
        *ANY_SCORE,
        "--compare-weights",
        weights,
        other_weights,
    )
    assert proc.returncode == 0, proc.output[-5000:]
    labels = [os.path.join(*p.split(os.sep)[-2:]) for p in (weights, other_weights)]
    detections = json.loads((out / "detections.json").read_text())
    assert sorted(detections) == sorted(GOOD)
    for name, (w, h) in GOOD.items():
        assert sorted(detections[name]) == sorted(labels)
        for label in labels:
            assert 1 <= len(detections[name][label]) <= 3
        with Image.open(out / (os.path.splitext(name)[0] + ".jpg")) as im:
            assert im.size[0] == 2 * w and im.size[1] > h  # two panels under a label strip
            panel = np.asarray(im)
        strip = panel[: panel.shape[0] - h]
        assert (strip > 200).mean() > 0.9 and (strip < 100).any()  # white, with black text
    # the two untrained models differ, so the lists do
    name = next(iter(GOOD))
    assert detections[name][labels[0]] != detections[name][labels[1]]


def test_every_input_gets_its_own_output_file(weights, tmp_path):
    """a.jpg, a.png and a.jpg.jpg: a stem shared, and a name that the first would take."""
    photos = tmp_path / "in"
    photos.mkdir()
    for i, name in enumerate(["a.jpg", "a.png", "a.jpg.jpg"]):
        cv2.imwrite(
            str(photos / name),
            np.full((64, 64, 3), 60 * i, np.uint8),
            [cv2.IMWRITE_JPEG_QUALITY, 95] if name.endswith(".jpg") else [],
        )
    out = tmp_path / "out"
    proc = run_here(
        "demo.py",
        *QUICKSTART,
        "--input",
        str(photos),
        "--output",
        str(out),
        *ANY_SCORE,
        "MODEL.WEIGHTS",
        weights,
    )
    assert proc.returncode == 0, proc.output[-5000:]
    assert "3 photos annotated" in proc.output
    written = sorted(n for n in os.listdir(out) if n != "detections.json")
    assert len(written) == 3, written
    for name in ("a.jpg", "a.png", "a.jpg.jpg"):  # the log line says which output is whose
        assert (
            len(
                [line for line in proc.output.splitlines() if f" {name}: " in line and "->" in line]
            )
            == 1
        )


def test_output_names_are_unique_even_across_letter_case():
    import demo

    names = demo.output_names(
        ["p/a.jpg", "p/a.jpg.jpg", "p/a.png", "p/B.jpg", "p/b.png", "p/c.jpg"]
    )
    assert names == ["a.jpg.jpg", "a.jpg.jpg.jpg", "a.png.jpg", "B.jpg", "b.png.jpg", "c.jpg"]
    assert len({n.casefold() for n in names}) == len(names)


def test_a_checkpoint_that_would_run_a_command_is_refused_by_the_demo(notes, tmp_path):
    from test_reliability import _SystemCall

    marker = tmp_path / "pwned"
    evil = tmp_path / "model_final"  # no extension: read as a .pth
    torch.save({"model": {}, "x": _SystemCall(marker)}, evil)
    proc = run_here(
        "demo.py",
        *QUICKSTART,
        "--input",
        notes,
        "--output",
        str(tmp_path / "out"),
        "MODEL.WEIGHTS",
        str(evil),
    )
    assert_one_line_error(proc, f"Refusing to load {evil}", "Nothing in it was run")
    assert not marker.exists()


# detectron2's demo/demo.py command line: several --input globs, --output a file, --opts, and
# --video-input. Small drawn pictures keep each run to a few seconds.


def draw_shapes(i, size=64):
    """A BGR picture of a circle and a square that move with ``i``."""
    image = np.full((size, size, 3), 200, np.uint8)
    cv2.circle(image, (12 + 6 * i, 20), 9, (0, 0, 255), -1)
    cv2.rectangle(image, (30, 34 + 3 * i), (50, 54 + 3 * i), (255, 0, 0), -1)
    return image


def write_video(path, frames, fourcc="mp4v"):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10.0, (64, 64))
    assert writer.isOpened()
    for i in range(frames):
        writer.write(draw_shapes(i))
    writer.release()


def read_video(path):
    """(frame count, (width, height)) of a video, read to its end."""
    video = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    assert video.isOpened(), path
    frames = []
    while True:
        ok, frame = video.read()
        if not ok:
            break
        frames.append(frame)
    video.release()
    return len(frames), (frames[0].shape[1], frames[0].shape[0])


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "walk.mp4"
    write_video(path, 5)
    assert read_video(path) == (5, (64, 64))
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Four small photos: a1.png, a2.png, b.png, c.jpg."""
    folder = tmp_path_factory.mktemp("shapes")
    for i, name in enumerate(["a1.png", "a2.png", "b.png", "c.jpg"]):
        cv2.imwrite(str(folder / name), draw_shapes(i))
    return folder


def test_a_video_is_annotated_frame_by_frame_with_progress(weights, video, tmp_path):
    out = tmp_path / "out"
    proc = run_here(
        "demo.py",
        *QUICKSTART,
        "--video-input",
        str(video),
        "--output",
        str(out),
        *ANY_SCORE,
        "MODEL.WEIGHTS",
        weights,
    )
    assert proc.returncode == 0, proc.output[-5000:]
    assert os.listdir(out) == ["walk.mp4"]  # <stem>.mp4, and no temporary file left
    assert read_video(out / "walk.mp4") == (5, (64, 64))
    assert "frame 1/5 (20%)" in proc.output and "ETA" in proc.output
    assert "5 frames annotated" in proc.output


def test_compare_weights_on_a_video_gives_two_panels_per_frame(
    weights, other_weights, video, tmp_path
):
    out = tmp_path / "cmp" / "walk_fl_vs_flstar.mkv"  # --output a file, in a folder to create
    proc = run_here(
        "demo.py",
        *QUICKSTART,
        "--video-input",
        str(video),
        "--output",
        str(out),
        *ANY_SCORE,
        "--compare-weights",
        weights,
        other_weights,
    )
    assert proc.returncode == 0, proc.output[-5000:]
    assert os.listdir(out.parent) == [out.name]
    frames, (w, h) = read_video(out)
    assert frames == 5 and w == 2 * 64 and h > 64  # two panels under a label strip


@pytest.mark.parametrize(
    "case,needle",
    [
        ("missing.mp4", "no such file"),
        ("notes.mp4", "not a video that OpenCV (FFmpeg) can read"),
        ("empty.avi", "no frame could be read"),
    ],
)
def test_an_unusable_video_is_one_line_naming_it_and_writes_nothing(
    weights, tmp_path, case, needle
):
    path = tmp_path / case
    if case == "notes.mp4":
        path.write_text("not a video\n")
    elif case == "empty.avi":
        write_video(path, 0, fourcc="MJPG")  # an AVI header, no frame
    out = tmp_path / "out"
    proc = run_here(
        "demo.py",
        *QUICKSTART,
        "--video-input",
        str(path),
        "--output",
        str(out),
        "MODEL.WEIGHTS",
        weights,
    )
    assert_one_line_error(proc, f"--video-input {path}: {needle}")
    assert not out.exists()


def test_several_input_globs_and_files_each_once(weights, shapes, tmp_path):
    out = tmp_path / "out"
    proc = run_here(
        "demo.py",
        *QUICKSTART,
        "--input",
        str(shapes / "a*.png"),
        str(shapes / "c.jpg"),
        str(shapes / "a1.png"),
        "--output",
        str(out),
        *ANY_SCORE,
        "MODEL.WEIGHTS",
        weights,
    )
    assert proc.returncode == 0, proc.output[-5000:]
    assert "3 photos annotated" in proc.output
    assert sorted(json.loads((out / "detections.json").read_text())) == [
        "a1.png",
        "a2.png",
        "c.jpg",
    ]
    assert sorted(os.listdir(out)) == ["a1.jpg", "a2.jpg", "c.jpg", "detections.json"]


def test_output_may_name_one_photo_file(weights, shapes, tmp_path):
    out = tmp_path / "result.png"
    proc = run_here(
        "demo.py",
        *QUICKSTART,
        "--input",
        str(shapes / "b.png"),
        "--output",
        str(out),
        *ANY_SCORE,
        "MODEL.WEIGHTS",
        weights,
    )
    assert proc.returncode == 0, proc.output[-5000:]
    assert sorted(os.listdir(tmp_path)) == ["result.json", "result.png"]
    with Image.open(out) as im:
        assert (im.format, im.size) == ("PNG", (64, 64))
    assert list(json.loads((tmp_path / "result.json").read_text())) == ["b.png"]


def test_a_file_output_for_several_inputs_is_refused(weights, shapes, tmp_path):
    out = tmp_path / "result.jpg"
    proc = run_here(
        "demo.py",
        *QUICKSTART,
        "--input",
        str(shapes),
        "--output",
        str(out),
        "MODEL.WEIGHTS",
        weights,
    )
    assert_one_line_error(proc, f"--output {out} names one file", "gives 4: name a folder")
    assert not out.exists() and os.listdir(tmp_path) == []


def detections_at(threshold, weights, shapes, out):
    proc = run_here(
        "demo.py",
        *QUICKSTART,
        "--input",
        str(shapes),
        "--output",
        str(out),
        "--device",
        "cpu",
        "--confidence-threshold",
        str(threshold),
        "MODEL.WEIGHTS",
        weights,
    )
    assert proc.returncode == 0, proc.output[-5000:]
    return json.loads((out / "detections.json").read_text())


def test_a_higher_confidence_threshold_keeps_only_the_higher_scores(weights, shapes, tmp_path):
    low = detections_at(0.0, weights, shapes, tmp_path / "low")
    scores = sorted(d["score"] for found in low.values() for d in found)
    threshold = scores[len(scores) // 2]  # the median: about half the detections stay
    high = detections_at(threshold, weights, shapes, tmp_path / "high")
    assert sorted(high) == sorted(low)
    assert 0 < sum(map(len, high.values())) < len(scores)
    for name, found in high.items():
        assert all(d["score"] >= threshold for d in found)
        assert all(d in low[name] for d in found), name  # the same boxes, fewer of them


def test_config_pairs_after_opts_and_after_input(weights, shapes, tmp_path):
    """detectron2's --opts KEY VALUE ..., and today's pairs, even right after --input."""
    proc = run_here(
        "demo.py",
        *QUICKSTART,
        "--output",
        str(tmp_path / "out"),
        *ANY_SCORE,
        "--input",
        str(shapes / "b.png"),
        "MODEL.WEIGHTS",
        weights,
        "--opts",
        "TEST.DETECTIONS_PER_IMAGE",
        "1",
    )
    assert proc.returncode == 0, proc.output[-5000:]
    detections = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert [len(found) for found in detections.values()] == [1]  # ANY_SCORE's 3, overridden


def test_config_pairs_are_told_apart_from_input_paths():
    import demo

    args = demo.parse_args(
        [
            *QUICKSTART,
            "--input",
            "p/a.jpg",
            "p/*.png",
            "MODEL.WEIGHTS",
            "w.pth",
            "--output",
            "o",
            "--opts",
            "TEST.DETECTIONS_PER_IMAGE",
            "1",
        ]
    )
    assert args.input == ["p/a.jpg", "p/*.png"]
    assert args.opts == ["MODEL.WEIGHTS", "w.pth", "TEST.DETECTIONS_PER_IMAGE", "1"]


def test_a_video_cut_off_midway_leaves_no_file(weights, video, tmp_path, monkeypatch):
    """Ctrl-C at the third frame: the frames written so far go with the temporary file."""
    import demo

    calls, draw = [], demo.Annotator.__call__

    def interrupted_at_the_third_frame(self, image):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return draw(self, image)

    monkeypatch.setattr(demo.Annotator, "__call__", interrupted_at_the_third_frame)
    out = tmp_path / "out"
    proc = run_here(
        "demo.py",
        *QUICKSTART,
        "--video-input",
        str(video),
        "--output",
        str(out),
        *ANY_SCORE,
        "MODEL.WEIGHTS",
        weights,
    )
    assert proc.returncode != 0 and len(calls) == 3
    assert os.listdir(out) == []
