import sys

from hpcserve.mock import main

sys.exit(main())
