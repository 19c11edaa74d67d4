"""Shards to a TFDS dataset, resumably: `DATA_DIR/NAME/1.0.0/`, as `tfds.builder(NAME,
data_dir=DATA_DIR, file_format='array_record')` reads it (the read-only builder of a folder).

Layout (N shards, as planned from --src):
  NAME-train.array_record-0000i-of-0000N   shard i's records (empty if all of it was skipped)
  _prepare/plan.json                       the kind, options and shards (a rerun must agree)
  _prepare/0000i.json                      shard i is done: its record count and skips
  dataset_info.json, features.json         written last, once every shard is done
  prepare_report.json                      records written and skips by reason

A shard is written to a local temporary file, copied into place (local or gs://), and only then
marked done, so an interrupted run redoes exactly the shards without a marker.

Shards are independent (`write_shard(job)`), so spreading them beyond one machine's processes only
needs a runner that maps write_shard over the jobs. Apache Beam is not that runner yet: every
release from 2.60 to 2.77 would downgrade protobuf (7 -> 6.33 or older) and pyarrow (26 -> 25 or
older), from 2.72 also pillow (13 -> 12.3) (`pip install --dry-run`, December 2026).
"""
import dataclasses
import json
import multiprocessing
import os
import tempfile

from array_record.python import array_record_module
from etils import epath
import tensorflow_datasets as tfds
import tqdm

from flamingo_jax.data.prepare import records
from flamingo_jax.data.prepare import report as report_lib
from flamingo_jax.data.prepare import sources

VERSION = '1.0.0'
SPLIT = 'train'


@dataclasses.dataclass(frozen=True)
class Job:
  """One shard to write (what a worker process needs; picklable)."""
  kind: str
  name: str
  dataset_dir: str
  index: int
  num_shards: int
  shard: dict
  options: records.Options
  images: tuple[str, ...] = ()  # The --images tar files.


def shard_path(dataset_dir, name: str, index: int, num_shards: int) -> epath.Path:
  return epath.Path(dataset_dir) / f'{name}-{SPLIT}.array_record-{index:05d}-of-{num_shards:05d}'


def _marker(dataset_dir, index: int) -> epath.Path:
  return epath.Path(dataset_dir) / '_prepare' / f'{index:05d}.json'


def write_shard(job: Job) -> dict:
  """Writes one shard and its done marker; returns the marker ({'records', 'bytes', 'skipped'})."""
  skips, features, count = report_lib.Skips(), records.features(job.kind), 0
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, 'shard.array_record')
    writer = array_record_module.ArrayRecordWriter(local, 'group_size:1')  # As TFDS writes them.
    for name, doc, load in sources.samples(job.shard, skips, job.images):
      try:
        example = records.record(job.kind, doc, load, name, job.options)
      except report_lib.Skip as s:
        skips.add(s.reason, s.name or name)
        continue
      writer.write(features.serialize_example(example))
      count += 1
    writer.close()
    num_bytes = os.path.getsize(local)
    path = shard_path(job.dataset_dir, job.name, job.index, job.num_shards)
    epath.Path(local).copy(path, overwrite=True)
  marker = {'records': count, 'bytes': num_bytes, 'skipped': skips.counts}
  _marker(job.dataset_dir, job.index).write_text(json.dumps(marker))
  return marker


def _check_plan(dataset_dir: epath.Path, plan: dict) -> None:
  """Saves the plan, or checks that a resumed run has the same one."""
  path = dataset_dir / '_prepare' / 'plan.json'
  if path.exists():
    saved = json.loads(path.read_text())
    if saved != plan:
      raise ValueError(f'{path}: this dataset was started with another plan (kind, --src files or '
                       'options differ); rerun with the same flags to resume it, or choose another '
                       '--name or --out.')
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(plan, indent=1))


def _write_info(kind: str, name: str, dataset_dir: epath.Path, shard_lengths: list[int],
                num_bytes: int) -> None:
  """dataset_info.json and features.json, as the TFDS builders' (what `tfds.builder` reads)."""
  info = tfds.core.DatasetInfo(
      builder=tfds.core.DatasetIdentity(name=name, version=tfds.core.Version(VERSION),
                                        data_dir=os.fspath(dataset_dir), module_name=''),
      description=f'{kind} records prepared by flamingo_jax.data.prepare.',
      features=records.features(kind))
  info.set_file_format(tfds.core.FileFormat.ARRAY_RECORD)
  template = tfds.core.ShardedFileTemplate(data_dir=dataset_dir, dataset_name=name, split=SPLIT,
                                           filetype_suffix='array_record')
  info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
      name=SPLIT, shard_lengths=shard_lengths, num_bytes=num_bytes, filename_template=template)]))
  info.write_to_directory(dataset_dir)


def prepare(kind: str, src: str, out: str, name: str, *, options: records.Options,
            rows_per_shard: int = 1000, num_workers: int = 0, images: str = '') -> dict:
  """Prepares (or resumes, or just reports) dataset `name` under `out`; returns the report.

  num_workers: processes writing shards in parallel (0: in this process).
  images: comma-separated tar files or globs holding the media that a table's references name
    (sources.py, media_shards.py); '' for media files beside the table.
  """
  if kind not in records.KINDS:
    raise ValueError(f'kind={kind!r}; expected one of {records.KINDS}.')
  if rows_per_shard < 1:
    raise ValueError(f'--rows_per_shard={rows_per_shard}; expected at least 1.')
  dataset_dir = epath.Path(out) / name / VERSION
  shards = sources.plan(src, rows_per_shard, records.COLUMNS[kind])
  files = tuple(f for glob in filter(None, images.split(","))
                for f in sources.list_files(glob, '--images'))
  tars = [s['path'] for s in shards if sources.is_tar(s['path'])]
  if files and tars:
    raise ValueError(f'--images with --src={src!r}: {tars[0]} is a tar, whose samples hold their '
                     'own media; --images is for tables (JSONL, CSV, TSV, Parquet).')
  plan = {'kind': kind, 'shards': shards, 'options': dataclasses.asdict(options)}
  _check_plan(dataset_dir, {**plan, 'images': list(files)} if files else plan)
  report_path = dataset_dir / 'prepare_report.json'
  if report_path.exists():
    return json.loads(report_path.read_text())
  jobs = [Job(kind, name, os.fspath(dataset_dir), i, len(shards), shard, options, files)
          for i, shard in enumerate(shards) if not _marker(dataset_dir, i).exists()]
  bar = tqdm.tqdm(total=len(shards), initial=len(shards) - len(jobs), unit='shard',
                  desc=f'prepare {name}')
  if num_workers and len(jobs) > 1:
    # spawn: TensorFlow is loaded here, and forking a process that runs its threads can hang.
    with multiprocessing.get_context('spawn').Pool(min(num_workers, len(jobs))) as pool:
      for _ in pool.imap_unordered(write_shard, jobs):
        bar.update()
  else:
    for job in jobs:
      write_shard(job)
      bar.update()
  bar.close()
  markers = [json.loads(_marker(dataset_dir, i).read_text()) for i in range(len(shards))]
  skips = report_lib.Skips()
  for marker in markers:
    skips.merge(marker['skipped'])
  lengths = [m['records'] for m in markers]
  _write_info(kind, name, dataset_dir, lengths, sum(m['bytes'] for m in markers))
  report = {'name': name, 'kind': kind, 'src': src, 'dataset_dir': os.fspath(dataset_dir),
            'num_shards': len(shards), 'records_written': sum(lengths),
            'records_skipped': skips.total(), 'skipped': skips.counts}
  report_path.write_text(json.dumps(report, indent=1))
  return report
