import sys

from hpcserve.batch.cli import main

sys.exit(main())
