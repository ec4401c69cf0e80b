import sys

from stepaudio2_gateway.cli import main

sys.exit(main())
