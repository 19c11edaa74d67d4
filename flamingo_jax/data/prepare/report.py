"""Skipped records, counted by reason: a prepared dataset drops nothing silently.

A shard's counts travel in its done marker (JSON); the report merges every shard's. Each count is
of records, except 'truncated_shard', which counts tar files that end early: the records that were
in a lost tail cannot be counted, so the report names the file instead.
"""
import dataclasses

# Why a record can be left out; `Skip.reason` is one of these.
REASONS = ('malformed_record', 'missing_file', 'unreadable_image', 'unreadable_video',
           'image_position_mismatch', 'empty_text', 'non_utf8', 'too_short_video',
           'truncated_shard')
NUM_EXAMPLES = 5  # File names kept per reason.


class Skip(Exception):
  """Leaves one record out, for `reason`; `name` is the offending file (or record)."""

  def __init__(self, reason: str, name: str = '', detail: str = ''):
    if reason not in REASONS:
      raise ValueError(f'skip reason {reason!r}; expected one of {REASONS}.')
    super().__init__(f'{reason}: {name} {detail}'.strip())
    self.reason, self.name = reason, name


@dataclasses.dataclass
class Skips:
  """{reason: {'count': int, 'examples': [first NUM_EXAMPLES names]}}."""
  counts: dict = dataclasses.field(default_factory=dict)

  def add(self, reason: str, name: str, count: int = 1) -> None:
    entry = self.counts.setdefault(reason, {'count': 0, 'examples': []})
    entry['count'] += count
    if name and len(entry['examples']) < NUM_EXAMPLES:
      entry['examples'].append(name)

  def merge(self, counts: dict) -> None:
    for reason, other in counts.items():
      entry = self.counts.setdefault(reason, {'count': 0, 'examples': []})
      entry['count'] += other['count']
      entry['examples'] = (entry['examples'] + other['examples'])[:NUM_EXAMPLES]

  def total(self) -> int:
    return sum(e['count'] for e in self.counts.values())


def text(report: dict) -> str:
  """The report as the lines printed at the end of a run."""
  lines = [f"{report['name']}: {report['records_written']} records written to "
           f"{report['dataset_dir']} ({report['num_shards']} shards); "
           f"{report['records_skipped']} skipped."]
  for reason, entry in sorted(report['skipped'].items()):
    lines.append(f"  {reason}: {entry['count']} (e.g. {', '.join(entry['examples'])})")
  return '\n'.join(lines)
