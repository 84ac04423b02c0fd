from saekit.cli import main
import sys

sys.exit(main())
