"""Prepares your own data as a TFDS dataset the trainer reads with no code.

  python -m flamingo_jax.data.prepare {interleaved,pairs,video} --src=SRC --out=DATA_DIR \
      --name=NAME [--images=TARS] [--max_size=PIXELS] [--rows_per_shard=1000] [--num_workers=CORES]
      [--fps=1 --max_frames=32 --min_frames=2]

then train on it with, e.g.
  --config.input.datasets.docs.tfds_name=NAME --config.input.datasets.docs.data_dir=DATA_DIR
  --config.input.datasets.docs.split=train

--src (a file, a folder, or a glob such as 'shards/*.tar'; local or gs://, as --out):
  interleaved  JSONL of MMC4 or OBELICS documents (images: paths relative to the JSONL, or members
               of the --images tars), or
               WebDataset tars whose `{key}.json` is such a document naming members of its sample
               ('{key}.0.jpg' or '0.jpg').
  pairs        CSV/TSV/Parquet/JSONL with `image_path` and `caption` (paths relative to the table),
               or WebDataset/img2dataset tars: `{key}.jpg|png|webp` with `{key}.txt` or a
               `{key}.json` holding "caption".
  video        CSV/TSV/Parquet/JSONL with `video_path` and `caption`, or WebDataset tars:
               `{key}.mp4|webm|mkv|mov|avi` with `{key}.txt` or `{key}.json` "caption". Frames are
               kept at --fps (the paper's 1 FPS), at most --max_frames of them.
--images: comma-separated tar files or globs (local or gs://) holding the media a table names, by
  member path, file name or key ('x.jpg' or 'x' for 'part/x.jpg'); instead of files beside it.
--max_size: longer side of stored images and frames (default 0: as they are); images otherwise
  keep their encoded bytes (records.py, encode.py).

An interrupted run resumes where it stopped when rerun with the same flags (writer.py); a finished
one just prints its report (also in DATA_DIR/NAME/1.0.0/prepare_report.json).
"""
import argparse
import os
import re

import tensorflow_datasets as tfds

from flamingo_jax.data.prepare import records
from flamingo_jax.data.prepare import report as report_lib
from flamingo_jax.data.prepare import writer


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m flamingo_jax.data.prepare', description=__doc__.split('\n\n')[0],
      epilog=__doc__.split('\n\n', 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('kind', choices=records.KINDS)
  parser.add_argument('--src', required=True, help='input file, folder or glob')
  parser.add_argument('--out', required=True, help='the TFDS data_dir to write into')
  parser.add_argument('--name', required=True, help='the dataset name (config tfds_name)')
  parser.add_argument('--images', default='', help='tar files or globs holding the media')
  defaults = records.Options()
  parser.add_argument('--max_size', type=int, default=defaults.max_size)
  parser.add_argument('--fps', type=float, default=defaults.fps)
  parser.add_argument('--max_frames', type=int, default=defaults.max_frames)
  parser.add_argument('--min_frames', type=int, default=defaults.min_frames)
  parser.add_argument('--rows_per_shard', type=int, default=1000)
  parser.add_argument('--num_workers', type=int, default=os.cpu_count(),
                      help='processes writing shards (0: this one)')
  return parser


def main(argv: list[str] | None = None) -> dict:
  args = _parser().parse_args(argv)
  if not re.fullmatch(r'[a-z][a-z0-9_]*', args.name):
    raise SystemExit(f'--name={args.name!r}: expected a snake_case TFDS name ([a-z][a-z0-9_]*).')
  if args.name in tfds.list_builders(with_community_datasets=False):
    raise SystemExit(f'--name={args.name!r} is a registered TFDS dataset, which tfds.builder '
                     'would open instead of yours; choose another name.')
  for flag in ('max_size', 'max_frames', 'min_frames', 'num_workers'):
    if getattr(args, flag) < 0 or (flag == 'max_frames' and args.max_frames < 1):
      raise SystemExit(f'--{flag}={getattr(args, flag)}: expected a non-negative count '
                       '(--max_frames at least 1).')
  options = records.Options(max_size=args.max_size, fps=args.fps, max_frames=args.max_frames,
                            min_frames=args.min_frames)
  report = writer.prepare(args.kind, args.src, args.out, args.name, options=options,
                          rows_per_shard=args.rows_per_shard, num_workers=args.num_workers,
                          images=args.images)
  print(report_lib.text(report))
  return report


if __name__ == '__main__':
  main()
