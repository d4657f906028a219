"""``python -m stream_jobs.bench`` (``make bench``)."""

import sys

from stream_jobs.bench.run import main

sys.exit(main())
