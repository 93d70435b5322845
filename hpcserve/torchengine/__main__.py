import sys

from hpcserve.torchengine.app import main

sys.exit(main(sys.argv[1:]))
