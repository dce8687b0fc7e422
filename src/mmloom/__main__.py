import sys

from mmloom.cli.main import main

sys.exit(main())
