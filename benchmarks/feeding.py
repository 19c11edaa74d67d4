"""Can one TPU host's CPUs feed Flamingo-3B? Examples/s the trainer's input delivers per core.

What one host must deliver. A v4 host drives 4 chips; the 3B config (configs/flamingo_3b.py,
common.paper_input) has global batches M3W 256, ALIGN 512, LTIP 512, VTP 64 per step, and
benchmarks/AOT.md's 3b/v4-128 row (64 chips = 16 hosts) a step of 0.27 s at 50% MFU. Per host
and second: global batch / 16 hosts / 0.27 s (the last line below).

What it delivers. The trainer's input (train/input.py -> data/mixture.py) reads each prepared
dataset by random access (`tfds.builder(...).as_data_source`, ArrayRecord) and runs the config's
pp string on each example, in Python: TFDS's feature decoding (PIL), then `decode|resize_pad(320)|
normalize(...)` (NFNet-F6's pixels at the 3B config's image_size 320) and the tokenize op. It runs
either in `config.input.num_workers` threads of the training process (the paper configs set 8) or
in `config.input.worker_processes` spawned processes. Threads overlap only where the work releases
the GIL: PIL's JPEG decoding and resizing and numpy's larger array operations do; the Python
around them (TFDS's feature decoding, the pp ops' glue, tokenization) holds it. Processes share no
GIL but pickle every example back to the trainer. With 2 workers, 'CPU use' (the trainer's and its
worker processes' CPU time per second) near 2.0 means both cores were busy; near 1.0, the GIL
serialised them. Cores needed = examples/s required / examples per CPU-second (ideal scaling).

The sources are synthetic but shaped like the real ones and go through the prepare CLI in a temp
dir: 640x480 JPEGs (smooth colour fields plus noise, ~50 KB), OBELICS-style documents of 3-6
images and ~300 words with the images in a separate tar shard (--images), WebDataset image-text
pairs, and 8 s 640x360 H.264 clips stored at 1 FPS.

python benchmarks/feeding.py --results=benchmarks/RESULTS.md   # on an idle host
python benchmarks/feeding.py --records=40 --seconds=2 --results=  # quick look, no file
python benchmarks/feeding.py --workers= --processes=1,2 --results=  # worker processes only
"""
import argparse
import io
import json
import multiprocessing
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import time

import av
import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# pylint: disable=wrong-import-position
from benchmarks import machine_load
from flamingo_jax.configs import flamingo_3b
from flamingo_jax.data import mixture
from flamingo_jax.data import tokenizer as tokenizer_lib

HOSTS, CHIPS_PER_HOST, STEP_S = 16, 4, 0.27  # 3b/v4-128 in benchmarks/AOT.md.
# Measured source -> the 3B config's dataset whose pp it runs (and those it stands for).
SOURCES = {'interleaved': ('m3w', ('m3w',)), 'pairs': ('ltip', ('align', 'ltip')),
           'video': ('vtp', ('vtp',))}
SECTION = '# Input feeding per TPU host (`python benchmarks/feeding.py`)'
WORDS = [a + b for a in ('ka', 'lo', 'mi', 'ne', 'su', 'ta', 'ri', 'po', 'de', 'gu')
         for b in ('ro', 'ven', 'dal', 'mis', 'tuk', 'ple', 'sor', 'ba', 'ne', 'fi')]


def required(config) -> dict[str, float]:
  """Examples/s one host must deliver per dataset: global batch / hosts / step time."""
  return {name: ds.batch_size / HOSTS / STEP_S for name, ds in config.input.datasets.items()}


def _words(rng, n: int) -> str:
  return ' '.join(rng.choice(WORDS, n))


def _jpeg(rng, size=(640, 480)) -> bytes:
  field = Image.fromarray(rng.integers(0, 256, (12, 16, 3), np.uint8)).resize(size, Image.BICUBIC)
  pixels = np.asarray(field, np.int16) + rng.normal(0, 6, (size[1], size[0], 3)).astype(np.int16)
  buffer = io.BytesIO()
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, 'JPEG', quality=90)
  return buffer.getvalue()


def _tar(path: pathlib.Path, members: dict[str, bytes]) -> None:
  with tarfile.open(path, 'w') as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def _video(path: pathlib.Path, rng, seconds: int = 8, rate: int = 24) -> None:
  with av.open(str(path), 'w') as container:
    stream = container.add_stream('libx264', rate=rate)
    stream.width, stream.height, stream.pix_fmt = 640, 360, 'yuv420p'
    base = np.asarray(Image.open(io.BytesIO(_jpeg(rng, (640, 360)))))
    for i in range(seconds * rate):
      frame = np.roll(base, 4 * i, axis=1)  # A panning shot.
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, 'rgb24')))
    container.mux(stream.encode())


def make_sources(root: pathlib.Path, records: int, rng) -> dict[str, list[str]]:
  """Raw files of each kind under root; returns each kind's prepare CLI arguments."""
  pool = [_jpeg(rng) for _ in range(64)]  # Distinct images, reused by name.
  (root / 'raw').mkdir()
  docs, images = [], {}
  for d in range(records):
    texts, refs = [], []
    for i in range(rng.integers(3, 7)):
      name = f'{d:05d}_{i}.jpg'
      images[f'part/{name}'] = pool[rng.integers(len(pool))]
      texts += [_words(rng, 60), None]
      refs += [None, name]
    docs.append(json.dumps({'texts': texts + [_words(rng, 20)], 'images': refs + [None]}))
  (root / 'raw' / 'docs.jsonl').write_text('\n'.join(docs) + '\n')
  _tar(root / 'raw' / 'images-000.tar', images)
  pairs = {}
  for p in range(records):
    pairs[f'{p:06d}.jpg'] = pool[rng.integers(len(pool))]
    pairs[f'{p:06d}.txt'] = _words(rng, 15).encode()
  (root / 'raw' / 'pairs').mkdir()
  _tar(root / 'raw' / 'pairs' / '000.tar', pairs)
  (root / 'raw' / 'videos').mkdir()
  rows = ['video_path,caption']
  for v in range(max(records // 8, 4)):  # Video is 3% of the mixture; fewer clips suffice.
    _video(root / 'raw' / 'videos' / f'{v:04d}.mp4', rng)
    rows.append(f'{v:04d}.mp4,{_words(rng, 12)}')
  (root / 'raw' / 'videos' / 'captions.csv').write_text('\n'.join(rows) + '\n')
  raw = root / 'raw'
  return {'interleaved': [f'--src={raw}/docs.jsonl', f'--images={raw}/images-*.tar'],
          'pairs': [f'--src={raw}/pairs'],
          'video': [f'--src={raw}/videos/captions.csv']}


def prepare(root: pathlib.Path, args: dict[str, list[str]]) -> None:
  for kind, flags in args.items():
    subprocess.run([sys.executable, '-m', 'flamingo_jax.data.prepare', kind, *flags,
                    f'--out={root}/data', f'--name=feeding_{kind}', '--num_workers=2',
                    '--rows_per_shard=64'], check=True, capture_output=True)


def _cpu_seconds() -> float:
  """CPU seconds of this process and of its live child processes (the pp workers), from /proc."""
  total = time.process_time()
  for child in multiprocessing.active_children():
    with open(f'/proc/{child.pid}/stat') as f:
      utime, stime = f.read().rsplit(')', 1)[1].split()[11:13]  # Fields 14 and 15.
    total += (int(utime) + int(stime)) / os.sysconf('SC_CLK_TCK')
  return total


def measure(root: pathlib.Path, config, tokenizer: str, kind: str, mode: str, workers: int,
            seconds: float) -> dict[str, float]:
  """Examples/s and CPU-seconds of the trainer's Mixture over one prepared source, its pp in
  `workers` threads or processes (`mode`)."""
  name = SOURCES[kind][0]
  ds = dict(config.input.datasets[name], tfds_name=f'feeding_{kind}', data_dir=f'{root}/data',
            batch_size=int(np.ceil(required(config)[name] * STEP_S)))  # One host's share.
  parallel = {'num_workers' if mode == 'threads' else 'worker_processes': workers}
  with mixture.Mixture({name: ds}, {name: mixture.open_source(ds['tfds_name'], 'train',
                                                              ds['data_dir'], name)},
                       tokenizer=tokenizer, seed=0, process_index=0, process_count=1,
                       **parallel) as feed:
    next(feed)  # Warm-up: opens files, builds the permutation, starts the worker processes.
    examples, start, cpu = 0, time.perf_counter(), _cpu_seconds()
    while time.perf_counter() - start < seconds:
      examples += len(next(feed)[name]['tokens'])
    wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
  return {'examples/s': examples / wall, 'per CPU-s': examples / cpu, 'CPU use': cpu / wall}


def table(config, results: dict, load: machine_load.OtherCpu) -> str:
  need = required(config)
  lines = [load.describe() + ('' if load.idle() else
                              ' — **loaded host: these numbers understate an idle host**') + '.',
           '',
           '| source (pp of) | pp workers | examples/s | examples per CPU-s | CPU use '
           '| host needs examples/s | cores needed |', '|---|---|---|---|---|---|---|']
  for (kind, mode, workers), r in results.items():
    name, stands_for = SOURCES[kind]
    rate = sum(need[n] for n in stands_for)
    lines.append(f"| {kind} ({name}) | {mode} {workers} | {r['examples/s']:.1f} "
                 f"| {r['per CPU-s']:.1f} "
                 f"| {r['CPU use']:.2f} | {rate:.1f} ({' + '.join(stands_for)}) "
                 f"| {rate / r['per CPU-s']:.1f} |")
  first = {kind: r for (kind, _, _), r in reversed(results.items())}  # Each source's first.
  cores = sum(sum(need[n] for n in SOURCES[k][1]) / r['per CPU-s'] for k, r in first.items())
  lines += ['', f'One host needs {sum(need.values()):.0f} examples/s '
            f"({', '.join(f'{n} {v:.1f}' for n, v in need.items())}: global batch / {HOSTS} "
            f"hosts / {STEP_S} s); at each source's first-row rate above that is {cores:.1f} "
            'cores of pp (ideal scaling).']
  return '\n'.join(lines)


def write_section(path: str, text: str) -> None:
  """Replaces this benchmark's section of `path` (from SECTION to the next '# '), or appends it."""
  old = pathlib.Path(path).read_text() if os.path.exists(path) else ''
  head, found, rest = old.partition(SECTION)
  tail = rest[rest.find('\n# ') + 1:] if found and '\n# ' in rest else ''
  pathlib.Path(path).write_text(f'{head.rstrip()}\n\n{text}\n\n{tail}'.strip() + '\n')


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--records', type=int, default=256, help='documents and pairs to make')
  parser.add_argument('--seconds', type=float, default=10.0, help='timed per source and setting')
  parser.add_argument('--workers', default='1,2', help='config.input.num_workers (threads)')
  parser.add_argument('--processes', default='1,2', help='config.input.worker_processes values')
  parser.add_argument('--results', default='benchmarks/RESULTS.md', help="'' = print only")
  args = parser.parse_args(argv)
  config = flamingo_3b.get_config()
  with tempfile.TemporaryDirectory() as tmp, machine_load.OtherCpu() as load:
    root = pathlib.Path(tmp)
    rng = np.random.default_rng(0)
    prepare(root, make_sources(root, args.records, rng))
    tokenizer_lib.train_sentencepiece(
        [_words(rng, 20) for _ in range(2000)], 1000, f'{tmp}/sp.model')
    settings = [(mode, int(n)) for mode, values in (('threads', args.workers),
                                                    ('processes', args.processes))
                for n in values.split(',') if n]
    results = {(kind, mode, n): measure(root, config, f'{tmp}/sp.model', kind, mode, n,
                                        args.seconds)
               for kind in SOURCES for mode, n in settings}
  text = table(config, results, load)
  command = ' '.join(['python', 'benchmarks/feeding.py', *(argv or sys.argv[1:])])
  section = (f'{SECTION}\n\n{__doc__.split(chr(10) * 2, 1)[1].rsplit(chr(10) * 2, 1)[0]}\n\n'
             f'Command: `{command}` on {os.cpu_count()} cores, {time.strftime("%Y-%m-%d")}.\n\n'
             f'{text}')
  print(section)
  if args.results:
    write_section(args.results, section)
  return section


if __name__ == '__main__':
  main()
