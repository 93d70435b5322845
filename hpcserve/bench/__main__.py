import sys

from hpcserve.bench import main

sys.exit(main())
