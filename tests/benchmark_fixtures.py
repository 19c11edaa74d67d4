"""Tiny made-up benchmark fixtures in exactly the owners' published layouts (issue #23).

    from tests import benchmark_fixtures
    expected = benchmark_fixtures.write("vqav2", tmp_path, np.random.default_rng(0))
    assert benchmarks.read("vqav2", str(tmp_path), "val") == expected["val"]

`write` puts the files a benchmark's release holds (same keys, nesting and file names; small real
JPEG/PNG images of varied sizes; videos of 3 s at 4 fps whose frames differ) under a root, and
returns the `Example`s each written split must read as, built from what it wrote, not by reading.
"""
import json
import os

import av
import numpy as np
from PIL import Image

from flamingo_jax.eval import benchmarks
from flamingo_jax.eval.benchmarks import Example

VIDEO_SECONDS, VIDEO_FPS, VIDEO_SIZE = 3, 4, (32, 24)  # (width, height)
_WORDS = ("dog", "cat", "red", "two", "yes", "no", "table", "bus", "pizza", "snow")


# Files.


def write_image(path: str, rng: np.random.Generator, size=None, mode: str = "RGB") -> str:
  """A small image of random pixels, size (w, h) varied by rng; JPEG or PNG by the extension."""
  w, h = size if size else (int(rng.integers(12, 40)), int(rng.integers(12, 40)))
  channels = {"RGB": (h, w, 3), "L": (h, w), "RGBA": (h, w, 4)}[mode]
  pixels = rng.integers(0, 256, channels, dtype=np.uint8)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(pixels, mode).save(path)
  return path


def write_video(path: str, seconds: float = VIDEO_SECONDS, fps: int = VIDEO_FPS,
                size=VIDEO_SIZE) -> str:
  """A video whose frame i is a flat grey of level 8 + 16 * (i % 15), so frames differ and a
  decoded frame's index is readable from its mean (see `frame_index`). mp4 or avi by extension."""
  w, h = size
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with av.open(path, "w") as container:
    stream = container.add_stream("mpeg4", rate=fps)
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    for i in range(int(round(seconds * fps))):
      pixels = np.full((h, w, 3), 8 + 16 * (i % 15), np.uint8)
      container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
    container.mux(stream.encode())
  return path


def frame_index(frame: np.ndarray) -> int:
  """The index (mod 15) of a `write_video` frame, from its grey level."""
  return int(round((float(frame.mean()) - 8) / 16))


def _dump(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def _question(rng) -> str:
  return f"what is the {rng.choice(_WORDS)} near the {rng.choice(_WORDS)}?"


def _answers(rng, n: int = 10) -> list[str]:
  """Human answers with repeats, as VQA annotators give them."""
  return [str(a) for a in rng.choice(_WORDS[:3], n)]


def _ids(rng, n: int, low: int, high: int) -> list[int]:
  """n distinct ids in [low, high), in drawing order."""
  ids = {}
  while len(ids) < n:
    ids[int(rng.integers(low, high))] = None
  return list(ids)


# Captioning (Karpathy splits).


def _karpathy_entry(rng, imgid: int, split: str, filename: str) -> dict:
  raws = [f"A {rng.choice(_WORDS)} and a {rng.choice(_WORDS)} number {j}." for j in range(5)]
  sentences = [{"tokens": r.lower().rstrip(".").split(), "raw": r, "imgid": imgid,
                "sentid": imgid * 5 + j} for j, r in enumerate(raws)]
  return {"sentids": [s["sentid"] for s in sentences], "imgid": imgid, "sentences": sentences,
          "split": split, "filename": filename}


def _karpathy_splits(n: int) -> list[str]:
  """Every Karpathy split, n images each (restval one fewer, at least one)."""
  return (["train"] * n + ["restval"] * max(1, n - 1) + ["val"] * n + ["test"] * n)


def _write_coco(root, rng, splits, n):
  images, expected = [], {s: [] for s in ("train", "val", "test")}
  for imgid, (split, cocoid) in enumerate(zip(_karpathy_splits(n), _ids(rng, 4 * n, 1, 600000))):
    filepath = "train2014" if split == "train" else "val2014"
    entry = _karpathy_entry(rng, imgid, split, f"COCO_{filepath}_{cocoid:012d}.jpg")
    entry.update(filepath=filepath, cocoid=cocoid)
    images.append(entry)
    path = write_image(os.path.join(root, filepath, entry["filename"]), rng)
    asked = "train" if split == "restval" else split
    expected[asked].append(Example(id=str(cocoid), media=(path,), captions=_raws(entry)))
  _dump(os.path.join(root, "dataset_coco.json"), {"images": images, "dataset": "coco"})
  return expected


def _raws(entry) -> tuple[str, ...]:
  return tuple(s["raw"] for s in entry["sentences"])


def _write_flickr30k(root, rng, splits, n):
  images, expected = [], {s: [] for s in ("train", "val", "test")}
  photo_ids = _ids(rng, 3 * n, 10**9, 10**10)
  for imgid, (split, photo) in enumerate(zip(["train"] * n + ["val"] * n + ["test"] * n,
                                             photo_ids)):
    entry = _karpathy_entry(rng, imgid, split, f"{photo}.jpg")
    images.append(entry)
    path = write_image(os.path.join(root, "flickr30k-images", entry["filename"]), rng)
    expected[split].append(Example(id=str(photo), media=(path,), captions=_raws(entry)))
  _dump(os.path.join(root, "dataset_flickr30k.json"), {"images": images, "dataset": "flickr30k"})
  return expected


# VQA.


def _coco_vqa(root, rng, split, n, answer_record):
  """VQA-API questions/annotations dicts for n questions on ceil(n/2) COCO images (two questions
  per image, as VQA has several), and the expected examples."""
  image_ids = _ids(rng, (n + 1) // 2, 1, 600000)
  questions, annotations, expected = [], [], []
  for i in range(n):
    image_id = image_ids[i // 2]
    qid = image_id * 1000 + i % 2
    name = f"COCO_{split}2014_{image_id:012d}.jpg"
    path = os.path.join(root, f"{split}2014", name)
    if not os.path.exists(path):
      write_image(path, rng)
    answers = _answers(rng)
    questions.append({"image_id": image_id, "question": _question(rng), "question_id": qid})
    annotations.append({
        "question_type": "what is the", "multiple_choice_answer": answers[0],
        "answers": [answer_record(a, j + 1) for j, a in enumerate(answers)],
        "image_id": image_id, "answer_type": "other", "question_id": qid})
    expected.append(Example(id=str(qid), media=(path,), question=questions[-1]["question"],
                            answers=tuple(answers)))
  rng.shuffle(annotations)  # the reader must join by question_id, not by position
  return questions, annotations, expected


def _vqa_header(split: str) -> dict:
  return {"info": {"description": "made-up fixture"}, "license": {"name": "none"},
          "data_type": "mscoco", "data_subtype": f"{split}2014"}


def _write_vqav2(root, rng, splits, n):
  record = lambda a, j: {"answer": a, "answer_confidence": "yes", "answer_id": j}
  expected = {}
  for split in splits:
    questions, annotations, expected[split] = _coco_vqa(root, rng, split, n, record)
    _dump(os.path.join(root, f"v2_OpenEnded_mscoco_{split}2014_questions.json"),
          {**_vqa_header(split), "task_type": "Open-Ended", "questions": questions})
    _dump(os.path.join(root, f"v2_mscoco_{split}2014_annotations.json"),
          {**_vqa_header(split), "annotations": annotations})
  return expected


def _write_okvqa(root, rng, splits, n):
  # OK-VQA keeps the annotator's text in raw_answer and the processed form in answer.
  record = lambda a, j: {"answer_id": j, "raw_answer": a + "s", "answer_confidence": "yes",
                         "answer": a}
  expected = {}
  for split in splits:
    questions, annotations, expected[split] = _coco_vqa(root, rng, split, n, record)
    for a in annotations:
      a.update(question_type="eight", confidence=3)
    _dump(os.path.join(root, f"OpenEnded_mscoco_{split}2014_questions.json"),
          {**_vqa_header(split), "task_type": "Open-Ended", "questions": questions})
    _dump(os.path.join(root, f"mscoco_{split}2014_annotations.json"),
          {**_vqa_header(split), "annotations": annotations})
  return expected


def _write_textvqa(root, rng, splits, n):
  expected, qid = {}, 0
  for split in splits:
    data, expected[split] = [], []
    for _ in range(n):
      image_id = "".join(rng.choice(list("0123456789abcdef"), 16))
      path = write_image(os.path.join(root, "train_images", f"{image_id}.jpg"), rng)
      w, h = Image.open(path).size
      question, answers = _question(rng), _answers(rng)
      data.append({"question": question, "image_id": image_id, "image_classes": ["Text"],
                   "flickr_original_url": "", "flickr_300k_url": "", "image_width": w,
                   "image_height": h, "answers": answers,
                   "question_tokens": question.rstrip("?").split(), "question_id": qid,
                   "set_name": split})
      expected[split].append(Example(id=str(qid), media=(path,), question=question,
                                     answers=tuple(answers)))
      qid += 1
    _dump(os.path.join(root, f"TextVQA_0.5.1_{split}.json"),
          {"dataset_type": split, "dataset_name": "textvqa", "dataset_version": "0.5.1",
           "data": data})
  return expected


def _write_vizwiz(root, rng, splits, n):
  expected = {}
  for split in splits:
    records, expected[split] = [], []
    for i in range(n):
      image = f"VizWiz_{split}_{i:08d}.jpg"
      path = write_image(os.path.join(root, split, image), rng)
      question, answers = _question(rng), _answers(rng)
      records.append({"image": image, "question": question, "answer_type": "other",
                      "answerable": 1, "answers": [{"answer_confidence": "yes", "answer": a}
                                                   for a in answers]})
      expected[split].append(Example(id=image, media=(path,), question=question,
                                     answers=tuple(answers)))
    _dump(os.path.join(root, "Annotations", f"{split}.json"), records)
  return expected


# Classification.


def _write_hateful_memes(root, rng, splits, n):
  expected = {}
  for split in splits:
    lines, expected[split] = [], []
    for i, meme_id in enumerate(_ids(rng, n, 100, 10000)):
      img = f"img/{meme_id:05d}.png"  # ids drop the file names' leading zeros
      path = write_image(os.path.join(root, img), rng)
      record = {"id": meme_id, "img": img, "label": i % 2, "text": f"meme text {meme_id}"}
      lines.append(json.dumps(record))
      expected[split].append(Example(id=str(meme_id), media=(path,), text=record["text"],
                                     label=record["label"]))
    with open(os.path.join(root, f"{split}.jsonl"), "w") as f:
      f.write("\n".join(lines) + "\n")
  return expected


# Video QA.


def _video_qa(root, rng, splits, n, video_file, extra=lambda r: r):
  """{split}_qa.json of n questions on ceil(n/2) videos; video_file(video_id) -> path to write.
  Video ids of different splits differ, as in the releases."""
  expected, qid, video_id = {}, 0, 0
  for split in splits:
    records, expected[split] = [], []
    for i in range(n):
      if i % 2 == 0:
        video_id += 1
        path = write_video(video_file(video_id))
      answer = str(rng.choice(_WORDS))
      records.append(extra({"answer": answer, "id": qid, "question": _question(rng),
                            "video_id": video_id}))
      expected[split].append(Example(id=str(qid), media=(path,), video=True,
                                     question=records[-1]["question"], answers=(answer,)))
      qid += 1
    _dump(os.path.join(root, f"{split}_qa.json"), records)
  return expected


def _write_msrvtt_qa(root, rng, splits, n):
  video = lambda v: os.path.join(root, "video", f"video{v}.mp4")
  return _video_qa(root, rng, splits, n, video, lambda r: {**r, "category_id": 3})


def _clip(video_id: int) -> str:
  """A YouTube-style MSVD clip name: <11-char id>_<start>_<end>."""
  return f"-4wsuPC{video_id:04d}_{video_id}_{video_id + 10}"


def _write_msvd_qa(root, rng, splits, n):
  expected = _video_qa(root, rng, splits, n,
                       lambda v: os.path.join(root, "YouTubeClips", f"{_clip(v)}.avi"))
  count = len(splits) * ((n + 1) // 2)  # videos written; the mapping lists one more, unused
  with open(os.path.join(root, "youtube_mapping.txt"), "w") as f:
    f.writelines(f"{_clip(v)} vid{v}\n" for v in range(1, count + 2))
  return expected


_WRITERS = {
    "coco": _write_coco, "flickr30k": _write_flickr30k, "vqav2": _write_vqav2,
    "okvqa": _write_okvqa, "textvqa": _write_textvqa, "vizwiz": _write_vizwiz,
    "hateful_memes": _write_hateful_memes, "msrvtt_qa": _write_msrvtt_qa,
    "msvd_qa": _write_msvd_qa,
}


def write(name: str, root, rng: np.random.Generator, num_per_split: int = 2,
          splits=None) -> dict[str, list[Example]]:
  """Writes benchmark `name`'s fixture under root for `splits` (default: its support and query
  splits; Karpathy captioning writes all its splits, which share one file) with num_per_split
  examples each; returns {split: the examples `benchmarks.read` must give, in file order}."""
  bench = benchmarks.BENCHMARKS[name]
  splits = tuple(splits or dict.fromkeys((bench.support_split, bench.query_split)))
  root = os.path.abspath(os.fspath(root))
  os.makedirs(root, exist_ok=True)
  return _WRITERS[name](root, rng, splits, num_per_split)
