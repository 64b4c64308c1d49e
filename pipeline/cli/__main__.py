"""`python -m rtpipe.pipeline.cli ...` is `rtpipe ...`."""

import sys

from rtpipe.pipeline.cli.main import main

sys.exit(main())
