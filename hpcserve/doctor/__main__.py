import sys

from hpcserve.doctor.node import main

sys.exit(main())
