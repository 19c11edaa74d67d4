"""Reading the formats people have, as samples `(name, doc, load)`.

`doc` is a dict (a table row, a JSONL line, or a WebDataset sample's `{key}.json` with its
`{key}.txt` as 'caption'); `load(ref)` returns the bytes of the media file `ref` names: a path
relative to the table's folder (or absolute, or gs://) for tables, or a member of the `--images`
tar shards (media_shards.py); a member of the same sample for tar shards. What each kind makes of
them is records.py's business.

A shard is the unit of work (and of resume): one tar file, or `rows_per_shard` rows of one table
(JSONL, CSV, TSV or Parquet). Problems with one sample are counted in `skips` and reading goes on;
a tar file that ends early (truncated) counts once as 'truncated_shard', keeping the samples before.
"""
import csv
import io
import itertools
import json
import os
import tarfile
import zlib
from typing import Callable, Iterator

from etils import epath
import pyarrow.parquet as pq

from flamingo_jax import paths  # noqa: F401  (pins epath's gs:// to gcsfs before first use)
from flamingo_jax.data.prepare import media_shards
from flamingo_jax.data.prepare.report import Skip, Skips

TABLES = ('.jsonl', '.csv', '.tsv', '.parquet')
TARS = ('.tar', '.tar.gz', '.tgz')
Sample = tuple[str, dict, Callable[[str], bytes]]


def _format(path: str) -> str:
  for suffix in TABLES + TARS:
    if path.endswith(suffix):
      return suffix
  return ''


def is_tar(path: str) -> bool:
  return _format(path) in TARS


def list_files(src: str, flag: str = '--src') -> list[str]:
  """The input files `src` (given as `flag`) names: one file, a folder's table and tar files (not
  recursive), or a glob in its last component (`shards/*.tar`)."""
  path = epath.Path(src)
  if any(c in path.name for c in '*?['):
    files = sorted(path.parent.glob(path.name))
  elif path.is_dir():
    files = sorted(p for p in path.iterdir() if _format(p.name))
  else:
    files = [path] if path.exists() else []
  files = [os.fspath(p) for p in files]
  if not files:
    raise ValueError(f'{flag}={src!r}: no input files; expected a file, a folder or a glob of '
                     f'{", ".join(TABLES + TARS)} files.')
  unknown = [f for f in files if not _format(f)]
  if unknown:
    raise ValueError(f'{flag}={src!r}: {unknown[:3]} have no known suffix; expected one of '
                     f'{", ".join(TABLES + TARS)}.')
  return files


def _table(path: str) -> Iterator[dict]:
  """The rows of a CSV, TSV or Parquet table as dicts (read whole: split big tables into files)."""
  with epath.Path(path).open('rb') as f:
    if _format(path) == '.parquet':
      yield from pq.read_table(f).to_pylist()
    else:
      text = io.TextIOWrapper(f, encoding='utf-8', errors='surrogateescape', newline='')
      yield from csv.DictReader(text, delimiter='\t' if _format(path) == '.tsv' else ',')


def _table_shards(path: str, rows_per_shard: int, columns: tuple[str, ...]) -> list[dict]:
  """A table's shards, after checking that a CSV/TSV/Parquet header has `columns`. A JSONL shard
  also keeps the byte offset of its first line, so that reading it seeks there."""
  if _format(path) == '.jsonl':
    shards, offset = [], 0
    with epath.Path(path).open('rb') as f:
      for i, line in enumerate(f):
        if i % rows_per_shard == 0:
          shards.append({'path': path, 'start': i, 'stop': i, 'offset': offset})
        shards[-1]['stop'], offset = i + 1, offset + len(line)
    return shards
  first = next(_table(path), None)
  missing = set(columns) - set(first or ())
  if missing:
    raise ValueError(f'{path}: no column(s) {sorted(missing)}; expected columns {list(columns)} '
                     f'(found {sorted(first or ())}).')
  rows = sum(1 for _ in _table(path))
  return [{'path': path, 'start': s, 'stop': min(s + rows_per_shard, rows), 'offset': 0}
          for s in range(0, rows, rows_per_shard)]


def plan(src: str, rows_per_shard: int, columns: tuple[str, ...]) -> list[dict]:
  """The shards of `src`: {'path', 'start', 'stop', 'offset'}: rows [start, stop) of a table (a
  JSONL's first at byte `offset`), or a whole tar file (all three 0)."""
  shards = []
  for path in list_files(src):
    if _format(path) in TARS:
      shards.append({'path': path, 'start': 0, 'stop': 0, 'offset': 0})
    else:
      shards += _table_shards(path, rows_per_shard, columns)
  return shards


def _file_loader(base: epath.Path) -> Callable[[str], bytes]:
  def load(ref: str) -> bytes:
    if not isinstance(ref, str) or not ref:
      raise Skip('malformed_record', str(ref), 'a media path must be a non-empty string')
    if ref.startswith(('http://', 'https://')):
      raise Skip('missing_file', ref, 'a URL: download the media first (e.g. img2dataset)')
    path = epath.Path(ref) if ref.startswith('gs://') or os.path.isabs(ref) else base / ref
    try:
      return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError) as e:
      raise Skip('missing_file', os.fspath(path)) from e
  return load


def _jsonl(shard: dict) -> Iterator[tuple[int, bytes]]:
  """(line index, line) of a JSONL shard's lines but blank ones, read from its byte offset."""
  with epath.Path(shard['path']).open('rb') as f:
    f.seek(shard['offset'])
    for i, line in enumerate(itertools.islice(f, shard['stop'] - shard['start']), shard['start']):
      if line.strip():  # Blank lines are no records.
        yield i, line


def _rows(shard: dict, skips: Skips, images: tuple[str, ...]) -> Iterator[Sample]:
  path = shard['path']
  load = media_shards.loader(images) if images else _file_loader(epath.Path(path).parent)
  if _format(path) == '.jsonl':
    rows = _jsonl(shard)
  else:
    rows = itertools.islice(enumerate(_table(path)), shard['start'], shard['stop'])
  for i, row in rows:
    name = f'{path}:{i + 1}'
    if isinstance(row, bytes):
      try:
        row = json.loads(row.decode('utf-8'))
      except UnicodeDecodeError:
        skips.add('non_utf8', name)
        continue
      except json.JSONDecodeError:
        row = None
    if not isinstance(row, dict):
      skips.add('malformed_record', name)
      continue
    yield name, row, load


def _members(path: str, skips: Skips) -> Iterator[tuple[str, bytes]]:
  """(member name, bytes) of a tar file's regular files, in order, until it ends or breaks."""
  try:
    with epath.Path(path).open('rb') as f, tarfile.open(fileobj=f, mode='r|*') as tar:
      for member in tar:
        if member.isfile():
          yield member.name, tar.extractfile(member).read()
  except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
    skips.add('truncated_shard', f'{path} ({e})')


def _split(member: str) -> tuple[str, str]:
  """WebDataset naming: 'dir/key.ext.more' -> ('dir/key', 'ext.more')."""
  folder, base = os.path.split(member)
  key, _, ext = base.partition('.')
  return os.path.join(folder, key), ext.lower()


IMAGES = ('jpg', 'jpeg', 'png', 'webp')
VIDEOS = ('mp4', 'webm', 'mkv', 'mov', 'avi')


def _group_doc(name: str, files: dict[str, bytes]) -> dict:
  """A sample's doc: its .json, with its .txt as 'caption' and its first image and video members
  as 'image_path' and 'video_path' (unless the .json names them); raises Skip for a bad one."""
  try:
    doc = json.loads(files['json'].decode('utf-8')) if 'json' in files else {}
    if isinstance(doc, dict) and 'txt' in files:
      doc['caption'] = files['txt'].decode('utf-8')
  except UnicodeDecodeError as e:
    raise Skip('non_utf8', name) from e
  except json.JSONDecodeError as e:
    raise Skip('malformed_record', name, f'its .json is not JSON: {e}') from e
  if not isinstance(doc, dict):
    raise Skip('malformed_record', name, 'its .json is not a JSON object')
  for field, exts in (('image_path', IMAGES), ('video_path', VIDEOS)):
    media = [ext for ext in files if ext in exts]
    if media:
      doc.setdefault(field, media[0])
  return doc


def _groups(shard: dict, skips: Skips) -> Iterator[Sample]:
  """WebDataset samples: consecutive members sharing a key ('dir/key.ext')."""
  path = shard['path']

  def sample(key, files):
    name, prefix = f'{path}:{key}', os.path.basename(key) + '.'

    def load(ref: str) -> bytes:  # 'key.0.jpg' or '0.jpg': a member of this sample.
      ext = str(ref).removeprefix(prefix).lower()
      if ext not in files:
        raise Skip('missing_file', f'{name}.{ext}', 'no such member in the sample')
      return files[ext]
    return name, _group_doc(name, files), load

  for key, members in itertools.groupby(_members(path, skips), key=lambda m: _split(m[0])[0]):
    try:
      yield sample(key, {_split(member)[1]: data for member, data in members})
    except Skip as s:
      skips.add(s.reason, s.name)


def samples(shard: dict, skips: Skips, images: tuple[str, ...] = ()) -> Iterator[Sample]:
  """The samples of one shard (see the module docstring); `images`: the --images tar files."""
  if _format(shard['path']) in TARS:
    return _groups(shard, skips)
  return _rows(shard, skips, images)
