"""Your own data (web documents, image-text pairs, videos) as TFDS datasets: see __main__.py.

sources.py reads the formats, records.py makes each kind's records (encode.py stores their media),
writer.py writes shards in parallel and resumably, report.py counts what was left out and why.
"""
