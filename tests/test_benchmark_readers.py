"""Benchmark readers (eval/benchmarks.py) and media decoding (data/media.py) on made-up fixtures
in the owners' published layouts (tests/benchmark_fixtures.py)."""
import json
import os

import av
import numpy as np
import pytest

from flamingo_jax.data import media
from flamingo_jax.data import pp
from flamingo_jax.eval import benchmarks
from tests import benchmark_fixtures as fixtures


def _rng(seed: int = 0) -> np.random.Generator:
  return np.random.default_rng(seed)


@pytest.mark.parametrize("name", sorted(benchmarks.BENCHMARKS))
def test_reader_gives_the_written_examples(name, tmp_path):
  expected = fixtures.write(name, tmp_path, _rng(), num_per_split=3)
  bench = benchmarks.BENCHMARKS[name]
  assert {bench.support_split, bench.query_split} <= set(expected) <= set(bench.splits)
  for split, examples in expected.items():
    got = benchmarks.read(name, str(tmp_path), split)
    assert got == examples, (name, split)
    assert all(os.path.isfile(p) for ex in got for p in ex.media)
    assert len({ex.id for ex in got}) == len(got), "ids are unique within a split"


@pytest.mark.parametrize("name", ["vqav2", "okvqa", "textvqa", "vizwiz"])
def test_vqa_keeps_all_ten_answers_with_repeats(name, tmp_path):
  fixtures.write(name, tmp_path, _rng())
  for ex in benchmarks.read(name, str(tmp_path), "val"):
    assert len(ex.answers) == 10 and len(set(ex.answers)) < 10
    assert ex.question and not ex.video


def test_okvqa_reads_the_processed_answer_not_raw_answer(tmp_path):
  fixtures.write("okvqa", tmp_path, _rng())
  with open(tmp_path / "mscoco_val2014_annotations.json") as f:
    annotation = json.load(f)["annotations"][0]
  by_id = {ex.id: ex for ex in benchmarks.read("okvqa", str(tmp_path), "val")}
  assert by_id[str(annotation["question_id"])].answers == tuple(
      a["answer"] for a in annotation["answers"])


def test_coco_karpathy_train_includes_restval(tmp_path):
  fixtures.write("coco", tmp_path, _rng(), num_per_split=2)
  with open(tmp_path / "dataset_coco.json") as f:
    images = json.load(f)["images"]
  restval = {str(e["cocoid"]) for e in images if e["split"] == "restval"}
  train = benchmarks.read("coco", str(tmp_path), "train")
  assert restval and restval <= {ex.id for ex in train}
  assert len(train) == sum(e["split"] in ("train", "restval") for e in images)
  assert all(len(ex.captions) == 5 for ex in train)


def test_hateful_memes_images_keep_leading_zeros(tmp_path):
  fixtures.write("hateful_memes", tmp_path, _rng())
  for ex in benchmarks.read("hateful_memes", str(tmp_path), "test_seen"):
    assert os.path.basename(ex.media[0]) == f"{int(ex.id):05d}.png"
    assert ex.label in (0, 1) and ex.text


def test_msrvtt_qa_falls_back_to_msrvtt_video_folders(tmp_path):
  expected = fixtures.write("msrvtt_qa", tmp_path, _rng(), splits=("test",))
  os.rename(tmp_path / "video", tmp_path / "TestVideo")
  got = benchmarks.read("msrvtt_qa", str(tmp_path), "test")
  assert [ex.media[0] for ex in got] == [
      ex.media[0].replace(f"{os.sep}video{os.sep}", f"{os.sep}TestVideo{os.sep}")
      for ex in expected["test"]]


def test_msvd_qa_reads_clips_renamed_to_vid_n(tmp_path):
  fixtures.write("msvd_qa", tmp_path, _rng(), splits=("test",))
  os.mkdir(tmp_path / "video")
  for line in (tmp_path / "youtube_mapping.txt").read_text().splitlines():
    clip, vid = line.split()
    if (tmp_path / "YouTubeClips" / f"{clip}.avi").exists():
      os.rename(tmp_path / "YouTubeClips" / f"{clip}.avi", tmp_path / "video" / f"{vid}.avi")
  os.remove(tmp_path / "youtube_mapping.txt")  # not needed once renamed
  video_ids = [q["video_id"] for q in json.loads((tmp_path / "test_qa.json").read_text())]
  got = benchmarks.read("msvd_qa", str(tmp_path), "test")
  assert [ex.media[0] for ex in got] == [str(tmp_path / "video" / f"vid{v}.avi") for v in video_ids]


def test_relative_root_gives_absolute_media_paths(tmp_path, monkeypatch):
  fixtures.write("vizwiz", tmp_path / "vizwiz", _rng())
  monkeypatch.chdir(tmp_path)
  assert all(os.path.isabs(ex.media[0]) for ex in benchmarks.read("vizwiz", "vizwiz", "val"))


# Media.


@pytest.mark.parametrize("ext,mode", [("jpg", "RGB"), ("png", "RGB"), ("png", "L"),
                                      ("png", "RGBA")])
def test_read_image_agrees_with_pp_decode(ext, mode, tmp_path):
  path = fixtures.write_image(str(tmp_path / f"a.{ext}"), _rng(), size=(17, 11), mode=mode)
  image = media.read_image(path)
  assert image.shape == (11, 17, 3) and image.dtype == np.uint8
  np.testing.assert_array_equal(image, pp.build("decode")({"image": path})["image"])


@pytest.mark.parametrize("ext", ["mp4", "avi"])
def test_read_video_takes_one_frame_per_second(ext, tmp_path):
  path = fixtures.write_video(str(tmp_path / f"v.{ext}"), seconds=3, fps=4)
  video = media.read_video(path)
  assert video.shape == (3, 24, 32, 3) and video.dtype == np.uint8
  assert [fixtures.frame_index(f) for f in video] == [0, 4, 8]  # frames at 0 s, 1 s, 2 s
  assert [fixtures.frame_index(f) for f in media.read_video(path, fps=2)] == [0, 2, 4, 6, 8, 10]


def test_read_video_subsamples_evenly_to_max_frames(tmp_path):
  path = fixtures.write_video(str(tmp_path / "v.mp4"), seconds=3, fps=4)
  frames = lambda **kw: [fixtures.frame_index(f) for f in media.read_video(path, **kw)]
  assert frames(fps=4, max_frames=12) == list(range(12))
  assert frames(fps=4, max_frames=4) == [0, 4, 7, 11]  # first and last kept
  assert frames(fps=1, max_frames=2) == [0, 8]
  assert frames(fps=1, max_frames=1) == [0]
  assert frames(fps=4, max_frames=5) == frames(fps=4, max_frames=5)  # deterministic


@pytest.mark.parametrize("kwargs,field", [({"fps": 0}, "fps"), ({"max_frames": 0}, "max_frames")])
def test_read_video_rejects_bad_settings(kwargs, field, tmp_path):
  path = fixtures.write_video(str(tmp_path / "v.mp4"))
  with pytest.raises(ValueError, match=field):
    media.read_video(path, **kwargs)


# Errors name the file or field at fault.


def test_missing_and_corrupt_media_files(tmp_path):
  for read in (media.read_image, media.read_video):
    with pytest.raises(FileNotFoundError, match="nowhere.bin"):
      read(str(tmp_path / "nowhere.bin"))
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"not an image at all")
  with pytest.raises(ValueError, match="bad.jpg"):
    media.read_image(str(bad))
  bad = tmp_path / "bad.mp4"
  bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
  with pytest.raises(ValueError, match="bad.mp4"):
    media.read_video(str(bad))
  sound = str(tmp_path / "sound.wav")
  with av.open(sound, "w") as container:
    stream = container.add_stream("pcm_s16le", rate=8000, layout="mono")
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
    frame.sample_rate = 8000
    container.mux(stream.encode(frame))
    container.mux(stream.encode())
  with pytest.raises(ValueError, match="sound.wav.*no video stream"):
    media.read_video(sound)


def test_unknown_benchmark_split_and_root(tmp_path):
  with pytest.raises(ValueError, match="unknown benchmark 'coco2017'.*'vqav2'"):
    benchmarks.read("coco2017", str(tmp_path), "test")
  with pytest.raises(ValueError, match="unknown split 'testing'.*'train', 'val', 'test'"):
    benchmarks.read("coco", str(tmp_path), "testing")
  with pytest.raises(ValueError, match="'test-dev' has no public answers"):
    benchmarks.read("vqav2", str(tmp_path), "test-dev")
  with pytest.raises(FileNotFoundError, match="root directory .*absent"):
    benchmarks.read("coco", str(tmp_path / "absent"), "test")


@pytest.mark.parametrize("name,file", [
    ("coco", "dataset_coco.json"), ("flickr30k", "dataset_flickr30k.json"),
    ("vqav2", "v2_mscoco_val2014_annotations.json"),
    ("vqav2", "v2_OpenEnded_mscoco_val2014_questions.json"),
    ("okvqa", "mscoco_val2014_annotations.json"), ("textvqa", "TextVQA_0.5.1_val.json"),
    ("vizwiz", "Annotations/val.json"), ("hateful_memes", "test_seen.jsonl"),
    ("msrvtt_qa", "test_qa.json"), ("msvd_qa", "youtube_mapping.txt")])
def test_missing_annotation_file_is_named(name, file, tmp_path):
  fixtures.write(name, tmp_path, _rng())
  os.remove(tmp_path / file)
  with pytest.raises(FileNotFoundError, match=os.path.basename(file)):
    benchmarks.read(name, str(tmp_path), benchmarks.BENCHMARKS[name].query_split)


@pytest.mark.parametrize("name", sorted(benchmarks.BENCHMARKS))
def test_missing_media_file_is_named(name, tmp_path):
  expected = fixtures.write(name, tmp_path, _rng())
  split = benchmarks.BENCHMARKS[name].query_split
  path = expected[split][-1].media[0]
  first_user = next(ex.id for ex in expected[split] if ex.media[0] == path)  # files are shared
  os.remove(path)
  with pytest.raises(FileNotFoundError, match=f"{os.path.basename(path)}.*'{first_user}'"):
    benchmarks.read(name, str(tmp_path), split)


def test_question_without_annotation_is_named(tmp_path):
  fixtures.write("vqav2", tmp_path, _rng())
  path = tmp_path / "v2_mscoco_val2014_annotations.json"
  data = json.loads(path.read_text())
  dropped = data["annotations"].pop()["question_id"]
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError, match=f"question_id {dropped} has no annotation in "
                     ".*v2_mscoco_val2014_annotations.json"):
    benchmarks.read("vqav2", str(tmp_path), "val")


def test_malformed_annotations_name_file_and_field(tmp_path):
  fixtures.write("hateful_memes", tmp_path, _rng())
  (tmp_path / "train.jsonl").write_text('{"id": 1, "img": "img/00001.png", "text": "t"}\n')
  with pytest.raises(ValueError, match=r"train.jsonl line 1: expected a field 'label'"):
    benchmarks.read("hateful_memes", str(tmp_path), "train")
  (tmp_path / "train.jsonl").write_text("{not json\n")
  with pytest.raises(ValueError, match="train.jsonl.*line 1 is not valid JSON"):
    benchmarks.read("hateful_memes", str(tmp_path), "train")
  (tmp_path / "test_seen.jsonl").write_text("")
  assert benchmarks.read("hateful_memes", str(tmp_path), "test_seen") == []
