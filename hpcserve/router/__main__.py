import sys

from hpcserve.router import main

sys.exit(main())
