"""The models lock: the commit each model's files came from (commit it to freeze a study)."""

import yaml

from kbit.logs import job
from kbit.io import write_text
from kbit.sources import lock_entries

with job(snakemake) as log:
    lock = lock_entries(dict(snakemake.params.dirs), dict(snakemake.params.entries))
    header = "# set `lock:` to this file in a study config to download exactly these commits\n"
    write_text(header + yaml.safe_dump(lock, sort_keys=False), snakemake.output[0])
    log.info("%d models locked", len(lock["models"]))
