"""Readers for the standard benchmarks' files as their owners publish them (issue #23).

The user points `read` at a directory holding one benchmark's files, unpacked as released; nothing
is downloaded. Each reader returns `Example`s with the benchmark's own ids and every reference
(all human answers, all captions) as given, and checks that every media file exists before
returning, so a missing file is an error before any compute.

Layouts, under the root (a local directory or gs://):
  coco           dataset_coco.json (Karpathy split), images {filepath}/{filename}
                 ({train,val}2014/COCO_..._{cocoid:012d}.jpg). Karpathy 'train' is train + restval
                 (the 113k images everyone trains on); 'val' and 'test' are 5k each.
  flickr30k      dataset_flickr30k.json (Karpathy split), images flickr30k-images/{filename}.
  vqav2          v2_OpenEnded_mscoco_{split}2014_questions.json,
                 v2_mscoco_{split}2014_annotations.json,
                 images {split}2014/COCO_{split}2014_{image_id:012d}.jpg.
  okvqa          OpenEnded_mscoco_{split}2014_questions.json, mscoco_{split}2014_annotations.json,
                 COCO images as vqav2. Answers are the annotations' 'answer' (OK-VQA's processed
                 form of 'raw_answer'), as the official evaluation scores them.
  textvqa        TextVQA_0.5.1_{split}.json ({'data': [...]}), images train_images/{image_id}.jpg
                 for train and val (both from train_val_images.zip; test's test_images/ goes
                 unread: test has no public answers).
  vizwiz         Annotations/{split}.json (a list), images {split}/{image}; the id is the image
                 file name (one question per image; the evaluation server keys results by it).
  hateful_memes  {split}.jsonl (id, img, label, text per line), images img/ (the 'img' field's
                 file name: ids drop the file names' leading zeros).
  msrvtt_qa      {split}_qa.json (MSRVTT-QA: a list of question, answer, video_id, id), videos
                 video/video{video_id}.mp4 (the MSRVTT-QA repository's layout), else MSR-VTT's own
                 TrainValVideo/ (train, val) or TestVideo/ (test) when video/ is absent.
  msvd_qa        {split}_qa.json (MSVD-QA, as msrvtt_qa), videos video/vid{video_id}.avi (the
                 MSVD-QA repository's layout), else MSVD's own YouTubeClips/<clip>.avi named through
                 MSVD-QA's youtube_mapping.txt ('<clip> vid<video_id>' per line).
"""
from collections.abc import Callable, Iterable
import dataclasses
import json
import os
import posixpath

from etils import epath

from flamingo_jax import paths


@dataclasses.dataclass(frozen=True)
class Example:
  """One evaluation item; only the fields its task uses are set."""
  id: str  # the benchmark's own id (question_id, image id, ...), as str
  media: tuple[str, ...]  # file paths: one image or one video
  video: bool = False
  question: str = ""
  answers: tuple[str, ...] = ()  # VQA: every human answer as given (repeats kept); video QA: one
  captions: tuple[str, ...] = ()  # reference captions, raw text
  text: str = ""  # HatefulMemes: the meme's text
  label: int | None = None  # HatefulMemes: 1 hateful, 0 not


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """A benchmark's task, splits and reader."""
  task: str  # 'captioning' | 'vqa' | 'classification'
  splits: tuple[str, ...]  # the split names the reader accepts
  support_split: str  # where in-context examples come from (the paper: train)
  query_split: str  # the default evaluation split
  read: Callable[[str, str], list[Example]]  # (root, split)


# Shared pieces.


def _join(root: str, *parts: str) -> str:
  """A path under root; posix joins keep gs:// URLs intact."""
  return posixpath.join(root, *parts) if paths.is_url(root) else os.path.join(root, *parts)


def _text(path: str) -> str:
  """The file's text; a missing file is an error naming it."""
  file = epath.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"annotation file {path!r} is missing.")
  return file.read_text()


def _json(path: str):
  """The parsed JSON file; missing or malformed is an error naming it."""
  try:
    return json.loads(_text(path))
  except json.JSONDecodeError as e:
    raise ValueError(f"annotation file {path!r} is not valid JSON: {e}") from e


def _jsonl(path: str) -> list[dict]:
  """One parsed JSON object per non-empty line; a bad line is an error naming file and line."""
  out = []
  for n, line in enumerate(_text(path).splitlines(), 1):
    if line.strip():
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"annotation file {path!r} line {n} is not valid JSON: {e}") from e
  return out


def _field(record, key: str, where: str):
  """record[key]; absent is an error naming the file, the record and the key."""
  if not isinstance(record, dict) or key not in record:
    raise ValueError(f"{where}: expected a field {key!r}; got {_short(record)}.")
  return record[key]


def _list(value, key: str, where: str) -> list:
  """A field that must be a list (of records or answers)."""
  if not isinstance(value, list):
    raise ValueError(f"{where}: expected {key!r} to be a list; got {type(value).__name__}.")
  return value


def _int(record, key: str, where: str) -> int:
  """An integer field (ids that name files); anything else is an error naming the field."""
  value = _field(record, key, where)
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f"{where}: expected {key!r} to be an integer; got {value!r}.")
  return value


def _short(value) -> str:
  text = repr(value)
  return text if len(text) <= 200 else text[:200] + "..."


def _check_media(examples: list[Example]) -> list[Example]:
  """Every media file exists: one directory listing per folder (cheap on gs:// too)."""
  listed: dict[str, set[str]] = {}
  for ex in examples:
    for path in ex.media:
      folder, name = os.path.split(path)
      if folder not in listed:
        listed[folder] = _names(folder, path, ex.id)
      if name not in listed[folder]:
        raise FileNotFoundError(f"media file {path!r} of example {ex.id!r} is missing.")
  return examples


def _names(folder: str, path: str, example_id: str) -> set[str]:
  directory = epath.Path(folder)
  if not directory.is_dir():
    raise FileNotFoundError(f"media folder {folder!r} (for {path!r}, example {example_id!r}) "
                            "is missing.")
  return {p.name for p in directory.iterdir()}


def _coco_image(root: str, split: str, image_id: int) -> str:
  """COCO 2014's image naming, shared by VQAv2 and OK-VQA."""
  folder = f"{split}2014"
  return _join(root, folder, f"COCO_{folder}_{image_id:012d}.jpg")


# Captioning: Karpathy splits.

# Karpathy split names per split asked for: 'train' adds 'restval' (the usual 113k training set).
_KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def _karpathy(root: str, split: str, file: str, image_path, image_id) -> list[Example]:
  """Examples of one Karpathy split; image_path and image_id map an 'images' entry."""
  path = _join(root, file)
  images = _list(_field(_json(path), "images", path), "images", path)
  out = []
  for i, entry in enumerate(images):
    where = f"{path} images[{i}]"
    if _field(entry, "split", where) in _KARPATHY_SPLITS[split]:
      sentences = _list(_field(entry, "sentences", where), "sentences", where)
      captions = tuple(_field(s, "raw", f"{where} sentences") for s in sentences)
      out.append(Example(id=str(image_id(entry, where)), media=(image_path(entry, where),),
                         captions=captions))
  return _check_media(out)


def _read_coco(root: str, split: str) -> list[Example]:
  image = lambda e, w: _join(root, _field(e, "filepath", w), _field(e, "filename", w))
  return _karpathy(root, split, "dataset_coco.json", image, lambda e, w: _field(e, "cocoid", w))


def _read_flickr30k(root: str, split: str) -> list[Example]:
  image = lambda e, w: _join(root, "flickr30k-images", _field(e, "filename", w))
  image_id = lambda e, w: os.path.splitext(_field(e, "filename", w))[0]
  return _karpathy(root, split, "dataset_flickr30k.json", image, image_id)


# VQA: the VQA API's questions + annotations files (VQAv2, OK-VQA).


def _vqa(root: str, split: str, questions_file: str, annotations_file: str) -> list[Example]:
  """Questions joined to their annotations by question_id."""
  q_path, a_path = _join(root, questions_file), _join(root, annotations_file)
  questions = _list(_field(_json(q_path), "questions", q_path), "questions", q_path)
  annotations = _list(_field(_json(a_path), "annotations", a_path), "annotations", a_path)
  by_id = {_field(a, "question_id", f"{a_path} annotations[{i}]"): a
           for i, a in enumerate(annotations)}
  out = []
  for i, q in enumerate(questions):
    where = f"{q_path} questions[{i}]"
    qid = _field(q, "question_id", where)
    if qid not in by_id:
      raise ValueError(f"{where}: question_id {qid} has no annotation in {a_path!r}.")
    a_where = f"{a_path} (question_id {qid})"
    answers = _list(_field(by_id[qid], "answers", a_where), "answers", a_where)
    out.append(Example(
        id=str(qid), media=(_coco_image(root, split, _int(q, "image_id", where)),),
        question=_field(q, "question", where),
        answers=tuple(_field(x, "answer", f"{a_where} answers") for x in answers)))
  return _check_media(out)


def _read_vqav2(root: str, split: str) -> list[Example]:
  return _vqa(root, split, f"v2_OpenEnded_mscoco_{split}2014_questions.json",
              f"v2_mscoco_{split}2014_annotations.json")


def _read_okvqa(root: str, split: str) -> list[Example]:
  return _vqa(root, split, f"OpenEnded_mscoco_{split}2014_questions.json",
              f"mscoco_{split}2014_annotations.json")


def _read_textvqa(root: str, split: str) -> list[Example]:
  path = _join(root, f"TextVQA_0.5.1_{split}.json")
  out = []
  for i, q in enumerate(_list(_field(_json(path), "data", path), "data", path)):
    where = f"{path} data[{i}]"
    out.append(Example(
        id=str(_field(q, "question_id", where)),
        media=(_join(root, "train_images", f"{_field(q, 'image_id', where)}.jpg"),),
        question=_field(q, "question", where),
        answers=tuple(_list(_field(q, "answers", where), "answers", where))))
  return _check_media(out)


def _read_vizwiz(root: str, split: str) -> list[Example]:
  path = _join(root, "Annotations", f"{split}.json")
  out = []
  for i, q in enumerate(_list(_json(path), "the file", path)):
    where = f"{path} [{i}]"
    image = _field(q, "image", where)
    answers = _list(_field(q, "answers", where), "answers", where)
    out.append(Example(id=image, media=(_join(root, split, image),),
                       question=_field(q, "question", where),
                       answers=tuple(_field(x, "answer", f"{where} answers") for x in answers)))
  return _check_media(out)


# Classification.


def _read_hateful_memes(root: str, split: str) -> list[Example]:
  path = _join(root, f"{split}.jsonl")
  out = []
  for n, line in enumerate(_jsonl(path), 1):
    where = f"{path} line {n}"
    label = _field(line, "label", where)
    if label not in (0, 1):
      raise ValueError(f"{where}: expected label 0 or 1; got {label!r}.")
    image = posixpath.basename(_field(line, "img", where))
    out.append(Example(id=str(_field(line, "id", where)), media=(_join(root, "img", image),),
                       text=_field(line, "text", where), label=label))
  return _check_media(out)


# Video QA (Xu et al., 2017: MSRVTT-QA and MSVD-QA).


def _video_qa(path: str, video_path) -> list[Example]:
  """Examples of a {split}_qa.json list; video_path maps (video_id, where) to a file."""
  out = []
  for i, q in enumerate(_list(_json(path), "the file", path)):
    where = f"{path} [{i}]"
    out.append(Example(
        id=str(_field(q, "id", where)), video=True,
        media=(video_path(_int(q, "video_id", where), where),),
        question=_field(q, "question", where), answers=(str(_field(q, "answer", where)),)))
  return _check_media(out)


def _folder(root: str, folders: Iterable[str]) -> str:
  """The first of root/folder that exists (releases unpack videos differently), looked up once per
  split; the first when none does, so the missing-file error names where a video was expected."""
  candidates = [_join(root, folder) for folder in folders]
  return next((c for c in candidates if epath.Path(c).is_dir()), candidates[0])


def _read_msrvtt_qa(root: str, split: str) -> list[Example]:
  folder = _folder(root, ["video", "TestVideo" if split == "test" else "TrainValVideo"])
  video = lambda video_id, where: _join(folder, f"video{video_id}.mp4")
  return _video_qa(_join(root, f"{split}_qa.json"), video)


def _youtube_mapping(path: str) -> dict[int, str]:
  """MSVD-QA's youtube_mapping.txt: '<clip name> vid<N>' per line -> {N: clip name}."""
  mapping = {}
  for n, line in enumerate(_text(path).splitlines(), 1):
    parts = line.split()
    if not parts:
      continue
    if len(parts) != 2 or not parts[1].startswith("vid") or not parts[1][3:].isdigit():
      raise ValueError(f"{path} line {n}: expected '<clip name> vid<N>'; got {line!r}.")
    mapping[int(parts[1][3:])] = parts[0]
  return mapping


def _read_msvd_qa(root: str, split: str) -> list[Example]:
  renamed = _join(root, "video")  # the MSVD-QA code's layout: clips renamed to vid<N>.avi
  if epath.Path(renamed).is_dir():
    video = lambda video_id, where: _join(renamed, f"vid{video_id}.avi")
    return _video_qa(_join(root, f"{split}_qa.json"), video)
  mapping_path = _join(root, "youtube_mapping.txt")
  mapping = _youtube_mapping(mapping_path)

  def clip(video_id, where):
    if video_id not in mapping:
      raise ValueError(f"{where}: video_id {video_id} is not in {mapping_path!r}.")
    return _join(root, "YouTubeClips", f"{mapping[video_id]}.avi")
  return _video_qa(_join(root, f"{split}_qa.json"), clip)


BENCHMARKS: dict[str, Benchmark] = {
    "coco": Benchmark("captioning", ("train", "val", "test"), "train", "test", _read_coco),
    "flickr30k": Benchmark("captioning", ("train", "val", "test"), "train", "test",
                           _read_flickr30k),
    "vqav2": Benchmark("vqa", ("train", "val"), "train", "val", _read_vqav2),
    "okvqa": Benchmark("vqa", ("train", "val"), "train", "val", _read_okvqa),
    "textvqa": Benchmark("vqa", ("train", "val"), "train", "val", _read_textvqa),
    "vizwiz": Benchmark("vqa", ("train", "val"), "train", "val", _read_vizwiz),
    # Flamingo reports Hateful Memes on test seen (phase 2 release, which labels it).
    "hateful_memes": Benchmark(
        "classification", ("train", "dev", "dev_seen", "dev_unseen", "test_seen", "test_unseen"),
        "train", "test_seen", _read_hateful_memes),
    "msrvtt_qa": Benchmark("vqa", ("train", "val", "test"), "train", "test", _read_msrvtt_qa),
    "msvd_qa": Benchmark("vqa", ("train", "val", "test"), "train", "test", _read_msvd_qa),
}

# Splits whose official files carry no answers (scored only by the owners' evaluation servers).
_UNANSWERED = {
    "vqav2": ("test-dev", "test", "test-dev2015", "test2015"),
    "textvqa": ("test",),
    "vizwiz": ("test",),
    "hateful_memes": ("test",),
}


def _check_split(name: str, split: str) -> None:
  bench = BENCHMARKS[name]
  if split in bench.splits:
    return
  if split in _UNANSWERED.get(name, ()):
    raise ValueError(f"benchmarks.read({name!r}): split {split!r} has no public answers (its "
                     f"official files hold none; only the evaluation server scores it); expected "
                     f"one of {list(bench.splits)}, e.g. {bench.query_split!r}.")
  raise ValueError(f"benchmarks.read({name!r}): unknown split {split!r}; expected one of "
                   f"{list(bench.splits)}.")


def read(name: str, root: str, split: str) -> list[Example]:
  """The examples of benchmark `name`'s `split` from its files under `root` (see the module
  docstring for each layout); errors name the benchmark, split or file at fault."""
  if name not in BENCHMARKS:
    raise ValueError(f"benchmarks.read: unknown benchmark {name!r}; expected one of "
                     f"{sorted(BENCHMARKS)}.")
  _check_split(name, split)
  root = paths.resolve(os.fspath(root))
  if not epath.Path(root).is_dir():
    raise FileNotFoundError(f"benchmarks.read({name!r}): root directory {root!r} is missing.")
  return BENCHMARKS[name].read(root, split)
